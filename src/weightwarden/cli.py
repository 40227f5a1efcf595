"""`warden`: a thin command line over the library API.  One command, one library call.

Every command that reports something takes ``--json``.  Any error prints one
line to stderr and exits 1.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from . import api, audit, trail
from ._term import SafeConsole, safe
from ._term import SafeTable as Table  # every table escapes its cells (text from files, requests, lists)
from .errors import CustodyError, KeyringError, WardenError
from .keys.local import KdfParams, Keyring, TrustStore, default_home
from .keys.provider import ed25519_key_id
from .sealed.bundle import SealedBundle

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Guard the weights of AI models.")
key_app = typer.Typer(no_args_is_help=True, help="Keys in the local keyring.")
trust_app = typer.Typer(no_args_is_help=True, help="Signers whose manifests `verify` accepts.")
custody_app = typer.Typer(no_args_is_help=True, help="M-of-N custodians of the keyring's root key.")
agent_app = typer.Typer(no_args_is_help=True, help="The custody agent (holds an unsealed keyring in memory).")
app.add_typer(key_app, name="key")
app.add_typer(trust_app, name="trust")
app.add_typer(custody_app, name="custody")
app.add_typer(agent_app, name="agent")
_audit_ctx: list[Any] = []
_passphrase_file: list[Path] = []  # --passphrase-file / WARDEN_PASSPHRASE_FILE (global)


@app.callback()
def _global(
    reason: Annotated[
        str, typer.Option("--reason", envvar="WARDEN_REASON", help="Why: recorded in the audit log.")
    ] = "",
    actor: Annotated[
        str | None, typer.Option("--actor", envvar="WARDEN_ACTOR", help="Who, if not the OS user.")
    ] = None,
    passphrase_file: Annotated[
        Path | None,
        typer.Option(
            "--passphrase-file",
            envvar="WARDEN_PASSPHRASE_FILE",
            show_default=False,
            help="Read the keyring passphrase from this file (or /dev/fd/N) instead of a prompt.",
        ),
    ] = None,
) -> None:
    _passphrase_file[:] = [passphrase_file] if passphrase_file is not None else []
    ctx = audit.context(actor=actor, reason=reason)
    ctx.__enter__()
    _audit_ctx.append(ctx)


out = SafeConsole()  # no markup; every string printed is escaped (weightwarden/_term.py)
err = SafeConsole(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON report.")]
HomeOpt = Annotated[
    Path | None, typer.Option("--home", envvar="WARDEN_HOME", help="Keyring directory.", show_default=False)
]


def _emit(obj: Any, as_json: bool, human: str | Table | list[str] | None = None) -> None:
    """JSON, or the human text: a list is printed line by line (each line escaped on its own, so that only our
    own line breaks reach the terminal)."""
    if as_json:
        sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    elif isinstance(human, list):
        for line in human:
            out.print(line)
    elif human is not None:
        out.print(human)


def _passphrase(confirm: bool = False) -> str:
    """The keyring passphrase: --passphrase-file (or WARDEN_PASSPHRASE_FILE), then WARDEN_PASSPHRASE
    (automation; long-lived processes never inherit it), then a prompt."""
    if _passphrase_file:
        from ._harden import read_secret_file

        return read_secret_file(_passphrase_file[0], "--passphrase-file")
    pw = os.environ.get("WARDEN_PASSPHRASE")
    if pw is not None:
        return pw
    if not sys.stdin.isatty():
        raise KeyringError("give the keyring passphrase with --passphrase-file FILE (or WARDEN_PASSPHRASE_FILE)")
    pw = getpass.getpass("Keyring passphrase: ")
    if confirm and getpass.getpass("Repeat passphrase: ") != pw:
        raise KeyringError("the passphrases differ")
    return pw


ProviderOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--provider", help="key provider URI: pkcs11:token=..;object=.. | awskms:///ARN | vault://MOUNT/keys/NAME"
    ),
]


SignerOpt = Annotated[
    str | None, typer.Option("--signer", help="sign with an Ed25519 key in an HSM: pkcs11:token=..;object=LABEL")
]


def _signer(kr: Any, uri: str | None, purpose: str | None = None) -> Any:
    if uri is None:
        return kr.signer()
    if not uri.startswith("pkcs11:"):
        raise WardenError("--signer takes a pkcs11: URI")
    from .keys.pkcs11 import signer_from_uri

    try:
        return signer_from_uri(uri, purpose=purpose)
    except ValueError as e:
        raise WardenError(str(e)) from None


def _uri_providers(uris: list[str] | None) -> list[Any]:
    from .keys.kms import from_uri

    out = []
    for u in uris or []:
        try:
            out.append(from_uri(u))
        except ValueError as e:
            raise WardenError(str(e)) from None
    return out


def _keyring(home: Path | None) -> Keyring:
    from .keys.agent import AgentKeyring, under_custody

    h = home or default_home()
    if under_custody(h):
        return AgentKeyring(h)  # type: ignore[return-value]
    return Keyring.unlock(h, _passphrase())


@contextlib.contextmanager
def _progress(total: int, what: str, enabled: bool, *, files: bool = False) -> Iterator[Any]:
    """A rich progress bar on stderr for operations that take over about a second
    (hidden for --json and non-terminals).  ``total`` counts bytes, or files."""
    if not enabled or total < (200 if files else 256 * 1024 * 1024) or not err.is_terminal:
        yield None
        return
    cols: tuple[Any, ...] = (BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    if not files:
        cols = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress("[progress.description]{task.description}", *cols, console=err, transient=True) as p:
        task = p.add_task(what, total=total)
        yield lambda n: p.advance(task, n)


def _sealed_size(path: Path, as_json: bool) -> int:
    """Plaintext bytes of a sealed file or bundle, for sizing a progress bar (0 when no bar is shown)."""
    if as_json or not err.is_terminal:
        return 0
    with api.open_sealed(path) as sealed:
        return sealed.data_len if isinstance(sealed, SealedBundle) else sealed.context.data_len


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


# -- keyring ----------------------------------------------------------------------------------
@app.command()
def init(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Create the local keyring (a KEK and a signing key) protected by a passphrase (Argon2id)."""
    kr = Keyring.create(home, _passphrase(confirm=True), kdf=_kdf_from_env())
    info = {"home": str(kr.home), "keys": kr.list_keys()}
    _emit(info, as_json, f"keyring created in {kr.home}")


def _kdf_from_env() -> KdfParams:
    # For automated test environments only: a cheaper Argon2id (never lower than RFC 9106 minimums).
    mem = os.environ.get("WARDEN_KDF_MEMORY_KIB")
    return KdfParams(time_cost=1, memory_kib=max(8, int(mem))) if mem else KdfParams()


@key_app.command("list")
def key_list(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List keys (ids, versions, states; never key material)."""
    keys = _keyring(home).list_keys()
    t = Table("key id", "kind", "purpose", "version", "state", "current", "default", "created")
    for k in keys:
        t.add_row(k["key_id"], k["kind"], k.get("purpose", "sealing"), str(k["version"]), k["state"], str(k["current"]),
                  str(k["default"]), k["created"])  # fmt: skip
    _emit(keys, as_json, t)


PurposeOpt = Annotated[
    str | None,
    typer.Option("--purpose", help="what the key is for: signing keys sealing | audit-log | export-rules; "
                 "KEKs sealing | tracing [default: sealing]", show_default=False),
]  # fmt: skip


@key_app.command("new")
def key_new(
    kind: Annotated[str, typer.Option(help="kek or signing")] = "kek",
    signing: Annotated[bool, typer.Option("--signing", help="a signing key (same as --kind signing)")] = False,
    purpose: PurposeOpt = None,
    name: Annotated[str | None, typer.Option(help="KEK name, e.g. one per model (so it can be shredded)")] = None,
    provider: Annotated[
        str | None, typer.Option("--provider", help="create it in this HSM instead: a pkcs11: URI (object= names it)")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a new key-encryption key or signing key of one purpose (in the keyring, or inside a PKCS#11
    token).  The first key of a purpose becomes that purpose's default."""
    from .keys.provider import KEK_PURPOSES, SIGNING_PURPOSES, check_purpose

    kind = "signing" if signing else kind
    if kind not in ("kek", "signing"):
        raise WardenError("--kind must be kek or signing")
    purpose = check_purpose(purpose or "sealing", SIGNING_PURPOSES if kind == "signing" else KEK_PURPOSES,
                            f"--purpose (for a {kind} key)")  # fmt: skip
    if provider is not None:
        if not provider.startswith("pkcs11:"):
            raise WardenError("--provider creates keys in a PKCS#11 token; KMS and Vault keys are made there")
        from .keys.pkcs11 import from_uri, signer_from_uri

        try:
            if kind == "kek":
                if purpose != "sealing":
                    raise WardenError("--purpose: a token's KEKs wrap data keys (sealing) only")
                kid = from_uri(provider).create_key()
            else:
                kid = signer_from_uri(provider, create=True, purpose=purpose).key_id
        except ValueError as e:
            raise WardenError(str(e)) from None
        _emit({"key_id": kid, "kind": kind, "purpose": purpose, "provider": "pkcs11"}, as_json,
              f"new {kind} key {kid} ({purpose}) in the token")  # fmt: skip
        return
    kr = _keyring(home)
    kid = kr.new_kek(name, purpose=purpose) if kind == "kek" else kr.new_signing_key(purpose=purpose)
    kr.save()
    _emit({"key_id": kid, "kind": kind, "purpose": purpose}, as_json, f"new {kind} key {kid} ({purpose})")


@key_app.command("export-public")
def key_export_public(
    key_id: Annotated[str | None, typer.Argument(help="signing key id (default: the purpose's default key)")] = None,
    purpose: PurposeOpt = None,
    signer_uri: SignerOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a signing key's public key, for others to `warden trust add --purpose` (or to pin an audit log)."""
    if signer_uri:
        signer = _signer(None, signer_uri, purpose)
    else:
        signer = _keyring(home).signer(key_id, purpose=purpose or (None if key_id else "sealing"))
    pub = base64.b64encode(signer.public_key).decode()
    _emit({"key_id": signer.key_id, "purpose": signer.purpose, "public_key": pub}, as_json,
          f"{signer.key_id} {pub}")  # fmt: skip


def _parse_public(text: str) -> bytes:
    p = Path(text)
    if p.is_file():
        text = p.read_text()
    token = text.strip().split()[-1] if text.strip() else ""
    try:
        raw = base64.b64decode(token, validate=True)
    except ValueError:
        raise WardenError("public key must be base64 (the output of `warden key export-public`)") from None
    if len(raw) != 32:
        raise WardenError("an Ed25519 public key is 32 bytes")
    return raw


def _trust_keys(trust_key: list[str], home: Path | None) -> list[bytes]:
    """--trust-key values as manifest signers; a known audit-log key of this home is refused."""
    from .broker.home import refuse_log_keys

    return refuse_log_keys([_parse_public(k) for k in trust_key], home or default_home())


@trust_app.command("add")
def trust_add(
    public_key: Annotated[str, typer.Argument(help="base64 public key, or a file holding it")],
    label: Annotated[str, typer.Option(help="who this is")] = "",
    purpose: Annotated[str, typer.Option("--purpose", help="sealing | legacy-sealing (also version-1 manifests) | "
                                         "audit-log | export-rules")] = "sealing",
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Trust a signer's public key for one purpose (a key trusted for another purpose is refused: remove it first)."""
    ts = TrustStore.load(home or default_home())
    kid = ts.add(_parse_public(public_key), label, purpose)
    ts.save()
    _emit({"key_id": kid, "label": label, "purpose": purpose}, as_json, f"trusted {kid} for {purpose}")


@trust_app.command("list")
def trust_list(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List trusted signers and what each is trusted for."""
    from rich.markup import escape

    ts = TrustStore.load(home or default_home())
    rows = [{"key_id": k, "label": v.get("label", ""), "purpose": ts.purpose(k)} for k, v in sorted(ts.signers.items())]
    t = Table("key id", "purpose", "label")
    for r in rows:
        t.add_row(r["key_id"], r["purpose"], escape(str(r["label"])))
    _emit(rows, as_json, t)


@trust_app.command("remove")
def trust_remove(key_id: str, home: HomeOpt = None) -> None:
    """Stop trusting a signer."""
    ts = TrustStore.load(home or default_home())
    ts.remove(key_id)
    ts.save()
    out.print(f"removed {key_id}")


# -- sealed checkpoints ---------------------------------------------------------------------------
@app.command()
def seal(
    src: Annotated[Path, typer.Argument(help="safetensors file, any file, or a model directory")],
    output: Annotated[Path, typer.Option("-o", "--output", help="sealed file (or directory for a model dir)")],
    hide_header: Annotated[bool, typer.Option("--hide-header", help="encrypt names, shapes and metadata too")] = False,
    chunk_size: Annotated[int, typer.Option(help="plaintext bytes per AEAD chunk (power of two)")] = 1 << 20,
    key: Annotated[str | None, typer.Option("--key", help="KEK to wrap under (default: the keyring's)")] = None,
    provider: ProviderOpt = None,
    signer: SignerOpt = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite the output")] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Seal a checkpoint: encrypt, wrap its data key (keyring, HSM or KMS), sign its manifest."""
    kr = _keyring(home)
    wrap = (_uri_providers(provider) or [None])[0]
    with _progress(_size(src), "sealing", not as_json) as prog:
        results = api.seal(
            src, output, keyring=kr, key=key, provider=wrap, signer=_signer(kr, signer), hide_header=hide_header,
            chunk_size=chunk_size, force=force, progress=prog, home=home,
        )  # fmt: skip
    rows = [
        {"path": str(r.path), "file_id": r.file_id, "kind": r.kind, "bytes": r.data_len, "chunks": r.n_chunks,
         "signer": r.signer, "header_hidden": r.hidden}
        for r in results
    ]  # fmt: skip
    _emit({"sealed": rows}, as_json, f"sealed {len(rows)} file(s) into {output}, signed by {results[0].signer}")


ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", min=1, help="threads that hash and decrypt (default: every core)")
]


@app.command("open")
def open_(
    src: Annotated[Path, typer.Argument(help="sealed file or bundle")],
    output: Annotated[Path, typer.Option("-o", "--output", help="where to write the PLAINTEXT")],
    force: Annotated[bool, typer.Option("--force", help="overwrite the output")] = False,
    provider: ProviderOpt = None,
    identity: Annotated[
        Path | None, typer.Option("--identity", help="a recipient's age identity file (a copy sealed to you)")
    ] = None,
    trust_key: Annotated[
        list[str] | None, typer.Option("--trust-key", help="the sender's public key (base64 or file); repeatable")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Decrypt a sealed checkpoint to a plaintext file: only when you must have one on disk.

    A released copy sealed to your age key opens with --identity FILE and the releaser's public key
    (--trust-key, or your trust store); no keyring is needed."""
    if identity is not None:
        from .keys.age import AgeIdentityProvider

        trust: Any = _trust_keys(trust_key, home) if trust_key else TrustStore.load(home or default_home())
        provs: list[Any] = [AgeIdentityProvider.from_file(identity)]
        with _progress(_sealed_size(src, as_json), "opening", not as_json) as prog:
            paths = api.unseal(src, output, providers=provs, trust=trust, force=force, progress=prog)
        _emit({"written": [str(p) for p in paths]}, as_json, f"wrote plaintext to {output}")
        return
    kr = _keyring(home)
    provs = [*_uri_providers(provider), kr.provider()]
    trust = _trust_keys(trust_key, home) if trust_key else None
    with _progress(_sealed_size(src, as_json), "opening", not as_json) as prog:
        paths = api.unseal(src, output, keyring=kr, providers=provs, trust=trust, force=force, progress=prog,
                           threads=threads, home=home)
    _emit({"written": [str(p) for p in paths]}, as_json, f"wrote plaintext to {output}")


@app.command()
def verify(
    src: Annotated[Path, typer.Argument(help="sealed file or bundle")],
    deep: Annotated[bool, typer.Option("--deep", help="also decrypt and check every GCM tag (needs the key)")] = False,
    trust_key: Annotated[
        list[str] | None, typer.Option("--trust-key", help="trust only this public key (base64 or file); repeatable")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Check the signature and every chunk digest without any key; writes nothing.  --trust-key never
    takes an audit-log key (the broker's log key): it is refused."""
    trust: Any = _trust_keys(trust_key, home) if trust_key else TrustStore.load(home or default_home())
    kr = _keyring(home) if deep else None
    with _progress(_sealed_size(src, as_json), "verifying", not as_json) as prog:
        rep = api.verify(src, trust=trust, deep=deep, keyring=kr, progress=prog, threads=threads, home=home)
    _emit(rep.to_json(), as_json, f"OK: {rep.files} file(s), {rep.chunks} chunks, signed by {rep.signer}" + (
        ", every tag checked" if deep else ""))  # fmt: skip


@app.command()
def inspect(src: Annotated[Path, typer.Argument(help="sealed file or bundle")], as_json: JsonOpt = False) -> None:
    """Show what anyone can see without a key (names and metadata escaped: they are the file's text)."""
    info = api.inspect(src)
    if as_json:
        _emit(info, True)
        return
    for m in info.get("members", [info]):
        header = "hidden" if m["header_hidden"] else "visible"
        out.print(
            f"{m.get('name', '(hidden name)')}  {m['kind']}  {m['data_len']} bytes  "
            f"{m['n_chunks']} chunks  signer {m['signer']}  header {header}"
        )
        if m.get("metadata"):
            t = Table("metadata", "value")
            for k, v in list(m["metadata"].items())[:50]:
                t.add_row(k, v)
            out.print(t)
        if m.get("tensors"):
            t = Table("tensor", "dtype", "shape")
            for name, ti in list(m["tensors"].items())[:50]:
                t.add_row(name, ti["dtype"], str(ti["shape"]))
            out.print(t)
            if len(m["tensors"]) > 50:
                out.print(f"... {len(m['tensors']) - 50} more")


# -- key lifecycle ------------------------------------------------------------------------------
KeyArg = Annotated[str | None, typer.Argument(help="KEK id (default: the keyring's default KEK)")]


@key_app.command("rotate")
def key_rotate(key_id: KeyArg = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Make a new version of a KEK; new seals use it (then `warden rewrap` the old files)."""
    p = _keyring(home).provider(key_id)
    v = p.rotate()
    _emit({"key_id": p.key_id, "version": v}, as_json, f"{p.key_id} is now at version {v}")


def _version_cmd(action: str, key_id: str, version: int, home: Path | None, as_json: bool) -> None:
    p = _keyring(home).provider(key_id)
    getattr(p, action)(version)
    _emit({"key_id": key_id, "version": version, "action": action}, as_json, f"{action}d {key_id} version {version}")


@key_app.command("disable")
def key_disable(key_id: str, version: int, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Disable an old KEK version (files still wrapped only under it stop opening)."""
    _version_cmd("disable", key_id, version, home, as_json)


@key_app.command("enable")
def key_enable(key_id: str, version: int, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Enable a disabled KEK version again."""
    _version_cmd("enable", key_id, version, home, as_json)


@key_app.command("destroy")
def key_destroy(
    key_id: str,
    version: int,
    yes: Annotated[bool, typer.Option("--yes", help="confirm: this cannot be undone")] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Destroy one old KEK version for good."""
    if not yes:
        raise WardenError("destroying a key version cannot be undone: add --yes")
    _version_cmd("destroy", key_id, version, home, as_json)


@app.command()
def rewrap(
    paths: Annotated[list[Path], typer.Argument(help="sealed files or bundle directories")],
    key: Annotated[str | None, typer.Option("--key", help="KEK to wrap under (default: the keyring's)")] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="wrap under this provider URI instead (e.g. move keys into an HSM)")
    ] = None,
    provider: ProviderOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-wrap data keys under the KEK's current version; ciphertext stays byte-identical.
    Safe to interrupt and run again."""
    from .sealed.bundle import MANIFEST
    from .sealed.rewrap import rewrap as do_rewrap

    kr = _keyring(home)
    files: list[Path] = []
    for p in paths:
        files += sorted(q for q in p.iterdir() if q.name != MANIFEST) if p.is_dir() else [p]
    local = kr.provider(key)
    target = _uri_providers([to])[0] if to else local
    sources = [*_uri_providers(provider), local]
    with _progress(len(files), "rewrapping", not as_json, files=True) as prog:
        rep = do_rewrap(files, providers=sources, target=target, progress=prog)
    _emit(rep.__dict__, as_json, f"rewrapped {rep.rewrapped}, finished {rep.finished}, already current {rep.current}")


@app.command()
def shred(
    key_id: Annotated[str, typer.Argument(help="the model's KEK id")],
    yes: Annotated[bool, typer.Option("--yes", help="confirm: every copy sealed under it becomes unreadable")] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Crypto-shred a model: destroy every version of its KEK."""
    from .sealed.rewrap import shred as do_shred

    if not yes:
        raise WardenError("shredding cannot be undone: add --yes")
    done = do_shred(_keyring(home).provider(key_id))
    _emit({"key_id": key_id, "destroyed_versions": done}, as_json, f"shredded {key_id} (versions {done})")


# -- custody ------------------------------------------------------------------------------------
def _custodian_env(name: str) -> str:
    """The variable that holds a passphrase custodian's passphrase for automation."""
    return "WARDEN_CUSTODIAN_PASSPHRASE_" + "".join(ch if ch.isalnum() else "_" for ch in name).upper()


def _custodian_passphrase(name: str, given: Path | None = None) -> str | None:
    """A passphrase custodian's passphrase: ``given`` (a file or /dev/fd/N), the file named by
    WARDEN_CUSTODIAN_PASSPHRASE_FILE_<NAME>, WARDEN_CUSTODIAN_PASSPHRASE_<NAME> (automation), a prompt."""
    from ._harden import read_secret_file

    env = _custodian_env(name)
    path = given or os.environ.get(env.replace("_PASSPHRASE_", "_PASSPHRASE_FILE_", 1))
    if path:
        return read_secret_file(path, f"custodian {name}'s passphrase")
    pw = os.environ.get(env)
    if pw is None and sys.stdin.isatty():
        pw = getpass.getpass(f"Passphrase for custodian {name}: ")
    return pw


def _custodians(specs: list[str], ask: bool = True) -> tuple[list[Any], dict[str, str]]:
    from .keys.custody import Custodian

    out, pws = [], {}
    for spec in specs:
        name, sep, recipient = spec.partition("=")
        if not sep:
            raise CustodyError(f"--custodian takes NAME=age1... or NAME=passphrase, not {spec[:40]!r}")
        out.append(Custodian(name, recipient))
        if recipient == "passphrase" and ask:
            pw = _custodian_passphrase(name)
            if pw is None:
                env = _custodian_env(name).replace("_PASSPHRASE_", "_PASSPHRASE_FILE_", 1)
                raise CustodyError(f"set {env} to a file holding custodian {name}'s passphrase")
            pws[name] = pw
    return out, pws


CustodianOpt = Annotated[
    list[str], typer.Option("--custodian", help="NAME=age1... (age public key) or NAME=passphrase")
]
ThresholdOpt = Annotated[int, typer.Option("--threshold", help="M: shares needed to unseal")]


@custody_app.command("init")
def custody_init(
    custodian: CustodianOpt,
    threshold: ThresholdOpt,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Put the keyring under M-of-N custody (it is then unsealed by custodians, not a passphrase)."""
    custodians, pws = _custodians(custodian)
    kr = Keyring.unlock(home or default_home(), _passphrase())
    doc = kr.to_custody(custodians, threshold, pws)
    _emit(
        {"split_id": doc.split_id, "threshold": doc.threshold, "custodians": [c.name for c in custodians]},
        as_json,
        f"keyring under {doc.threshold}-of-{len(custodians)} custody; start the agent and unseal",
    )


def _open_share(home: Path, custodian: str, identity: Path | None, passphrase_file: Path | None = None) -> Any:
    """One custodian's share, opened on their terminal with their age identity or passphrase."""
    from .keys.custody import CustodyDoc

    doc = CustodyDoc.load(home)
    entry = doc.custodian(custodian)
    if entry["recipient"] == "passphrase":
        return doc.open_share(custodian, passphrase=_custodian_passphrase(custodian, passphrase_file))
    if identity is None:
        raise CustodyError("--identity FILE (your age identity) is needed for your share")
    from .keys.custody import identity_is_protected, read_identity

    raw = identity.read_bytes()
    pw = _custodian_passphrase(custodian, passphrase_file) if identity_is_protected(raw) else None
    return doc.open_share(custodian, identity=read_identity(raw, pw, where=str(identity)))


@custody_app.command("unseal")
def custody_unseal(
    custodian: Annotated[str, typer.Option("--custodian", help="your custodian name")],
    identity: Annotated[Path | None, typer.Option("--identity", help="your age identity file")] = None,
    share_passphrase_file: Annotated[
        Path | None,
        typer.Option(
            "--share-passphrase-file",
            help="a file (or /dev/fd/N) with your share's passphrase "
            "[default: WARDEN_CUSTODIAN_PASSPHRASE_FILE_<NAME>, else a prompt]",
            show_default=False,
        ),
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit one custodian's share to the agent (decrypted here, sent over the local socket)."""
    from .keys.agent import AgentClient
    from .keys.provider import b64e

    h = home or default_home()
    share = _open_share(h, custodian, identity, share_passphrase_file)
    st = AgentClient(h).call("unseal", share=b64e(share.to_bytes()))
    msg = "unsealed" if not st["sealed"] else f"sealed: {st['progress']} of {st['threshold']} shares"
    _emit(st, as_json, msg)


@custody_app.command("status")
def custody_status(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Sealed or unsealed, and the unseal progress."""
    from .keys.agent import AgentClient

    st = AgentClient(home or default_home()).call("status")
    msg = "unsealed" if not st["sealed"] else "sealed" + (
        f": {st['progress']} of {st['threshold']} shares" if "progress" in st else ""
    )
    _emit(st, as_json, msg)


@custody_app.command("seal")
def custody_seal(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Make the agent forget the root key (seal the vault)."""
    from .keys.agent import AgentClient

    _emit(AgentClient(home or default_home()).call("seal"), as_json, "sealed")


@custody_app.command("keygen")
def custody_keygen(
    output: Annotated[Path, typer.Option("-o", "--output", help="your age identity file (kept by you, 0600)")],
    protect: Annotated[bool, typer.Option("--protect", help="encrypt the identity file under your passphrase")] = False,
    identity_passphrase_file: Annotated[
        Path | None, typer.Option("--identity-passphrase-file", help="--protect: the passphrase, from a file")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """A custodian's age identity: prints the public key (age1...) to give for `custody init` or a reshare."""
    from ._atomic import atomic_write_bytes
    from ._harden import read_secret_file
    from .keys.custody import new_identity

    pw = None
    if protect:
        if identity_passphrase_file is not None:
            pw = read_secret_file(identity_passphrase_file, "--identity-passphrase-file")
        elif sys.stdin.isatty():
            pw = getpass.getpass("Passphrase for the identity file: ")
            if getpass.getpass("Repeat passphrase: ") != pw:
                raise CustodyError("the passphrases differ")
        else:
            raise CustodyError("--protect: give the passphrase with --identity-passphrase-file FILE")
    data, pub = new_identity(pw)
    atomic_write_bytes(output, data, mode=0o600)
    _emit({"recipient": pub, "identity_file": str(output), "protected": protect}, as_json, pub)


# custody changes: requested, approved by M custodians (each signs that exact statement), executed
request_app = typer.Typer(no_args_is_help=True, help="Request a custody change; M custodians must then approve it.")
custody_app.add_typer(request_app, name="request")
TtlOpt = Annotated[float, typer.Option("--ttl", help="seconds the custodians have to approve it")]
OpArg = Annotated[str, typer.Argument(help="the operation id `warden custody request` printed")]


def _plain(text: Any) -> str:
    """Text from the agent or a file, on one line: non-printable characters shown as '?' (the consoles
    interpret no markup)."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(text))


def _request(kind: str, params: dict[str, Any], ttl: float, home: Path | None, as_json: bool, **extra: Any) -> None:
    from .keys.agent import AgentClient

    r = AgentClient(home or default_home()).call("request", kind=kind, params=params, ttl_seconds=ttl, **extra)
    from .keys.quorum import Statement

    op = _plain(r["op_id"])
    msg = [f"requested {op}: {_plain(r['summary'])}",
           *(f"    {_plain(d)}" for d in Statement.from_json(r["statement"]).details()),
           f"statement digest {_plain(r['digest'])}", f"each custodian: warden custody approve {op} --custodian NAME"]
    _emit(r, as_json, msg)


@request_app.command("reshare")
def request_reshare(
    custodian: CustodianOpt,
    threshold: ThresholdOpt,
    ttl: TtlOpt = 3600.0,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """New custodians and/or threshold for the same root key (keys and sealed files stay as they are).
    Each new custodian is an age public key (`warden custody keygen`): the custodians approve every one."""
    custodians, _ = _custodians(custodian, ask=False)  # the agent refuses NAME=passphrase, with what to do
    params = {"threshold": threshold, "custodians": [{"name": c.name, "recipient": c.recipient} for c in custodians]}
    _request("reshare", params, ttl, home, as_json)


@request_app.command("destroy")
def request_destroy(
    key_id: Annotated[str, typer.Argument(help="KEK id")],
    version: Annotated[int | None, typer.Option("--version", help="one old version (default: all: shred)")] = None,
    ttl: TtlOpt = 3600.0,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Destroy one old version of a KEK, or every version (crypto-shred its models)."""
    _request("destroy", {"key_id": key_id, "version": version}, ttl, home, as_json)


@request_app.command("export")
def request_export(
    key_id: Annotated[str, typer.Argument(help="KEK id or signing key id")],
    to: Annotated[str, typer.Option("--to", help="age X25519 recipient (age1...) the key is sealed to")],
    version: Annotated[int, typer.Option("--version", help="KEK version")] = 1,
    ttl: TtlOpt = 3600.0,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export key material, sealed with age to one recipient (escrow, migration)."""
    _request("export", {"key_id": key_id, "version": version, "recipient": to}, ttl, home, as_json)


@request_app.command("policy")
def request_policy(
    file: Annotated[Path, typer.Argument(help="the new key-use policy (TOML; docs/CUSTODY.md)")],
    ttl: TtlOpt = 3600.0,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace the key-use policy (who may wrap, unwrap, sign or manage which key)."""
    from .keys.policy import Policy

    _request("policy", {"policy": Policy.load_file(file).to_json()}, ttl, home, as_json)


@request_app.command("audit")
def request_audit(
    key_use: Annotated[str, typer.Option("--key-use", help="on or off: record every wrap, unwrap and sign")],
    ttl: TtlOpt = 3600.0,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Turn the recording of key use on or off (custody events and refusals are always recorded)."""
    if key_use not in ("on", "off"):
        raise CustodyError("--key-use takes on or off")
    _request("audit", {"key_use": key_use == "on"}, ttl, home, as_json)


@custody_app.command("pending")
def custody_pending(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Custody changes waiting for approval."""
    from .keys.agent import AgentClient
    from .keys.quorum import Statement

    sts = [Statement.from_json(x) for x in AgentClient(home or default_home()).call("pending")["pending"]]
    lines = [ln for st in sts for ln in (f"{_plain(st.op_id)}: {_plain(st.describe())}",
                                          *(f"    {_plain(d)}" for d in st.details()))]  # fmt: skip
    _emit([st.to_json() for st in sts], as_json, lines or "no pending custody changes")


@custody_app.command("approve")
def custody_approve(
    op_id: OpArg,
    custodian: Annotated[str, typer.Option("--custodian", help="your custodian name")],
    identity: Annotated[Path | None, typer.Option("--identity", help="your age identity file")] = None,
    digest: Annotated[str | None, typer.Option("--digest", help="approve only a statement of this digest")] = None,
    policy_file: Annotated[
        Path | None, typer.Option("--policy-file", help="a policy change: approve only if it is exactly this file")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Approve one requested custody change: your share (opened here) signs that exact statement."""
    from datetime import UTC, datetime

    from .keys.agent import approve, fetch_statement

    h = home or default_home()
    st = fetch_statement(h, op_id)
    if digest is not None and digest != st.digest:
        raise CustodyError(f"the statement's digest is {st.digest}, not the --digest given: nothing approved")
    if policy_file is not None:
        st.check_policy_file(policy_file)
    err.print(f"approving {_plain(st.op_id)}: {_plain(st.describe())} (digest {st.digest})")
    for line in st.details():
        err.print(f"    {_plain(line)}")
    r = approve(h, st, _open_share(h, custodian, identity), now=datetime.now(UTC))
    _emit(r, as_json, f"{r['approvals']} of {r['threshold']} approvals for {_plain(op_id)}")


@custody_app.command("execute")
def custody_execute(
    op_id: OpArg,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="export: write the age-sealed key here")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Carry out a custody change once M custodians have approved it."""
    from .keys.agent import AgentClient
    from .keys.provider import b64d

    r = AgentClient(home or default_home()).call("execute", op_id=op_id)
    res = r.get("result")
    if output is not None and isinstance(res, dict) and "sealed_key" in res:
        from ._atomic import atomic_write_bytes

        atomic_write_bytes(output, b64d(res["sealed_key"], "sealed key"), mode=0o600)
        res["sealed_key"] = str(output)
    _emit(r, as_json, f"executed {_plain(r['kind'])} {_plain(op_id)}, approved by {_plain(', '.join(r['approvers']))}")


@custody_app.command("policy")
def custody_policy(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """The key-use policy in force (and whether key use is audited)."""
    from .keys.agent import AgentClient

    r = AgentClient(home or default_home()).call("policy")
    _emit(r, as_json, [_plain(ln) for ln in json.dumps(r, indent=2, sort_keys=True).splitlines()])


@custody_app.command("workload-token")
def custody_workload_token(
    name: Annotated[str, typer.Argument(help="workload name, as in the policy's [workloads]")], as_json: JsonOpt = False
) -> None:
    """A fresh secret token for a workload, and the digest the policy file holds for it."""
    import secrets as _secrets

    from .keys.policy import token_digest

    tok = _secrets.token_urlsafe(32)
    dig = token_digest(tok)
    msg = [f"WARDEN_WORKLOAD={_plain(name)} WARDEN_WORKLOAD_TOKEN={tok}", f'policy: {_plain(name)} = "{dig}"']
    _emit({"workload": name, "token": tok, "digest": dig}, as_json, msg)


IdleOpt = Annotated[
    float, typer.Option("--idle-seal", help="seal again after this many seconds without key use (0: never)")
]


@agent_app.command("start")
def agent_start(idle_seal: IdleOpt = 3600.0, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Start the custody agent in the background (sealed)."""
    from .keys import agent

    pid = agent.start(home or default_home(), idle_seal=idle_seal)
    _emit({"pid": pid}, as_json, f"agent started (pid {pid}), sealed")


@agent_app.command("stop")
def agent_stop(home: HomeOpt = None) -> None:
    """Stop the agent (it forgets everything)."""
    from .keys import agent

    agent.stop(home or default_home())
    out.print("agent stopped")


@agent_app.command("run")
def agent_run(idle_seal: IdleOpt = 3600.0, home: HomeOpt = None) -> None:
    """Run the agent in the foreground (restarted first with only paths, locale, user and WARDEN_HOME)."""
    from ._harden import agent_env, reexec_with
    from .keys import agent

    reexec_with(agent_env())
    agent.serve(home or default_home(), idle_seal)


# -- provenance: clone detection ------------------------------------------------------
prov_app = typer.Typer(no_args_is_help=True, help="Is a model derived from one of ours? (p-values, registry)")
app.add_typer(prov_app, name="provenance")
AlphaOpt = Annotated[float, typer.Option("--alpha", help="significance level of the decision")]
RegistryOpt = Annotated[
    Path | None,
    typer.Option("--registry", help="registry folder [default: $WARDEN_HOME/provenance]", show_default=False),
]


def _model_kw(path: Path, home: Path | None, kr: Any = None) -> dict[str, Any]:
    """Sealed inputs are read with the keyring (decrypted in memory only); plain ones need nothing."""
    from .provenance.source import _is_sealed

    if (path.is_dir() and (path / "BUNDLE.wwb").exists()) or (path.is_file() and _is_sealed(path)):
        return {"keyring": kr or _keyring(home)}
    return {}


def _registry(registry: Path | None, home: Path | None) -> Any:
    from .provenance import Registry, default_registry

    return Registry(registry, home=home) if registry else default_registry(home)


def _pfmt(p: float, log10_p: float) -> str:
    """A p-value for people: scientific while a float holds it, else its power of ten."""
    return f"{p:.2e}" if p else f"1e{log10_p:.0f}"


def _evidence_table(c: Any) -> Table:
    t = Table("ref layer", "suspect layer", "p-value", "rho", "agree", "cos in", "cos out")
    for e in c.layers:
        t.add_row(str(e.reference_layer), str(e.suspect_layer), _pfmt(e.p_value, e.log_p / 2.302585),
                  f"{e.rho:.3f}", f"{e.agreement:.2f}", f"{e.cos_in:.3f}", f"{e.cos_out:.3f}")  # fmt: skip
    return t


def _verdict(j: dict[str, Any]) -> str:
    p = _pfmt(j["p_value"], j["log10_p_value"])
    shared = ", ".join(j["shared_ranges"]) or "none"
    return f"{j['decision'].upper()}: p = {p} (alpha {j['alpha']:g}); shared reference layers: {shared}"


@prov_app.command("compare")
def prov_compare(
    suspect: Annotated[Path, typer.Argument(help="suspect checkpoint: .safetensors, HF folder, sealed file/bundle")],
    reference: Annotated[Path, typer.Argument(help="reference checkpoint (ours)")],
    alpha: AlphaOpt = 1e-6,
    plot: Annotated[Path | None, typer.Option("--plot", help="also write a PNG figure here (needs matplotlib)")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Test "SUSPECT and REFERENCE were initialised independently"; print the p-value and per-layer evidence."""
    from .provenance import compare

    c = compare(suspect, reference, alpha=alpha, home=home, **_model_kw(reference, home) or _model_kw(suspect, home))
    j = c.to_json()
    if plot is not None:
        from .plots import compare_plot

        compare_plot(c, plot)
    if as_json:
        _emit(j, True)
    else:
        out.print(_evidence_table(c))
        out.print(_verdict(j))


@prov_app.command("register")
def prov_register(
    model: Annotated[Path, typer.Argument(help="a protected checkpoint")],
    name: Annotated[str, typer.Option("--name", help="name to report it under")],
    replace: Annotated[bool, typer.Option("--replace", help="overwrite an entry of that name")] = False,
    parent: Annotated[
        str | None, typer.Option("--parent", help="its registered parent (checked by the test)", show_default=False)
    ] = None,
    no_lineage: Annotated[bool, typer.Option("--no-lineage", help="record no registered parent")] = False,
    alpha: AlphaOpt = 1e-6,
    registry: RegistryOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Store a compact signature of MODEL in the registry (not its weights), with its registered parent."""
    reg = _registry(registry, home)
    sig = reg.register(model, name, replace=replace, parent=parent, lineage=not no_lineage, alpha=alpha,
                       **_model_kw(model, home))  # fmt: skip
    up = reg.parent_of(name)
    _emit({"registered": name, "layers": len(sig.blocks), "registered_parent": up, "registry_size": len(reg)},
          as_json, f"registered {name} ({len(sig.blocks)} MLP blocks, parent: {up or 'none'}); "
          f"registry holds {len(reg)} model(s)")  # fmt: skip


@prov_app.command("identify")
def prov_identify(
    suspect: Annotated[Path, typer.Argument(help="suspect checkpoint")],
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="candidates given the exact test")] = 10,
    alpha: AlphaOpt = 1e-6,
    registry: RegistryOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rank registered models against SUSPECT, with p-values corrected for the registry's size."""
    reg = _registry(registry, home)
    res = reg.identify(suspect, top_k=top_k, alpha=alpha, **_model_kw(suspect, home))
    j = res.to_json()
    if as_json:
        _emit(j, True)
        return
    t = Table("model", "decision", "p-value (corrected)", "shared layers", "similarity", "lineage")
    for m in j["matches"]:
        lin = m.get("lineage", {})
        beta = ""
        if "could_be_parent" in lin:
            kind = "could be parent" if lin["could_be_parent"] else "sibling-like"
            beta = f"{kind} (cos {lin['cos_angle_at_candidate']:.2f} from {lin['registered_parent']})"
        t.add_row(m["name"], m["decision"], _pfmt(m["p_value"], m["log10_p_value"]), ", ".join(m["shared_ranges"]),
                  f"{m['similarity']:.3f}", beta)  # fmt: skip
    out.print(t)
    out.print(f"derived from: {j['derived_from'] or 'none of the registered models'}")


@prov_app.command("list")
def prov_list(registry: RegistryOpt = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Registered models."""
    facts = _registry(registry, home).facts()
    t = Table("name", "family", "layers", "d_model", "params", "registered parent")
    for f in facts:
        up = f.get("parent") or {}
        t.add_row(f["name"], f["family"], str(f["layers"]), str(f["d_model"]), str(f["params"]), up.get("name", ""))
    _emit({"models": facts}, as_json, t)


@prov_app.command("remove")
def prov_remove(name: str, registry: RegistryOpt = None, home: HomeOpt = None) -> None:
    """Forget a registered model."""
    _registry(registry, home).remove(name)
    out.print(f"removed {name}")


@app.command("scan")
def scan_cmd(
    where: Annotated[list[str], typer.Argument(help="folders of checkpoints, list files, or s3://bucket/prefix")],
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", help="an existing Ray cluster [default: a local one]")
    ] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="CPUs of the local Ray")] = None,
    state: Annotated[
        Path | None, typer.Option("--state", help="resume file [default: under $WARDEN_HOME/scan]")
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1)] = 10,
    alpha: AlphaOpt = 1e-6,
    registry: RegistryOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Report every checkpoint derived from a registered model; rerun with the same state to resume."""
    from .provenance import scan

    reg = _registry(registry, home)
    bar: list[Any] = []
    with contextlib.ExitStack() as stack:

        def progress(done: int, total: int) -> None:
            if as_json or not err.is_terminal:
                return
            if not bar:
                p = stack.enter_context(Progress(transient=True, console=err))
                bar.append((p, p.add_task("scanning", total=total)))
            bar[0][0].update(bar[0][1], completed=done, total=total)

        rep = scan(where, reg.root, state=state, ray_address=ray_address, workers=workers, top_k=top_k, alpha=alpha,
                   on_progress=progress, home=home)  # fmt: skip
    j = rep.to_json()
    if as_json:
        _emit(j, True)
        return
    t = Table("item", "derived from", "p-value", "shared layers")
    for d in j["derived"]:
        t.add_row(d["item"], d["derived_from"], _pfmt(d["p_value"], d["log10_p_value"]),
                  ", ".join(d["shared_ranges"]))  # fmt: skip
    out.print(t)
    out.print(f"{j['items']} item(s), {len(j['derived'])} derived, {len(j['errors'])} error(s), "
              f"{j['resumed_from_state']} resumed from state")  # fmt: skip


# -- the tamper-evident audit log ---------------------------------------------------------------
audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident audit log: heads, proofs, verification")
app.add_typer(audit_app, name="audit")
DbOpt = Annotated[
    str | None,
    typer.Option("--db", envvar="WARDEN_AUDIT_DB", help="SQLAlchemy URL [default: the broker's, sqlite:///$WARDEN_HOME/broker/broker.db]",
                 show_default=False),
]  # fmt: skip
PubkeyOpt = Annotated[
    str | None,
    typer.Option("--pubkey", envvar="WARDEN_AUDIT_PUBKEY", help="the log's Ed25519 public key (hex), kept "
                 "outside the database", show_default=False),
]  # fmt: skip
LogIdOpt = Annotated[
    str | None,
    typer.Option("--log-id", envvar="WARDEN_AUDIT_LOG_ID", help="the log's id (32 hex digits, printed by `warden "
                 "serve` and in every head), kept outside the database: another log signed by the same key is "
                 "refused", show_default=False),
]  # fmt: skip


def _pubkey(pubkey: str | None, what: str) -> bytes:
    """An Ed25519 public key given as 64 hex digits, as base64, or as `warden key export-public` prints it."""
    import base64
    import binascii

    if pubkey is None:
        raise WardenError(f"{what} needs the log's public key (--pubkey): the database's own cannot be trusted")
    text = pubkey.strip().split()[-1] if pubkey.strip() else ""
    try:
        key = bytes.fromhex(text)
    except ValueError:
        try:
            key = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            key = b""
    if len(key) != 32:
        raise WardenError("--pubkey is an Ed25519 public key: 64 hex digits, base64, or `warden key export-public`")
    return key


def _audit_log(db: str | None, home: Path | None, key: bytes | None = None, log_id: str | None = None) -> Any:
    """The log the trail rule picks (trail.locate): --db, else the home's broker log, else its local log."""
    return trail.open_log(home, db, public_key=key, log_id=_log_id(log_id))


def _log_id(text: str | None) -> bytes | None:
    from .broker.auditlog import parse_log_id

    try:
        return parse_log_id(text, "--log-id")
    except WardenError as e:
        raise WardenError(str(e)) from None


def _log_key(pubkey: str | None, db: str | None, home: Path | None) -> bytes:
    """--pubkey, else the public half of the key that signs the picked log (the broker's log key file,
    or the home's local audit/log.key), read outside the database."""
    if pubkey is None:
        own = trail.log_public_key(home, db)
        if own is not None:
            return own
    return _pubkey(pubkey, "verifying")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WardenError(f"cannot read {path.name} as JSON ({type(e).__name__})") from None


@audit_app.command("head")
def audit_head(db: DbOpt = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Print the latest signed tree head (keep a copy outside the database)."""
    h = _audit_log(db, home).head().to_json()
    _emit(h, as_json, f"log {h['log_id']}  size {h['size']}  root {h['root']}  at {h['at']}  key {h['key_id']}")


@audit_app.command("prove")
def audit_prove(index: int, db: DbOpt = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """An inclusion proof of event INDEX under the latest signed head."""
    p = _audit_log(db, home).prove(index).to_json()
    _emit(p, True)  # a proof is data: JSON either way (ASCII, escaped)


@audit_app.command("check-proof")
def audit_check_proof(proof: Path, pubkey: PubkeyOpt = None, log_id: LogIdOpt = None, as_json: JsonOpt = False) -> None:
    """Check a proof file offline, with the log's public key (and log id) only."""
    from .broker.auditlog import InclusionProof, check_inclusion

    key = _pubkey(pubkey, "checking a proof")
    p = InclusionProof.from_json(_read_json(proof))
    ev = check_inclusion(p, key, _log_id(log_id))
    what = f"{ev.get('action')} by {ev.get('actor')}"
    _unpinned(log_id, as_json)
    _emit({"valid": True, "index": p.index, "head_size": p.head.size, "log_id": p.head.log_id.hex(),
           "log_id_pinned": log_id is not None, "event": ev}, as_json,
          f"event {p.index} is in the signed log {p.head.log_id.hex()} of {p.head.size} events: {what}")  # fmt: skip


def _unpinned(log_id: str | None, as_json: bool) -> None:
    if log_id is None and not as_json:
        err.print("note: no --log-id pinned: another log signed by the same key would pass too")


@audit_app.command("verify")
def audit_verify(
    db: DbOpt = None,
    pubkey: PubkeyOpt = None,
    against: Annotated[Path | None, typer.Option("--against", help="a head kept outside the database")] = None,
    log_id: LogIdOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Recompute the whole tree from the events and check every signed head (of the pinned log)."""
    from .broker.auditlog import SignedHead

    log = _audit_log(db, home, None, log_id)  # no log yet: said before asking for a key
    log.public_key = _log_key(pubkey, db, home)
    kept = SignedHead.from_json(_read_json(against)) if against else None
    rep = log.verify(against=kept)
    _unpinned(log_id or (kept.log_id.hex() if kept else None), as_json)  # a kept head names its log
    _emit(rep, as_json, f"audit log {rep['log_id']} intact: {rep['events']} events, {rep['heads_checked']} signed "
          "heads checked" + (f", extends the kept head of size {rep['against']}" if kept else ""))  # fmt: skip


@audit_app.command("key")
def audit_key(db: DbOpt = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """The public key that signs the home's trail (hex): the broker's log key when the trail is the broker's
    log, else the home's local audit-log key.  Pin it outside the database (`verify --pubkey`)."""
    pub = trail.log_public_key(home, db)
    if pub is None:
        if trail.locate(home, db)[1]:
            raise WardenError("the broker's log key is not a file here (WARDEN_LOG_KEY names a token or an agent): "
                              "take its public key from `warden broker init` and pin it with --pubkey")  # fmt: skip
        raise WardenError("no audit-log key yet: the first audited operation creates it with the log")
    _emit({"public_key": pub.hex()}, as_json, pub.hex())


@audit_app.command("export")
def audit_export(
    db: DbOpt = None,
    start: Annotated[int, typer.Option("--start", min=0, help="first event index")] = 0,
    home: HomeOpt = None,
) -> None:
    """Events as JSON lines (index, leaf hash, event) for a SIEM."""
    for row in _audit_log(db, home).export(start):
        sys.stdout.write(json.dumps(row, sort_keys=True, separators=(",", ":")) + "\n")


# -- the access broker -----------------------------------------------------------------------------
broker_app = typer.Typer(no_args_is_help=True, help="Administer the access broker (accounts, models)")
app.add_typer(broker_app, name="broker")
license_app = typer.Typer(no_args_is_help=True, help="Export licenses on file (the release gate consults them)")
app.add_typer(license_app, name="license")
StoreOpt = Annotated[
    str | None,
    typer.Option("--store", envvar="WARDEN_BROKER_STORE", help="sealed-weights folder or s3://bucket/prefix "
                 "[default: $WARDEN_HOME/broker/weights]", show_default=False),
]  # fmt: skip
# export-control facts about a model (warden classify, warden release, warden broker model)
TokensOpt = Annotated[float | None, typer.Option("--tokens", help="training tokens (compute = 6·N·D)")]
ComputeOpt = Annotated[float | None, typer.Option("--compute", help="declared training compute, FLOP")]
PublishedOpt = Annotated[bool, typer.Option("--published", help="the weights are published")]
ExpertsOpt = Annotated[int | None, typer.Option("--experts-per-token", min=1)]
AllowSampleOpt = Annotated[bool, typer.Option(
    "--allow-sample-list", help="let the gate screen against the shipped fictitious SAMPLE list (demonstrations)")]
DeclarationOpt = Annotated[Path | None, typer.Option(
    "--declaration", help="a signed training declaration (FILE and FILE.sig, by a key in release/compliance-keys)")]


def _declaration_kw(declaration: Path | None, home: Path | None) -> dict[str, Any]:
    from .release.declaration import compliance_keys

    return {"declaration": declaration, "compliance_keys": compliance_keys(home)} if declaration else {}
BrokerDbOpt = Annotated[
    str | None,
    typer.Option("--db", envvar="WARDEN_BROKER_DB", help="SQLAlchemy URL of the broker's state and audit log "
                 "[default: sqlite:///$WARDEN_HOME/broker/broker.db]", show_default=False),
]  # fmt: skip


LogKeyOpt = Annotated[
    str | None,
    typer.Option("--log-key", envvar="WARDEN_LOG_KEY", help="the broker's own audit-log signing key: file:PATH "
                 "(encrypted, its own passphrase), pkcs11:token=..;object=LABEL or agent:LOGHOME [default: "
                 "file:$WARDEN_HOME/broker/log-key.json]", show_default=False),
]  # fmt: skip
LogKeyPassOpt = Annotated[
    Path | None,
    typer.Option("--log-key-passphrase-file", envvar="WARDEN_LOG_KEY_PASSPHRASE_FILE", show_default=False,
                 help="a file (or /dev/fd/N) holding the file log key's passphrase [default: a prompt]"),
]  # fmt: skip


def _log_signer(home: Path | None, log_key: str | None, pass_file: Path | None) -> tuple[Any, bool]:
    """The broker's log key (created on first use): never the keyring."""
    from ._harden import read_secret_file
    from .broker.logkey import open_log_key

    def passphrase(confirm: bool) -> str:
        if pass_file is not None:
            return read_secret_file(pass_file, "--log-key-passphrase-file")
        if not sys.stdin.isatty():
            raise KeyringError("give the log key's passphrase with --log-key-passphrase-file FILE "
                               "(or WARDEN_LOG_KEY_PASSPHRASE_FILE)")  # fmt: skip
        pw = getpass.getpass("Log key passphrase: ")
        if confirm and getpass.getpass("Repeat passphrase: ") != pw:
            raise KeyringError("the passphrases differ")
        return pw

    return open_log_key(log_key, home or default_home(), passphrase, kdf=_kdf_from_env())


def _broker(db: str | None, store: str | None, home: Path | None, audience: str | None = None,
            gate: bool = False, per_principal: tuple[float, float] | None = None, *, log_key: str | None = None,
            log_pass: Path | None = None, allow_sample_list: bool | None = None) -> Any:  # fmt: skip
    """A broker that holds no key but its own log key (it signs the audit log's tree heads); with
    ``gate``, the export-control gate configured under ``home`` decides its release requests."""
    from .broker.auditlog import AuditLog
    from .broker.service import Broker, BrokerConfig
    from .broker.storage import LocalWeightStore, S3WeightStore

    h = home or default_home()
    (h / "broker").mkdir(parents=True, exist_ok=True, mode=0o700)
    url = db or f"sqlite:///{h / 'broker' / 'broker.db'}"
    if store and store.startswith("s3://"):
        bucket, _, prefix = store[5:].partition("/")
        ws: Any = S3WeightStore(bucket, prefix, os.environ.get("AWS_ENDPOINT_URL"))
    else:
        ws = LocalWeightStore(Path(store) if store else h / "broker" / "weights")
    signer, created = _log_signer(home, log_key, log_pass)
    if created:
        sys.stderr.write(f"created the broker's log key; its public key (pin it): {signer.public_key.hex()}\n")
    log = AuditLog(url, signer)
    trail.use_broker_signer(url, signer)  # this process's trail appends to the broker's log sign with it
    cfg = BrokerConfig(audience=audience) if audience else BrokerConfig()
    if per_principal is not None:
        import dataclasses

        from .broker.service import Limit

        cfg = dataclasses.replace(cfg, per_principal=Limit(rate=per_principal[0], burst=per_principal[1]))
    if gate:
        from .release.gate import ReleaseGate

        return Broker(url, ws, log, cfg, gate=ReleaseGate.from_home(h, allow_sample_list=allow_sample_list))
    return Broker(url, ws, log, cfg)


@broker_app.command("init")
def broker_init(log_key: LogKeyOpt = None, log_key_passphrase_file: LogKeyPassOpt = None, home: HomeOpt = None,
                trust_from: Annotated[Path | None, typer.Option(
                    "--trust-from", help="copy the trust store (public keys only) from this home or trusted.json",
                    show_default=False)] = None,
                as_json: JsonOpt = False) -> None:  # fmt: skip
    """Create the broker's log key if there is none, and print its public key (pin it for `audit verify`).
    With --trust-from KEYHOME, give this (the broker's own) home the key host's trust store first."""
    copied = None
    if trust_from is not None:
        from .broker.home import copy_trust

        copied = copy_trust(trust_from, home or default_home())
    signer, created = _log_signer(home, log_key, log_key_passphrase_file)
    _emit({"public_key": signer.public_key.hex(), "key_id": signer.key_id, "created": created,
           "trusted_copied": copied}, as_json, signer.public_key.hex())  # fmt: skip


@broker_app.command("account")
def broker_account(
    account: Annotated[str, typer.Argument(help="account id")],
    pubkey: Annotated[str, typer.Option("--pubkey", help="the account's Ed25519 public key (hex or base64)")],
    kind: Annotated[str, typer.Option("--kind", help="service | workload | human")] = "service",
    role: Annotated[list[str] | None, typer.Option("--role", help="a role (repeat)")] = None,
    team: Annotated[list[str] | None, typer.Option("--team", help="a team (repeat)")] = None,
    db: BrokerDbOpt = None,
    log_key: LogKeyOpt = None,
    log_key_passphrase_file: LogKeyPassOpt = None,
    home: HomeOpt = None,
) -> None:
    """Add or replace an account (its key, roles and teams)."""
    with _broker(db, None, home, log_key=log_key, log_pass=log_key_passphrase_file) as b:
        b.add_account(account, kind, _pubkey(pubkey, "an account"), set(role or []), set(team or []),
                      actor=audit._default_actor())  # fmt: skip
    out.print(f"account {account}: {kind}, roles {sorted(role or [])}, teams {sorted(team or [])}")


@broker_app.command("suspend")
def broker_suspend(
    account: str,
    reason: Annotated[str, typer.Option("--reason")] = "",
    db: BrokerDbOpt = None,
    log_key: LogKeyOpt = None,
    log_key_passphrase_file: LogKeyPassOpt = None,
    home: HomeOpt = None,
) -> None:
    """Suspend an account: every token it holds is refused from now on."""
    with _broker(db, None, home, log_key=log_key, log_pass=log_key_passphrase_file) as b:
        b.suspend(account, actor=audit._default_actor(), reason=reason)
    out.print(f"suspended {account}")


@broker_app.command("model")
def broker_model(
    name: str,
    sealed: Annotated[Path, typer.Argument(help="a sealed file (.wws)")],
    team: Annotated[str, typer.Option("--team", help="the team that owns it")],
    tokens: TokensOpt = None,
    compute: ComputeOpt = None,
    published: PublishedOpt = False,
    experts_per_token: ExpertsOpt = None,
    classification: Annotated[
        Path | None,
        typer.Option(
            "--classification",
            help="the JSON of `warden classify MODEL --json`, run where the keys are (needed for a hidden header)",
            show_default=False,
        ),
    ] = None,
    declaration: DeclarationOpt = None,
    db: BrokerDbOpt = None,
    store: StoreOpt = None,
    log_key: LogKeyOpt = None,
    log_key_passphrase_file: LogKeyPassOpt = None,
    home: HomeOpt = None,
) -> None:
    """Admit a sealed model (its digests and signature are checked; plaintext is refused) and record
    its export-control classification, on which the gate decides releases of it.  No key is used:
    the tensor shapes come from the visible header, or from --classification."""
    from .keys.local import TrustStore
    from .release import classify
    from .release.classify import Classification

    if classification is not None:
        try:
            c = Classification.from_json(_read_json(classification))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise WardenError(f"--classification {classification.name} is not the JSON of `warden classify "
                              "--json`") from None  # fmt: skip
    else:
        c = classify(sealed, tokens=tokens, declared_flop=compute, published=published,
                     experts_per_token=experts_per_token, keyless=True,
                     **_declaration_kw(declaration, home))  # fmt: skip
    with _broker(db, store, home, log_key=log_key, log_pass=log_key_passphrase_file) as b:
        size = b.add_model(name, team, sealed, trust=TrustStore.load(home), actor=audit._default_actor(),
                           classification=c)  # fmt: skip
    out.print(
        f"model {name} ({size} bytes) admitted for team {team}; {c.total_params:,} parameters"
        + (f", training compute {c.compute.flop:.2e} FLOP ({c.compute.method})" if c.compute else "")
    )


@app.command("serve")
def serve_cmd(
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8443,
    audience: Annotated[
        str, typer.Option("--audience", help="the aud claim tokens must carry")
    ] = "weightwarden-broker",
    rp_id: Annotated[str, typer.Option("--rp-id", help="WebAuthn relying party id (the console's host)")] = "localhost",
    origin: Annotated[
        list[str] | None, typer.Option("--origin", help="the console's origin [default: http://localhost:PORT]")
    ] = None,
    egress_rate: Annotated[
        float | None, typer.Option("--egress-rate", help="bytes/s each principal may stream [default: 50e6]")
    ] = None,
    egress_burst: Annotated[
        float | None, typer.Option("--egress-burst", help="bytes a principal may stream at once [default: 20e9]")
    ] = None,
    allow_sample_list: AllowSampleOpt = False,
    db: BrokerDbOpt = None,
    store: StoreOpt = None,
    log_key: LogKeyOpt = None,
    log_key_passphrase_file: LogKeyPassOpt = None,
    home: HomeOpt = None,
) -> None:
    """Run the access broker and its web console (FastAPI on uvicorn).  Put TLS in front of it.

    It holds sealed bytes, public keys and its own log key, never the keyring: start it in a home of its
    own (`warden broker init --trust-from KEYHOME`), with --log-key (and --log-key-passphrase-file); it
    restarts itself with an allowlisted environment (no PIN, token or passphrase it does not need)."""
    from ._harden import broker_env, harden_process, lock_pages, reexec_with
    from .broker.home import check_own_home

    reexec_with(broker_env(log_key))  # first: /proc/<pid>/environ shows only what the broker needs
    check_own_home(home or default_home())  # never beside a keyring or an agent socket
    import uvicorn

    from .broker.app import create_app
    from .broker.passkeys import Passkeys

    hard = harden_process(lock_memory=False)
    pp = None
    if egress_rate is not None or egress_burst is not None:
        pp = (egress_rate if egress_rate is not None else 50e6, egress_burst if egress_burst is not None else 20e9)
    b = _broker(db, store, home, audience, gate=True, per_principal=pp, log_key=log_key,
                log_pass=log_key_passphrase_file, allow_sample_list=allow_sample_list or None)  # fmt: skip
    pk = Passkeys(b, rp_id=rp_id, origins=tuple(origin or [f"http://localhost:{port}"]))
    # the log key is loaded: lock the pages mapped now (it is among them), not the streams' later mappings
    hard["memory_locked"], notice = lock_pages(future=False)
    hard["notices"] += [notice] if notice else []
    sys.setswitchinterval(0.001)  # short GIL slices: a policy decision never waits a 5 ms slice behind a stream
    for n in hard["notices"]:
        sys.stderr.write(f"notice: {n}\n")
    sys.stderr.write(f"process: dumpable {hard['dumpable']}, core file limit {hard['core_limit']}, "
                     f"memory locked {hard['memory_locked']}\n")  # fmt: skip
    sys.stderr.write(f"audit log public key (pin it): {b.log.public_key.hex()}\n")
    sys.stderr.write(f"audit log id (pin it with the key): {b.log.log_id.hex()}\n")
    sys.stderr.flush()
    try:
        from .broker.zerocopy import ZeroCopyH11Protocol  # weight streams leave by sendfile

        uvicorn.run(create_app(b, pk), host=host, port=port, log_level="warning", server_header=False,
                    http=ZeroCopyH11Protocol)  # fmt: skip
    finally:
        b.close()


@broker_app.command("enroll")
def broker_enroll(
    account: str,
    rp_id: Annotated[str, typer.Option("--rp-id")] = "localhost",
    db: BrokerDbOpt = None,
    log_key: LogKeyOpt = None,
    log_key_passphrase_file: LogKeyPassOpt = None,
    home: HomeOpt = None,
) -> None:
    """A one-time code (15 minutes) with which a person registers a passkey in the console."""
    from .broker.passkeys import Passkeys

    with _broker(db, None, home, log_key=log_key, log_pass=log_key_passphrase_file) as b:
        code = Passkeys(b, rp_id=rp_id).enroll_code(account, actor=audit._default_actor())
    sys.stdout.write(code + "\n")


@app.command("pull")
def pull_cmd(
    model: Annotated[str, typer.Argument(help="the model's name at the broker")],
    output: Annotated[Path, typer.Option("-o", "--output", help="where the sealed file goes")],
    url: Annotated[str, typer.Option("--broker", envvar="WARDEN_BROKER_URL", help="the broker's base URL")],
    account: Annotated[str, typer.Option("--account", envvar="WARDEN_ACCOUNT", help="your account id")],
    key: Annotated[
        Path, typer.Option("--key", envvar="WARDEN_ACCOUNT_KEY", help="your account's Ed25519 key (PEM, raw or hex)")
    ],
    request: Annotated[str | None, typer.Option("--request", help="an approved copy request's id")] = None,
    audience: Annotated[str, typer.Option("--audience")] = "weightwarden-broker",
    trust_key: Annotated[
        list[str] | None, typer.Option("--trust-key", help="trust only this signer (base64 or file); repeatable")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite OUTPUT")] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download sealed weights from the broker, resuming OUTPUT.part after a cut, and verify them
    (signature, every chunk digest) before they are put in place."""
    from .broker.client import BrokerClient, load_account_key

    trust: Any = _trust_keys(trust_key, home) if trust_key else TrustStore.load(home or default_home())
    with BrokerClient(url, account, load_account_key(key), audience=audience) as c:
        res = c.pull(model, output, request_id=request, trust=trust, force=force)
    from rich.markup import escape

    resumed = f", resumed at {res.resumed_from}" if res.resumed_from else ""
    _emit(res.to_json(), as_json, escape(f"OK: {res.path} ({res.bytes} bytes{resumed}), signed by {res.signer}"))


# -- export control ------------------------------------------------------------------------------
@app.command("classify")
def classify_cmd(
    model: Annotated[Path, typer.Argument(help="checkpoint: .safetensors, HF folder, sealed file or bundle")],
    tokens: TokensOpt = None,
    compute: ComputeOpt = None,
    chip_hours: Annotated[float | None, typer.Option("--chip-hours")] = None,
    peak_flops: Annotated[float | None, typer.Option("--peak-flops", help="peak dense FLOP/s per chip")] = None,
    utilization: Annotated[float | None, typer.Option("--utilization", help="0..1 [default 0.4]")] = None,
    published: PublishedOpt = False,
    experts_per_token: ExpertsOpt = None,
    country: Annotated[str | None, typer.Option("--country", help="destination (ISO 3166 alpha-2)")] = None,
    as_of: Annotated[str | None, typer.Option("--as-of", help="evaluate the rules at this date (YYYY-MM-DD)")] = None,
    rules: Annotated[Path | None, typer.Option("--rules", help="a signed rules file (FILE + FILE.sig)")] = None,
    rules_key: Annotated[str | None, typer.Option("--rules-key", help="Ed25519 key (hex) that signs --rules")] = None,
    declaration: DeclarationOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Parameters, training compute and the outcome under each export-control regime."""
    import datetime as _dt

    from .release import classify, load_rules
    from .release.rules import SHIPPED_RULES_KEY

    when = None
    if as_of:
        try:
            when = _dt.date.fromisoformat(as_of)
        except ValueError:
            raise typer.BadParameter("--as-of is YYYY-MM-DD") from None
    rs = None
    if rules:
        keys = [SHIPPED_RULES_KEY] + ([_pubkey(rules_key, "a rules file")] if rules_key else [])
        rs = load_rules(rules, keys)
    c = classify(model, rules=rs, as_of=when, country=country, tokens=tokens, declared_flop=compute,
                 chip_hours=chip_hours, peak_flops=peak_flops, utilization=utilization, published=published,
                 experts_per_token=experts_per_token, home=home, **_declaration_kw(declaration, home),
                 **_model_kw(model, home))  # fmt: skip
    j = c.to_json()
    if as_json:
        _emit(j, True)
        return
    comp = c.compute
    flop = f"{comp.flop:.2e} FLOP ({comp.method}, {comp.low:.1e}..{comp.high:.1e})" if comp else "unknown"
    out.print(f"{c.model}: {c.total_params:,} parameters ({c.active_params:,} active); training compute {flop}"
              + (f" [{c.source}]" if c.source else ""))  # fmt: skip
    if c.claimed:
        out.print(f"claimed, unsigned (config.json): {c.claimed.flop:.2e} FLOP: can only make an outcome stricter")
    from rich.markup import escape

    for doubt in c.doubts:
        out.print(f"needs review: {escape(ascii(doubt)[1:-1])}")
    t = Table("regime", "outcome", "reasons")
    for o in c.outcomes:
        t.add_row(o["regime"], o["outcome"], "; ".join(o["reasons"]))
    out.print(t)
    out.print(f"rules {c.rules_version}, as of {c.as_of}" + (f", destination {c.country}" if c.country else ""))


@app.command("declare")
def declare_cmd(
    model: Annotated[Path, typer.Argument(help="checkpoint: .safetensors, HF folder, sealed file or bundle")],
    output: Annotated[Path, typer.Option("-o", "--output", help="the declaration (FILE; FILE.sig beside it)")],
    by: Annotated[str, typer.Option("--by", help="who declares (name, role)")],
    tokens: TokensOpt = None,
    compute: ComputeOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Sign a training declaration for MODEL's weights with this keyring's compliance key (made when missing;
    trust its public key, `warden key export-public --purpose compliance`, in release/compliance-keys wherever
    declarations are checked)."""
    from .release.declaration import declare

    signer = _keyring(home).signer(purpose="compliance", create=True)
    d = declare(model, output, signer=signer, declared_by=by, compute_flop=compute, tokens=tokens,
                **_model_kw(model, home))  # fmt: skip
    from rich.markup import escape

    _emit(d.to_json(), as_json, f"declaration {escape(str(output))} for weights {d.model_sha256[:16]}… signed by "
          f"{d.signed_by}")  # fmt: skip


@app.command("screen")
def screen_cmd(
    name: Annotated[str, typer.Argument(help="a person or organisation; `update` with --file loads a new list")],
    alias: Annotated[list[str] | None, typer.Option("--alias", help="another name of the same party (repeat)")] = None,
    country: Annotated[str | None, typer.Option("--country", help="its country (ISO 3166 alpha-2)")] = None,
    threshold: Annotated[float, typer.Option("--threshold", min=0, max=100)] = 86.0,
    file: Annotated[
        Path | None, typer.Option("--file", help="a screening list (CSL JSON/CSV, OpenSanctions FtM)")
    ] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Screen NAME against the restricted-party list (`warden screen update --file F` loads a newer one)."""
    from .release.screen import screen, update_list

    if name == "update":
        if file is None:
            raise WardenError("warden screen update needs --file")
        rec = update_list(file, home)
        _emit(rec, as_json, f"screening list {rec['origin']}: {rec['entries']} entries, sha256 {rec['sha256'][:16]}…")
        return
    if country is not None:  # ISO 3166: USA, United States -> US; an unknown country is refused
        from .release.countries import resolve_country

        country = resolve_country(country)
    r, sample = screen(name, aliases=tuple(alias or ()), country=country, threshold=threshold, file=file, home=home)
    if sample:
        err.print("note: screening against the shipped SAMPLE list (fictitious); load a real one with "
                  "`warden screen update --file`")  # fmt: skip
    if as_json:
        _emit(r, True)
        return
    t = Table("score", "entry", "matched name", "source", "countries")
    for h in r["hits"]:
        t.add_row(f"{h['score']:.1f}", h["entry"]["name"], h["matched_name"], h["entry"]["source"],
                  ",".join(h["entry"]["countries"]))  # fmt: skip
    out.print(t)
    out.print(f"{r['decision'].upper()} (threshold {threshold:g}; list {r['list']['origin']}, "
              f"{r['list']['entries']} entries" + (f"; country {country}" if country else "") + ")")  # fmt: skip


# -- release and trace: per-recipient fingerprints ----------------------------------------------
@app.command("release")
def release_cmd(
    model: Annotated[Path, typer.Argument(help="the master: .safetensors file, model folder, sealed file or bundle")],
    to: Annotated[str, typer.Option("--to", help="the recipient (end user) this copy is for")],
    output: Annotated[Path, typer.Option("-o", "--output", help="where to write the fingerprinted copy")],
    country: Annotated[
        str | None, typer.Option("--country", help="destination country (ISO 3166 alpha-2); without it: review")
    ] = None,
    alias: Annotated[list[str] | None, typer.Option("--alias", help="another name of the recipient (repeat)")] = None,
    model_id: Annotated[
        str | None, typer.Option("--model-id", help="[default: the model's file or folder name]")
    ] = None,
    tokens: TokensOpt = None,
    compute: ComputeOpt = None,
    published: PublishedOpt = False,
    experts_per_token: ExpertsOpt = None,
    declaration: DeclarationOpt = None,
    request: Annotated[
        str | None, typer.Option("--request", help="the broker's approved release request (two-person rule)")
    ] = None,
    db: BrokerDbOpt = None,
    store: StoreOpt = None,
    recipient_key: Annotated[
        str | None,
        typer.Option(
            "--recipient-key",
            help="seal the copy to this age public key (age1...) [default: the key the recipient is enrolled with]",
            show_default=False,
        ),
    ] = None,
    seal_out: Annotated[bool, typer.Option("--seal", help="seal the copy under our own key instead")] = False,
    plaintext: Annotated[bool, typer.Option("--plaintext", help="write the copy in plaintext instead")] = False,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="leave files matching this pattern out (repeat; recorded)")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite the output")] = False,
    log_key: LogKeyOpt = None,
    log_key_passphrase_file: LogKeyPassOpt = None,
    allow_sample_list: AllowSampleOpt = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a copy of MODEL carrying a secret fingerprint of RECIPIENT, and record the release.

    The export-control gate decides first; anything but `allow` is refused unless --request names a
    release request the broker's approvers approved (which covers exactly the reasons they saw).
    The copy is sealed to the recipient's age key (--recipient-key, or the one `warden recipient add`
    enrolled), signed by our key; --seal seals it under our own key, --plaintext writes it in plaintext.
    With --request and a sealed copy, the copy is handed to the broker, which streams it to the requester."""
    from .release.gate import ReleaseDenied
    from .trace import ENROLLED, release

    if sum((recipient_key is not None, seal_out, plaintext)) > 1:
        raise WardenError("--recipient-key, --seal and --plaintext are exclusive: pick one output")
    kr = _keyring(home)
    ckw = {"tokens": tokens, "declared_flop": compute, "published": published, "experts_per_token": experts_per_token,
           **_declaration_kw(declaration, home)}  # fmt: skip
    sealing = not plaintext
    with contextlib.ExitStack() as stack:
        approval: Any = None
        b = None
        if request:
            b = stack.enter_context(_broker(db, store, home, log_key=log_key, log_pass=log_key_passphrase_file))

            def approval(d: Any) -> Any:
                return b.consume_release(request, d, actor=audit._default_actor())

        kw = {"provider": kr.provider(purpose="tracing", create=True), "country": country,
              "aliases": tuple(alias or ()), "approval": approval, "classify_kw": ckw, "model_id": model_id,
              "home": home, "db": db, "exclude": tuple(exclude or ()), "master_kw": _model_kw(model, home, kr),
              "seal": (kr.provider(), kr.signer()) if sealing else None,
              "recipient_key": None if seal_out or plaintext else (recipient_key or ENROLLED)}  # fmt: skip
        if allow_sample_list:
            from .release.gate import ReleaseGate

            kw["gate"] = ReleaseGate.from_home(home, allow_sample_list=True)
        try:
            rel = release(model, to, output, force=force, **kw)
        except ReleaseDenied as e:
            if as_json and e.decision is not None:
                _emit({"released": False, "gate": e.decision.to_json()}, True)
            elif e.decision is not None:
                t = Table("reason", "outcome", "detail")
                for r in e.decision.reasons:
                    t.add_row(_safe(r.code), _safe(r.outcome), _safe(r.text))
                err.print(t)
            raise
        if b is not None and sealing:
            b.attach_release(request, output, actor=audit._default_actor())
    _emit({"released": True, "release": rel.to_json(), "output": str(output)}, as_json,
          f"released {_safe(rel.model_id)} to {_safe(rel.recipient)} in {rel.country or '??'} (code {rel.code_id}; "
          f"gate: {rel.gate}, rules {rel.rules_version}; {rel.output}) at {_safe(str(output))}")  # fmt: skip


def _safe(text: str) -> str:
    """Text from files, lists or requests, escaped for the terminal (control characters, rich markup)."""
    from rich.markup import escape

    from .sealed.walk import shown

    return escape(shown(str(text)))


recipient_app = typer.Typer(no_args_is_help=True, help="Release recipients and the public keys copies are sealed to")
app.add_typer(recipient_app, name="recipient")


@recipient_app.command("add")
def recipient_add(
    name: Annotated[str, typer.Argument(help="the recipient, as `warden release --to` names them")],
    pubkey: Annotated[str, typer.Option("--pubkey", help="their age X25519 public key (age1...)")],
    replace: Annotated[bool, typer.Option("--replace", help="replace the key they are enrolled with")] = False,
    db: BrokerDbOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Enroll a recipient with their public key: their copies are sealed to it, and only they open them."""
    from .trace import add_recipient

    r = add_recipient(name, pubkey, home=home, db=db, replace=replace)
    _emit(r, as_json, f"recipient {_safe(r['recipient'])} enrolled with {r['pubkey']}")


@recipient_app.command("list")
def recipient_list(db: BrokerDbOpt = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Enrolled recipients: name, canonical identity, public key."""
    from .trace import recipients

    rows = recipients(home=home, db=db)
    if as_json:
        _emit(rows, True)
        return
    t = Table("recipient", "identity", "public key", "added")
    for r in rows:
        t.add_row(_safe(r["recipient"]), _safe(r["identity"]), r["pubkey"] or "", r["added"])
    out.print(t)


@license_app.command("add")
def license_add(
    license_id: Annotated[str, typer.Argument(help="the license number")],
    regime: Annotated[list[str], typer.Option("--regime", help="a regime id it covers (repeat)")],
    recipient: Annotated[str, typer.Option("--recipient", help="the licensed end user")],
    country: Annotated[list[str], typer.Option("--country", help="a licensed destination (repeat)")],
    model: Annotated[list[str], typer.Option("--model", help="a model id it covers, or * (repeat)")],
    valid_from: Annotated[str, typer.Option("--from", help="YYYY-MM-DD")],
    valid_until: Annotated[str, typer.Option("--until", help="YYYY-MM-DD")],
    authority: Annotated[str, typer.Option("--authority", help="who issued it (e.g. BIS)")] = "",
    reference: Annotated[str, typer.Option("--reference", help="a document reference")] = "",
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """File an export license; the gate allows what it covers (regime, model, recipient, country, dates)."""
    from .release.gate import LicenseRecord, file_license

    rec = LicenseRecord.from_json({"id": license_id, "regimes": regime, "recipient": recipient, "countries": country,
                                   "models": model, "valid_from": valid_from, "valid_until": valid_until,
                                   "authority": authority, "reference": reference})  # fmt: skip
    book = file_license(rec, home)
    _emit(rec.to_json(), as_json, f"license {license_id} filed ({len(book.records)} on file)")


@license_app.command("list")
def license_list(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """The license records on file."""
    from .release.gate import LicenseBook

    book = LicenseBook.load((home or default_home()) / "release" / "licenses.json")
    rows = [r.to_json() for r in book.records]
    if as_json:
        _emit(rows, True)
        return
    t = Table("id", "regimes", "recipient", "countries", "models", "valid")
    for r in rows:
        t.add_row(r["id"], ",".join(r["regimes"]), r["recipient"], ",".join(r["countries"]), ",".join(r["models"]),
                  f"{r['valid_from']}..{r['valid_until']}")  # fmt: skip
    out.print(t)


@app.command("trace")
def trace_cmd(
    suspect: Annotated[Path, typer.Argument(help="the leaked copy")],
    model: Annotated[Path, typer.Option("--model", help="the original it was released from")],
    model_id: Annotated[
        str | None, typer.Option("--model-id", help="[default: the model's file or folder name]")
    ] = None,
    eps: Annotated[float, typer.Option("--eps", help="bound on accusing any innocent recipient")] = 1e-6,
    population: Annotated[
        int | None, typer.Option("--population", help="n for the bound [default: recipients]")
    ] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="also write a PNG figure here (needs matplotlib)")] = None,
    db: BrokerDbOpt = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Name the recipient(s) whose fingerprint SUSPECT carries, or say that no one can be accused."""
    from .trace import trace

    kr = _keyring(home)
    rep = trace(suspect, model, provider=kr.provider(purpose="tracing"), model_id=model_id, home=home, db=db, eps=eps,
                population=population, **(_model_kw(suspect, home, kr) or _model_kw(model, home, kr)))  # fmt: skip
    j = rep.to_json()
    if plot is not None:
        from .plots import trace_plot

        trace_plot(rep, plot)
    if as_json:
        _emit(j, True)
        return
    t = Table("recipient", "score", "accused", "false-accusation bound")
    acc = {a["recipient"]: a for a in rep.accused}
    for r in rep.ranking:
        a = acc.get(r["recipient"])
        t.add_row(_safe(r["recipient"]), f"{r['score']:.1f}", "yes" if a else "no",
                  f"{a['false_accusation_bound']:.2e}" if a else "")  # fmt: skip
    out.print(t)
    out.print(f"{j['decision']} (threshold {j['threshold']:.1f}, eps {eps:g}, {rep.recipients} recipients)")


def main(argv: list[str] | None = None) -> int:
    cmd = typer.main.get_command(app)
    try:
        cmd.main(args=argv, prog_name="warden", standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        sys.stderr.write("error: aborted\n")
        return 1
    except WardenError as e:
        sys.stderr.write(f"error: {type(e).__name__}: {safe(e)}\n")
        return 1
    except OSError as e:
        sys.stderr.write(f"error: {type(e).__name__}: {safe(e.strerror or e)} ({safe(e.filename)})\n")
        return 1
    except KeyError as e:
        sys.stderr.write(f"error: no such tensor or file: {safe(e)}\n")
        return 1
    except Exception as e:  # usage errors from the CLI framework
        fmt = getattr(e, "format_message", None)
        if fmt is None or not hasattr(e, "exit_code"):
            raise
        sys.stderr.write(f"error: {safe(fmt())}\n")
        return 1
    finally:
        while _audit_ctx:
            _audit_ctx.pop().__exit__(None, None, None)
    return 0


def _entry() -> None:  # pragma: no cover
    sys.exit(main())


__all__ = ["app", "ed25519_key_id", "main"]

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
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from . import api
from .errors import KeyringError, WardenError
from .keys.local import KdfParams, Keyring, TrustStore, default_home
from .keys.provider import ed25519_key_id

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Guard the weights of AI models.")
key_app = typer.Typer(no_args_is_help=True, help="Keys in the local keyring.")
trust_app = typer.Typer(no_args_is_help=True, help="Signers whose manifests `verify` accepts.")
app.add_typer(key_app, name="key")
app.add_typer(trust_app, name="trust")

out = Console()
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON report.")]
HomeOpt = Annotated[
    Path | None, typer.Option("--home", envvar="WARDEN_HOME", help="Keyring directory.", show_default=False)
]


def _emit(obj: Any, as_json: bool, human: str | Table | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    elif human is not None:
        out.print(human)


def _passphrase(confirm: bool = False) -> str:
    pw = os.environ.get("WARDEN_PASSPHRASE")
    if pw is not None:
        return pw
    if not sys.stdin.isatty():
        raise KeyringError("set WARDEN_PASSPHRASE to unlock the keyring non-interactively")
    pw = getpass.getpass("Keyring passphrase: ")
    if confirm and getpass.getpass("Repeat passphrase: ") != pw:
        raise KeyringError("the passphrases differ")
    return pw


def _keyring(home: Path | None) -> Keyring:
    return Keyring.unlock(home or default_home(), _passphrase())


@contextlib.contextmanager
def _progress(total: int, what: str, enabled: bool) -> Iterator[Any]:
    """A rich progress bar on stderr for long operations (hidden for --json and non-terminals)."""
    if not enabled or total < 256 * 1024 * 1024 or not err.is_terminal:
        yield None
        return
    cols = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress("[progress.description]{task.description}", *cols, console=err, transient=True) as p:
        task = p.add_task(what, total=total)
        yield lambda n: p.advance(task, n)


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
    t = Table("key id", "kind", "version", "state", "current", "default", "created")
    for k in keys:
        t.add_row(
            k["key_id"], k["kind"], str(k["version"]), k["state"], str(k["current"]), str(k["default"]), k["created"]
        )
    _emit(keys, as_json, t)


@key_app.command("new")
def key_new(
    kind: Annotated[str, typer.Option(help="kek or signing")] = "kek", home: HomeOpt = None, as_json: JsonOpt = False
) -> None:
    """Create a new key-encryption key or signing key."""
    kr = _keyring(home)
    if kind == "kek":
        kid = kr.new_kek()
    elif kind == "signing":
        kid = kr.new_signing_key()
    else:
        raise WardenError("--kind must be kek or signing")
    kr.save()
    _emit({"key_id": kid, "kind": kind}, as_json, f"new {kind} key {kid}")


@key_app.command("export-public")
def key_export_public(
    key_id: Annotated[str | None, typer.Argument(help="signing key id (default: the default signer)")] = None,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a signing key's public key, for others to `warden trust add`."""
    signer = _keyring(home).signer(key_id)
    pub = base64.b64encode(signer.public_key).decode()
    _emit({"key_id": signer.key_id, "public_key": pub}, as_json, f"{signer.key_id} {pub}")


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


@trust_app.command("add")
def trust_add(
    public_key: Annotated[str, typer.Argument(help="base64 public key, or a file holding it")],
    label: Annotated[str, typer.Option(help="who this is")] = "",
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Trust a signer's public key."""
    ts = TrustStore.load(home or default_home())
    kid = ts.add(_parse_public(public_key), label)
    ts.save()
    _emit({"key_id": kid, "label": label}, as_json, f"trusted {kid}")


@trust_app.command("list")
def trust_list(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List trusted signers."""
    ts = TrustStore.load(home or default_home())
    rows = [{"key_id": k, "label": v.get("label", "")} for k, v in sorted(ts.signers.items())]
    t = Table("key id", "label")
    for r in rows:
        t.add_row(r["key_id"], r["label"])
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
    force: Annotated[bool, typer.Option("--force", help="overwrite the output")] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Seal a checkpoint: encrypt, wrap its data key, sign its manifest."""
    kr = _keyring(home)
    with _progress(_size(src), "sealing", not as_json) as prog:
        results = api.seal(
            src, output, keyring=kr, hide_header=hide_header, chunk_size=chunk_size, force=force, progress=prog
        )
    rows = [
        {"path": str(r.path), "file_id": r.file_id, "kind": r.kind, "bytes": r.data_len, "chunks": r.n_chunks,
         "signer": r.signer, "header_hidden": r.hidden}
        for r in results
    ]  # fmt: skip
    _emit({"sealed": rows}, as_json, f"sealed {len(rows)} file(s) into {output}, signed by {results[0].signer}")


@app.command("open")
def open_(
    src: Annotated[Path, typer.Argument(help="sealed file or bundle")],
    output: Annotated[Path, typer.Option("-o", "--output", help="where to write the PLAINTEXT")],
    force: Annotated[bool, typer.Option("--force", help="overwrite the output")] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Decrypt a sealed checkpoint to a plaintext file: only when you must have one on disk."""
    kr = _keyring(home)
    total = api.inspect(src)
    nbytes = sum(m["data_len"] for m in total.get("members", [total]))
    with _progress(nbytes, "opening", not as_json) as prog:
        paths = api.unseal(src, output, keyring=kr, force=force, progress=prog)
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
) -> None:
    """Check the signature and every chunk digest without any key; writes nothing."""
    trust: Any = [_parse_public(k) for k in trust_key] if trust_key else TrustStore.load(home or default_home())
    kr = _keyring(home) if deep else None
    info = api.inspect(src)
    nbytes = sum(m["data_len"] for m in info.get("members", [info]))
    with _progress(nbytes, "verifying", not as_json) as prog:
        rep = api.verify(src, trust=trust, deep=deep, keyring=kr, progress=prog)
    _emit(rep.to_json(), as_json, f"OK: {rep.files} file(s), {rep.chunks} chunks, signed by {rep.signer}" + (
        ", every tag checked" if deep else ""))  # fmt: skip


@app.command()
def inspect(src: Annotated[Path, typer.Argument(help="sealed file or bundle")], as_json: JsonOpt = False) -> None:
    """Show what anyone can see without a key."""
    info = api.inspect(src)
    if as_json:
        _emit(info, True)
        return
    for m in info.get("members", [info]):
        header = "hidden" if m["header_hidden"] else "visible"
        out.print(
            f"[bold]{m.get('name', '(hidden name)')}[/bold]  {m['kind']}  {m['data_len']} bytes  "
            f"{m['n_chunks']} chunks  signer {m['signer']}  header {header}"
        )
        if m.get("tensors"):
            t = Table("tensor", "dtype", "shape")
            for name, ti in list(m["tensors"].items())[:50]:
                t.add_row(name, ti["dtype"], str(ti["shape"]))
            out.print(t)
            if len(m["tensors"]) > 50:
                out.print(f"... {len(m['tensors']) - 50} more")


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
        sys.stderr.write(f"error: {type(e).__name__}: {e}\n")
        return 1
    except OSError as e:
        sys.stderr.write(f"error: {type(e).__name__}: {e.strerror or e} ({e.filename})\n")
        return 1
    except KeyError as e:
        sys.stderr.write(f"error: no such tensor or file: {e}\n")
        return 1
    except Exception as e:  # usage errors from the CLI framework
        fmt = getattr(e, "format_message", None)
        if fmt is None or not hasattr(e, "exit_code"):
            raise
        sys.stderr.write(f"error: {fmt()}\n")
        return 1
    return 0


def _entry() -> None:  # pragma: no cover
    sys.exit(main())


__all__ = ["app", "ed25519_key_id", "main"]

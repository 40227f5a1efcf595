"""`warden init`, `warden key ...` (the local keyring's keys and their lifecycle) and `warden trust ...`."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Annotated

import typer

from ..errors import WardenError
from ..keys.keyring import Keyring
from ..keys.pubkey import parse_public_key
from ._common import HomeOpt, JsonOpt, SignerOpt, Table, _emit, _ws

key_app = typer.Typer(no_args_is_help=True, help="Keys in the local keyring.")
trust_app = typer.Typer(no_args_is_help=True, help="Signers whose manifests `verify` accepts.")


def init(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Create the local keyring (a KEK and a signing key) protected by a passphrase (Argon2id)."""
    kr = _ws(home).create_keyring()
    info = {"home": str(kr.home), "keys": kr.list_keys()}
    _emit(info, as_json, f"keyring created in {kr.home}")


@key_app.command("list")
def key_list(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List keys (ids, versions, states; never key material)."""
    keys = _ws(home).keyring.list_keys()
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
    from ..keys.provider import KEK_PURPOSES, SIGNING_PURPOSES, check_purpose

    kind = "signing" if signing else kind
    if kind not in ("kek", "signing"):
        raise WardenError("--kind must be kek or signing")
    purpose = check_purpose(purpose or "sealing", SIGNING_PURPOSES if kind == "signing" else KEK_PURPOSES,
                            f"--purpose (for a {kind} key)")  # fmt: skip
    if provider is not None:
        if not provider.startswith("pkcs11:"):
            raise WardenError("--provider creates keys in a PKCS#11 token; KMS and Vault keys are made there")
        from ..keys.pkcs11 import from_uri, signer_from_uri

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
    kr = _ws(home).keyring
    if kind == "kek":
        kid = kr.new_kek(name, purpose=purpose)
    elif isinstance(kr, Keyring):
        kid = kr.new_signing_key(purpose=purpose)
    else:  # the custody agent's keyring (AgentKeyring): no such operation over the socket
        raise WardenError("--kind signing: under custody the agent makes each purpose's signing key when first "
                          "used, and no others; nothing was done")  # fmt: skip
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
        signer = _ws(home).signer(signer_uri, purpose)
    else:
        signer = _ws(home).keyring.signer(key_id, purpose=purpose or (None if key_id else "sealing"))
    pub = base64.b64encode(signer.public_key).decode()
    _emit({"key_id": signer.key_id, "purpose": signer.purpose, "public_key": pub}, as_json,
          f"{signer.key_id} {pub}")  # fmt: skip


KeyArg = Annotated[str | None, typer.Argument(help="KEK id (default: the keyring's default KEK)")]


@key_app.command("rotate")
def key_rotate(key_id: KeyArg = None, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Make a new version of a KEK; new seals use it (then `warden rewrap` the old files)."""
    p = _ws(home).keyring.provider(key_id)
    v = p.rotate()
    _emit({"key_id": p.key_id, "version": v}, as_json, f"{p.key_id} is now at version {v}")


def _version_cmd(action: str, key_id: str, version: int, home: Path | None, as_json: bool) -> None:
    p = _ws(home).keyring.provider(key_id)
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
    ts = _ws(home).trust_store()
    kid = ts.add(parse_public_key(public_key, "PUBLIC_KEY", files=True), label, purpose)
    ts.save()
    _emit({"key_id": kid, "label": label, "purpose": purpose}, as_json, f"trusted {kid} for {purpose}")


@trust_app.command("list")
def trust_list(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """List trusted signers and what each is trusted for."""
    from rich.markup import escape

    ts = _ws(home).trust_store()
    rows = [{"key_id": k, "label": v.get("label", ""), "purpose": ts.purpose(k)} for k, v in sorted(ts.signers.items())]
    t = Table("key id", "purpose", "label")
    for r in rows:
        t.add_row(r["key_id"], r["purpose"], escape(str(r["label"])))
    _emit(rows, as_json, t)


@trust_app.command("remove")
def trust_remove(key_id: str, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Stop trusting a signer."""
    ts = _ws(home).trust_store()
    ts.remove(key_id)
    ts.save()
    _emit({"ok": True, "removed": key_id}, as_json, f"removed {key_id}")


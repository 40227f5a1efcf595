"""The tamper-evident audit log: `warden audit ...` (heads, proofs, verification, export)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import WardenError
from ._common import HomeOpt, JsonOpt, _emit, _pubkey, _read_json, _ws, err

audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident audit log: heads, proofs, verification")
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


def _audit_log(db: str | None, home: Path | None, key: bytes | None = None, log_id: str | None = None) -> Any:
    """The log the trail rule picks (trail.locate): --db, else the home's broker log, else its local log."""
    return _ws(home, db=db).audit_log(key, _log_id(log_id))


def _log_id(text: str | None) -> bytes | None:
    from ..merkle import parse_log_id

    try:
        return parse_log_id(text, "--log-id")
    except WardenError as e:
        raise WardenError(str(e)) from None


def _log_key(pubkey: str | None, db: str | None, home: Path | None) -> bytes:
    """--pubkey, else the public half of the key that signs the picked log (the broker's log key file,
    or the home's local audit/log.key), read outside the database."""
    if pubkey is None:
        own = _ws(home, db=db).log_public_key()
        if own is not None:
            return own
    return _pubkey(pubkey, "verifying")


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
    from ..merkle import InclusionProof, check_inclusion

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
    from ..merkle import SignedHead

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
    ws = _ws(home, db=db)
    pub = ws.log_public_key()
    if pub is None:
        if ws.trail_is_broker_log():
            raise WardenError("the broker's log key is not a file here (WARDEN_LOG_KEY names a token or an agent): "
                              "take its public key from `warden broker init` and pin it with --pubkey")  # fmt: skip
        raise WardenError("no audit-log key yet: the first audited operation creates it with the log")
    _emit({"public_key": pub.hex()}, as_json, pub.hex())


@audit_app.command("export")
def audit_export(
    db: DbOpt = None,
    start: Annotated[int, typer.Option("--start", min=0, help="first event index")] = 0,
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document (a list) instead of JSON lines")] = False,
) -> None:
    """Events as JSON lines (index, leaf hash, event) for a SIEM."""
    rows = _audit_log(db, home).export(start)
    if as_json:
        _emit(list(rows), True)
        return
    for row in rows:
        sys.stdout.write(json.dumps(row, sort_keys=True, separators=(",", ":")) + "\n")

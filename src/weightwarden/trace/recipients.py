"""Release recipients: enrolling one with their age public key, listing them; and the trace store of a home."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import audit, trail
from ..audit import AuditAction
from ..errors import WardenError
from .store import TraceStore, shown

__all__ = ["add_recipient", "open_store", "recipients"]


def open_store(home: Path | None, db: str | None = None) -> TraceStore:
    """Tracing secrets under ``home/trace``; recipients and releases in the broker's database (``db``, default
    the broker's embedded one, ``home/broker/broker.db``), where the broker and its replicas see them."""
    from ..home import default_home

    h = home or default_home()
    if db is None:
        (h / "broker").mkdir(parents=True, exist_ok=True, mode=0o700)
        db = f"sqlite:///{h / 'broker' / 'broker.db'}"
    return TraceStore(h / "trace", db)


def add_recipient(name: str, pubkey: str, *, home: Path | None = None, db: str | None = None,
                  replace: bool = False, sink: audit.AuditSink | None = None) -> dict[str, Any]:  # fmt: skip
    """Enroll a release recipient with their age X25519 public key (sealed copies are sealed to it).
    The name is canonicalised; a bad name or key is refused (one line) and the refusal audited (in
    ``sink``, default: the trail of ``home`` / ``db``, one append)."""
    from ..keys.age import check_recipient
    from .store import recipient_name

    if sink is None:
        with trail.operation(home, db) as t:
            return add_recipient(name, pubkey, home=home, db=db, replace=replace, sink=t)
    try:
        n = recipient_name(name, "NAME")
        key = check_recipient(pubkey, "--pubkey")
        store = open_store(home, db)
        store.add_recipient(n, key, replace=replace)
    except WardenError as e:
        sink.emit(audit.event(AuditAction.RECIPIENT_ADD, "denied", subject=shown(str(name))[:256],
                              detail={"error": type(e).__name__, "message": str(e)[:2000]}))  # fmt: skip
        raise
    detail = {"pubkey": key, "name_key": n.key}
    sink.emit(audit.event(AuditAction.RECIPIENT_ADD, "ok", subject=n.display, detail=detail))
    return {"recipient": n.display, "pubkey": key, "identity": n.key}


def recipients(*, home: Path | None = None, db: str | None = None) -> list[dict[str, Any]]:
    """Every enrolled recipient identity: the name shown, its canonical key and public key."""
    return open_store(home, db).directory_rows()


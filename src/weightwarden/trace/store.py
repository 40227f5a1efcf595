"""Release records and per-model tracing secrets.

``$WARDEN_HOME/trace/`` holds, per enrolled model, a JSON record with the tracing parameters and its
32-byte master secret *wrapped by a key provider* (the keyring, an HSM or KMS: the custody layer), and
one SQLite database of releases (recipient, recipient index, time, model version, code id, output
digest), the state the broker will share.  The code key and the embedding key derive from the
master secret with HMAC-SHA256 under distinct labels.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .._atomic import atomic_write_bytes
from ..errors import FormatError, WardenError
from ..keys.provider import KeyProvider, KeySlot

__all__ = ["ModelRecord", "ReleaseRecord", "TraceError", "TraceStore"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


class TraceError(WardenError):
    """Tracing state is missing or inconsistent (model not enrolled, unknown recipient, bad id)."""


@dataclass(frozen=True)
class ModelRecord:
    model_id: str
    code_length: int
    cutoff: float
    alpha: float
    slot: KeySlot
    created: str

    def to_json(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "code_length": self.code_length, "cutoff": self.cutoff,
                "alpha": self.alpha, "slot": self.slot.to_json(), "created": self.created, "version": 1}  # fmt: skip

    @classmethod
    def from_json(cls, obj: Any) -> ModelRecord:
        try:
            return cls(str(obj["model_id"]), int(obj["code_length"]), float(obj["cutoff"]), float(obj["alpha"]),
                       KeySlot.from_json(obj["slot"]), str(obj["created"]))  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"tracing record is malformed ({type(e).__name__})") from None


@dataclass(frozen=True)
class ReleaseRecord:
    model_id: str
    recipient: str
    index: int
    at: str
    model_version: str
    code_id: str
    output_sha256: str | None
    country: str | None = None
    gate: str = ""  # the export-control decision ("allow", or "<decision>/overridden")
    gate_digest: str = ""
    rules_version: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _context(model_id: str) -> bytes:
    return b"warden-trace-secret|" + model_id.encode()


def derive(secret: bytes | bytearray, label: str) -> bytes:
    return hmac.new(bytes(secret), label.encode(), hashlib.sha256).digest()


class TraceStore:
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    # -- models -----------------------------------------------------------------------
    def _model_path(self, model_id: str) -> Path:
        if not _ID.match(model_id):
            raise TraceError("a model id is 1-128 characters: letters, digits and . _ : @ -")
        return self.root / "models" / f"{model_id}.json"

    def enroll(self, model_id: str, provider: KeyProvider, *, code_length: int, cutoff: float, alpha: float,
               now: datetime | None = None) -> ModelRecord:  # fmt: skip
        path = self._model_path(model_id)
        if path.exists():
            return self.model(model_id)
        secret = bytearray(secrets.token_bytes(32))
        try:
            slot = provider.wrap(secret, _context(model_id))
        finally:
            secret[:] = bytes(32)
        rec = ModelRecord(model_id, code_length, cutoff, alpha, slot, (now or datetime.now(UTC)).isoformat())
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(path, json.dumps(rec.to_json(), sort_keys=True).encode())
        return rec

    def model(self, model_id: str) -> ModelRecord:
        path = self._model_path(model_id)
        if not path.exists():
            raise TraceError(f"model {model_id!r} has no releases (nothing to trace against)")
        try:
            return ModelRecord.from_json(json.loads(path.read_bytes()))
        except ValueError:
            raise FormatError("tracing record is not JSON") from None

    def secret(self, rec: ModelRecord, provider: KeyProvider) -> bytearray:
        return provider.unwrap(rec.slot, _context(rec.model_id))

    # -- releases ---------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = sqlite3.connect(self.root / "releases.db", isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("""CREATE TABLE IF NOT EXISTS recipients (model_id TEXT NOT NULL, recipient TEXT NOT NULL,
                      idx INTEGER NOT NULL, PRIMARY KEY (model_id, recipient), UNIQUE (model_id, idx))""")
        db.execute("""CREATE TABLE IF NOT EXISTS releases (id INTEGER PRIMARY KEY, model_id TEXT NOT NULL,
                      recipient TEXT NOT NULL, at TEXT NOT NULL, model_version TEXT NOT NULL,
                      code_id TEXT NOT NULL, output_sha256 TEXT)""")
        cols = {r[1] for r in db.execute("PRAGMA table_info(releases)")}
        for col in ("country", "gate", "gate_digest", "rules_version"):  # added with the export-control gate
            if col not in cols:
                db.execute(f"ALTER TABLE releases ADD COLUMN {col} TEXT")
        return db

    def recipient_index(self, model_id: str, recipient: str) -> int:
        """The recipient's codeword index for this model, assigned on first release (in one transaction)."""
        if not recipient or len(recipient) > 256 or any(ord(c) < 32 for c in recipient):
            raise TraceError("a recipient is 1-256 printable characters")
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT idx FROM recipients WHERE model_id=? AND recipient=?",
                             (model_id, recipient)).fetchone()  # fmt: skip
            if row is None:
                (n,) = db.execute("SELECT COUNT(*) FROM recipients WHERE model_id=?", (model_id,)).fetchone()
                db.execute("INSERT INTO recipients VALUES (?,?,?)", (model_id, recipient, n))
                row = (n,)
            db.execute("COMMIT")
            return int(row[0])
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def record(self, rel: ReleaseRecord) -> None:
        db = self._db()
        try:
            db.execute("INSERT INTO releases (model_id, recipient, at, model_version, code_id, output_sha256, country, "
                       "gate, gate_digest, rules_version) VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (rel.model_id, rel.recipient, rel.at, rel.model_version, rel.code_id, rel.output_sha256,
                        rel.country, rel.gate, rel.gate_digest, rel.rules_version))  # fmt: skip
        finally:
            db.close()

    def recipients(self, model_id: str) -> list[str]:
        db = self._db()
        try:
            rows = db.execute("SELECT recipient FROM recipients WHERE model_id=? ORDER BY idx", (model_id,)).fetchall()
        finally:
            db.close()
        return [r[0] for r in rows]

    def releases(self, model_id: str | None = None) -> list[dict[str, Any]]:
        db = self._db()
        try:
            q = (
                "SELECT model_id, recipient, at, model_version, code_id, output_sha256, country, gate, gate_digest, "
                "rules_version FROM releases"
            )
            rows = db.execute(q + (" WHERE model_id=?" if model_id else "") + " ORDER BY id",
                              (model_id,) if model_id else ()).fetchall()  # fmt: skip
        finally:
            db.close()
        keys = (
            "model_id",
            "recipient",
            "at",
            "model_version",
            "code_id",
            "output_sha256",
            "country",
            "gate",
            "gate_digest",
            "rules_version",
        )
        return [dict(zip(keys, r, strict=True)) for r in rows]

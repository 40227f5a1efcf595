"""Release records and per-model tracing secrets.

``$WARDEN_HOME/trace/`` holds, per enrolled model, a JSON record with the tracing parameters and its
32-byte master secret *wrapped by a key provider* (the keyring, an HSM or KMS: the custody layer) under a
KEK of its own purpose: the keyring's ``tracing`` KEK, never the KEK that wraps sealed files' data keys
(a provider that says it is of another purpose is refused, :class:`KeyPurposeError`).
Recipients (with their codeword index) and releases (recipient, time, model version, code id, output
digest, destination, export-gate decision, rules version) are rows of an SQL database: the broker's
(SQLite embedded, PostgreSQL shared) when its URL is given, else ``trace/releases.db``.
The code key and the embedding key derive from the
master secret with HMAC-SHA256 under distinct labels.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .._atomic import atomic_write_bytes
from ..errors import FormatError, KeyPurposeError, WardenError
from ..keys.provider import KeyProvider, KeySlot
from ._kernel import MAX_SYMBOLS

__all__ = ["ModelRecord", "ReleaseRecord", "TraceError", "TraceStore"]

RECORD_VERSION = 2  # the model record's version; version 2 marks with chip layout 2 (docs/TRACING.md)
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
                "alpha": self.alpha, "slot": self.slot.to_json(), "created": self.created,
                "version": RECORD_VERSION}  # fmt: skip

    @classmethod
    def from_json(cls, obj: Any) -> ModelRecord:
        if not isinstance(obj, dict):
            raise FormatError("tracing record is malformed (not an object)")
        version = obj.get("version", 1)
        if version != RECORD_VERSION:
            raise FormatError(
                f"tracing record version {version!r} is not supported (this weightwarden reads version "
                f"{RECORD_VERSION}, chip layout 2; version 1 came from pre-release builds)"
            )
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


def _tracing(provider: KeyProvider) -> KeyProvider:
    """Providers that know their purpose (the keyring's, the agent's) must be ``tracing`` ones."""
    purpose = getattr(provider, "purpose", "tracing")
    if purpose != "tracing":
        raise KeyPurposeError(f"tracing secrets are wrapped by a tracing KEK, not a {purpose!r} one "
                              "(Keyring.provider(purpose='tracing', create=True))")  # fmt: skip
    return provider


def derive(secret: bytes | bytearray, label: str) -> bytes:
    return hmac.new(bytes(secret), label.encode(), hashlib.sha256).digest()


_RELEASE_COLUMNS = (
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


class TraceStore:
    """Per-model tracing records under ``root``; recipients and releases in the SQL database ``url``
    (default: ``root/releases.db``; give the broker's URL to share them with the broker and its replicas)."""

    def __init__(self, root: str | os.PathLike[str], url: str | None = None):
        self.root = Path(root)
        self.url = url
        self._eng: Any = None
        self._rcp: Any = None
        self._rel: Any = None

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
        if not 0 < code_length <= MAX_SYMBOLS or code_length % 4:
            raise TraceError(f"a code length is a multiple of 4 from 4 to {MAX_SYMBOLS}")
        _tracing(provider)
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
        try:
            return _tracing(provider).unwrap(rec.slot, _context(rec.model_id))
        except KeyPurposeError as e:
            raise KeyPurposeError(f"the tracing secret of {rec.model_id!r} is not under a tracing KEK ({e}); a "
                                  "record enrolled before tracing KEKs existed is not read") from None

    # -- releases ---------------------------------------------------------------------
    def _engine(self) -> Any:
        if self._eng is None:
            import sqlalchemy as sa

            url = self.url
            if url is None:
                self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
                url = f"sqlite:///{self.root / 'releases.db'}"
            kw: dict[str, Any] = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
            self._eng = sa.create_engine(url, **kw)
            if url.startswith("sqlite"):
                from ..broker.auditlog import _sqlite_begin_immediate

                _sqlite_begin_immediate(self._eng, synchronous="FULL")
            md = sa.MetaData()
            C = sa.Column
            self._rcp = sa.Table("ww_trace_recipients", md, C("model_id", sa.String(128), primary_key=True),
                                 C("recipient", sa.String(256), primary_key=True), C("idx", sa.Integer, nullable=False),
                                 sa.UniqueConstraint("model_id", "idx"))  # fmt: skip
            self._rel = sa.Table("ww_trace_releases", md, C("id", sa.Integer, primary_key=True, autoincrement=True),
                                 *(C(k, sa.String(256)) for k in _RELEASE_COLUMNS))  # fmt: skip
            with self._eng.connect() as c, c.execution_options(ww_write=True).begin():  # creators take turns
                if c.dialect.name == "postgresql":
                    c.exec_driver_sql("SELECT pg_advisory_xact_lock(7317101)")  # (SQLite: BEGIN IMMEDIATE)
                md.create_all(c)
        return self._eng

    def close(self) -> None:
        if self._eng is not None:
            self._eng.dispose()
            self._eng = None

    def recipient_index(self, model_id: str, recipient: str) -> int:
        """The recipient's codeword index for this model, assigned on first release: indices are dense and
        unique per model, also when several processes release at once (a unique key; the loser retries)."""
        import sqlalchemy as sa

        if not recipient or len(recipient) > 256 or any(ord(c) < 32 for c in recipient):
            raise TraceError("a recipient is 1-256 printable characters")
        eng, t = self._engine(), self._rcp
        mine = sa.select(t.c.idx).where(t.c.model_id == model_id, t.c.recipient == recipient)
        for _ in range(50):
            with eng.connect() as c:
                row = c.execute(mine).first()
            if row is not None:
                return int(row[0])
            try:
                with eng.connect() as c, c.execution_options(ww_write=True).begin():  # SQLite: the write lock at BEGIN
                    n = c.execute(
                        sa.select(sa.func.count()).select_from(t).where(t.c.model_id == model_id)
                    ).scalar_one()
                    c.execute(sa.insert(t).values(model_id=model_id, recipient=recipient, idx=int(n)))
                return int(n)
            except sa.exc.IntegrityError:
                continue  # another release took that index (or that recipient) first: look again
        raise TraceError("could not assign a recipient index (too much contention)")

    def record(self, rel: ReleaseRecord) -> None:
        import sqlalchemy as sa

        with self._engine().connect() as c, c.execution_options(ww_write=True).begin():
            c.execute(sa.insert(self._rel).values(**{k: getattr(rel, k) for k in _RELEASE_COLUMNS}))

    def recipients(self, model_id: str) -> list[str]:
        import sqlalchemy as sa

        eng = self._engine()
        t = self._rcp
        with eng.connect() as c:
            rows = c.execute(sa.select(t.c.recipient).where(t.c.model_id == model_id).order_by(t.c.idx)).all()
        return [r[0] for r in rows]

    def releases(self, model_id: str | None = None) -> list[dict[str, Any]]:
        import sqlalchemy as sa

        self._engine()
        q = sa.select(*(self._rel.c[k] for k in _RELEASE_COLUMNS)).order_by(self._rel.c.id)
        if model_id:
            q = q.where(self._rel.c.model_id == model_id)
        with self._engine().connect() as c:
            return [dict(zip(_RELEASE_COLUMNS, r, strict=True)) for r in c.execute(q).all()]

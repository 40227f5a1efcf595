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
import math
import os
import re
import secrets
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import db
from .._atomic import atomic_write_bytes
from .._extras import require
from ..errors import FormatError, KeyPurposeError, RecipientNameError, WardenError
from ..keys.provider import KeyProvider, KeySlot, wraps_for
from ._kernel import MAX_SYMBOLS

__all__ = ["ModelRecord", "RecipientName", "ReleaseRecord", "TraceError", "TraceStore", "recipient_name", "shown"]

RECORD_VERSION = 2  # the model record's version; version 2 marks with chip layout 2 (docs/TRACING.md)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


class TraceError(WardenError):
    """Tracing state is missing or inconsistent (model not enrolled, unknown recipient, bad id)."""


# -- one canonical identity per recipient ---------------------------------------------------
_REFUSED_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn"}  # control, format, surrogate, private, unassigned
_BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)}
MAX_NAME = 256


def shown(text: str) -> str:
    """``text`` safe for a terminal or a log line: anything not printable as itself (or printing as nothing:
    default-ignorables, U+2800) becomes ``\\uXXXX``."""
    from ..sealed.walk import shown as _shown

    return _shown(text)


@dataclass(frozen=True)
class RecipientName:
    display: str  # NFKC, whitespace collapsed: what tables show
    key: str  # the identity: TR39 skeleton of the case-folded display name (one codeword per key)


def _invisible(c: str) -> bool:
    from ..sealed.walk import invisible

    return invisible(c)


def _stray_mark(text: str) -> str | None:
    """``U+XXXX`` of the first combining mark in ``text`` (NFC) that is not part of a letter: one after no
    letter, a third in a row, or one left uncomposed on a Latin, Greek or Cyrillic letter (those compose
    under NFC wherever a real letter exists; a leftover mark only makes a new identity)."""
    icu = require("icu", extra="release")

    composing = {icu.UScriptCode.LATIN, icu.UScriptCode.GREEK, icu.UScriptCode.CYRILLIC}
    run, base = 0, ""
    for c in text:
        if unicodedata.category(c).startswith("M"):
            run += 1
            if run > 2 or not base or icu.Script.getScript(ord(base)).getScriptCode() in composing:
                return f"U+{ord(c):04X}"
        else:
            run, base = 0, c if unicodedata.category(c).startswith("L") else ""
    return None


def _skeleton(text: str) -> str:
    icu = require("icu", extra="release")  # pyicu (a dependency: rigour's normality needs it too)

    return str(icu.SpoofChecker().getSkeleton(0, text))


def recipient_name(name: str, what: str = "--to") -> RecipientName:
    """The canonical identity of a recipient name, or :class:`RecipientNameError` naming ``what``.

    NFKC (full-width, compatibility forms, NBSP), whitespace runs collapsed to one space, case folded,
    and mapped to its Unicode TR39 confusable skeleton (ICU) before and after case folding, so names
    that look alike are one identity.  Control, format (bidi, zero-width), private-use, surrogate,
    unassigned and default-ignorable characters (ICU; and U+2800) are refused, not stripped, and so are
    combining marks that are not part of a letter (see :func:`_stray_mark`)."""
    if not isinstance(name, str) or not name.strip():
        raise RecipientNameError(f"{what}: a recipient name is 1-{MAX_NAME} printable characters (got an empty one)")
    for text in (name, unicodedata.normalize("NFKC", name)):
        bad = sorted({c for c in text if c in _BIDI or unicodedata.category(c) in _REFUSED_CATEGORIES})
        if bad:
            codes = ", ".join(f"U+{ord(c):04X}" for c in bad[:5])
            raise RecipientNameError(
                f"{what} '{shown(name)}': holds control, format or bidi characters ({codes}); give the name as "
                "plain text"
            )
        hidden = sorted({c for c in text if not c.isascii() and _invisible(c)})
        if hidden:  # each would be a new identity, and a new codeword, for one partner (issue 17)
            codes = ", ".join(f"U+{ord(c):04X}" for c in hidden[:5])
            raise RecipientNameError(f"{what} '{shown(name)}': holds invisible (default-ignorable) characters "
                                     f"({codes}); give the name as plain text")  # fmt: skip
    stray = _stray_mark(unicodedata.normalize("NFC", name))
    if stray is not None:
        raise RecipientNameError(f"{what} '{shown(name)}': holds a combining mark ({stray}) that is not part of a "
                                 "letter; give the name as plain text")  # fmt: skip
    display = " ".join(unicodedata.normalize("NFKC", name).split())
    if len(display) > MAX_NAME:
        raise RecipientNameError(f"{what}: a recipient name is at most {MAX_NAME} characters")
    key = _skeleton(" ".join(unicodedata.normalize("NFKC", _skeleton(display).casefold()).split()))
    return RecipientName(display, key)


@dataclass(frozen=True)
class ModelRecord:
    model_id: str
    code_length: int
    cutoff: float
    alpha: float
    slot: KeySlot
    created: str
    head: float = 0.0  # the head mark's amplitude (trace/head.py); 0: none (an older record, or a tied head)
    head_span: float = 0.0  # its in-span share (trace/head.py); 0 in a record made before that part existed

    def to_json(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "code_length": self.code_length, "cutoff": self.cutoff,
                "alpha": self.alpha, "slot": self.slot.to_json(), "created": self.created,
                "version": RECORD_VERSION, **({"head": self.head} if self.head else {}),
                **({"head_span": self.head_span} if self.head_span else {})}  # fmt: skip

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
            head, span = _number(obj.get("head", 0.0)), _number(obj.get("head_span", 0.0))
            if not (0.0 <= head <= 1.0 and (span == 0.0 or 0.01 <= span <= 0.9)) or (span and not head):
                raise ValueError("head")
            return cls(str(obj["model_id"]), int(obj["code_length"]), float(obj["cutoff"]), float(obj["alpha"]),
                       KeySlot.from_json(obj["slot"]), str(obj["created"]), head, span)  # fmt: skip
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise FormatError(f"tracing record is malformed ({type(e).__name__})") from None


def _number(v: Any) -> float:
    """A JSON number (not a string or a boolean) as a finite float, else ValueError."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(float(v)):
        raise ValueError("not a finite number")
    return float(v)


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
    output: str = ""  # "sealed-to-recipient", "sealed" (under our key) or "plaintext"
    recipient_key: str = ""  # the age public key a sealed-to-recipient copy is sealed to
    exclude: tuple[str, ...] = ()  # the operator's --exclude patterns
    excluded_files: tuple[str, ...] = ()  # what they left out of the copy
    master: str = ""  # "sealed" or "plaintext"

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def _context(model_id: str) -> bytes:
    return b"warden-trace-secret|" + model_id.encode()


def _tracing(provider: KeyProvider) -> KeyProvider:
    """Providers that know their purpose (the keyring's, the agent's) must be ``tracing`` ones."""
    return wraps_for(provider, "tracing", "tracing secrets")


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


class _Conflict(Exception):
    """Another release took the index first."""


def _lock(c: Any) -> None:
    """New recipient indices are taken in turn (PostgreSQL: an advisory lock; SQLite: BEGIN IMMEDIATE)."""
    if c.dialect.name == "postgresql":
        c.exec_driver_sql("SELECT pg_advisory_xact_lock(7317102)")


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
               head: float = 0.0, head_span: float = 0.0, now: datetime | None = None) -> ModelRecord:  # fmt: skip
        path = self._model_path(model_id)
        if not (math.isfinite(head) and 0.0 <= head <= 1.0):
            raise TraceError(f"head mark {head}: a number from 0 to 1")
        if not (head_span == 0.0 or 0.01 <= head_span <= 0.9) or (head_span and not head):
            raise TraceError(f"head mark's in-span share {head_span}: 0, or a number from 0.01 to 0.9 with a head "
                             "mark")  # fmt: skip
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
        rec = ModelRecord(model_id, code_length, cutoff, alpha, slot, (now or datetime.now(UTC)).isoformat(), head,
                          head_span)  # fmt: skip
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
            self._eng = db.create_engine(url, synchronous="FULL", threads=False)
            md = sa.MetaData()
            C = sa.Column
            self._rcp = sa.Table("ww_trace_recipients", md, C("model_id", sa.String(128), primary_key=True),
                                 C("recipient", sa.String(256), primary_key=True), C("idx", sa.Integer, nullable=False),
                                 sa.UniqueConstraint("model_id", "idx"))  # fmt: skip
            self._rel = sa.Table("ww_trace_releases", md, C("id", sa.Integer, primary_key=True, autoincrement=True),
                                 *(C(k, sa.String(256)) for k in _RELEASE_COLUMNS))  # fmt: skip
            # one row per recipient identity: the name shown, and the age public key copies are sealed to
            self._dir = sa.Table("ww_trace_directory", md, C("name_key", sa.String(512), primary_key=True),
                                 C("display", sa.String(512), nullable=False), C("pubkey", sa.String(128)),
                                 C("added", sa.String(64), nullable=False))  # fmt: skip
            self._ext = sa.Table("ww_trace_release_extra", md, C("release_id", sa.Integer, primary_key=True),
                                 C("detail", sa.Text, nullable=False))  # fmt: skip
            with db.write(self._eng) as c:  # creators take turns
                if c.dialect.name == "postgresql":
                    c.exec_driver_sql("SELECT pg_advisory_xact_lock(7317101)")  # (SQLite: BEGIN IMMEDIATE)
                md.create_all(c)
        return self._eng

    def close(self) -> None:
        if self._eng is not None:
            self._eng.dispose()
            self._eng = None

    def recipient_index(self, model_id: str, recipient: str) -> int:
        """The recipient's codeword index for this model, assigned on first use: indices are dense and
        unique per model, also when several processes release at once (a unique key; the loser retries).
        ``recipient`` is canonicalised (:func:`recipient_name`): one identity, one index."""
        import sqlalchemy as sa

        name = recipient_name(recipient)
        for _ in range(50):
            idx, new = self.tentative_index(model_id, name)
            if not new:
                return idx
            try:
                with db.write(self._engine()) as c:
                    _lock(c)
                    self._insert_recipient(c, model_id, name, idx)
                return idx
            except (_Conflict, sa.exc.IntegrityError):
                continue  # another release took that index (or that recipient) first: look again
        raise TraceError("could not assign a recipient index (too much contention)")

    def tentative_index(self, model_id: str, name: RecipientName) -> tuple[int, bool]:
        """(index, is_new): the recipient's index if it has one, else the next free one (not taken yet:
        :meth:`commit_release` takes it in the release's own transaction, or reports a conflict)."""
        import sqlalchemy as sa

        eng = self._engine()
        t = self._rcp
        with eng.connect() as c:
            row = c.execute(sa.select(t.c.idx).where(t.c.model_id == model_id, t.c.recipient == name.key)).first()
            if row is not None:
                return int(row[0]), False
            n = c.execute(sa.select(sa.func.count()).select_from(t).where(t.c.model_id == model_id)).scalar_one()
        return int(n), True

    def _insert_recipient(self, c: Any, model_id: str, name: RecipientName, idx: int) -> None:
        import sqlalchemy as sa

        t = self._rcp
        n = c.execute(sa.select(sa.func.count()).select_from(t).where(t.c.model_id == model_id)).scalar_one()
        if int(n) != idx:
            raise _Conflict()
        c.execute(sa.insert(t).values(model_id=model_id, recipient=name.key, idx=idx))  # IntegrityError: a race
        self._ensure_directory(c, name, None)

    def _ensure_directory(self, c: Any, name: RecipientName, pubkey: str | None, *, replace: bool = False) -> None:
        import sqlalchemy as sa

        d = self._dir
        row = c.execute(sa.select(d.c.display, d.c.pubkey).where(d.c.name_key == name.key)).first()
        if row is None:
            c.execute(sa.insert(d).values(name_key=name.key, display=name.display, pubkey=pubkey,
                                          added=datetime.now(UTC).isoformat()))  # fmt: skip
        elif pubkey is not None and row[1] != pubkey:
            if row[1] is not None and not replace:
                raise TraceError(f"recipient '{shown(row[0])}' is enrolled with another public key "
                                 f"({row[1][:16]}…); pass --replace to change it")  # fmt: skip
            c.execute(sa.update(d).where(d.c.name_key == name.key).values(pubkey=pubkey))

    def add_recipient(self, name: RecipientName, pubkey: str, *, replace: bool = False) -> None:
        """Enroll a recipient identity with their age public key (copies sealed to them use it)."""
        with db.write(self._engine()) as c:
            self._ensure_directory(c, name, pubkey, replace=replace)

    def directory(self, name: RecipientName) -> dict[str, Any] | None:
        import sqlalchemy as sa

        eng = self._engine()
        d = self._dir
        with eng.connect() as c:
            row = c.execute(sa.select(d.c.display, d.c.pubkey, d.c.added).where(d.c.name_key == name.key)).first()
        return None if row is None else {"display": row[0], "pubkey": row[1], "added": row[2]}

    def directory_rows(self) -> list[dict[str, Any]]:
        import sqlalchemy as sa

        eng = self._engine()
        d = self._dir
        with eng.connect() as c:
            rows = c.execute(sa.select(d.c.display, d.c.name_key, d.c.pubkey, d.c.added).order_by(d.c.added)).all()
        return [{"recipient": r[0], "identity": r[1], "pubkey": r[2], "added": r[3]} for r in rows]

    def commit_release(self, rel: ReleaseRecord, name: RecipientName, new: bool, extra: dict[str, Any],
                       finish: Any = None) -> None:  # fmt: skip
        """Record a release and (when ``new``) its recipient in one transaction; ``finish()`` (moving the
        copy into place) runs inside it, so a failure anywhere records nothing.  Raises :class:`_Conflict`
        when another release took the index first (the copy must be marked again)."""
        import sqlalchemy as sa

        try:
            with db.write(self._engine()) as c:
                _lock(c)
                if new:
                    self._insert_recipient(c, rel.model_id, name, rel.index)
                else:
                    self._ensure_directory(c, name, None)
                res = c.execute(sa.insert(self._rel).values(**{k: getattr(rel, k) for k in _RELEASE_COLUMNS}))
                c.execute(sa.insert(self._ext).values(release_id=int(res.inserted_primary_key[0]),
                                                      detail=json.dumps(extra, sort_keys=True)))  # fmt: skip
                if finish is not None:
                    finish()
        except sa.exc.IntegrityError:
            raise _Conflict() from None

    def record(self, rel: ReleaseRecord) -> None:
        import sqlalchemy as sa

        with db.write(self._engine()) as c:
            c.execute(sa.insert(self._rel).values(**{k: getattr(rel, k) for k in _RELEASE_COLUMNS}))

    def recipients(self, model_id: str) -> list[str]:
        """The model's recipients in index order, by the name they were first released under."""
        import sqlalchemy as sa

        eng = self._engine()
        t, d = self._rcp, self._dir
        q = (sa.select(t.c.recipient, d.c.display).select_from(t.outerjoin(d, d.c.name_key == t.c.recipient))
             .where(t.c.model_id == model_id).order_by(t.c.idx))  # fmt: skip
        with eng.connect() as c:
            rows = c.execute(q).all()
        return [r[1] or r[0] for r in rows]

    def releases(self, model_id: str | None = None) -> list[dict[str, Any]]:
        import sqlalchemy as sa

        self._engine()
        q = sa.select(*(self._rel.c[k] for k in _RELEASE_COLUMNS)).order_by(self._rel.c.id)
        if model_id:
            q = q.where(self._rel.c.model_id == model_id)
        x = self._ext
        q = q.add_columns(x.c.detail).outerjoin_from(self._rel, x, x.c.release_id == self._rel.c.id)
        out = []
        with self._engine().connect() as c:
            for r in c.execute(q).all():
                row = dict(zip(_RELEASE_COLUMNS, r[: len(_RELEASE_COLUMNS)], strict=True))
                if r[-1]:
                    row.update(json.loads(r[-1]))
                out.append(row)
        return out

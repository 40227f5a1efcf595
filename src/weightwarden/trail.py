"""The home's one tamper-evident trail: every security event, appended by the library.

Seal, open, verify, release, trace, provenance decisions, screening, classification, key use and
custody are :class:`~weightwarden.audit.AuditEvent` records appended to the Merkle audit log of
docs/AUDIT_LOG.md (:class:`weightwarden.broker.auditlog.AuditLog`):

* in the broker's database when one is configured (``db=`` / ``$WARDEN_BROKER_DB``), else
* in the home's own database, ``$WARDEN_HOME/broker/broker.db`` (SQLite; the file the embedded
  broker uses, so a home has one trail whether or not it ever runs the broker), created on first use.

Tree heads are signed by the home's **audit-log key**, ``$WARDEN_HOME/audit/log.key``: a dedicated
Ed25519 key (never the sealing key), created with the log, readable by the home's owner only.  It
is a file rather than a keyring entry so that commands that never unlock the keyring (``verify``,
``inspect``, ``screen``, ``classify``) still append and sign.  Its limit (docs/AUDIT_LOG.md): whoever
can read the home's files can re-sign a rewritten log; a head kept outside the machine
(``warden audit head`` to a SIEM, ``verify --against``) still reveals it.

One library operation is one append: :meth:`Trail.operation` buffers the events emitted inside it
(the provider's wrap/unwrap/sign, the operation's own event) and commits them in one transaction
under one signed head when it ends, also when it fails.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import audit
from .errors import AuditLogError, NoAuditLogError

LOG_KEY = Path("audit") / "log.key"
HOME_DB = Path("broker") / "broker.db"
_KEY_FORMAT = "weightwarden-audit-log-key"

_batch = audit._batch  # the operation in progress in this context: (trail, buffered events)


def _home(home: str | os.PathLike[str] | None) -> Path:
    from .keys.local import default_home

    return Path(home) if home is not None else default_home()


def trail_url(home: str | os.PathLike[str] | None = None, db: str | None = None) -> str:
    """The database the home's trail lives in: ``db``, else ``$WARDEN_BROKER_DB``, else the home's SQLite."""
    url = db or os.environ.get("WARDEN_BROKER_DB")
    return url or f"sqlite:///{_home(home) / HOME_DB}"


def _sqlite_path(url: str) -> Path | None:
    return Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None


# -- the audit-log key ---------------------------------------------------------------------------
def _read_key(path: Path) -> bytes:
    try:
        obj = json.loads(path.read_text())
        raw = base64.b64decode(obj["private"], validate=True)
        if obj.get("format") != _KEY_FORMAT or len(raw) != 32:
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise AuditLogError(f"{path} is not a weightwarden audit-log key; restore it from a backup") from None
    return raw


def log_signer(home: str | os.PathLike[str] | None = None, *, create: bool = True) -> Any:
    """The home's audit-log key (an Ed25519 ``Signer``), created on first use when ``create``;
    ``None`` when it does not exist and ``create`` is false."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    from ._atomic import _fsync_dir
    from .keys.local import Ed25519Signer

    path = _home(home) / LOG_KEY
    if not path.exists():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        raw = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        doc = {"format": _KEY_FORMAT, "version": 1, "private": base64.b64encode(raw).decode()}
        tmp = path.parent / f".log.key.{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (json.dumps(doc) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never replaces a key another process made meanwhile
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        _fsync_dir(path.parent)
    return Ed25519Signer(Ed25519PrivateKey.from_private_bytes(_read_key(path)))


def log_public_key(home: str | os.PathLike[str] | None = None) -> bytes | None:
    """The public half of the home's audit-log key (kept outside the database), or ``None``."""
    s = log_signer(home, create=False)
    return None if s is None else s.public_key


# -- the trail -----------------------------------------------------------------------------------
class Trail(audit.AuditSink):
    """The audit sink of one home: appends to its Merkle log (opened, and created, on first use)."""

    def __init__(self, home: str | os.PathLike[str] | None = None, db: str | None = None):
        self.home = _home(home)
        self.url = trail_url(self.home, db)
        self._log: Any = None
        self._lock = threading.Lock()

    def _open(self) -> Any:
        from .broker.auditlog import AuditLog

        if self._log is None:
            p = _sqlite_path(self.url)
            try:
                if p is not None:
                    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                signer = log_signer(self.home, create=False)
                log = AuditLog(self.url, signer)
                if signer is None:
                    if log.size():  # a new key would leave every signed head unverifiable
                        log.close()
                        raise AuditLogError(f"the audit log holds events but its key {self.home / LOG_KEY} is "
                                            "missing: restore the key from a backup")  # fmt: skip
                    log.signer = signer = log_signer(self.home)
                    log.public_key = signer.public_key
            except OSError as e:
                why = e.strerror or type(e).__name__
                raise AuditLogError(f"cannot create the audit log or its key under {self.home} ({why}): "
                                    "the home must be writable") from None  # fmt: skip
            self._log = log
        return self._log

    def emit(self, ev: audit.AuditEvent) -> None:
        b = _batch.get()
        if b is not None:  # inside an operation, its events go to the operation's trail, in one append
            b[1].append(ev)
        else:
            self.append([ev])

    def append(self, events: list[audit.AuditEvent]) -> list[int]:
        """Append ``events`` in one transaction under one signed head."""
        if not events:
            return []
        with self._lock:
            return list(self._open().append(events))

    @contextlib.contextmanager
    def operation(self) -> Iterator[list[audit.AuditEvent]]:
        """Buffer the events emitted in this block (by this trail, and by providers and signers
        without a sink of their own) and append them at its end as one batch, also on failure.
        Nested operations join the outer one."""
        cur = _batch.get()
        if cur is not None and cur[0] is self:
            yield cur[1]
            return
        with self._lock:
            self._open()  # an unwritable trail stops the operation before it acts
        buf: list[audit.AuditEvent] = []
        tok = _batch.set((self, buf))
        try:
            yield buf
        except BaseException as e:
            _batch.reset(tok)
            try:
                self.append(buf)
            except AuditLogError as le:  # the operation's own error stays the one raised
                e.add_note(f"and its audit events could not be logged: {le}")
            raise
        _batch.reset(tok)
        self.append(buf)

    def close(self) -> None:
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None


_cache: OrderedDict[tuple[Path, str], Trail] = OrderedDict()
_cache_lock = threading.Lock()
_CACHE_MAX = 8  # open SQLite logs kept per process (each holds file descriptors)


def for_home(home: str | os.PathLike[str] | None = None, db: str | None = None) -> Trail:
    """The trail of ``home`` (one object per home and database in a process)."""
    h = _home(home).absolute()
    k = (h, trail_url(h, db))
    with _cache_lock:
        t = _cache.get(k)
        if t is None:
            t = _cache[k] = Trail(h, db)
            while len(_cache) > _CACHE_MAX:
                _cache.popitem(last=False)[1].close()  # reopened on its next append if still in use
        _cache.move_to_end(k)
        return t


@contextlib.contextmanager
def operation(home: str | os.PathLike[str] | None = None, db: str | None = None) -> Iterator[Trail]:
    """``with trail.operation(home) as t: ...; t.emit(event)``: one append for the whole operation."""
    t = for_home(home, db)
    with t.operation():
        yield t


def record(action: audit.AuditAction, outcome: str = "ok", *, home: str | os.PathLike[str] | None = None,
           db: str | None = None, subject: str | None = None, **detail: Any) -> None:  # fmt: skip
    """Append one event (joins the operation in progress, if any)."""
    for_home(home, db).emit(audit.event(action, outcome, subject=subject, detail=detail))


# -- reading -------------------------------------------------------------------------------------
def open_log(home: str | os.PathLike[str] | None = None, db: str | None = None, *,
             public_key: bytes | None = None) -> Any:  # fmt: skip
    """The trail's log for reading (head, prove, verify, export); :class:`NoAuditLogError` when
    nothing has been logged yet.  Opening it creates nothing."""
    from .broker.auditlog import AuditLog

    url = trail_url(home, db)
    p = _sqlite_path(url)
    if p is not None and not p.exists():
        raise NoAuditLogError(f"no audit log yet at {p}: the first audited operation creates it")
    return AuditLog(url, public_key=public_key, create=False)


def events(home: str | os.PathLike[str] | None = None, db: str | None = None) -> list[dict[str, Any]]:
    """Every event of the trail, in order (``[]`` when there is no log yet)."""
    try:
        log = open_log(home, db)
    except NoAuditLogError:
        return []
    try:
        return [r["event"] for r in log.export()]
    finally:
        log.close()


__all__ = ["Trail", "events", "for_home", "log_public_key", "log_signer", "open_log", "operation",
           "record", "trail_url"]  # fmt: skip

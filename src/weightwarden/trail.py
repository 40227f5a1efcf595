"""The home's one tamper-evident trail: every security event, appended by the library.

Seal, open, verify, release, trace, provenance decisions, screening, classification, key use and
custody are :class:`~weightwarden.audit.AuditEvent` records appended to the Merkle audit log of
docs/AUDIT_LOG.md (:class:`weightwarden.merkle.AuditLog`).  Which log, and who signs its
tree heads (:func:`locate`):

1. a broker database configured explicitly (``db=`` / ``--db`` / ``$WARDEN_BROKER_DB``): that
   database, its heads signed by **the broker's log key** (:mod:`weightwarden.broker.logkey`,
   ``$WARDEN_LOG_KEY``, default ``file:$WARDEN_HOME/broker/log-key.json``, its passphrase from
   ``$WARDEN_LOG_KEY_PASSPHRASE_FILE``); a key that cannot be opened refuses the operation before it
   acts (one :class:`AuditLogError` line);
2. else, when the home hosts a broker (``broker/log-key.json`` exists, or ``broker/broker.db``
   already holds a log): the home's ``broker/broker.db``, signed the same way;
3. else the home's **local log** ``$WARDEN_HOME/audit/trail.db`` (SQLite, a log id of its own),
   its heads signed by the home's local audit-log key ``$WARDEN_HOME/audit/log.key``: an Ed25519
   key of purpose ``audit-log`` (never the sealing key, never the broker's), created with the log,
   readable by the home's owner only.  It is a file rather than a keyring entry so that commands
   that never unlock the keyring (``verify``, ``inspect``, ``screen``, ``classify``) still append
   and sign.  Its limit (docs/AUDIT_LOG.md): whoever can read the home's files can re-sign a
   rewritten local log; a head kept outside the machine (``warden audit head`` to a SIEM,
   ``verify --against``) still reveals it.

One library operation is one append: :meth:`Trail.operation` buffers the events emitted inside it
(the provider's wrap/unwrap/sign, the operation's own event) and commits them in one transaction
under one signed head when it ends, also when it fails.  Events that must survive the process
being killed mid-operation (a probe's queries) are appended as they happen instead (:func:`record_now`).
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
from .home import Home, resolve_home

_KEY_FORMAT = "weightwarden-audit-log-key"

_batch = audit.operation_batch  # the operation in progress in this context: (trail, buffered events)


def _home(home: str | os.PathLike[str] | None) -> Path:
    return resolve_home(home).root


def _sqlite_path(url: str) -> Path | None:
    return Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None


def _holds_log(db: Path) -> bool:
    """Whether the SQLite file ``db`` already holds an audit log (read only; creates nothing)."""
    import sqlite3

    if not db.is_file():
        return False
    try:
        con = sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            row = con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='ww_audit_state'").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return False
    return row is not None


def hosts_broker(home: str | os.PathLike[str] | None = None) -> bool:
    """Whether ``home`` hosts a broker: its log key file exists, or its database already holds a log."""
    h = _home(home)
    return Home(h).broker_log_key.exists() or _holds_log(Home(h).broker_db)


def locate(home: str | os.PathLike[str] | None = None, db: str | None = None) -> tuple[str, bool]:
    """``(url, broker)``: the database the home's trail lives in, and whether it is the broker's log
    (signed by the broker's log key) rather than the home's local log (signed by ``audit/log.key``)."""
    url = db or os.environ.get("WARDEN_BROKER_DB")
    if url:
        return url, True
    h = _home(home)
    if hosts_broker(h):
        return Home(h).broker_db_url, True
    return f"sqlite:///{Home(h).trail_db}", False


#: the variables that say where a process's trail goes and how its broker log key opens (paths and
#: URIs, not secrets): passed on to the custody agent so that its events join the same trail
TRAIL_VARS = ("WARDEN_BROKER_DB", "WARDEN_LOG_KEY", "WARDEN_LOG_KEY_PASSPHRASE_FILE")


def trail_env(env: dict[str, str] | None = None) -> dict[str, str]:
    src = os.environ if env is None else env
    return {k: src[k] for k in TRAIL_VARS if src.get(k)}


def trail_url(home: str | os.PathLike[str] | None = None, db: str | None = None) -> str:
    """The database the home's trail lives in (:func:`locate`)."""
    return locate(home, db)[0]


# -- the broker's log key, for a trail in the broker's log -----------------------------------------
_broker_signers: dict[str, Any] = {}  # url -> the broker's log signer, opened by this process (the CLI)
_broker_lock = threading.Lock()


def use_broker_signer(url: str, signer: Any) -> None:
    """Sign this process's trail appends to the broker log at ``url`` with ``signer`` (the broker's log
    key the caller has already opened), instead of opening it again from the environment."""
    with _broker_lock:
        _broker_signers[url] = signer


def broker_signer(home: str | os.PathLike[str] | None = None, url: str | None = None) -> Any:
    """The broker's log key, opened as 16B's ``open_log_key`` does (``$WARDEN_LOG_KEY`` or the home's
    default file, its passphrase from ``$WARDEN_LOG_KEY_PASSPHRASE_FILE``); never created here."""
    from ._harden import read_secret_file
    from .broker.logkey import open_log_key
    from .errors import WardenError

    h = _home(home)
    if url is not None:
        with _broker_lock:
            if url in _broker_signers:
                return _broker_signers[url]
    uri = os.environ.get("WARDEN_LOG_KEY") or None
    pass_file = os.environ.get("WARDEN_LOG_KEY_PASSPHRASE_FILE") or None
    where = f"the broker's audit log ({url or Home(h).broker_db})"

    def passphrase(confirm: bool = False) -> str:
        if pass_file is None:
            raise AuditLogError(f"{where} is signed by the broker's log key: set WARDEN_LOG_KEY_PASSPHRASE_FILE to "
                                "its passphrase file (and WARDEN_LOG_KEY if the key is not "
                                "file:$WARDEN_HOME/broker/log-key.json); nothing was done")  # fmt: skip
        return read_secret_file(pass_file, "WARDEN_LOG_KEY_PASSPHRASE_FILE")

    try:
        signer, _ = open_log_key(uri, h, passphrase, create=False)
    except AuditLogError:
        raise
    except WardenError as e:
        raise AuditLogError(f"cannot open the broker's log key for {where} ({e}): check WARDEN_LOG_KEY and "
                            "WARDEN_LOG_KEY_PASSPHRASE_FILE; nothing was done") from None  # fmt: skip
    return signer


def broker_public_key(home: str | os.PathLike[str] | None = None) -> bytes | None:
    """The public half of the broker's log key when it is a file (``$WARDEN_LOG_KEY`` ``file:PATH`` or
    the home's default), read without its passphrase; ``None`` otherwise."""
    uri = os.environ.get("WARDEN_LOG_KEY") or None
    if uri is not None and not uri.startswith("file:"):
        return None
    path = Path(uri[len("file:") :]) if uri else Home(_home(home)).broker_log_key
    try:
        return bytes.fromhex(json.loads(path.read_text())["public_key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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

    from ._atomic import fsync_dir
    from .keys.signer import Ed25519Signer

    path = Home(_home(home)).trail_key
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
        fsync_dir(path.parent)
    return Ed25519Signer(Ed25519PrivateKey.from_private_bytes(_read_key(path)), "audit-log")


def log_public_key(home: str | os.PathLike[str] | None = None, db: str | None = None) -> bytes | None:
    """The public half of the key that signs the trail :func:`locate` picks (kept outside the
    database): the broker's log key file's, or the home's local ``audit/log.key``'s; ``None``
    when there is none (or the broker's key is not a file: pin it with ``--pubkey``)."""
    if locate(home, db)[1]:
        return broker_public_key(home)
    s = log_signer(home, create=False)
    return None if s is None else s.public_key


# -- the trail -----------------------------------------------------------------------------------
class Trail(audit.AuditSink):
    """The audit sink of one home: appends to its Merkle log (opened, and created, on first use)."""

    def __init__(self, home: str | os.PathLike[str] | None = None, db: str | None = None):
        self.home = _home(home)
        self.url, self.broker = locate(self.home, db)
        self._log: Any = None
        self._lock = threading.Lock()

    def _open(self) -> Any:
        from .merkle import AuditLog

        if self._log is None:
            p = _sqlite_path(self.url)
            if self.broker:  # the broker's log: its own log key signs, opened (never created) here
                signer = broker_signer(self.home, self.url)
                try:
                    if p is not None:
                        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                except OSError as e:
                    raise AuditLogError(f"cannot create the audit log under {p.parent if p else self.url} "
                                        f"({e.strerror or type(e).__name__})") from None  # fmt: skip
                self._log = AuditLog(self.url, signer)
                return self._log
            try:
                if p is not None:
                    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                signer = log_signer(self.home, create=False)
                log = AuditLog(self.url, signer)
                if signer is None:
                    if log.size():  # a new key would leave every signed head unverifiable
                        log.close()
                        raise AuditLogError(f"the audit log holds events but its key {Home(self.home).trail_key} is "
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


def record_now(action: audit.AuditAction, outcome: str = "ok", *, home: str | os.PathLike[str] | None = None,
               db: str | None = None, subject: str | None = None, **detail: Any) -> None:  # fmt: skip
    """Append one event at once, in a transaction and under a signed head of its own, even inside an
    operation: for events that must outlive a process killed before its operation ends (each query a
    probe sends to an endpoint, whose answer is already cached by then)."""
    for_home(home, db).append([audit.event(action, outcome, subject=subject, detail=detail)])


# -- reading -------------------------------------------------------------------------------------
def open_log(home: str | os.PathLike[str] | None = None, db: str | None = None, *,
             public_key: bytes | None = None, log_id: bytes | str | None = None) -> Any:  # fmt: skip
    """The log :func:`locate` picks, for reading (head, prove, verify, export); ``log_id`` pins it
    (16A).  :class:`NoAuditLogError` when nothing has been logged there yet.  Opening it creates nothing."""
    from .merkle import AuditLog

    url = trail_url(home, db)
    p = _sqlite_path(url)
    if p is not None and not p.exists():
        raise NoAuditLogError(f"no audit log yet at {p}: the first audited operation creates it")
    try:
        return AuditLog(url, public_key=public_key, create=False, log_id=log_id)
    except NoAuditLogError:
        if p is None:
            raise
        raise NoAuditLogError(f"no audit log yet at {p}: the first audited operation creates it") from None


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


__all__ = ["Trail", "broker_public_key", "broker_signer", "events", "for_home", "hosts_broker", "locate",
           "log_public_key", "log_signer", "open_log", "operation", "record", "record_now", "trail_env", "trail_url",
           "use_broker_signer"]  # fmt: skip

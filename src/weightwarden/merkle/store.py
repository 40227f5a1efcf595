"""The tamper-evident audit log's store: every event a leaf of an append-only Merkle tree (RFC 9162).

Storage is any SQLAlchemy database: SQLite is the embedded default, PostgreSQL the shared one
several broker replicas append to.  Five tables::

    ww_audit_meta    one row: the log's identity, a random 16-byte log id fixed at creation
    ww_audit_events  idx -> canonical JSON body of the event
    ww_audit_nodes   (level, idx) -> hash of every complete subtree (level 0: the leaf hashes)
    ww_audit_heads   signed tree heads: the latest, and one every ``checkpoint`` events
    ww_audit_state   one row: the size, and the lock appenders take (SELECT ... FOR UPDATE)

An append runs in one transaction: lock the state row, read the tree's right edge (at most
log2(n) nodes, one query), add the leaves and the nodes they complete, sign the new head with
the log's Ed25519 key (a key of purpose ``audit-log``, never the sealing key) and store it.  A head
signs the log id with size, root and time, so a head of one log never passes for another's, even
under the same key.  Proofs read O(log² n) stored nodes in one query.  Anyone
holding a signed head and the log's public key can check an inclusion proof offline
(:func:`~.heads.check_inclusion`), and a head they kept against a later one (:func:`~.heads.check_consistency`).

``verify`` recomputes every node from the event bodies, level by level, and every head's root:
editing, deleting, inserting or reordering any row of any table is reported as
:class:`AuditTamperedError`, except cutting the newest events together with every head that
covers them, which only a head kept outside the database reveals (``verify(against=head)``):
publish heads to the SIEM or a second site.  docs/AUDIT_LOG.md has the formats; heads and proofs:
:mod:`.heads`.
"""

from __future__ import annotations

import functools
import hmac
import json
import secrets
import threading
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .. import db
from ..audit import AuditEvent
from ..errors import AuditLogError, AuditTamperedError, LogIdentityError, NoAuditLogError
from . import tree
from .heads import LOG_ID_LEN, PURPOSE, InclusionProof, SignedHead, event_body, parse_log_id

if TYPE_CHECKING:
    from ..keys.provider import Signer

__all__ = ["AuditLog"]


def _db_errors(fn: Any) -> Any:
    """Database failures surface as :class:`AuditLogError` (typed, without the SQL or its values)."""

    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        import sqlalchemy as sa

        try:
            r = fn(*a, **kw)
        except sa.exc.SQLAlchemyError as e:
            raise AuditLogError(f"audit database error ({type(e).__name__})") from None
        return _wrap_iter(r) if hasattr(r, "__next__") else r

    return wrapper


def _wrap_iter(it: Iterator[Any]) -> Iterator[Any]:
    import sqlalchemy as sa

    try:
        yield from it
    except sa.exc.SQLAlchemyError as e:
        raise AuditLogError(f"audit database error ({type(e).__name__})") from None


class AuditLog:
    """An append-only, signed Merkle log of audit events in a SQL database.

    ``url``: a SQLAlchemy URL (``sqlite:///path.db``, ``postgresql+psycopg://...``).  ``signer``: a
    :class:`weightwarden.keys.provider.Signer` (local key, agent, PKCS#11) of purpose ``audit-log``
    that signs tree heads (a key of another purpose is refused, :class:`KeyPurposeError`); it is
    needed to append, not to read, prove or verify.  ``public_key`` pins the key heads must carry
    (default: the signer's); ``log_id`` pins the log (default: the database's own, which an
    attacker holding the database can swap for another log signed by the same key)."""

    def __init__(self, url: str, signer: Signer | None = None, *, public_key: bytes | None = None,
                 checkpoint: int = 1024, create: bool = True, log_id: bytes | str | None = None):  # fmt: skip
        import sqlalchemy as sa

        if signer is not None:
            signer.require(PURPOSE)
        self.url = url
        self.pinned_log_id = parse_log_id(log_id, "the pinned log id")
        self._log_id: bytes | None = None
        self.signer = signer
        self.public_key = public_key or (signer.public_key if signer is not None else None)
        self.checkpoint = max(1, checkpoint)
        self._lock = threading.Lock()
        self._frontier: tree.Frontier | None = None  # the right edge after this object's last commit
        self._nodes: dict[tuple[int, int], bytes] = {}  # complete-subtree hashes read by proofs
        try:
            self.engine = db.create_engine(url, synchronous="FULL")
        except (sa.exc.ArgumentError, ImportError) as e:
            raise AuditLogError(f"cannot open the audit database ({type(e).__name__})") from None
        md = sa.MetaData()
        self.t_meta = sa.Table("ww_audit_meta", md,
                               sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
                               sa.Column("log_id", sa.String(2 * LOG_ID_LEN), nullable=False))  # fmt: skip
        self.t_events = sa.Table("ww_audit_events", md,
                                 sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
                                 sa.Column("body", sa.LargeBinary, nullable=False))  # fmt: skip
        self.t_nodes = sa.Table("ww_audit_nodes", md,
                                sa.Column("level", sa.SmallInteger, primary_key=True, autoincrement=False),
                                sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
                                sa.Column("hash", sa.LargeBinary(32), nullable=False))  # fmt: skip
        self.t_heads = sa.Table("ww_audit_heads", md,
                                sa.Column("size", sa.BigInteger, primary_key=True, autoincrement=False),
                                sa.Column("root", sa.LargeBinary(32), nullable=False),
                                sa.Column("at", sa.String(40), nullable=False),
                                sa.Column("key_id", sa.String(80), nullable=False),
                                sa.Column("signature", sa.LargeBinary(64), nullable=False))  # fmt: skip
        self.t_state = sa.Table("ww_audit_state", md,
                                sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
                                sa.Column("size", sa.BigInteger, nullable=False))  # fmt: skip
        try:
            if create:
                md.create_all(self.engine)
                with self.engine.begin() as c:
                    size = c.execute(sa.select(self.t_state.c.size)).scalar()
                    if size is None:
                        c.execute(sa.insert(self.t_state).values(id=1, size=0))
                    # a new (or still empty) log gets its identity; a log that holds events but no id
                    # was written before heads named their log, and stays without one (refused below)
                    if not size and c.execute(sa.select(self.t_meta.c.log_id)).first() is None:
                        c.execute(sa.insert(self.t_meta).values(id=1, log_id=secrets.token_hex(LOG_ID_LEN)))
            elif not sa.inspect(self.engine).has_table("ww_audit_state"):
                self.engine.dispose()
                raise NoAuditLogError("no audit log in this database yet: the first audited operation creates it")
        except sa.exc.SQLAlchemyError as e:
            raise AuditLogError(f"cannot open the audit database ({type(e).__name__})") from None

    @property
    def log_id(self) -> bytes:
        """This log's identity (from its database), checked against the pinned one."""
        if self._log_id is None:
            import sqlalchemy as sa

            try:
                with self.engine.connect() as c:
                    found = c.execute(sa.select(self.t_meta.c.log_id).where(self.t_meta.c.id == 1)).scalar()
            except sa.exc.SQLAlchemyError:
                found = None
            if found is None:
                raise AuditLogError("this audit log has no log id: it was written before tree heads named their log "
                                    "(version-1 heads, signed by the sealing key); export its events (`warden audit "
                                    "export`) and start a new log")  # fmt: skip
            lid = parse_log_id(str(found), "the database's log id")
            assert lid is not None
            self._log_id = lid
        if self.pinned_log_id is not None and not hmac.compare_digest(self._log_id, self.pinned_log_id):
            raise LogIdentityError(f"the database holds log {self._log_id.hex()}, not the pinned log "
                                   f"{self.pinned_log_id.hex()}: another log, refused")  # fmt: skip
        return self._log_id

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------
    @_db_errors
    def append(self, events: Iterable[AuditEvent | dict[str, Any]], *, now: datetime | None = None) -> list[int]:
        """Append events atomically and sign the new head; returns their indices."""
        return self._append_bodies([event_body(e) for e in events], now)

    def _append_bodies(self, bodies: list[bytes], now: datetime | None = None) -> list[int]:
        """Append canonical JSON bodies (see :func:`~.heads.event_body`) in one transaction."""
        import sqlalchemy as sa

        if self.signer is None:
            raise AuditLogError("appending needs the log's signing key")
        if not bodies:
            return []
        log_id = self.log_id
        q = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        with self._lock, db.write(self.engine) as c:
            size = c.execute(
                sa.select(self.t_state.c.size).where(self.t_state.c.id == 1).with_for_update()
            ).scalar_one()
            if self._frontier is not None and self._frontier.size == size:
                f = self._frontier  # nobody appended since our last commit: our right edge is current
            else:
                keys = tree.Frontier.keys(size)
                have = self._fetch(c, keys)
                if len(have) != len(keys):
                    raise AuditTamperedError("the log's right edge is missing nodes")
                f = tree.Frontier([(lv, i, have[(lv, i)]) for lv, i in keys])
            self._frontier = None  # until this transaction commits
            f = tree.Frontier(list(f.stack))
            rows_e, rows_n = [], []
            for k, b in enumerate(bodies):
                h = tree.leaf_hash(b)
                rows_e.append((size + k, b))
                rows_n.append((0, size + k, h))
                rows_n += f.push(h)
            new = size + len(bodies)
            # plain DB-API executemany: SQLAlchemy's per-row parameter processing cost more than the inserts
            c.exec_driver_sql(f"INSERT INTO ww_audit_events (idx, body) VALUES ({q}, {q})", rows_e)
            c.exec_driver_sql(f"INSERT INTO ww_audit_nodes (level, idx, hash) VALUES ({q}, {q}, {q})", rows_n)
            head = self._sign(log_id, new, f.root(), now)
            if size and size // self.checkpoint == new // self.checkpoint:  # keep the last head of each bucket
                c.execute(sa.delete(self.t_heads).where(self.t_heads.c.size == size))
            c.execute(sa.insert(self.t_heads).values(size=new, root=head.root, at=head.at, key_id=head.key_id,
                                                     signature=head.signature))  # fmt: skip
            c.execute(sa.update(self.t_state).where(self.t_state.c.id == 1).values(size=new))
        self._frontier = f
        return list(range(size, new))

    def _sign(self, log_id: bytes, size: int, root: bytes, now: datetime | None) -> SignedHead:
        at = (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="microseconds")
        signer = self.signer
        if signer is None:  # _append_bodies checks first
            raise AuditLogError("appending needs the log's signing key")
        sig = signer.sign_unaudited(SignedHead.message(log_id, size, root, at))
        return SignedHead(size, root, at, signer.key_id, sig, log_id)

    # -- reading ------------------------------------------------------------------------
    @_db_errors
    def size(self) -> int:
        import sqlalchemy as sa

        with self.engine.connect() as c:
            return int(c.execute(sa.select(self.t_state.c.size).where(self.t_state.c.id == 1)).scalar_one())

    def _fetch(self, c: Any, keys: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:

        if not keys:
            return {}
        out: dict[tuple[int, int], bytes] = {}
        uniq = list(dict.fromkeys(keys))
        for a in range(0, len(uniq), 500):
            part = uniq[a : a + 500]
            params = {f"l{k}": lv for k, (lv, _) in enumerate(part)} | {f"i{k}": i for k, (_, i) in enumerate(part)}
            out.update({(int(lv), int(i)): bytes(h) for lv, i, h in c.execute(_nodes_query(len(part)), params)})
        return out

    def _getter(self, c: Any, fn: Any, *, cached: bool = False) -> Any:
        """Run ``fn(get)`` over stored nodes fetched in one query.  ``cached`` (proofs only, never
        verification) keeps nodes seen before: a complete subtree's hash never changes, and a proof
        built from them is checked by its reader against the signed head anyway."""
        need = tree.needed(fn)
        if cached:
            have = {k: self._nodes[k] for k in need if k in self._nodes}
            fresh = self._fetch(c, [k for k in need if k not in have])
            if len(self._nodes) > 200_000:
                self._nodes.clear()
            self._nodes.update(fresh)
            have.update(fresh)
        else:
            have = self._fetch(c, need)

        def get(level: int, i: int) -> bytes:
            try:
                return have[(level, i)]
            except KeyError:
                raise AuditTamperedError(f"node ({level}, {i}) is missing from the log") from None

        return fn(get)

    @_db_errors
    def head(self, size: int | None = None) -> SignedHead:
        """The latest signed head, or the stored one of exactly ``size``."""
        import sqlalchemy as sa

        log_id = self.log_id
        q = sa.select(self.t_heads).order_by(self.t_heads.c.size.desc()).limit(1)
        if size is not None:
            q = sa.select(self.t_heads).where(self.t_heads.c.size == size)
        with self.engine.connect() as c:
            r = c.execute(q).first()
        if r is None:
            raise AuditLogError("the log has no signed head" + (f" of size {size}" if size is not None else ""))
        return SignedHead(int(r.size), bytes(r.root), r.at, r.key_id, bytes(r.signature), log_id)

    @_db_errors
    def event(self, index: int) -> dict[str, Any]:
        import sqlalchemy as sa

        with self.engine.connect() as c:
            b = c.execute(sa.select(self.t_events.c.body).where(self.t_events.c.idx == index)).scalar()
        if b is None:
            raise AuditLogError(f"no event {index} in the log")
        return json.loads(bytes(b))

    @_db_errors
    def prove(self, index: int, head: SignedHead | None = None) -> InclusionProof:
        """An inclusion proof of event ``index`` under ``head`` (default: the latest)."""
        import sqlalchemy as sa

        head = head or self.head()
        if not hmac.compare_digest(head.log_id, self.log_id):
            raise LogIdentityError(f"the head given is of log {head.log_id.hex()}, not of this log")
        if not 0 <= index < head.size:
            raise AuditLogError(f"event {index} is not under the head of size {head.size}")
        with self.engine.connect() as c:
            b = c.execute(sa.select(self.t_events.c.body).where(self.t_events.c.idx == index)).scalar()
            if b is None:
                raise AuditTamperedError(f"event {index} is missing from the log")
            path = self._getter(c, lambda g: tree.inclusion_proof(g, index, head.size), cached=True)
        return InclusionProof(index, bytes(b), tuple(path), head)

    @_db_errors
    def consistency(self, old: int, new: int | None = None) -> list[bytes]:
        new = self.size() if new is None else new
        if not 0 <= old <= new <= self.size():
            raise AuditLogError("a consistency proof needs 0 <= old <= new <= size")
        with self.engine.connect() as c:
            return self._getter(c, lambda g: tree.consistency_proof(g, old, new), cached=True)

    @_db_errors
    def export(self, start: int = 0) -> Iterator[dict[str, Any]]:
        """Events from ``start`` on, in order, each with the log id, its index and leaf hash (JSON lines for
        a SIEM).  A log from before log ids exports with ``log_id`` null: moving its events out is the way on."""
        import sqlalchemy as sa

        try:
            lid: str | None = self.log_id.hex()
        except LogIdentityError:
            raise
        except AuditLogError:
            lid = None
        with self.engine.connect() as c:
            q = sa.select(self.t_events).where(self.t_events.c.idx >= start).order_by(self.t_events.c.idx)
            for r in c.execution_options(stream_results=True, yield_per=1000).execute(q):
                b = bytes(r.body)
                yield {"log_id": lid, "index": int(r.idx), "leaf_hash": tree.leaf_hash(b).hex(),
                       "event": json.loads(b)}

    # -- verification -------------------------------------------------------------------
    @_db_errors
    def verify(self, *, against: SignedHead | None = None, public_key: bytes | None = None) -> dict[str, Any]:
        """Recompute every node from the event bodies and check every stored head; raise
        :class:`AuditTamperedError` on the first disagreement.  ``against``: a head kept elsewhere
        (it must be of this log: :class:`LogIdentityError`, as for a pinned log id that differs)."""
        import sqlalchemy as sa

        key = public_key or self.public_key
        if key is None:
            raise AuditLogError("verifying needs the log's public key")
        log_id = self.log_id
        with self.engine.connect() as c:
            size = int(c.execute(sa.select(self.t_state.c.size).where(self.t_state.c.id == 1)).scalar_one())
            # level 0: the stored leaf hashes are the hashes of the bodies, indices 0..n-1 without gaps
            qe = sa.select(self.t_events.c.idx, self.t_events.c.body).order_by(self.t_events.c.idx)
            n = 0
            f = tree.Frontier()
            made: dict[tuple[int, int], bytes] = {}
            for (idx, body), (lv, i, h) in _zip_strict(
                c.execution_options(yield_per=2000).execute(qe), self._level_rows(c, 0), "events and leaves"
            ):
                if idx != n or i != n or lv != 0:
                    raise AuditTamperedError(f"event rows are not 0..n-1 in order (found {idx} at {n})")
                lh = tree.leaf_hash(bytes(body))
                if not hmac.compare_digest(lh, bytes(h)):
                    raise AuditTamperedError(f"event {n} does not match its leaf hash")
                for node in f.push(lh):
                    made[node[:2]] = node[2]
                    if len(made) > 4096:
                        self._check_nodes(c, made)
                        made.clear()
                n += 1
            self._check_nodes(c, made)
            if n != size:
                raise AuditTamperedError(f"the log says it holds {size} events but {n} are stored")
            stored = c.execute(sa.select(sa.func.count()).select_from(self.t_nodes)).scalar_one()
            if stored != 2 * n - bin(n).count("1"):
                raise AuditTamperedError("the log stores nodes no event accounts for")
            heads = [SignedHead(int(r.size), bytes(r.root), r.at, r.key_id, bytes(r.signature), log_id)
                     for r in c.execute(sa.select(self.t_heads).order_by(self.t_heads.c.size))]  # fmt: skip
            for h in heads:
                h.check(key, log_id)
                if h.size > size:
                    raise AuditTamperedError(f"a head of size {h.size} is beyond the log's {size} events")
                root = self._getter(c, lambda g, s=h.size: tree.subtree_hash(g, 0, s))
                if not hmac.compare_digest(root, h.root):
                    raise AuditTamperedError(f"the events disagree with the signed head of size {h.size}")
            if size and (not heads or heads[-1].size != size):
                raise AuditTamperedError("the newest events are not covered by a signed head")
            if against is not None:
                against.check(key, log_id)
                if against.size > size:
                    raise AuditTamperedError(f"the log holds {size} events, fewer than the {against.size} of the "
                                             "head kept outside it: events were cut")  # fmt: skip
                root = self._getter(c, lambda g: tree.subtree_hash(g, 0, against.size))
                if not hmac.compare_digest(root, against.root):
                    raise AuditTamperedError(f"the log was rewritten since the head of size {against.size}")
        return {"events": size, "heads_checked": len(heads), "root": heads[-1].root.hex() if heads else
                tree.EMPTY_ROOT.hex(), "against": against.size if against else None, "log_id": log_id.hex(),
                "log_id_pinned": self.pinned_log_id is not None}  # fmt: skip

    def _level_rows(self, c: Any, level: int) -> Iterator[tuple[int, int, bytes]]:
        import sqlalchemy as sa

        q = (sa.select(self.t_nodes.c.level, self.t_nodes.c.idx, self.t_nodes.c.hash)
             .where(self.t_nodes.c.level == level).order_by(self.t_nodes.c.idx))  # fmt: skip
        # a second connection: SQLite and psycopg stream one result per connection at a time
        with self.engine.connect() as c2:
            for r in c2.execution_options(yield_per=2000).execute(q):
                yield int(r[0]), int(r[1]), bytes(r[2])

    def _check_nodes(self, c: Any, made: dict[tuple[int, int], bytes]) -> None:
        have = self._fetch(c, list(made))
        for k, h in made.items():
            if k not in have or not hmac.compare_digest(have[k], h):
                raise AuditTamperedError(f"node {k} disagrees with the events below it")


@functools.lru_cache(maxsize=600)
def _nodes_query(n: int) -> Any:
    """``(level = ? AND idx = ?) OR ...`` for ``n`` keys, built once per length: both SQLite and
    PostgreSQL answer it from the primary key (SQLite scans the table for a row-value IN list),
    and building the expression with SQLAlchemy's operators costs more than the query."""
    import sqlalchemy as sa

    cond = " OR ".join(f"(level = :l{k} AND idx = :i{k})" for k in range(n))
    return sa.text(f"SELECT level, idx, hash FROM ww_audit_nodes WHERE {cond}")


def _zip_strict(a: Iterable[Any], b: Iterable[Any], what: str) -> Iterator[tuple[Any, Any]]:
    ia, ib = iter(a), iter(b)
    sentinel = object()
    while True:
        x, y = next(ia, sentinel), next(ib, sentinel)
        if x is sentinel and y is sentinel:
            return
        if x is sentinel or y is sentinel:
            raise AuditTamperedError(f"{what} differ in number")
        yield x, y

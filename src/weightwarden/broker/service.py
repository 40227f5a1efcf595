"""The broker's service layer: authentication, authorization, two-person approval, egress limits,
anomaly rules and weight streams, every step recorded in the tamper-evident audit log.

Routes (:mod:`.app`) call this and nothing else; this calls the policy, the token checks, the
weight store and the database.  State lives in one SQL database (SQLite embedded, PostgreSQL
shared by replicas): accounts, seen token ids, approval requests, token buckets, alerts.  Every
call that depends on time has a ``now`` parameter.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..audit import AuditAction, AuditEvent
from ..errors import WardenError
from .auditlog import AuditLog, MerkleLogSink
from .policy import Decision, Permission, Policy, Principal
from .storage import CHUNK, WeightStore, check_name
from .tokens import TokenError, verify

__all__ = ["Broker", "BrokerConfig", "BrokerError", "EgressLimitError", "Forbidden", "NotFound", "StreamCut",
           "Unauthorized"]  # fmt: skip


class BrokerError(WardenError):
    status = 400


class Unauthorized(BrokerError):
    status = 401


class Forbidden(BrokerError):
    status = 403


class NotFound(BrokerError):
    status = 404


class Conflict(BrokerError):
    status = 409


class EgressLimitError(BrokerError):
    status = 429


class StreamCut(Forbidden):
    """A running stream ended because its principal was suspended."""


class RangeError(BrokerError):
    """A ``Range`` header that is malformed or asks for several ranges (only one is served)."""

    status = 400


class RangeNotSatisfiable(BrokerError):
    """A single range that lies outside the file; the answer carries ``Content-Range: bytes */size``."""

    status = 416

    def __init__(self, msg: str, total: int):
        super().__init__(msg)
        self.headers = {"content-range": f"bytes */{total}"}


class PreconditionFailed(BrokerError):
    """``If-Match`` names another version of the file: a resume against a different file."""

    status = 412


_RANGE = re.compile(r"bytes=(?:(\d{1,19})-(\d{0,19})|-(\d{1,19}))")


def parse_range(header: str, total: int) -> tuple[int, int]:
    """A single ``Range`` (``bytes=a-b``, ``a-``, ``-n``) against a file of ``total`` bytes:
    ``(start, end)``, end exclusive.  Several ranges, or a malformed one, raise :class:`RangeError`;
    one outside the file, :class:`RangeNotSatisfiable`."""
    h = header.strip()
    if "," in h:
        raise RangeError("only a single byte range is served (multiple or overlapping ranges are refused)")
    m = _RANGE.fullmatch(h)
    if m is None:
        raise RangeError("malformed Range header: use bytes=START-END, bytes=START- or bytes=-LENGTH")
    a, b, n = m.groups()
    if n is not None:
        if int(n) == 0 or total == 0:
            raise RangeNotSatisfiable("the range is empty", total)
        return max(0, total - int(n)), total
    start = int(a)
    if b and int(b) < start:
        raise RangeError("malformed Range header: END is before START")
    if start >= total:
        raise RangeNotSatisfiable(f"the range starts at or past the end of the file ({total} bytes)", total)
    return start, min(total, int(b) + 1) if b else total


APPROVAL_CONTEXT = b"weightwarden approval v1\n"
_GENERIC = "token signature or claims are invalid"


class WeightStream(Iterator[bytes]):
    """The chunks of a weight stream (debited from the egress buckets as they go) and its ``size``."""

    def __init__(self, chunks: Iterator[bytes], size: int, *, start: int = 0, total: int | None = None,
                 etag: str | None = None, partial: bool = False, file_id: str | None = None):  # fmt: skip
        self._chunks, self.size, self.file_id = chunks, size, file_id  # file_id: the sealed header's, hex
        self.start, self.total, self.etag, self.partial = start, size if total is None else total, etag, partial

    def __iter__(self) -> WeightStream:
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        getattr(self._chunks, "close", lambda: None)()


@dataclass(frozen=True)
class Limit:
    rate: float  # bytes per second refilled
    burst: float  # bucket size in bytes


@dataclass(frozen=True)
class BrokerConfig:
    audience: str = "weightwarden-broker"
    approvals_needed: int = 2
    approval_window_s: int = 3600
    per_principal: Limit = Limit(rate=50e6, burst=20e9)
    per_model: Limit = Limit(rate=100e6, burst=50e9)
    global_: Limit = Limit(rate=200e6, burst=100e9)
    # anomaly rules: each raises an alert; those in auto_suspend also suspend the principal
    volume_bytes_per_hour: float = 50e9
    allowed_hours_utc: tuple[int, int] = (0, 24)
    max_models_per_hour: int = 5
    auto_suspend: frozenset[str] = frozenset({"volume", "many-models"})
    chunk: int = 4 * CHUNK  # bytes read and sent at a time
    lease: int = 64 * CHUNK  # bytes reserved from the buckets per database transaction
    # a ranged request (a resumed download) is not charged again, within this window, for bytes of the
    # same file (ETag) that the same principal paid for and was not sent (a cut stream's reserved tail)
    resume_window_s: int = 24 * 3600
    zero_copy_span: int = 16 * CHUNK  # bytes metered (and checked for suspension) at a time on the sendfile path


@dataclass
class _Tables:
    accounts: Any
    jti: Any
    models: Any
    requests: Any
    approvals: Any
    buckets: Any
    alerts: Any
    egress: Any
    networks: Any
    streams: Any
    downloads: Any


def _tables(md: Any) -> _Tables:
    import sqlalchemy as sa

    C = sa.Column
    return _Tables(
        sa.Table("ww_accounts", md, C("id", sa.String(128), primary_key=True), C("kind", sa.String(16)),
                 C("public_key", sa.LargeBinary(32)), C("key_id", sa.String(80)), C("roles", sa.Text),
                 C("teams", sa.Text), C("suspended", sa.Boolean, default=False), C("revoked_before", sa.BigInteger,
                 default=0)),
        sa.Table("ww_seen_tokens", md, C("jti", sa.String(200), primary_key=True), C("exp", sa.BigInteger,
                 index=True)),
        sa.Table("ww_models", md, C("name", sa.String(128), primary_key=True), C("team", sa.String(128)),
                 C("size", sa.BigInteger), C("detail", sa.Text)),
        sa.Table("ww_requests", md, C("id", sa.String(40), primary_key=True), C("requester", sa.String(128)),
                 C("model", sa.String(128)), C("action", sa.String(40)), C("created", sa.BigInteger),
                 C("expires", sa.BigInteger), C("status", sa.String(16)), C("reason", sa.Text),
                 C("recipient", sa.String(256)), C("country", sa.String(2)), C("gate", sa.Text),
                 C("artifact", sa.String(160))),
        sa.Table("ww_approvals", md, C("request_id", sa.String(40), primary_key=True),
                 C("approver", sa.String(128), primary_key=True), C("signature", sa.LargeBinary),
                 C("at", sa.BigInteger)),
        sa.Table("ww_buckets", md, C("key", sa.String(200), primary_key=True), C("tokens", sa.Float),
                 C("updated", sa.Float)),
        sa.Table("ww_alerts", md, C("id", sa.Integer, primary_key=True, autoincrement=True), C("at", sa.BigInteger),
                 C("principal", sa.String(128)), C("kind", sa.String(40)), C("detail", sa.Text)),
        sa.Table("ww_egress", md, C("id", sa.Integer, primary_key=True, autoincrement=True),
                 C("principal", sa.String(128), index=True), C("model", sa.String(128)), C("at", sa.BigInteger),
                 C("bytes", sa.BigInteger)),
        sa.Table("ww_networks", md, C("principal", sa.String(128), primary_key=True),
                 C("network", sa.String(64), primary_key=True)),
        # running streams, registered at start with the bytes they may send (finished ones: ww_egress)
        sa.Table("ww_streams", md, C("id", sa.String(32), primary_key=True), C("principal", sa.String(128),
                 index=True), C("model", sa.String(128)), C("at", sa.BigInteger), C("bytes", sa.BigInteger)),
        # per download (principal, object, ETag): bytes charged and bytes sent; a resume is free for at
        # most charged - sent (what was paid for and not sent), anything else is charged again
        sa.Table("ww_downloads", md, C("download", sa.String(300), primary_key=True), C("charged", sa.BigInteger),
                 C("sent", sa.BigInteger), C("at", sa.BigInteger)),
    )  # fmt: skip


def _ts(now: datetime | None) -> float:
    return (now or datetime.now(UTC)).timestamp()


@dataclass
class Broker:
    """One broker replica.  Several replicas may share ``url`` (PostgreSQL) and one audit log."""

    url: str
    store: WeightStore
    log: AuditLog
    config: BrokerConfig = field(default_factory=BrokerConfig)
    policy: Policy = field(default_factory=Policy)
    gate: Any = None  # the export-control gate (release.gate.ReleaseGate); without one, releases are refused

    def __post_init__(self) -> None:
        import sqlalchemy as sa

        from .auditlog import _sqlite_begin_immediate

        kw: dict[str, Any] = {}
        if self.url.startswith("sqlite"):
            kw["connect_args"] = {"timeout": 30, "check_same_thread": False}
        self.engine = sa.create_engine(self.url, **kw)
        if self.url.startswith("sqlite"):
            # the broker's own state (token ids, buckets) commits without waiting for fsync; the audit
            # log, even in the same file, keeps full fsync on its own connections
            _sqlite_begin_immediate(self.engine, synchronous="NORMAL")
        md = sa.MetaData()
        self.t = _tables(md)
        md.create_all(self.engine)
        self.sink = MerkleLogSink(self.log)
        self._decisions: deque[float] = deque(maxlen=100_000)  # seconds per policy decision, newest last
        self._jti_inserts = 0
        self._finishes = 0
        if self.gate is not None:  # issue 17: a rules file older than one this broker used is refused
            from ..release.rules_version import RulesReplaced, RulesRollback, check_database

            try:
                check_database(self.engine, self.gate.rules)
            except (RulesRollback, RulesReplaced) as e:
                self.audit(AuditAction.RELEASE_GATE, "denied", "broker", reason=str(e))
                self.close()
                raise

    def metrics(self) -> dict[str, Any]:
        """Policy-decision latency over the last 100,000 decisions (milliseconds)."""
        xs = sorted(self._decisions)
        if not xs:
            return {"decisions": 0}
        q = lambda f: round(1000 * xs[min(len(xs) - 1, int(f * len(xs)))], 3)
        return {"decisions": len(xs), "decision_ms_p50": q(0.5), "decision_ms_p99": q(0.99),
                "decision_ms_max": round(1000 * xs[-1], 3)}  # fmt: skip

    def close(self) -> None:
        self.sink.close()
        self.engine.dispose()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self) -> Any:
        c = self.engine.connect()
        return _WriteTx(c)

    # -- audit ----------------------------------------------------------------------------
    def audit(self, action: AuditAction, outcome: str, actor: str, subject: str | None = None, *,
              reason: str = "", now: datetime | None = None, **detail: Any) -> int:  # fmt: skip
        ev = AuditEvent(action, outcome, actor, reason, now or datetime.now(UTC), subject=subject, detail=detail)
        return self.sink.append(ev)

    # -- accounts -------------------------------------------------------------------------
    def add_account(self, account: str, kind: str, public_key: bytes, roles: set[str] | frozenset[str],
                    teams: set[str] | frozenset[str], *, actor: str = "admin") -> None:  # fmt: skip
        import sqlalchemy as sa

        from ..keys.provider import ed25519_key_id
        from .policy import ROLES

        if kind not in ("service", "workload", "human") or len(public_key) != 32:
            raise BrokerError("an account is a service, workload or human with a 32-byte Ed25519 key")
        if not set(roles) <= set(ROLES):
            raise BrokerError(f"unknown role(s): {sorted(set(roles) - set(ROLES))}")
        check_name(account)
        with self._write() as c:
            c.execute(sa.delete(self.t.accounts).where(self.t.accounts.c.id == account))
            c.execute(sa.insert(self.t.accounts).values(id=account, kind=kind, public_key=public_key,
                      key_id=ed25519_key_id(public_key), roles=json.dumps(sorted(roles)),
                      teams=json.dumps(sorted(teams)), suspended=False, revoked_before=0))  # fmt: skip
        self.audit(AuditAction.BROKER_ACCOUNT, "ok", actor, account, kind=kind, roles=sorted(roles),
                   teams=sorted(teams))  # fmt: skip

    def principal(self, account: str) -> Principal:
        r = self._account(account)
        return Principal(r.id, r.kind, frozenset(json.loads(r.roles)), frozenset(json.loads(r.teams)),
                         bool(r.suspended))  # fmt: skip

    def _account(self, account: str) -> Any:
        import sqlalchemy as sa

        with self.engine.connect() as c:
            r = c.execute(sa.select(self.t.accounts).where(self.t.accounts.c.id == account)).first()
        if r is None:
            raise Unauthorized("unknown account")
        return r

    def suspend(self, account: str, *, actor: str, reason: str, now: datetime | None = None) -> None:
        import sqlalchemy as sa

        with self._write() as c:
            c.execute(sa.update(self.t.accounts).where(self.t.accounts.c.id == account).values(suspended=True))
        self.audit(AuditAction.BROKER_SUSPEND, "ok", actor, account, reason=reason, now=now)

    def revoke_tokens(self, account: str, *, before: datetime, actor: str) -> None:
        """Refuse every token ``account`` issued before ``before``."""
        import sqlalchemy as sa

        with self._write() as c:
            c.execute(sa.update(self.t.accounts).where(self.t.accounts.c.id == account)
                      .values(revoked_before=int(before.timestamp())))  # fmt: skip
        self.audit(AuditAction.BROKER_REVOKE, "ok", actor, account, before=before.isoformat())

    # -- authentication -------------------------------------------------------------------
    def authenticate(self, token: str, method: str, path: str, *, network: str | None = None,
                     now: datetime | None = None) -> Principal:  # fmt: skip
        """Check a request token and record its id; raise :class:`Unauthorized` (audited) on any failure."""
        import sqlalchemy as sa

        from .tokens import parse_unverified

        who = "unknown"
        try:
            acct, kid = parse_unverified(token)
            who = acct[:128]
            r = self._account(acct)
            if not hmac.compare_digest(r.key_id.encode(), kid.encode()):
                raise TokenError("token is signed by a key this account does not hold")
            cl = verify(token, bytes(r.public_key), self.config.audience, method, path, now=now)
            if cl.iat < (r.revoked_before or 0):
                raise TokenError("token was revoked")
            t = int(_ts(now))
            self._jti_inserts += 1
            try:
                with self._write() as c:
                    if self._jti_inserts % 256 == 1:  # expired token ids are swept now and then, not per request
                        c.execute(sa.delete(self.t.jti).where(self.t.jti.c.exp < t - 60))
                    c.execute(sa.insert(self.t.jti).values(jti=f"{acct}:{cl.jti}", exp=cl.exp))
            except sa.exc.IntegrityError:
                raise TokenError("token was already used") from None
        except (TokenError, Unauthorized) as e:
            self.audit(AuditAction.BROKER_AUTHENTICATE, "denied", who, path[:200], reason=str(e), now=now,
                       method=method, network=network)  # fmt: skip
            # the log keeps the precise reason; the caller does not learn which accounts exist
            public = str(e) if isinstance(e, TokenError) and "key this account" not in str(e) else _GENERIC
            raise Unauthorized(public) from None
        p = Principal(r.id, r.kind, frozenset(json.loads(r.roles)), frozenset(json.loads(r.teams)), bool(r.suspended))
        if p.suspended:
            self.audit(AuditAction.BROKER_AUTHENTICATE, "denied", acct, path[:200], reason="account suspended",
                       now=now)  # fmt: skip
            raise Unauthorized("account suspended")
        return p

    # -- authorization --------------------------------------------------------------------
    def authorize(self, p: Principal, perm: Permission, model: str | None = None, *, team: str | None = None,
                  context: dict[str, Any] | None = None, now: datetime | None = None,
                  hide: bool = False) -> Decision:  # fmt: skip
        """Decide and audit; raise :class:`Forbidden` on deny.  ``team``: the model's, if already looked up.

        ``hide`` (the caller named the model): a model the caller may not see (no ``model:metadata:read``
        on it) is refused exactly as a model that does not exist, :class:`NotFound` (no oracle); both
        refusals are audited."""
        if model is not None and team is None:
            try:
                team = self.model(model)["team"]
            except NotFound:
                if not hide:
                    raise
                self.audit(AuditAction.BROKER_AUTHORIZE, "denied", p.id, model, now=now, permission=str(perm),
                           reason="no such model")  # fmt: skip
                raise
        t0 = time.perf_counter()
        d = self.policy.decide(p, perm, model, team, context)
        self._decisions.append(time.perf_counter() - t0)
        self.audit(AuditAction.BROKER_AUTHORIZE, "ok" if d.allowed else "denied", p.id, model, now=now,
                   permission=str(perm), policies=list(d.reasons))  # fmt: skip
        if not d.allowed:
            see = Permission.MODEL_METADATA_READ
            if hide and model is not None and (perm == see or not self.policy.decide(p, see, model, team).allowed):
                raise NotFound(f"no model {model!r}")
            raise Forbidden(f"{p.id} may not {perm}" + (f" on {model}" if model else ""))
        return d

    # -- models ---------------------------------------------------------------------------
    def add_model(self, name: str, team: str, path: Any, *, trust: Any = None, actor: str = "admin",
                  classification: Any = None) -> int:  # fmt: skip
        """Admit a sealed file: its structure and chunk digests are checked (and its signature against
        ``trust``, a TrustStore, when given); plaintext is refused.  ``classification`` (a
        :class:`~weightwarden.release.classify.Classification`) is what the export-control gate decides
        releases of this model on; without one, every release of it needs review."""
        import sqlalchemy as sa

        from ..sealed.reader import SealedFile

        check_name(name)
        with SealedFile(path) as sf:
            sf.verify_digests()
            signer = sf.check_signature(trust) if trust is not None else None
            detail = {"signer_public_key": sf.public_key.hex(), "trusted_signer": signer,
                      "file_id": sf.context.file_id.hex()}  # fmt: skip
        if classification is not None:
            detail["classification"] = classification.to_json()
        size = self.store.put(name, path)
        with self._write() as c:
            c.execute(sa.delete(self.t.models).where(self.t.models.c.name == name))
            c.execute(sa.insert(self.t.models).values(name=name, team=team, size=size, detail=json.dumps(detail)))
        cls = {}
        if classification is not None:  # issue 17: figures entered by this account are audited with their source
            comp = classification.compute
            cls = {"compute_flop": comp.flop if comp else None, "compute_method": comp.method if comp else None,
                   "compute_source": classification.source, "doubts": list(classification.doubts)}  # fmt: skip
        self.audit(AuditAction.BROKER_MODEL_ADD, "ok", actor, name, team=team, bytes=size, **cls)
        return size

    def model(self, name: str) -> dict[str, Any]:
        import sqlalchemy as sa

        check_name(name)
        with self.engine.connect() as c:
            r = c.execute(sa.select(self.t.models).where(self.t.models.c.name == name)).first()
        if r is None:
            raise NotFound(f"no model {name!r}")
        return {"name": r.name, "team": r.team, "size": int(r.size), "detail": json.loads(r.detail or "{}")}

    def models(self, p: Principal) -> list[dict[str, Any]]:
        import sqlalchemy as sa

        with self.engine.connect() as c:
            rows = c.execute(sa.select(self.t.models).order_by(self.t.models.c.name)).all()
        out = []
        for r in rows:
            if self.policy.decide(p, Permission.MODEL_METADATA_READ, r.name, r.team).allowed:
                out.append({"name": r.name, "team": r.team, "size": int(r.size)})
        return out

    # -- two-person rule ------------------------------------------------------------------
    def request_copy(self, p: Principal, model: str, action: str = "copy", *, reason: str = "",
                     recipient: str | None = None, country: str | None = None, aliases: tuple[str, ...] = (),
                     now: datetime | None = None) -> dict[str, Any]:  # fmt: skip
        """Open a request for a full copy (``copy``) or a release (``release``); it needs approvals.

        A release names its ``recipient`` (the end user) and destination ``country``; the export-control
        gate decides it now, the decision is recorded on the request (an audit event with the rule-set
        version), and approvers sign it: approving a release the gate did not allow is an override."""
        import sqlalchemy as sa

        perm = {"copy": Permission.MODEL_WEIGHTS_COPY, "release": Permission.RELEASE_COPY_CREATE}.get(action)
        if perm is None:
            raise BrokerError("action is copy or release")
        # the requester must hold the role (checked as if approved: approval is the only missing piece)
        self.authorize(p, perm, model, context={"approved": True}, now=now, hide=True)
        gate = None
        if action == "release":
            gate = self._gate_decision(p, model, recipient, country, aliases, now)
        t = int(_ts(now))
        rid = secrets.token_hex(16)
        with self._write() as c:
            c.execute(sa.insert(self.t.requests).values(id=rid, requester=p.id, model=model, action=action,
                      created=t, expires=t + self.config.approval_window_s, status="pending",
                      reason=reason[:500], recipient=gate.recipient if gate else None,
                      country=gate.country if gate else None,
                      gate=json.dumps(gate.to_json()) if gate else None))  # fmt: skip
        self.audit(AuditAction.APPROVAL_REQUEST, "ok", p.id, model, now=now, request=rid, kind=action,
                   reason=reason[:500], gate=gate.decision if gate else None)  # fmt: skip
        return self.request(rid, now=now)

    def _gate_decision(self, p: Principal, model: str, recipient: str | None, country: str | None,
                       aliases: tuple[str, ...], now: datetime | None) -> Any:  # fmt: skip
        from ..release.classify import Classification
        from ..release.gate import Destination, ReleaseDenied

        try:
            if self.gate is None:
                raise ReleaseDenied("this broker has no export-control gate configured: releases are refused")
            if not recipient:
                raise ReleaseDenied("a release names its recipient (and destination country)")
            dest = Destination(recipient, country.upper() if country else None, tuple(aliases))
            c = self.model(model)["detail"].get("classification")
            cls = Classification.from_json(c) if c else None
            d = self.gate.decide(cls, dest, model_id=model, as_of=datetime.fromtimestamp(_ts(now), UTC).date())
        except ReleaseDenied as e:
            self.audit(AuditAction.RELEASE_GATE, "denied", p.id, model, reason=str(e), now=now)
            raise BrokerError(str(e)) from None
        self.audit(AuditAction.RELEASE_GATE, "ok" if d.allowed else "denied", p.id, model, now=now,
                   decision=d.decision, blocking=sorted(d.blocking), rules_version=d.rules_version,
                   list_sha256=d.list_sha256, digest=d.digest, recipient=d.recipient, country=d.country)  # fmt: skip
        return d

    @staticmethod
    def approval_message(req: dict[str, Any]) -> bytes:
        """What an approver signs: the request's id, model, action, requester and expiry."""
        lines = [req["id"], req["model"], req["action"], req["requester"], str(req["expires"])]
        g = req.get("gate")
        if req["action"] == "release" and g:
            lines += [f"release-to {req['recipient']} {req['country'] or '??'}", f"gate {g['decision']} {g['digest']}"]
            if g["decision"] != "allow":
                lines.append("override " + ",".join(g["blocking"]))
        return APPROVAL_CONTEXT + "\n".join(lines).encode()

    def request(self, rid: str, *, now: datetime | None = None) -> dict[str, Any]:
        import sqlalchemy as sa

        if not isinstance(rid, str) or len(rid) != 32 or any(ch not in "0123456789abcdef" for ch in rid):
            raise NotFound("no such request")
        with self.engine.connect() as c:
            r = c.execute(sa.select(self.t.requests).where(self.t.requests.c.id == rid)).first()
            if r is None:
                raise NotFound("no such request")
            ap = c.execute(sa.select(self.t.approvals.c.approver).where(self.t.approvals.c.request_id == rid)
                           .order_by(self.t.approvals.c.at)).scalars().all()  # fmt: skip
        status = r.status
        if status in ("pending", "approved", "released") and int(_ts(now)) >= r.expires:
            status = "expired"
        out = {"id": r.id, "requester": r.requester, "model": r.model, "action": r.action, "created": r.created,
               "expires": r.expires, "status": status, "approvals": list(ap),
               "approvals_needed": self.config.approvals_needed}  # fmt: skip
        if r.action == "release":
            g = json.loads(r.gate) if r.gate else None
            out |= {"recipient": r.recipient, "country": r.country, "gate": g,
                    "override": bool(g and g["decision"] != "allow"), "artifact": r.artifact}  # fmt: skip
        return out

    def approve(self, p: Principal, rid: str, signature: bytes, *, now: datetime | None = None) -> dict[str, Any]:
        """Record ``p``'s approval, an Ed25519 signature of :meth:`approval_message` by ``p``'s account
        key; the request is approved at M distinct approvers."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        def check(req: dict[str, Any]) -> bytes:
            try:
                key = bytes(self._account(p.id).public_key)
                Ed25519PublicKey.from_public_bytes(key).verify(signature, self.approval_message(req))
            except (InvalidSignature, ValueError):
                raise Forbidden("the approval signature does not verify") from None
            return signature

        return self.record_approval(p, rid, check, now=now)

    def record_approval(self, p: Principal, rid: str, check: Any, *, now: datetime | None = None) -> dict[str, Any]:
        """The two-person rule's bookkeeping, whatever proves the approval: ``check(request)`` verifies
        the approver's proof (a signature, a WebAuthn assertion) and returns the bytes to record."""
        import sqlalchemy as sa

        req = self.request(rid, now=now)
        try:
            self.authorize(p, Permission.APPROVAL_REQUEST_APPROVE, req["model"], now=now)
            if p.id == req["requester"]:
                raise Forbidden("a requester cannot approve their own request")
            if req["status"] != "pending":
                raise Conflict(f"request is {req['status']}")
            if p.id in req["approvals"]:
                raise Conflict("this approver has already approved")
            proof = check(req)
            t = int(_ts(now))
            with self._write() as c:
                cur = c.execute(sa.select(self.t.requests.c.status).where(self.t.requests.c.id == rid)
                                .with_for_update()).scalar_one()  # fmt: skip
                if cur != "pending":
                    raise Conflict(f"request is {cur}")
                try:
                    c.execute(sa.insert(self.t.approvals).values(request_id=rid, approver=p.id, signature=proof, at=t))
                except sa.exc.IntegrityError:
                    raise Conflict("this approver has already approved") from None
                n = c.execute(sa.select(sa.func.count()).select_from(self.t.approvals)
                              .where(self.t.approvals.c.request_id == rid)).scalar_one()  # fmt: skip
                done = n >= self.config.approvals_needed
                if done:
                    c.execute(sa.update(self.t.requests).where(self.t.requests.c.id == rid).values(status="approved"))
        except BrokerError as e:
            self.audit(AuditAction.APPROVAL_GRANT, "denied", p.id, req["model"], reason=str(e), now=now, request=rid)
            raise
        self.audit(AuditAction.APPROVAL_GRANT, "ok", p.id, req["model"], now=now, request=rid,
                   proof_sha256=hashlib.sha256(proof).hexdigest())  # fmt: skip
        if done and req.get("override"):
            self.audit(AuditAction.RELEASE_OVERRIDE, "ok", p.id, req["model"], now=now, request=rid,
                       overridden=req["gate"]["blocking"], decision=req["gate"]["decision"],
                       digest=req["gate"]["digest"], approvers=[*req["approvals"], p.id])  # fmt: skip
        return self.request(rid, now=now)

    # -- releases -------------------------------------------------------------------------
    def consume_release(self, rid: str, decision: Any, *, actor: str, now: datetime | None = None) -> dict[str, Any]:
        """Check that the approved release request ``rid`` covers ``decision`` (the gate's decision as the
        release is made: same model, recipient and country, and no blocking reason the approvers did not
        override), and mark it released.  Raises :class:`~weightwarden.release.gate.ReleaseDenied`."""
        import sqlalchemy as sa

        from ..release.gate import ReleaseDenied, check_override

        try:
            req = self.request(rid, now=now)
            if req["action"] != "release":
                raise ReleaseDenied("the request is not for a release")
            if req["status"] != "approved":
                raise ReleaseDenied(f"the release request is {req['status']}, not approved")
            if (req["model"], req["recipient"], req["country"]) != (decision.model_id, decision.recipient,
                                                                    decision.country):  # fmt: skip
                raise ReleaseDenied("the approved request is for another model, recipient or country")
            check_override(decision, set(req["gate"]["blocking"]))
            with self._write() as c:
                n = c.execute(sa.update(self.t.requests).where(self.t.requests.c.id == rid,
                              self.t.requests.c.status == "approved").values(status="released")).rowcount  # fmt: skip
            if n != 1:
                raise ReleaseDenied("the approved release request was already used")
        except (ReleaseDenied, NotFound) as e:
            self.audit(AuditAction.RELEASE_GATE, "denied", actor, None, reason=str(e)[:300], now=now, request=rid)
            raise ReleaseDenied(str(e), decision) from None
        self.audit(AuditAction.RELEASE_GATE, "ok" if decision.allowed else "overridden", actor, decision.model_id,
                   now=now, request=rid, decision=decision.decision, blocking=sorted(decision.blocking),
                   rules_version=decision.rules_version, digest=decision.digest)  # fmt: skip
        return self.request(rid, now=now)

    def attach_release(self, rid: str, path: Any, *, actor: str, now: datetime | None = None) -> str:
        """Store the fingerprinted, sealed copy made for a released request; the requester's stream of
        ``rid`` then sends this copy (never the original)."""
        import sqlalchemy as sa

        from ..sealed.reader import SealedFile

        req = self.request(rid, now=now)
        if req["action"] != "release" or req["status"] != "released" or req["artifact"]:
            raise Conflict("only a released request without a copy yet takes one")
        with SealedFile(path) as sf:  # plaintext is refused
            sf.verify_digests()
        name = f"release-{rid}"
        size = self.store.put(name, path)
        with self._write() as c:
            c.execute(sa.update(self.t.requests).where(self.t.requests.c.id == rid).values(artifact=name))
        self.audit(AuditAction.RELEASE_CREATE, "ok", actor, req["model"], now=now, request=rid, bytes=size,
                   recipient=req["recipient"])  # fmt: skip
        return name

    def requests(self, *, status: str | None = None, now: datetime | None = None) -> list[dict[str, Any]]:
        import sqlalchemy as sa

        q = sa.select(self.t.requests.c.id).order_by(self.t.requests.c.created)
        with self.engine.connect() as c:
            ids = list(c.execute(q).scalars())
        out = [self.request(i, now=now) for i in ids]
        return [r for r in out if status is None or r["status"] == status]

    # -- egress ---------------------------------------------------------------------------
    def _take(self, keys: list[tuple[str, Limit]], n: int, now: datetime | None) -> str | None:
        """Debit ``n`` bytes from every bucket atomically; the name of the first short bucket, or None."""
        import sqlalchemy as sa

        t = _ts(now)
        b = self.t.buckets
        for attempt in range(3):
            try:
                with self._write() as c:
                    rows = {r.key: r for r in c.execute(sa.select(b).where(b.c.key.in_([k for k, _ in keys]))
                                                        .with_for_update())}  # fmt: skip
                    new = {}
                    for k, lim in keys:
                        r = rows.get(k)
                        tokens = (
                            lim.burst if r is None else min(lim.burst, r.tokens + lim.rate * max(0.0, t - r.updated))
                        )
                        if tokens < n:
                            return k
                        new[k] = tokens - n
                    for k, _ in keys:
                        if k in rows:
                            c.execute(sa.update(b).where(b.c.key == k).values(tokens=new[k], updated=t))
                        else:
                            c.execute(sa.insert(b).values(key=k, tokens=new[k], updated=t))
                return None
            except sa.exc.IntegrityError:  # another replica created the bucket first: retry on its row
                if attempt == 2:
                    raise
        return None

    def _admit(self, p: Principal, model: str, nbytes: int, network: str | None, now: datetime | None) -> str:
        """Run the anomaly rules and register the stream, in one transaction serialised per principal
        (its account row locked; SQLite: BEGIN IMMEDIATE), so every rule sees the principal's running
        streams (bytes reserved) as well as its finished ones, and parallel fetches are judged as serial
        ones.  Returns the stream's id; raises :class:`Forbidden` (audited) when the principal is
        suspended or an ``auto_suspend`` rule fires (the stream is then not registered)."""
        import sqlalchemy as sa

        t = int(_ts(now))
        hour = datetime.fromtimestamp(t, UTC).hour
        found: list[tuple[str, dict[str, Any]]] = []
        lo, hi = self.config.allowed_hours_utc
        if not lo <= hour < hi:
            found.append(("time-of-day", {"hour": hour}))
        e, s, a, nw = self.t.egress, self.t.streams, self.t.accounts, self.t.networks
        sid = secrets.token_hex(16)
        suspend = already = False
        with self._write() as c:
            acct = c.execute(sa.select(a.c.suspended).where(a.c.id == p.id).with_for_update()).first()
            if acct is None or acct.suspended:
                already = True
            else:
                vol = 0
                models: set[str] = set()
                for tb in (e, s):
                    vol += c.execute(sa.select(sa.func.coalesce(sa.func.sum(tb.c.bytes), 0))
                                     .where(tb.c.principal == p.id, tb.c.at > t - 3600)).scalar_one()  # fmt: skip
                    models |= set(c.execute(sa.select(tb.c.model).where(tb.c.principal == p.id, tb.c.at > t - 3600))
                                  .scalars())  # fmt: skip
                if vol + nbytes > self.config.volume_bytes_per_hour:  # the new stream's own size counts too
                    found.append(("volume", {"bytes_last_hour": int(vol), "stream": nbytes}))
                if len(models | {model}) > self.config.max_models_per_hour:
                    found.append(("many-models", {"models_last_hour": len(models | {model})}))
                if network is not None:  # the first network an account uses is its own; any later new one alerts
                    known = {r for r in c.execute(sa.select(nw.c.network).where(nw.c.principal == p.id)).scalars()}
                    if network[:64] not in known:
                        c.execute(sa.insert(nw).values(principal=p.id, network=network[:64]))
                        if known:
                            found.append(("new-network", {"network": network[:64]}))
                for kind, detail in found:
                    c.execute(sa.insert(self.t.alerts).values(at=t, principal=p.id, kind=kind,
                                                              detail=json.dumps(detail)))  # fmt: skip
                suspend = any(k in self.config.auto_suspend for k, _ in found)
                if suspend:
                    c.execute(sa.update(a).where(a.c.id == p.id).values(suspended=True))
                else:
                    c.execute(sa.insert(s).values(id=sid, principal=p.id, model=model, at=t, bytes=nbytes))
        if already:
            self.audit(AuditAction.BROKER_STREAM, "denied", p.id, model, now=now, phase="refused",
                       reason="account suspended")  # fmt: skip
            raise Forbidden("account suspended")
        for kind, detail in found:
            self.audit(AuditAction.BROKER_ALERT, "ok", "broker", p.id, now=now, kind=kind, **detail)
        if suspend:
            reason = "anomaly: " + ",".join(k for k, _ in found)
            self.audit(AuditAction.BROKER_SUSPEND, "ok", "broker", p.id, reason=reason, now=now)
            raise Forbidden("suspended by an anomaly rule")
        return sid

    def _is_suspended(self, account: str) -> bool:
        import sqlalchemy as sa

        with self.engine.connect() as c:
            r = c.execute(sa.select(self.t.accounts.c.suspended).where(self.t.accounts.c.id == account)).first()
        return r is None or bool(r.suspended)

    def alert(self, account: str, kind: str, detail: dict[str, Any], *, now: datetime | None = None) -> None:
        import sqlalchemy as sa

        with self._write() as c:
            c.execute(sa.insert(self.t.alerts).values(at=int(_ts(now)), principal=account, kind=kind,
                                                      detail=json.dumps(detail)))  # fmt: skip
        self.audit(AuditAction.BROKER_ALERT, "ok", "broker", account, now=now, kind=kind, **detail)

    def alerts(self) -> list[dict[str, Any]]:
        import sqlalchemy as sa

        with self.engine.connect() as c:
            rows = c.execute(sa.select(self.t.alerts).order_by(self.t.alerts.c.id)).all()
        return [{"id": r.id, "at": r.at, "principal": r.principal, "kind": r.kind, "detail": json.loads(r.detail)}
                for r in rows]  # fmt: skip

    # -- streams --------------------------------------------------------------------------
    def stream(self, p: Principal, model: str, *, request_id: str | None = None, network: str | None = None,
               range_: str | None = None, if_match: str | None = None, zero_copy: bool = False,
               now: datetime | None = None) -> WeightStream:  # fmt: skip
        """Authorize, then return an iterator over the sealed file that debits the egress buckets per chunk.

        Without ``request_id``: a stream to a workload (``model:weights:stream``).  With it: the full
        copy of an approved request, usable once (its requester may resume it with ranged requests until
        the request's window closes).  ``range_``: one HTTP byte range; ``if_match``: the ETag the
        caller's partial copy came from (a resume against another version of the file fails with
        :class:`PreconditionFailed`).  The stream is registered with the anomaly rules before its first
        byte, and ends (:class:`StreamCut`) at the next chunk after its principal is suspended.
        ``zero_copy`` (a server that sends files with ``sendfile``): from a local store, the stream yields
        :class:`~.zerocopy.FileSpan` objects (metered alike) instead of bytes."""
        import sqlalchemy as sa

        if request_id is None:
            self.authorize(p, Permission.MODEL_WEIGHTS_STREAM, model, now=now, hide=True)
        info = self.model(model)
        obj, extra, resume = model, {}, False
        if request_id is not None:
            req = self.request(request_id, now=now)
            if req["model"] != model or req["requester"] != p.id:
                raise Forbidden("the request is for another model or requester")
            # a used request's requester may resume it (ranged requests) while its window is open
            resume = req["status"] == "used" and range_ is not None and int(_ts(now)) < req["expires"]
            if req["status"] in ("used", "expired") and not resume:
                raise Conflict(f"the request is {req['status']}")
            release = req["action"] == "release"
            if release and not req["artifact"]:
                raise Conflict("a release streams its fingerprinted copy: make it first (warden release --request)")
            perm = Permission.RELEASE_COPY_CREATE if release else Permission.MODEL_WEIGHTS_COPY
            ready = resume or req["status"] == ("released" if release else "approved")
            self.authorize(p, perm, model, context={"approved": ready}, now=now)
            if release:
                obj, extra = req["artifact"], {"copy": req["artifact"]}
                info = {"size": self.store.size(obj)}
        total, etag = info["size"], self.store.etag(obj)
        try:
            if if_match is not None and if_match.strip() not in ("*", etag):
                raise PreconditionFailed("the file changed since your partial copy (ETag differs): download it "
                                         "again from the start")  # fmt: skip
            first, stop = parse_range(range_, total) if range_ is not None else (0, total)
        except BrokerError as e:
            self.audit(AuditAction.BROKER_STREAM, "denied", p.id, model, now=now, phase="refused", reason=str(e),
                       range=(range_ or "")[:100], request=request_id)  # fmt: skip
            raise
        if request_id is not None and not resume:
            with self._write() as c:  # single use: approved (released) -> used, atomically
                n = c.execute(sa.update(self.t.requests).where(self.t.requests.c.id == request_id,
                              self.t.requests.c.status == ("released" if release else "approved"))
                              .values(status="used")).rowcount  # fmt: skip
            if n != 1:
                raise Conflict("the approved request was already used")
        download = f"{p.id}:{obj}:{etag}"[:300]
        sid = self._admit(p, model, stop - first, network, now)
        free = self._take_credit(p, download, stop - first, now) if range_ is not None else 0
        zero_copy = zero_copy and callable(getattr(self.store, "path", None))
        try:
            if zero_copy:
                from .zerocopy import file_spans

                chunks: Iterator[Any] = file_spans(self.store.path(obj), first, stop, self.config.zero_copy_span)
            else:
                chunks = self.store.read(obj, self.config.chunk, first, stop)
        except BaseException:
            self._finish(sid, p, model, download, 0, 0, free, 0, now)
            raise
        if range_ is not None:
            extra |= {"range": f"{first}-{stop - 1}/{total}", "free": free}
        if zero_copy:
            extra["zero_copy"] = True
        self.audit(AuditAction.BROKER_STREAM, "ok", p.id, model, now=now, phase="start", bytes=stop - first,
                   request=request_id, network=network, **extra)  # fmt: skip
        it = self._metered(sid, p, model, chunks, first, stop, free, download, now)
        file_id = None if extra.get("copy") else info.get("detail", {}).get("file_id")
        return WeightStream(it, stop - first, start=first, total=total, etag=etag, partial=range_ is not None,
                            file_id=file_id)  # fmt: skip

    def _take_credit(self, p: Principal, download: str, n: int, now: datetime | None) -> int:
        """A ranged request takes, from its download's record, up to ``n`` bytes it may be sent without
        charge: at most what was charged and not sent (a cut stream's reserved tail), within
        ``resume_window_s``.  The credit is reserved now (counted as sent) so two resumes at once cannot
        both spend it; :meth:`_finish` gives back what the stream did not send.  Serialised per principal."""
        import sqlalchemy as sa

        t = int(_ts(now))
        d, a = self.t.downloads, self.t.accounts
        with self._write() as c:
            c.execute(sa.select(a.c.id).where(a.c.id == p.id).with_for_update())
            r = c.execute(sa.select(d).where(d.c.download == download).with_for_update()).first()
            if r is None or r.at <= t - self.config.resume_window_s:
                return 0
            free = max(0, min(n, int(r.charged) - int(r.sent)))
            if free:
                c.execute(sa.update(d).where(d.c.download == download).values(sent=d.c.sent + free))
        return free

    def _finish(self, sid: str, p: Principal, model: str, download: str, charged: int, sent: int, free: int,
                free_used: int, now: datetime | None) -> None:  # fmt: skip
        """A stream ends: its registration becomes an egress record of the bytes it *sent* (what the
        volume rule counts), and its download's record adds the bytes it was charged (a cut stream's
        reserved, unsent tail included) and sent; the part of its resume credit (``free``) it did not
        use is given back.  Serialised per principal (its row locked)."""
        import sqlalchemy as sa

        t = int(_ts(now))
        d, a = self.t.downloads, self.t.accounts
        self._finishes += 1
        with self._write() as c:
            c.execute(sa.select(a.c.id).where(a.c.id == p.id).with_for_update())
            if self._finishes % 256 == 1:  # downloads past the resume window are swept now and then
                c.execute(sa.delete(d).where(d.c.at < t - self.config.resume_window_s))
            r = c.execute(sa.select(d).where(d.c.download == download).with_for_update()).first()
            # the credit was counted as sent when taken: what it did not use goes back to the record
            dsent = sent - free
            if r is None:
                c.execute(sa.insert(d).values(download=download, charged=charged, sent=sent, at=t))
            else:
                c.execute(sa.update(d).where(d.c.download == download).values(
                    charged=d.c.charged + charged, sent=d.c.sent + dsent, at=t))  # fmt: skip
            c.execute(sa.delete(self.t.streams).where(self.t.streams.c.id == sid))
            c.execute(sa.insert(self.t.egress).values(principal=p.id, model=model, at=t, bytes=sent))

    def _volume_exceeded(self, sid: str, p: Principal, sent: int, now: datetime | None) -> int | None:
        """The volume rule re-checked during a stream: bytes sent in the last hour by the principal's
        finished streams, plus those its other running streams may send, plus what this one has sent;
        the total when it is over ``volume_bytes_per_hour``, else None."""
        import sqlalchemy as sa

        t = int(_ts(now))
        e, s = self.t.egress, self.t.streams
        with self.engine.connect() as c:
            vol = int(c.execute(sa.select(sa.func.coalesce(sa.func.sum(e.c.bytes), 0))
                                .where(e.c.principal == p.id, e.c.at > t - 3600)).scalar_one())  # fmt: skip
            others = sa.select(sa.func.coalesce(sa.func.sum(s.c.bytes), 0)).where(
                s.c.principal == p.id, s.c.id != sid, s.c.at > t - 3600)
            vol += int(c.execute(others).scalar_one())
        vol += sent
        return vol if vol > self.config.volume_bytes_per_hour else None

    def _metered(self, sid: str, p: Principal, model: str, chunks: Iterator[bytes], first: int, stop: int,
                 free: int, download: str, now: datetime | None) -> Iterator[bytes]:  # fmt: skip
        """Yield ``chunks`` (bytes ``[first, stop)`` of the file) while debiting the buckets for every
        byte past the first ``free`` (a resume's credit).  Bytes are reserved a lease at a time (one
        transaction per ``config.lease`` bytes, not per chunk), falling back to the exact chunk when
        the buckets hold less.  A stream that ends normally is credited back what it reserved and did
        not send; a cut one keeps it charged, as its download's resume credit.  Before each chunk the
        principal is checked (a suspended principal's stream is cut there), and before each lease the
        volume rule is re-checked with the bytes this stream is about to send (over it: an alert, a
        suspension if the rule is in ``auto_suspend``, and the stream cut)."""
        cfg = self.config
        keys = [(f"p:{p.id}", cfg.per_principal), (f"m:{model}", cfg.per_model), ("g:*", cfg.global_)]
        sent = reserved = charged = free_used = 0
        uncharged = (stop - first) - free
        ended = "closed"  # the consumer stopped early (a client that went away), unless set below
        try:
            for b in chunks:
                if self._is_suspended(p.id):
                    self.audit(AuditAction.BROKER_STREAM, "denied", p.id, model, now=now, phase="cut", bytes=sent,
                               reason="account suspended")  # fmt: skip
                    ended = ""
                    raise StreamCut("account suspended: stream cut")
                f = min(free - free_used, len(b))
                cost = len(b) - f
                while reserved < cost:  # reserve in pieces of at most 1 MiB, a lease at a time when possible
                    vol = self._volume_exceeded(sid, p, sent + len(b), now)
                    if vol is not None:
                        self._volume_cut(p, model, sent, vol, now)
                        ended = ""
                        raise StreamCut("hourly volume exceeded: stream cut")
                    need = min(cost - reserved, CHUNK)
                    want = max(need, min(cfg.lease, uncharged - charged - reserved))
                    short = self._take(keys, want, now)
                    if short is not None and want > need:
                        want, short = need, self._take(keys, need, now)
                    if short is not None:
                        self.alert(p.id, "egress-limit", {"bucket": short, "model": model, "sent": sent}, now=now)
                        self.audit(AuditAction.BROKER_STREAM, "denied", p.id, model, now=now, phase="suspended",
                                   bytes=sent, bucket=short)  # fmt: skip
                        ended = ""
                        raise EgressLimitError(f"egress budget {short.split(':')[0]} exhausted; stream suspended")
                    reserved += want
                reserved -= cost
                charged += cost
                free_used += f
                sent += len(b)
                yield b
            ended = "end"
        finally:
            if reserved > 0 and ended == "end":
                self._refund(keys, reserved, now)
            elif reserved > 0:  # cut: the reserved tail stays charged, and a resume may take it back
                charged += reserved
            self._finish(sid, p, model, download, charged, sent, free, free_used, now)
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            if ended:
                self.audit(AuditAction.BROKER_STREAM, "ok", p.id, model, now=now, phase=ended, bytes=sent,
                           charged=charged)  # fmt: skip

    def _volume_cut(self, p: Principal, model: str, sent: int, vol: int, now: datetime | None) -> None:
        """The volume rule fired during a stream: alert, suspend if the rule is in ``auto_suspend``."""
        self.alert(p.id, "volume", {"bytes_last_hour": vol, "model": model}, now=now)
        if "volume" in self.config.auto_suspend:
            self.suspend(p.id, actor="broker", reason="anomaly: volume", now=now)
        self.audit(AuditAction.BROKER_STREAM, "denied", p.id, model, now=now, phase="cut", bytes=sent,
                   reason="hourly volume exceeded")  # fmt: skip

    def _refund(self, keys: list[tuple[str, Limit]], n: int, now: datetime | None) -> None:
        import sqlalchemy as sa

        b = self.t.buckets
        t = _ts(now)
        with self._write() as c:
            for k, lim in keys:
                r = c.execute(sa.select(b).where(b.c.key == k).with_for_update()).first()
                if r is not None:
                    tokens = min(lim.burst, r.tokens + lim.rate * max(0.0, t - r.updated) + n)
                    c.execute(sa.update(b).where(b.c.key == k).values(tokens=tokens, updated=t))


class _WriteTx:
    """``with broker._write() as c``: one write transaction (BEGIN IMMEDIATE on SQLite)."""

    def __init__(self, c: Any):
        self.c = c

    def __enter__(self) -> Any:
        self.tx = self.c.execution_options(ww_write=True).begin()
        return self.c

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        try:
            if et is None:
                self.tx.commit()
            else:
                self.tx.rollback()
        finally:
            self.c.close()

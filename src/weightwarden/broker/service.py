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

__all__ = ["Broker", "BrokerConfig", "BrokerError", "EgressLimitError", "Forbidden", "NotFound", "Unauthorized"]


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


APPROVAL_CONTEXT = b"weightwarden approval v1\n"
_GENERIC = "token signature or claims are invalid"


class WeightStream(Iterator[bytes]):
    """The chunks of a weight stream (debited from the egress buckets as they go) and its ``size``."""

    def __init__(self, chunks: Iterator[bytes], size: int):
        self._chunks, self.size = chunks, size

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
        if self.gate is not None:  # issue 17: a rules file older than one this broker used is refused
            from ..release.rules_version import RulesRollback, check_database

            try:
                check_database(self.engine, self.gate.rules)
            except RulesRollback as e:
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
                  context: dict[str, Any] | None = None, now: datetime | None = None) -> Decision:  # fmt: skip
        """Decide and audit; raise :class:`Forbidden` on deny.  ``team``: the model's, if already looked up."""
        if model is not None and team is None:
            team = self.model(model)["team"]
        t0 = time.perf_counter()
        d = self.policy.decide(p, perm, model, team, context)
        self._decisions.append(time.perf_counter() - t0)
        self.audit(AuditAction.BROKER_AUTHORIZE, "ok" if d.allowed else "denied", p.id, model, now=now,
                   permission=str(perm), policies=list(d.reasons))  # fmt: skip
        if not d.allowed:
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
            detail = {"signer_public_key": sf.public_key.hex(), "trusted_signer": signer}
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
        self.authorize(p, perm, model, context={"approved": True}, now=now)
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

    def _check_anomalies(self, p: Principal, model: str, network: str | None, now: datetime | None) -> None:
        import sqlalchemy as sa

        t = int(_ts(now))
        hour = datetime.fromtimestamp(t, UTC).hour
        found: list[tuple[str, dict[str, Any]]] = []
        lo, hi = self.config.allowed_hours_utc
        if not lo <= hour < hi:
            found.append(("time-of-day", {"hour": hour}))
        e = self.t.egress
        with self.engine.connect() as c:
            vol = c.execute(sa.select(sa.func.coalesce(sa.func.sum(e.c.bytes), 0))
                            .where(e.c.principal == p.id, e.c.at > t - 3600)).scalar_one()  # fmt: skip
            models = set(c.execute(sa.select(e.c.model).where(e.c.principal == p.id, e.c.at > t - 3600)).scalars())
        if vol > self.config.volume_bytes_per_hour:
            found.append(("volume", {"bytes_last_hour": int(vol)}))
        if len(models | {model}) > self.config.max_models_per_hour:
            found.append(("many-models", {"models_last_hour": len(models | {model})}))
        if network is not None:  # the first network an account uses is its own; any later new one alerts
            known = self._seen_networks(p.id)
            try:
                with self._write() as c:
                    c.execute(sa.insert(self.t.networks).values(principal=p.id, network=network[:64]))
            except sa.exc.IntegrityError:
                pass  # seen before
            else:
                if known:
                    found.append(("new-network", {"network": network[:64]}))
        for kind, detail in found:
            self.alert(p.id, kind, detail, now=now)
        if any(k in self.config.auto_suspend for k, _ in found):
            self.suspend(p.id, actor="broker", reason="anomaly: " + ",".join(k for k, _ in found), now=now)
            raise Forbidden("suspended by an anomaly rule")

    def _seen_networks(self, account: str) -> int:
        import sqlalchemy as sa

        with self.engine.connect() as c:
            return int(c.execute(sa.select(sa.func.count()).select_from(self.t.networks)
                                 .where(self.t.networks.c.principal == account)).scalar_one())  # fmt: skip

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
               now: datetime | None = None) -> Iterator[bytes]:  # fmt: skip
        """Authorize, then return an iterator over the sealed file that debits the egress buckets per chunk.

        Without ``request_id``: a stream to a workload (``model:weights:stream``).  With it: the full
        copy of an approved request, usable once."""
        import sqlalchemy as sa

        info = self.model(model)
        if request_id is None:
            self.authorize(p, Permission.MODEL_WEIGHTS_STREAM, model, now=now)
        else:
            req = self.request(request_id, now=now)
            if req["model"] != model or req["requester"] != p.id:
                raise Forbidden("the request is for another model or requester")
            if req["status"] in ("used", "expired"):
                raise Conflict(f"the request is {req['status']}")
            release = req["action"] == "release"
            if release and not req["artifact"]:
                raise Conflict("a release streams its fingerprinted copy: make it first (warden release --request)")
            perm = Permission.RELEASE_COPY_CREATE if release else Permission.MODEL_WEIGHTS_COPY
            ready = req["status"] == ("released" if release else "approved")
            self.authorize(p, perm, model, context={"approved": ready}, now=now)
            with self._write() as c:  # single use: approved (released) -> used, atomically
                n = c.execute(sa.update(self.t.requests).where(self.t.requests.c.id == request_id,
                              self.t.requests.c.status == ("released" if release else "approved"))
                              .values(status="used")).rowcount  # fmt: skip
            if n != 1:
                raise Conflict("the approved request was already used")
            if release:
                info = {"size": self.store.size(req["artifact"])}
                self._check_anomalies(p, model, network, now)
                chunks = self.store.read(req["artifact"], self.config.chunk)
                self.audit(AuditAction.BROKER_STREAM, "ok", p.id, model, now=now, phase="start", bytes=info["size"],
                           request=request_id, network=network, copy=req["artifact"])  # fmt: skip
                return WeightStream(self._metered(p, model, chunks, info["size"], now), info["size"])
        self._check_anomalies(p, model, network, now)
        chunks = self.store.read(model, self.config.chunk)
        self.audit(AuditAction.BROKER_STREAM, "ok", p.id, model, now=now, phase="start", bytes=info["size"],
                   request=request_id, network=network)  # fmt: skip
        return WeightStream(self._metered(p, model, chunks, info["size"], now), info["size"])

    def _metered(self, p: Principal, model: str, chunks: Iterator[bytes], size: int,
                 now: datetime | None) -> Iterator[bytes]:  # fmt: skip
        """Yield ``chunks`` while debiting the buckets.  Bytes are reserved a lease at a time (one
        transaction per ``config.lease`` bytes, not per chunk), falling back to the exact chunk when
        the buckets hold less; whatever is reserved but not sent is credited back at the end."""
        import sqlalchemy as sa

        cfg = self.config
        keys = [(f"p:{p.id}", cfg.per_principal), (f"m:{model}", cfg.per_model), ("g:*", cfg.global_)]
        sent = reserved = 0
        try:
            for b in chunks:
                while reserved < len(b):  # reserve in pieces of at most 1 MiB, a lease at a time when possible
                    need = min(len(b) - reserved, CHUNK)
                    want = max(need, min(cfg.lease, size - sent - reserved))
                    short = self._take(keys, want, now)
                    if short is not None and want > need:
                        want, short = need, self._take(keys, need, now)
                    if short is not None:
                        self.alert(p.id, "egress-limit", {"bucket": short, "model": model, "sent": sent}, now=now)
                        self.audit(AuditAction.BROKER_STREAM, "denied", p.id, model, now=now, phase="suspended",
                                   bytes=sent, bucket=short)  # fmt: skip
                        raise EgressLimitError(f"egress budget {short.split(':')[0]} exhausted; stream suspended")
                    reserved += want
                reserved -= len(b)
                sent += len(b)
                yield b
        finally:
            if reserved > 0:
                self._refund(keys, reserved, now)
            with self._write() as c:
                c.execute(sa.insert(self.t.egress).values(principal=p.id, model=model, at=int(_ts(now)), bytes=sent))
        self.audit(AuditAction.BROKER_STREAM, "ok", p.id, model, now=now, phase="end", bytes=sent)

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

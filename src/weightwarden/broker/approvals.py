"""The two-person rule: copy and release requests, signed approvals, releases through the export gate."""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import UTC, datetime
from typing import Any

from ..audit import AuditAction
from .errors import BrokerError, Conflict, Forbidden, NotFound
from .policy import Permission, Principal
from .schema import BrokerState, _ts

__all__ = ["APPROVAL_CONTEXT", "Approvals"]

APPROVAL_CONTEXT = b"weightwarden approval v1\n"


class Approvals(BrokerState):
    """Requests for a full copy or a release, their approvals (M distinct approvers), releases."""

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

"""Custody changes in the agent (re-share, destroy, export, policy, auditing): each needs a fresh quorum
of custodians' approvals of that exact change (keys/quorum.py); an unsealed agent alone refuses them.
:class:`CustodyChanges` is the part of the agent's state (keys/agent_server.py) that requests, approves
and executes them.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ..audit import AuditAction
from ..errors import CustodyError, QuorumError, WardenError
from .custody import CustodyDoc, UnsealSession
from .keyring import Keyring
from .policy import Policy
from .provider import b64e
from .quorum import Approval, QuorumBook, check_params, make_statement

if TYPE_CHECKING:
    from .agent_server import Caller

__all__ = ["CustodyChanges"]


class CustodyChanges:
    """Request, approve and execute custody changes against the unsealed keyring (a mixin of the agent's
    state: it uses the state's custody record, quorum book, policy, keyring and audit)."""

    doc: CustodyDoc
    session: UnsealSession
    book: QuorumBook
    policy: Policy
    audit_key_use: bool

    if TYPE_CHECKING:

        def _kr(self) -> Keyring: ...

        def _audit(self, action: AuditAction, outcome: str, **kw: Any) -> None: ...

    def _refuse(self, kind: str, params: dict[str, Any]) -> QuorumError:
        msg = (
            f"{kind} is a custody change: it needs {self.doc.threshold} custodians' approval of that exact change "
            f"(`warden custody request {kind} ...`, then `warden custody approve`, then `warden custody execute`)"
        )
        self._audit(
            AuditAction.CUSTODY_CHANGE,
            "denied",
            subject=self.doc.split_id,
            detail={"operation": kind, "params": params, "why": "no quorum"},
            error=msg,
        )
        return QuorumError(msg)

    def _quorum(self, op: str, req: dict[str, Any], now: datetime, caller: Caller) -> dict[str, Any]:
        if op == "pending":
            return {"pending": [st.to_json() for st in self.book.pending()]}
        if op == "show":
            op_id = str(req.get("op_id"))
            st = self.book.get(op_id)
            return {"statement": st.to_json(), "digest": st.digest, "approvals": self.book.progress(op_id)}
        kr = self._kr()  # custody changes are requested, approved and executed against the unsealed keyring
        if op == "request":
            kind = str(req.get("kind"))[:32]
            try:
                if req.get("passphrases"):  # the old reshare let the requester choose every new share's passphrase
                    raise QuorumError(
                        "a custody change carries no passphrases: a reshare seals each new share to an age X25519 "
                        "recipient named in the statement the custodians approve (`warden custody keygen`)"
                    )
                params = check_params(kind, req.get("params"))
                self._precheck(kr, kind, params)
                ttl = timedelta(seconds=float(req.get("ttl_seconds") or 3600))
                st = make_statement(
                    kind,
                    params,
                    self.doc,
                    requested_by=_peer(caller),  # the socket peer, not what the request says
                    claimed_by=str(req["actor"]) if req.get("actor") else None,  # what the request says
                    now=now,
                    ttl=ttl,
                )
            except (WardenError, ValueError, OverflowError) as e:
                self._audit(
                    AuditAction.CUSTODY_REQUEST,
                    "denied",
                    subject=self.doc.split_id,
                    detail={"operation": kind},
                    error=str(e),
                )
                if isinstance(e, WardenError):
                    raise
                raise QuorumError("ttl_seconds must be a number of seconds") from None
            self.book.add(st)
            self._audit(AuditAction.CUSTODY_REQUEST, "ok", subject=st.op_id, detail=_describe(st))
            return {"op_id": st.op_id, "digest": st.digest, "statement": st.to_json(), "summary": st.describe()}
        op_id = str(req.get("op_id"))[:64]
        if op == "approve":
            try:
                appr = Approval.from_json(req.get("approval"))
                if appr.op_id != op_id:
                    raise QuorumError("this approval is for another operation id")
                n = self.book.approve(self.doc, appr, now=now)
            except WardenError as e:
                self._audit(
                    AuditAction.CUSTODY_APPROVE,
                    "denied",
                    subject=op_id,
                    error=str(e),
                    detail={
                        "custodian": str((req.get("approval") or {}).get("custodian"))[:64]
                        if isinstance(req.get("approval"), dict)
                        else None
                    },
                )
                raise
            self._audit(
                AuditAction.CUSTODY_APPROVE,
                "ok",
                subject=op_id,
                detail={
                    "custodian": appr.custodian,
                    "digest": appr.digest,
                    "approved_at": appr.approved_at.isoformat(),
                    "signature": b64e(appr.signature),
                },
            )
            return {"op_id": op_id, "approvals": n, "threshold": self.doc.threshold}
        if op == "execute":
            try:
                st, approvals = self.book.take(op_id, self.doc, now=now)
            except WardenError as e:
                self._audit(AuditAction.CUSTODY_CHANGE, "denied", subject=op_id, error=str(e))
                raise
            detail = {
                **_describe(st),
                "approvers": [a.custodian for a in approvals],
                "approvals": [a.to_json() for a in approvals],
            }
            try:
                result = self._execute(kr, st)
            except WardenError as e:
                self._audit(AuditAction.CUSTODY_CHANGE, "error", subject=st.op_id, detail=detail, error=str(e))
                raise
            self._audit(AuditAction.CUSTODY_CHANGE, "ok", subject=st.op_id, detail=detail)
            return {"op_id": st.op_id, "kind": st.kind, "approvers": detail["approvers"], "result": result}
        raise CustodyError(f"unknown agent operation {op[:32]!r}")

    def _precheck(self, kr: Keyring, kind: str, params: dict[str, Any]) -> None:
        """Refuse at request time what could not be carried out (so custodians never approve a dud)."""
        if kind in ("destroy", "export"):
            kid, v = params["key_id"], params["version"]
            if kind == "export" and kid in kr._s["signing"]:
                if v != 1:
                    raise QuorumError("export: a signing key has only version 1")
                return
            p = kr.provider(kid)
            if kind == "destroy" and v is not None and v == p.current_version():
                raise QuorumError(
                    "destroy: the current version cannot be destroyed alone; rotate first or shred the key"
                )
            if v is not None and v not in [x["version"] for x in p.versions()]:
                raise QuorumError(f"{kind}: key {kid} has no version {v}")

    def _execute(self, kr: Keyring, st: Any) -> Any:
        p = st.params
        if st.kind == "reshare":
            from .custody import Custodian

            custodians = [Custodian(c["name"], c["recipient"]) for c in p["custodians"]]
            if any(c.recipient == "passphrase" for c in custodians):  # check_params refuses them; never reached
                raise QuorumError("reshare: new shares go only to age X25519 recipients")
            doc = kr.reshare(custodians, int(p["threshold"]))
            self.doc, self.session = doc, UnsealSession(doc)
            self.book.clear()  # approvals of the old custodians carry no weight any more
            return {"split_id": doc.split_id, "threshold": doc.threshold}
        if st.kind == "destroy":
            from .provider import shred

            prov = kr.provider(p["key_id"])
            return shred(prov) if p["version"] is None else prov.destroy(int(p["version"]))
        if st.kind == "export":
            import pyrage

            kid, v = p["key_id"], int(p["version"])
            if kid in kr._s["signing"]:
                material = {"kind": "ed25519-signing-key", "private": kr._s["signing"][kid]["private"]}
            else:
                material = {"kind": "kek", "key": b64e(kr._kek(kid, v))}
            blob = json.dumps({"format": "weightwarden-key-export", "key_id": kid, "version": v, **material}).encode()
            sealed = pyrage.encrypt(blob, [pyrage.x25519.Recipient.from_str(p["recipient"])])
            self._audit(
                AuditAction.KEY_EXPORT,
                "ok",
                key_id=kid,
                key_version=v,
                provider="local",
                subject=st.op_id,
                detail={"recipient": p["recipient"]},
            )
            return {"sealed_key": b64e(sealed), "recipient": p["recipient"]}
        if st.kind == "policy":
            pol = Policy.from_json(p["policy"])
            kr._s["policy"] = pol.to_json()
            kr.save()
            self.policy = pol
            self._audit(AuditAction.POLICY_SET, "ok", subject=st.op_id, detail={"policy_digest": pol.digest})
            return {"policy_digest": pol.digest}
        if st.kind == "audit":
            kr._s["audit_key_use"] = bool(p["key_use"])
            kr.save()
            self.audit_key_use = bool(p["key_use"])
            self._audit(AuditAction.POLICY_SET, "ok", subject=st.op_id, detail={"key_use_audit": self.audit_key_use})
            return {"key_use_audit": self.audit_key_use}
        raise QuorumError(f"unknown custody change {st.kind!r}")


def _peer(caller: Caller) -> str:
    """Who asked, as the kernel says (SO_PEERCRED): uid and, where it has one, the user name."""
    import pwd

    try:
        return f"uid {caller.uid} ({pwd.getpwuid(caller.uid).pw_name})"
    except KeyError:
        return f"uid {caller.uid}"


def _describe(st: Any) -> dict[str, Any]:
    params = dict(st.params)
    if st.kind == "policy":
        params = {"policy_digest": Policy.from_json(params["policy"]).digest}
    return {
        "operation": st.kind,
        "params": params,
        "op_id": st.op_id,
        "digest": st.digest,
        "requested_by": st.requested_by,
        "claimed_by": st.claimed_by,
        "requested_at": st.requested_at.isoformat(),
        "expires_at": st.expires_at.isoformat(),
    }

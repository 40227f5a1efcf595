"""The custody agent's server side: its state (sealed or unsealed, unseal progress, the key-use policy)
and the key operations it serves to authenticated callers.

Who asks is the socket peer (:class:`Caller`, from SO_PEERCRED: keys/agent_process.py). Who may use which
key is the key-use policy (keys/policy.py); custody changes need a quorum (keys/agent_custody.py). Every
operation and every refusal is an audit event in the home's trail.
"""

from __future__ import annotations

import contextvars
import os
import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import audit
from ..audit import AuditAction
from ..audit import event as audit_event
from ..errors import CustodyError, KeyPurposeError, PolicyDeniedError
from .agent_custody import CustodyChanges
from .custody import CustodyDoc, Share, UnsealSession
from .keyring import Keyring
from .policy import Policy
from .provider import KeySlot, b64d, b64e, purpose_message
from .quorum import QuorumBook

__all__ = ["CUSTODY_OPS", "DEFAULT_IDLE_SEAL", "AgentState", "Caller", "current_caller"]

DEFAULT_IDLE_SEAL = 3600.0
#: operations only the agent's own OS user may ask for (custody, not key use)
CUSTODY_OPS = frozenset({"unseal", "seal", "shutdown", "request", "show", "pending", "approve", "execute", "policy"})
_KEY_USE = (AuditAction.KEY_WRAP, AuditAction.KEY_UNWRAP, AuditAction.KEY_SIGN)


@dataclass(frozen=True)
class Caller:
    """Who is asking: the socket peer's OS user and pid, and the workload it proved (if any)."""

    uid: int
    pid: int = 0
    workload: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"uid": self.uid, "pid": self.pid, "workload": self.workload}


_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("warden_agent_caller", default=None)


class CallerSink(audit.AuditSink):
    """Adds the authenticated caller to every event, and drops ok key-use events while key-use
    auditing is off (refusals, lifecycle and custody events are always recorded)."""

    def __init__(self, inner: audit.AuditSink, state: AgentState):
        self.inner, self.state = inner, state

    def emit(self, ev: audit.AuditEvent) -> None:
        if ev.action in _KEY_USE and ev.outcome == "ok" and not self.state.audit_key_use:
            return
        c = _caller.get()
        if c is not None:
            ev = replace(ev, detail={**ev.detail, "caller": c.to_json()})
        self.inner.emit(ev)


def current_caller() -> Caller | None:
    """The caller of the request being served (None outside a request)."""
    return _caller.get()


class AgentState(CustodyChanges):
    """The agent's state and the one entry point for a request (:meth:`handle`)."""

    def __init__(self, home: Path, idle_seal: float = DEFAULT_IDLE_SEAL):
        self.home = home
        self.doc = CustodyDoc.load(home)
        self.session = UnsealSession(self.doc)
        self.keyring: Keyring | None = None
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.idle_seal = idle_seal  # seconds without a key operation before the agent seals itself; 0: never
        self.last_use = time.monotonic()
        self.book = QuorumBook()
        self.policy: Policy = Policy.default(os.getuid())
        self.audit_key_use = True
        self.hardening: dict[str, Any] = {}

    def seal_if_idle(self, now: float | None = None) -> bool:
        """Forget the root key after ``idle_seal`` seconds without use (and drop partial shares)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            if not self.idle_seal or now - self.last_use < self.idle_seal:
                return False
            if self.keyring is None and self.session.progress == 0:
                return False
            if self.keyring is not None:
                self.keyring.close()
                self.keyring = None
            self.session.reset()
            self._audit(AuditAction.CUSTODY_SEAL, "ok", subject=self.doc.split_id, detail={"why": "idle"})
            return True

    def status(self) -> dict[str, Any]:
        from .._harden import dumpable

        return {
            "sealed": self.keyring is None,
            "progress": self.session.progress,
            "threshold": self.doc.threshold,
            "split_id": self.doc.split_id,
            "custodians": [c["name"] for c in self.doc.custodians],
            "idle_seal_seconds": self.idle_seal,
            "pending_changes": [st.op_id for st in self.book.pending()],
            # prctl(PR_GET_DUMPABLE) now (0: no core dump, no ptrace or /proc/<pid>/mem by the same user)
            "process": {"pid": os.getpid(), "dumpable": dumpable(), **self.hardening},
        }

    def _kr(self) -> Keyring:
        if self.keyring is None:
            raise CustodyError(
                f"the vault is sealed: {self.session.progress} of {self.doc.threshold} custodian shares so far"
            )
        return self.keyring

    def handle(
        self, req: dict[str, Any], caller: Caller | None = None, *, now: datetime | None = None
    ) -> dict[str, Any]:
        """One request from ``caller`` (default: the agent's own user, as for in-process use)."""
        caller = caller or Caller(os.getuid(), os.getpid())
        token = _caller.set(caller)
        try:
            return self._handle(req, caller, now or datetime.now(UTC))
        finally:
            _caller.reset(token)

    def _deny(self, what: str, message: str, **detail: Any) -> PolicyDeniedError:
        self._audit(AuditAction.POLICY_DENY, "denied", detail={"op": what, **detail}, error=message)
        return PolicyDeniedError(message)

    def _admit(self, req: dict[str, Any], caller: Caller) -> Caller:
        """Authenticate the caller's workload and check that the policy lets them in at all."""
        op = str(req.get("op"))[:32]
        own = caller.uid == os.getuid()
        if op in CUSTODY_OPS or self.keyring is None:
            if not own:
                raise self._deny(op, "the agent serves custody operations (and a sealed vault) only to its own user")
            return caller
        try:
            wl = self.policy.workload(req.get("workload"), req.get("workload_token"))
        except PolicyDeniedError as e:
            raise self._deny(op, str(e), workload=str(req.get("workload"))[:64]) from None
        caller = replace(caller, workload=wl)
        _caller.set(caller)
        if not self.policy.admits(caller.uid, wl):
            raise self._deny(
                op, f"the key-use policy admits no rule for uid {caller.uid}" + (f" workload {wl}" if wl else "")
            )
        return caller

    def _allow(self, caller: Caller, op: str, key_id: str | None) -> None:
        kid = key_id or ""
        if not self.policy.allows(caller.uid, caller.workload, op, kid):
            raise self._deny(
                op,
                f"the key-use policy does not let uid {caller.uid}"
                + (f" (workload {caller.workload})" if caller.workload else "")
                + f" {op} with key {kid[:64]!r}",
                key_id=kid[:80],
            )

    def _handle(self, req: dict[str, Any], caller: Caller, now: datetime) -> dict[str, Any]:
        op = req.get("op")
        with self.lock:
            if op == "status":  # another OS user learns only sealed or not (no custodians, no pending changes)
                return self.status() if caller.uid == os.getuid() else {"sealed": self.keyring is None}
            caller = self._admit(req, caller)
            self.last_use = time.monotonic()
            if op == "unseal":
                share = Share.from_bytes(b64d(req.get("share"), "share"))
                if self.keyring is not None:
                    raise CustodyError("the vault is already unsealed")
                ev = {"subject": self.doc.split_id, "detail": {"custodian": share.custodian}}
                try:
                    root = self.session.submit(share)
                except CustodyError as e:
                    self._audit(AuditAction.CUSTODY_SHARE, "denied", **ev, error=str(e))
                    raise
                self._audit(AuditAction.CUSTODY_SHARE, "ok", **ev)
                if root is not None:
                    try:
                        kr = Keyring.unlock_with_root(self.home, root)
                    finally:
                        self.session.reset()
                    self._open(kr)
                    self._audit(AuditAction.CUSTODY_UNSEAL, "ok", subject=self.doc.split_id)
                return self.status()
            if op == "seal":
                if self.keyring is not None:
                    self.keyring.close()
                    self.keyring = None
                self.session.reset()
                self._audit(AuditAction.CUSTODY_SEAL, "ok", subject=self.doc.split_id)
                return self.status()
            if op == "shutdown":
                self.stop.set()
                return {"stopping": True}
            if op in ("request", "show", "pending", "approve", "execute"):
                return self._quorum(op, req, now, caller)
            kr = self._kr()
            if op == "policy":
                return {
                    "policy": self.policy.to_json(),
                    "digest": self.policy.digest,
                    "key_use_audit": self.audit_key_use,
                }
            if op == "provider":  # names a KEK of one purpose (making a missing one is a 'manage' use); each
                # wrap and unwrap with it is checked against the policy on its own
                if req.get("create") is True:
                    self._allow(caller, "manage", req.get("key_id"))
                p = kr.provider(req.get("key_id"), purpose=req.get("purpose"), create=req.get("create") is True)
                return {"key_id": p.key_id, "purpose": p.purpose}
            if op == "wrap":
                p = kr.provider(req.get("key_id"), purpose=req.get("purpose"))
                self._allow(caller, "wrap", p.key_id)
                slot = p.wrap(b64d(req["dek"], "dek"), b64d(req["context"], "context"))
                return {"slot": slot.to_json()}
            if op == "unwrap":  # with a purpose, a KEK of another purpose is refused
                slot = KeySlot.from_json(req["slot"])
                self._allow(caller, "unwrap", slot.key_id)
                p = kr.provider(slot.key_id, purpose=req.get("purpose"))
                dek = p.unwrap(slot, b64d(req["context"], "context"))
                try:
                    return {"dek": b64e(bytes(dek))}
                finally:
                    for i in range(len(dek)):
                        dek[i] = 0
            if op == "sign":  # the message comes labelled; the agent signs only its key's own purpose
                s = kr.signer(req.get("key_id"), purpose=req.get("purpose"))
                self._allow(caller, "sign", s.key_id)
                msg = b64d(req["message"], "message")
                if not msg.startswith(purpose_message(s.purpose, b"")):
                    self._audit(
                        AuditAction.KEY_SIGN,
                        "denied",
                        key_id=s.key_id,
                        provider="local",
                        detail={"purpose": s.purpose},
                        error="message not labelled with the key's purpose",
                    )
                    raise KeyPurposeError(f"key {s.key_id} signs {s.purpose!r} messages only")
                sig = s._sign(msg)
                s.audit.emit(audit_event(AuditAction.KEY_SIGN, "ok", key_id=s.key_id, provider="local",
                                         detail={"purpose": s.purpose}))  # fmt: skip
                return {"signature": b64e(sig)}
            if op == "signer":  # public key only
                if req.get("create") is True:
                    self._allow(caller, "manage", req.get("key_id"))
                s = kr.signer(req.get("key_id"), purpose=req.get("purpose"), create=req.get("create") is True)
                return {"key_id": s.key_id, "public_key": b64e(s.public_key), "purpose": s.purpose}
            if op == "list_keys":
                return {"keys": kr.list_keys(), "default_kek": kr._s.get("default_kek")}
            if op == "new_kek":
                self._allow(caller, "manage", req.get("name") or "*")
                kid = kr.new_kek(req.get("name"), purpose=str(req.get("purpose") or "sealing"))
                kr.save()
                return {"key_id": kid}
            if op == "key":  # lifecycle: current_version, rotate, disable, enable, versions (destroy: quorum)
                p = kr.provider(req.get("key_id"))
                action = req.get("action")
                if action == "current_version":
                    return {"result": p.current_version()}
                if action == "versions":
                    return {"result": p.versions()}
                if action == "destroy":
                    v = req.get("version")
                    raise self._refuse("destroy", {"key_id": p.key_id, "version": v})
                self._allow(caller, "manage", p.key_id)
                if action == "rotate":
                    return {"result": p.rotate()}
                if action in ("disable", "enable"):
                    getattr(p, action)(int(req["version"]))
                    return {"result": None}
                raise CustodyError(f"unknown key action {str(action)[:32]!r}")
            if op == "reshare":
                raise self._refuse("reshare", {"threshold": req.get("threshold")})
        raise CustodyError(f"unknown agent operation {str(op)[:32]!r}")

    def _audit(self, action: AuditAction, outcome: str, **kw: Any) -> None:
        err = kw.pop("error", None)
        if err:
            kw.setdefault("detail", {})["error"] = err
        c = _caller.get()
        if c is not None:
            kw["detail"] = {**kw.get("detail", {}), "caller": c.to_json()}
        from .. import trail

        trail.for_home(self.home).emit(audit_event(action, outcome, **kw))

    def _open(self, kr: Keyring) -> None:
        """Serve ``kr``: its key-use policy and auditing switch come from inside it (authenticated)."""
        stored = kr._s.get("policy")
        self.policy = Policy.default(os.getuid()) if stored is None else Policy.from_json(stored)
        self.audit_key_use = bool(kr._s.get("audit_key_use", True))
        kr.audit = CallerSink(kr.audit, self)
        self.keyring = kr

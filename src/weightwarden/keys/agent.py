"""The custody agent: holds a keyring under M-of-N custody, unsealed, in memory only.

Like Vault's unseal: the agent starts *sealed*; custodians submit their shares one at a
time (``warden custody unseal``), each from their own terminal; once M distinct shares
are in, the agent rebuilds the root key, unlocks the keyring and serves wrap, unwrap and
sign to local ``warden`` commands.  Shares and keys never touch the disk.

Transport: a Unix socket ``$WARDEN_HOME/agent.sock`` (mode 0600, in a 0700 directory);
the agent reads each peer's OS user (SO_PEERCRED).  One JSON object per line each way.

Who may use which key is the key-use policy (keys/policy.py): per OS user and workload,
per key and operation; while sealed, and for every custody operation, only the agent's own
user.  Custody changes (re-share, destroy, export, policy, auditing) need a fresh quorum of
custodians' approvals of that exact change (keys/quorum.py): an unsealed agent alone
refuses them.  Every operation and every refusal is an audit event in the home's trail
(weightwarden.trail).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import json
import os
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .. import audit, errors
from .._harden import minimal_env
from ..audit import AuditAction
from ..audit import event as audit_event
from ..errors import (
    CustodyError,
    KeyPurposeError,
    PolicyDeniedError,
    ProviderUnavailableError,
    QuorumError,
    WardenError,
)
from .custody import CUSTODY_FILE, CustodyDoc, Share, UnsealSession
from .local import Keyring, TrustStore
from .policy import Policy
from .provider import KeyProvider, KeySlot, Signer, b64d, b64e, purpose_message
from .quorum import Approval, QuorumBook, check_params, make_statement

SOCKET = "agent.sock"
MAX_LINE = 1 << 20


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


class _CallerSink(audit.AuditSink):
    """Adds the authenticated caller to every event, and drops ok key-use events while key-use
    auditing is off (refusals, lifecycle and custody events are always recorded)."""

    def __init__(self, inner: audit.AuditSink, state: _State):
        self.inner, self.state = inner, state

    def emit(self, ev: audit.AuditEvent) -> None:
        if ev.action in _KEY_USE and ev.outcome == "ok" and not self.state.audit_key_use:
            return
        c = _caller.get()
        if c is not None:
            ev = replace(ev, detail={**ev.detail, "caller": c.to_json()})
        self.inner.emit(ev)


class _State:
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
                    self._audit(AuditAction.KEY_SIGN, "denied", key_id=s.key_id, provider="local",
                                detail={"purpose": s.purpose}, error="message not labelled with the key's purpose")
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
                kid = kr.new_kek(req.get("name"))
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

    # -- custody changes: a fresh quorum of that exact change ---------------------------------
    def _open(self, kr: Keyring) -> None:
        """Serve ``kr``: its key-use policy and auditing switch come from inside it (authenticated)."""
        stored = kr._s.get("policy")
        self.policy = Policy.default(os.getuid()) if stored is None else Policy.from_json(stored)
        self.audit_key_use = bool(kr._s.get("audit_key_use", True))
        kr.audit = _CallerSink(kr.audit, self)
        self.keyring = kr

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
            from ..sealed.rewrap import shred

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


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        line = self.rfile.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            self._reply({"error": "FormatError", "message": "request too large"})
            return
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError
        except ValueError:
            self._reply({"error": "FormatError", "message": "request is not a JSON object"})
            return
        try:
            with audit.context(actor=str(req.get("actor") or f"uid{uid}"), reason=str(req.get("reason") or "")):
                self._reply(self.server.state.handle(req, Caller(uid, pid)))
        except WardenError as e:
            self._reply({"error": type(e).__name__, "message": str(e)})
        except (KeyError, TypeError, ValueError) as e:
            self._reply({"error": "FormatError", "message": f"malformed request ({type(e).__name__})"})
        if self.server.state.stop.is_set():
            threading.Thread(target=self.server.shutdown, daemon=True).start()

    def _reply(self, obj: dict[str, Any]) -> None:
        self.wfile.write(json.dumps(obj).encode() + b"\n")


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    state: _State


def serve(home: Path, idle_seal: float = DEFAULT_IDLE_SEAL) -> None:
    """Run the agent in the foreground until `shutdown` or SIGTERM.  First it makes itself
    non-dumpable, with no core file and its memory locked where the OS allows (notices to stderr)."""
    from .._harden import harden_process

    hard = harden_process(lock_memory=True)
    for n in hard["notices"]:
        sys.stderr.write(f"notice: {n}\n")
    sys.stderr.flush()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home, 0o700)
    path = home / SOCKET
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old = os.umask(0o177)
    try:
        server = _Server(str(path), _Handler)
    finally:
        os.umask(old)
    server.state = _State(home, idle_seal)
    server.state.hardening = {"core_limit": hard["core_limit"], "memory_locked": hard["memory_locked"],
                              "notices": hard["notices"]}  # fmt: skip

    def watch_idle() -> None:
        while not server.state.stop.wait(min(1.0, idle_seal / 4 if idle_seal else 1.0)):
            server.state.seal_if_idle()

    threading.Thread(target=watch_idle, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        server.state.stop.set()
        if server.state.keyring is not None:
            server.state.keyring.close()


# -- client side -------------------------------------------------------------------------
class AgentClient:
    def __init__(self, home: Path):
        self.home = home
        self.path = home / SOCKET

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        req = {"op": op, **kw}
        actor, reason = audit._actor.get(), audit._reason.get()
        if actor:
            req["actor"] = actor
        if reason:
            req["reason"] = reason
        for field_, env in (("workload", "WARDEN_WORKLOAD"), ("workload_token", "WARDEN_WORKLOAD_TOKEN")):
            if os.environ.get(env) and field_ not in req:  # the workload this process runs as (key-use policy)
                req[field_] = os.environ[env]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(60)
                s.connect(str(self.path))
                s.sendall(json.dumps(req).encode() + b"\n")
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
        except (FileNotFoundError, ConnectionRefusedError):
            raise ProviderUnavailableError("the custody agent is not running: `warden agent start`") from None
        except OSError as e:
            raise ProviderUnavailableError(f"cannot reach the custody agent: {e.strerror or e}") from None
        try:
            resp = json.loads(buf)
        except ValueError:
            raise ProviderUnavailableError("the custody agent sent a malformed answer") from None
        if "error" in resp:
            cls = getattr(errors, str(resp["error"]), None)
            if not (isinstance(cls, type) and issubclass(cls, WardenError)):
                cls = WardenError
            raise cls(resp.get("message", "agent error"))
        return resp

    def running(self) -> bool:
        try:
            self.call("status")
        except ProviderUnavailableError:
            return False
        return True


class AgentProvider(KeyProvider):
    """The keyring's KEKs, used through the agent.  Slots are the keyring's ("local")."""

    name = "local"

    def __init__(self, client: AgentClient, key_id: str, purpose: str = "sealing"):
        self._c = client
        self.key_id = key_id
        self.purpose = purpose

    def _wrap(self, dek: bytes, context: bytes) -> KeySlot:
        r = self._c.call("wrap", key_id=self.key_id, purpose=self.purpose, dek=b64e(dek), context=b64e(context))
        return KeySlot.from_json(r["slot"])

    def _unwrap(self, slot: KeySlot, context: bytes) -> bytearray:
        r = self._c.call("unwrap", slot=slot.to_json(), purpose=self.purpose, context=b64e(context))
        return bytearray(b64d(r["dek"], "dek"))

    def _key(self, action: str, key_id: str, **kw: Any) -> Any:
        return self._c.call("key", action=action, key_id=key_id, **kw)["result"]

    def _current_version(self, key_id: str) -> int:
        return int(self._key("current_version", key_id))

    def _rotate(self, key_id: str) -> int:
        return int(self._key("rotate", key_id))

    def _set_state(self, key_id: str, version: int, state: str) -> None:
        self._key("enable" if state == "enabled" else "disable", key_id, version=version)

    def _destroy(self, key_id: str, version: int | None) -> list[int]:
        return list(self._key("destroy", key_id, version=version))

    def _versions(self, key_id: str) -> list[dict[str, Any]]:
        return list(self._key("versions", key_id))


class AgentSigner(Signer):
    """A signing key the agent holds, of the purpose the agent reports (it checks every message's label)."""

    def __init__(self, client: AgentClient, key_id: str | None = None, *, purpose: str | None = None,
                 create: bool = False):  # fmt: skip
        self._c = client
        r = client.call("signer", key_id=key_id, purpose=purpose, create=create)
        self._pub = b64d(r["public_key"], "public key")
        self.purpose = str(r.get("purpose", "sealing"))

    @property
    def public_key(self) -> bytes:
        return self._pub

    def _sign(self, message: bytes) -> bytes:
        r = self._c.call("sign", key_id=self.key_id, purpose=self.purpose, message=b64e(message))
        return b64d(r["signature"], "signature")


class AgentKeyring:
    """The parts of :class:`Keyring` that commands use, served by an unsealed agent."""

    under_custody = True

    def __init__(self, home: Path):
        self.home = home
        self.client = AgentClient(home)
        self.trust = TrustStore.load(home)
        self.audit = audit.NullSink()  # the agent records every use itself

    def provider(self, key_id: str | None = None, *, purpose: str | None = None, create: bool = False) -> AgentProvider:
        r = self.client.call("provider", key_id=key_id, purpose=purpose, create=create)
        return AgentProvider(self.client, str(r["key_id"]), str(r["purpose"]))

    def signer(self, key_id: str | None = None, *, purpose: str | None = None, create: bool = False) -> AgentSigner:
        return AgentSigner(self.client, key_id, purpose=purpose, create=create)

    def public_key(self, key_id: str | None = None, *, purpose: str | None = None) -> bytes:
        return self.signer(key_id, purpose=purpose).public_key

    def list_keys(self) -> list[dict[str, Any]]:
        return list(self.client.call("list_keys")["keys"])

    def new_kek(self, name: str | None = None) -> str:
        return str(self.client.call("new_kek", name=name)["key_id"])

    def save(self) -> None:
        return None


def fetch_statement(home: Path, op_id: str) -> Any:
    """A pending custody change's statement, rebuilt and re-hashed here (the agent's digest is not trusted)."""
    from .quorum import Statement

    r = AgentClient(home).call("show", op_id=op_id)
    st = Statement.from_json(r["statement"])
    if st.op_id != op_id:
        raise QuorumError("the agent answered with another operation's statement")
    if st.split_id != CustodyDoc.load(home).split_id:
        raise QuorumError("the change was requested under another custody record than this home's custody.json")
    return st


def approve(home: Path, stmt: Any, share: Share, *, now: datetime) -> dict[str, Any]:
    """Sign ``stmt`` with the approval key of ``share`` (here, on the custodian's side) and hand the approval in."""
    from .quorum import sign_approval

    appr = sign_approval(stmt, share, now=now)
    return AgentClient(home).call("approve", op_id=stmt.op_id, approval=appr.to_json())


def under_custody(home: Path) -> bool:
    if not (home / CUSTODY_FILE).exists():
        return False
    try:
        return json.loads((home / "keyring.json").read_text()).get("protector") == "custody"
    except (OSError, ValueError):
        return False


def start(home: Path, *, idle_seal: float = DEFAULT_IDLE_SEAL, timeout: float = 15.0) -> int:
    """Start the agent in the background (a new session) with a minimal environment (no passphrase,
    no token: only paths, locale and user); returns its pid."""
    from ..trail import trail_env

    client = AgentClient(home)
    if client.running():
        raise CustodyError("the agent is already running")
    CustodyDoc.load(home)  # fail early, in the caller, if there is no custody record
    log = open(home / "agent.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "weightwarden.keys.agent", "--home", str(home), "--idle-seal", str(idle_seal)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
        env=minimal_env() | trail_env(),  # where its events go: the home's trail (no secret: a file's path)
        close_fds=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.running():
            (home / "agent.pid").write_text(str(proc.pid))
            return proc.pid
        if proc.poll() is not None:
            raise ProviderUnavailableError(f"the agent exited at start; see {home / 'agent.log'}")
        time.sleep(0.05)
    proc.kill()
    raise ProviderUnavailableError("the agent did not start in time")


def stop(home: Path) -> None:
    AgentClient(home).call("shutdown")
    for _ in range(100):
        if not (home / SOCKET).exists():
            break
        time.sleep(0.05)
    with contextlib.suppress(FileNotFoundError):
        (home / "agent.pid").unlink()


def main() -> None:  # pragma: no cover - run as a process by `start`
    ap = argparse.ArgumentParser(prog="weightwarden.keys.agent")
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--idle-seal", type=float, default=DEFAULT_IDLE_SEAL)
    a = ap.parse_args()
    serve(a.home, a.idle_seal)


if __name__ == "__main__":  # pragma: no cover
    main()

"""The custody agent: holds a keyring under M-of-N custody, unsealed, in memory only.

Like Vault's unseal: the agent starts *sealed*; custodians submit their shares one at a
time (``warden custody unseal``), each from their own terminal; once M distinct shares
are in, the agent rebuilds the root key, unlocks the keyring and serves wrap, unwrap and
sign to local ``warden`` commands.  Shares and keys never touch the disk.

Transport: a Unix socket ``$WARDEN_HOME/agent.sock`` (mode 0600, in a 0700 directory);
the agent also checks that each peer runs as its own user (SO_PEERCRED).  One JSON
object per line each way.  Every operation is an audit event in the home's trail (weightwarden.trail).
"""

from __future__ import annotations

import argparse
import contextlib
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
from pathlib import Path
from typing import Any

from .. import audit, errors
from ..audit import AuditAction
from ..audit import event as audit_event
from ..errors import CustodyError, ProviderUnavailableError, WardenError
from .custody import CUSTODY_FILE, CustodyDoc, Share, UnsealSession
from .local import Keyring, TrustStore
from .provider import KeyProvider, KeySlot, Signer, b64d, b64e

SOCKET = "agent.sock"
MAX_LINE = 1 << 20


DEFAULT_IDLE_SEAL = 3600.0


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
        return {
            "sealed": self.keyring is None,
            "progress": self.session.progress,
            "threshold": self.doc.threshold,
            "split_id": self.doc.split_id,
            "custodians": [c["name"] for c in self.doc.custodians],
            "idle_seal_seconds": self.idle_seal,
        }

    def _kr(self) -> Keyring:
        if self.keyring is None:
            raise CustodyError(
                f"the vault is sealed: {self.session.progress} of {self.doc.threshold} custodian shares so far"
            )
        return self.keyring

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        with self.lock:
            if op == "status":
                return self.status()
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
                        self.keyring = Keyring.unlock_with_root(self.home, root)
                    finally:
                        self.session.reset()
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
            kr = self._kr()
            if op == "wrap":
                slot = kr.provider(req.get("key_id")).wrap(b64d(req["dek"], "dek"), b64d(req["context"], "context"))
                return {"slot": slot.to_json()}
            if op == "unwrap":
                slot = KeySlot.from_json(req["slot"])
                dek = kr.provider(slot.key_id).unwrap(slot, b64d(req["context"], "context"))
                try:
                    return {"dek": b64e(bytes(dek))}
                finally:
                    for i in range(len(dek)):
                        dek[i] = 0
            if op == "sign":
                s = kr.signer(req.get("key_id"))
                return {"signature": b64e(s.sign(b64d(req["message"], "message")))}
            if op == "signer":
                s = kr.signer(req.get("key_id"))
                return {"key_id": s.key_id, "public_key": b64e(s.public_key)}
            if op == "list_keys":
                return {"keys": kr.list_keys(), "default_kek": kr._s.get("default_kek")}
            if op == "new_kek":
                kid = kr.new_kek(req.get("name"))
                kr.save()
                return {"key_id": kid}
            if op == "key":  # lifecycle: current_version, rotate, disable, enable, destroy, versions
                p = kr.provider(req.get("key_id"))
                action = req.get("action")
                if action == "current_version":
                    return {"result": p.current_version()}
                if action == "rotate":
                    return {"result": p.rotate()}
                if action in ("disable", "enable"):
                    getattr(p, action)(int(req["version"]))
                    return {"result": None}
                if action == "destroy":
                    v = req.get("version")
                    return {"result": p.destroy(None if v is None else int(v))}
                if action == "versions":
                    return {"result": p.versions()}
                raise CustodyError(f"unknown key action {str(action)[:32]!r}")
            if op == "reshare":
                from .custody import Custodian

                custodians = [Custodian(c["name"], c["recipient"]) for c in req["custodians"]]
                doc = kr.reshare(custodians, int(req["threshold"]), req.get("passphrases") or {})
                self.doc, self.session = doc, UnsealSession(doc)
                return self.status()
        raise CustodyError(f"unknown agent operation {str(op)[:32]!r}")

    def _audit(self, action: AuditAction, outcome: str, **kw: Any) -> None:
        err = kw.pop("error", None)
        if err:
            kw.setdefault("detail", {})["error"] = err
        from .. import trail

        trail.for_home(self.home).emit(audit_event(action, outcome, **kw))


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid():
            self._reply({"error": "CustodyError", "message": "the agent serves only its own user"})
            return
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
                self._reply(self.server.state.handle(req))
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
    """Run the agent in the foreground until `shutdown` or SIGTERM."""
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

    def __init__(self, client: AgentClient, key_id: str):
        self._c = client
        self.key_id = key_id

    def _wrap(self, dek: bytes, context: bytes) -> KeySlot:
        r = self._c.call("wrap", key_id=self.key_id, dek=b64e(dek), context=b64e(context))
        return KeySlot.from_json(r["slot"])

    def _unwrap(self, slot: KeySlot, context: bytes) -> bytearray:
        r = self._c.call("unwrap", slot=slot.to_json(), context=b64e(context))
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
    def __init__(self, client: AgentClient, key_id: str | None = None):
        self._c = client
        r = client.call("signer", key_id=key_id)
        self._pub = b64d(r["public_key"], "public key")

    @property
    def public_key(self) -> bytes:
        return self._pub

    def _sign(self, message: bytes) -> bytes:
        return b64d(self._c.call("sign", key_id=self.key_id, message=b64e(message))["signature"], "signature")


class AgentKeyring:
    """The parts of :class:`Keyring` that commands use, served by an unsealed agent."""

    under_custody = True

    def __init__(self, home: Path):
        self.home = home
        self.client = AgentClient(home)
        self.trust = TrustStore.load(home)
        self.audit = audit.NullSink()  # the agent records every use itself

    def provider(self, key_id: str | None = None) -> AgentProvider:
        kid = key_id or self.client.call("list_keys")["default_kek"]
        return AgentProvider(self.client, kid)

    def signer(self, key_id: str | None = None) -> AgentSigner:
        return AgentSigner(self.client, key_id)

    def public_key(self, key_id: str | None = None) -> bytes:
        return self.signer(key_id).public_key

    def list_keys(self) -> list[dict[str, Any]]:
        return list(self.client.call("list_keys")["keys"])

    def new_kek(self, name: str | None = None) -> str:
        return str(self.client.call("new_kek", name=name)["key_id"])

    def save(self) -> None:
        return None


def under_custody(home: Path) -> bool:
    if not (home / CUSTODY_FILE).exists():
        return False
    try:
        return json.loads((home / "keyring.json").read_text()).get("protector") == "custody"
    except (OSError, ValueError):
        return False


def start(home: Path, *, idle_seal: float = DEFAULT_IDLE_SEAL, timeout: float = 15.0) -> int:
    """Start the agent in the background (a new session); returns its pid."""
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

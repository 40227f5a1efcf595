"""The custody agent's client side: :class:`AgentClient` (one JSON request per connection over the home's
Unix socket) and the keyring, provider and signer that use an unsealed agent instead of a passphrase."""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import audit, errors
from ..errors import KeyProviderError, ProviderUnavailableError, QuorumError, WardenError
from ..home import Home
from .custody import CustodyDoc, Share
from .provider import KeyProvider, KeySlot, Signer, b64d, b64e
from .truststore import TrustStore

__all__ = [
    "AgentClient",
    "AgentKeyring",
    "AgentProvider",
    "AgentSigner",
    "approve",
    "fetch_statement",
    "signer_from_uri",
    "under_custody",
]


class AgentClient:
    def __init__(self, home: Path):
        self.home = home
        self.path = Home(home).agent_socket

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        req = {"op": op, **kw}
        actor, reason = audit.current_context()
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
    """The parts of :class:`Keyring` that commands use, served by an unsealed agent: a
    :class:`~.protocols.KeyringLike`."""

    under_custody = True

    def __init__(self, home: Path):
        self.home = home
        self.client = AgentClient(home)
        self.trust = TrustStore.load(home)
        self.audit: audit.AuditSink = audit.NullSink()  # the agent records every use itself

    def provider(self, key_id: str | None = None, *, purpose: str | None = None, create: bool = False) -> AgentProvider:
        r = self.client.call("provider", key_id=key_id, purpose=purpose, create=create)
        return AgentProvider(self.client, str(r["key_id"]), str(r["purpose"]))

    def signer(self, key_id: str | None = None, *, purpose: str | None = None, create: bool = False) -> AgentSigner:
        return AgentSigner(self.client, key_id, purpose=purpose, create=create)

    def public_key(self, key_id: str | None = None, *, purpose: str | None = None) -> bytes:
        return self.signer(key_id, purpose=purpose).public_key

    def list_keys(self) -> list[dict[str, Any]]:
        return list(self.client.call("list_keys")["keys"])

    def new_kek(self, name: str | None = None, *, purpose: str = "sealing") -> str:
        return str(self.client.call("new_kek", name=name, purpose=purpose)["key_id"])

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
    h = Home(home)
    if not h.custody.exists():
        return False
    try:
        return json.loads(h.keyring.read_text()).get("protector") == "custody"
    except (OSError, ValueError):
        return False


def signer_from_uri(uri: str, *, create: bool = False, purpose: str | None = None) -> AgentSigner:
    """``agent:HOME``: a signing key of ``purpose`` held by the custody agent of HOME (made there when
    ``create`` and the purpose has none)."""
    where = uri[len("agent:") :] if uri.startswith("agent:") else ""
    if not where:
        raise KeyProviderError("an agent URI is agent:HOME (the home of the agent that holds the key)")
    return AgentSigner(AgentClient(Path(where)), purpose=purpose, create=create)

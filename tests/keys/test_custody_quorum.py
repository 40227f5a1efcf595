"""Issue 16 C: custody changes need a fresh quorum of custodians for that exact change; who may use
which key is the agent's policy.  Each test attacks: it tries the bypass and asserts the refusal
(typed error, nothing changed, the refusal audited)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyrage
import pytest
from safetensors.numpy import save_file

import weightwarden as ww
from tests.support.cli import PASSPHRASE, TEST_KDF, warden
from weightwarden import trail
from weightwarden.errors import CustodyError, KeyDestroyedError, PolicyDeniedError, QuorumError
from weightwarden.keys.agent_client import AgentClient, AgentKeyring
from weightwarden.keys.agent_server import AgentState as _State
from weightwarden.keys.agent_server import Caller
from weightwarden.keys.custody import Custodian, CustodyDoc, UnsealSession, combine
from weightwarden.keys.policy import Policy, token_digest
from weightwarden.keys.provider import b64d, b64e
from weightwarden.keys.quorum import Approval, Statement, sign_approval
from weightwarden.sealed.reader import SealedFile

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)


def _ids(n: int) -> list[pyrage.x25519.Identity]:
    return [pyrage.x25519.Identity.generate() for _ in range(n)]


def _custodians(ids, prefix: str = "c") -> list[Custodian]:
    return [Custodian(f"{prefix}{i}", str(x.to_public())) for i, x in enumerate(ids)]


class Vault:
    """A keyring under 2-of-3 custody, a model sealed under KEK model-x, and an unsealed agent state."""

    def __init__(self, home: Path, work: Path):
        self.home = home
        kr = ww.Keyring.create(home, PASSPHRASE, kdf=TEST_KDF)
        kr.new_kek("model-x")
        kr.save()
        src = work / "m.safetensors"
        save_file({"w": np.arange(16, dtype=np.float32).reshape(4, 4)}, str(src))
        self.sealed = work / "m.wws"
        ww.seal(src, self.sealed, keyring=kr, key="model-x")
        self.ids = _ids(3)
        self.doc = kr.to_custody(_custodians(self.ids), 2)
        self.shares = [self.doc.open_share(f"c{i}", identity=str(self.ids[i])) for i in range(3)]
        self.state = _State(home, idle_seal=0)
        for s in self.shares[:2]:
            self.state.handle({"op": "unseal", "share": b64e(s.to_bytes())})
        assert self.state.status()["sealed"] is False

    def files(self) -> dict[str, bytes]:
        return {n: (self.home / n).read_bytes() for n in ("custody.json", "keyring.json")}

    def events(self) -> list[dict]:
        return trail.events(self.home)

    def request(self, kind: str, params: dict, *, now=T0, ttl: float = 3600) -> dict:
        return self.state.handle({"op": "request", "kind": kind, "params": params, "ttl_seconds": ttl}, now=now)

    def statement(self, op_id: str) -> Statement:
        return Statement.from_json(self.state.handle({"op": "show", "op_id": op_id})["statement"])

    def approve(self, appr: Approval, *, now, op_id: str | None = None) -> dict:
        req = {"op": "approve", "op_id": op_id or appr.op_id, "approval": appr.to_json()}
        return self.state.handle(req, now=now)

    def sign(self, op_id: str, i: int, *, at) -> Approval:
        return sign_approval(self.statement(op_id), self.shares[i], now=at)

    def execute(self, op_id: str, *, now) -> dict:
        return self.state.handle({"op": "execute", "op_id": op_id}, now=now)

    def load_with(self, shares) -> float:
        kr = ww.Keyring.unlock_with_root(self.home, combine(CustodyDoc.load(self.home), shares))
        return float(ww.load(self.sealed, keyring=kr)["w"].sum())


@pytest.fixture
def vault(tmp_path) -> Vault:
    return Vault(tmp_path / "home", tmp_path)


def _denied(events: list[dict], action: str) -> list[dict]:
    return [e for e in events if e["action"] == action and e["outcome"] == "denied"]


def test_unsealed_agent_alone_cannot_change_custody(vault):
    """An unsealed agent (all any process of its OS user can reach) refuses every custody change."""
    before = vault.files()
    mallory = pyrage.x25519.Identity.generate()
    with pytest.raises(QuorumError, match="custody change"):  # the old takeover: a 1-of-1 split it controls
        vault.state.handle({"op": "reshare", "custodians": [{"name": "m", "recipient": str(mallory.to_public())}],
                            "threshold": 1})  # fmt: skip
    with pytest.raises(QuorumError, match="custody change"):  # threshold change
        vault.state.handle(
            {"op": "reshare", "custodians": [c.__dict__ for c in _custodians(vault.ids)], "threshold": 3}
        )
    for v in (None, 1):  # shred, key destroy
        with pytest.raises(QuorumError, match="custody change"):
            vault.state.handle({"op": "key", "action": "destroy", "key_id": "model-x", "version": v})
    # requested but never approved: export, policy, auditing off, reshare: nothing executes
    ops = [
        vault.request("export", {"key_id": "model-x", "version": 1, "recipient": str(mallory.to_public())}),
        vault.request("policy", {"policy": Policy.default(12345).to_json()}),
        vault.request("audit", {"key_use": False}),
        vault.request(
            "reshare", {"threshold": 1, "custodians": [{"name": "m", "recipient": str(mallory.to_public())}]}
        ),
    ]
    for r in ops:
        with pytest.raises(QuorumError, match="0 of 2"):
            vault.execute(r["op_id"], now=T0 + MIN)
    assert vault.files() == before
    ev = vault.events()
    assert len([e for e in _denied(ev, "custody:change") if e["detail"].get("why") == "no quorum"]) == 4
    assert len(_denied(ev, "custody:change")) == 8
    # the custodians' shares still work: a fresh agent unseals with them, the model opens
    fresh = _State(vault.home, idle_seal=0)
    for s in vault.shares[1:]:
        fresh.handle({"op": "unseal", "share": b64e(s.to_bytes())})
    assert fresh.status()["sealed"] is False
    assert vault.load_with(vault.shares[::2]) == 120.0


def test_quorum_reshare_names_every_approver(vault):
    new_ids = _ids(3)
    params = {
        "threshold": 2,
        "custodians": [{"name": c.name, "recipient": c.recipient} for c in _custodians(new_ids, "n")],
    }
    r = vault.request("reshare", params)
    assert vault.statement(r["op_id"]).digest == r["digest"]
    other = vault.request("audit", {"key_use": False})  # pending under the old record: voided by the reshare
    vault.approve(vault.sign(r["op_id"], 0, at=T0 + MIN), now=T0 + MIN)
    assert vault.approve(vault.sign(r["op_id"], 2, at=T0 + 2 * MIN), now=T0 + 2 * MIN)["approvals"] == 2
    done = vault.execute(r["op_id"], now=T0 + 3 * MIN)
    assert done["approvers"] == ["c0", "c2"]
    doc = CustodyDoc.load(vault.home)
    assert doc.split_id == done["result"]["split_id"] != vault.doc.split_id and doc.threshold == 2
    with pytest.raises(CustodyError, match="another split"):
        UnsealSession(doc).submit(vault.shares[0])  # the old custodians' shares open nothing now
    new_shares = [doc.open_share(f"n{i}", identity=str(new_ids[i])) for i in (1, 2)]
    assert vault.load_with(new_shares) == 120.0  # same root key: every sealed file still opens
    with pytest.raises(QuorumError, match="voided"):
        vault.execute(other["op_id"], now=T0 + 4 * MIN)
    change = [e for e in vault.events() if e["action"] == "custody:change" and e["outcome"] == "ok"]
    assert len(change) == 1 and change[0]["detail"]["approvers"] == ["c0", "c2"]
    assert change[0]["detail"]["operation"] == "reshare" and change[0]["detail"]["digest"] == r["digest"]
    assert any(e["action"] == "custody:reshare" for e in vault.events())


def test_quorum_refusals_change_nothing_and_are_audited(vault):
    destroy = vault.request("destroy", {"key_id": "model-x", "version": None})
    export = vault.request("export", {"key_id": "model-x", "version": 1, "recipient": str(vault.ids[0].to_public())})
    before = vault.files()
    d_id, e_id = destroy["op_id"], export["op_id"]
    refusals = [
        # a quorum gathered for a different operation: signed for the export, handed in for the shred
        (lambda: vault.approve(vault.sign(e_id, 0, at=T0 + MIN), now=T0 + MIN, op_id=d_id), "another operation"),
        # the same, with the op id rewritten: the signature covers op id and digest
        (lambda: vault.approve(_rebind(vault.sign(e_id, 0, at=T0 + MIN), d_id), now=T0 + MIN), "another statement"),
        # an approval given before the change was requested
        (lambda: vault.approve(vault.sign(d_id, 0, at=T0 - MIN), now=T0 + MIN), "before the change was requested"),
        # dated ahead of the window
        (lambda: vault.approve(vault.sign(d_id, 0, at=T0 + 2 * 3600 * MIN), now=T0 + MIN), "window"),
        # signed by someone who is not that custodian
        (lambda: vault.approve(_forged(vault.statement(d_id), "c1"), now=T0 + MIN), "does not verify"),
        # M-1 approvals
        (lambda: vault.execute(d_id, now=T0 + MIN), "0 of 2"),
    ]
    for attack, why in refusals:
        with pytest.raises(QuorumError, match=why):
            attack()
    first = vault.sign(d_id, 0, at=T0 + MIN)
    vault.approve(first, now=T0 + MIN)
    with pytest.raises(QuorumError, match="counts once"):  # a replayed approval
        vault.approve(first, now=T0 + 2 * MIN)
    with pytest.raises(QuorumError, match="1 of 2"):  # M-1 approvals
        vault.execute(d_id, now=T0 + 2 * MIN)
    assert vault.files() == before and vault.load_with(vault.shares[:2]) == 120.0
    # an expired request: even a full quorum is refused once the window has passed
    vault.approve(vault.sign(e_id, 1, at=T0 + MIN), now=T0 + MIN)
    late = vault.sign(e_id, 2, at=T0 + 61 * MIN)
    with pytest.raises(QuorumError, match="expired"):
        vault.approve(late, now=T0 + 61 * MIN)
    with pytest.raises(QuorumError, match="expired"):
        vault.execute(e_id, now=T0 + 61 * MIN)
    # the shred with its quorum goes through, once; its approvals cannot be replayed
    vault.approve(vault.sign(d_id, 2, at=T0 + 3 * MIN), now=T0 + 3 * MIN)
    assert vault.execute(d_id, now=T0 + 4 * MIN)["result"] == [1]
    with pytest.raises(QuorumError, match="single-use"):
        vault.approve(first, now=T0 + 5 * MIN)
    with pytest.raises(QuorumError, match="single-use"):
        vault.execute(d_id, now=T0 + 5 * MIN)
    with pytest.raises(KeyDestroyedError):
        vault.load_with(vault.shares[:2])
    ev = vault.events()
    assert len(_denied(ev, "custody:approve")) == 8  # five attacks, the replays, the late one
    assert len(_denied(ev, "custody:change")) == 4  # M-1 twice, expired, replayed execute
    assert {e["action"] for e in ev} >= {"custody:request", "key:destroy", "model:shred"}
    shred = [e for e in ev if e["action"] == "custody:change" and e["outcome"] == "ok"]
    assert [e["detail"]["approvers"] for e in shred] == [["c0", "c2"]]


def _rebind(a: Approval, op_id: str) -> Approval:
    return Approval(op_id, a.digest, a.custodian, a.approved_at, a.signature)


def _forged(st: Statement, name: str) -> Approval:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    unsigned = Approval(st.op_id, st.digest, name, T0 + MIN, b"")
    return Approval(st.op_id, st.digest, name, T0 + MIN, Ed25519PrivateKey.generate().sign(unsigned.message()))


def test_edited_custody_record_cannot_swap_approvers(vault):
    """custody.json is public and writable by the agent's user: replacing a custodian's approval key
    (to forge approvals) makes the record unwrap nothing, so an agent started on it never unseals."""
    doc = json.loads((vault.home / "custody.json").read_text())
    doc["custodians"][1]["approver"] = b64e(os.urandom(32))
    (vault.home / "custody.json").write_text(json.dumps(doc))
    fresh = _State(vault.home, idle_seal=0)
    fresh.handle({"op": "unseal", "share": b64e(vault.shares[0].to_bytes())})
    with pytest.raises(CustodyError, match="corrupt"):
        fresh.handle({"op": "unseal", "share": b64e(vault.shares[2].to_bytes())})
    assert fresh.status()["sealed"] is True


def test_export_with_quorum_is_sealed_to_the_approved_recipient(vault):
    escrow = pyrage.x25519.Identity.generate()
    r = vault.request("export", {"key_id": "model-x", "version": 1, "recipient": str(escrow.to_public())})
    for i in (1, 2):
        vault.approve(vault.sign(r["op_id"], i, at=T0 + MIN), now=T0 + MIN)
    res = vault.execute(r["op_id"], now=T0 + 2 * MIN)["result"]
    blob = json.loads(pyrage.decrypt(b64d(res["sealed_key"]), [escrow]))
    assert blob["key_id"] == "model-x" and b64d(blob["key"]) == vault.state.keyring._kek("model-x", 1)
    assert any(e["action"] == "key:export" for e in vault.events())


def _policy(infer_uid: int, token: str) -> dict:
    return {
        "version": 1,
        "workloads": {"inference": token_digest(token)},
        "rule": [
            {"users": [os.getuid()], "ops": ["*"], "keys": ["*"]},
            {"users": [infer_uid], "workloads": ["inference"], "ops": ["unwrap"], "keys": ["model-*"]},
        ],
    }


def _apply_policy(v: Vault, pol: dict) -> None:
    r = v.request("policy", {"policy": pol})
    for i in (0, 1):
        v.approve(v.sign(r["op_id"], i, at=T0 + MIN), now=T0 + MIN)
    v.execute(r["op_id"], now=T0 + MIN)


def test_key_use_policy_per_user_and_workload(vault):
    sf = SealedFile(vault.sealed)
    slot, ctx = sf.key_slots()[1][0], sf.context.file_id
    sf._f.close()
    unwrap = {"op": "unwrap", "slot": slot.to_json(), "context": b64e(ctx)}
    infer, token = 4242, "the inference node's token"
    # before any policy: only the agent's own user
    with pytest.raises(PolicyDeniedError):
        vault.state.handle(unwrap, Caller(infer))
    _apply_policy(vault, _policy(infer, token))
    dek = vault.state.handle({**unwrap, "workload": "inference", "workload_token": token}, Caller(infer, 7))["dek"]
    assert dek == vault.state.handle(unwrap)["dek"]  # the permitted unwrap returns the file's data key
    before = vault.files()
    attacks = [
        ({**unwrap}, Caller(infer)),  # the right user without the workload token
        ({**unwrap, "workload": "inference", "workload_token": "guess"}, Caller(infer)),  # a wrong token
        ({**unwrap, "workload": "inference", "workload_token": token}, Caller(5555)),  # another user with the token
        ({"op": "sign", "message": b64e(b"m"), "workload": "inference", "workload_token": token}, Caller(infer)),
        (
            {
                "op": "wrap",
                "key_id": "model-x",
                "dek": b64e(bytes(32)),
                "context": b64e(b"f"),
                "workload": "inference",
                "workload_token": token,
            },
            Caller(infer),
        ),
        ({"op": "request", "kind": "audit", "params": {"key_use": False}}, Caller(infer)),  # custody: own user only
    ]
    for req, who in attacks:
        with pytest.raises(PolicyDeniedError):
            vault.state.handle(req, who)
    # a KEK the rule does not name
    other = vault.state.handle({"op": "wrap", "dek": b64e(bytes(32)), "context": b64e(b"f")})["slot"]
    with pytest.raises(PolicyDeniedError, match="unwrap with key"):
        vault.state.handle({"op": "unwrap", "slot": other, "context": b64e(b"f"), "workload": "inference",
                            "workload_token": token}, Caller(infer))  # fmt: skip
    assert vault.files() == before
    ev = vault.events()
    assert len(_denied(ev, "policy:deny")) == 1 + len(attacks) + 1
    ok = [e for e in ev if e["action"] == "key:unwrap" and e["detail"].get("caller", {}).get("uid") == infer]
    assert len(ok) == 1 and ok[0]["outcome"] == "ok" and ok[0]["detail"]["caller"]["workload"] == "inference"
    assert any(e["action"] == "policy:set" for e in ev)
    # turning key-use auditing off is a custody change too; refusals are still recorded afterwards
    r = vault.request("audit", {"key_use": False})
    for i in (0, 2):
        vault.approve(vault.sign(r["op_id"], i, at=T0 + MIN), now=T0 + MIN)
    vault.execute(r["op_id"], now=T0 + MIN)
    n = len(vault.events())
    vault.state.handle(unwrap)
    assert len(vault.events()) == n
    with pytest.raises(PolicyDeniedError):
        vault.state.handle(unwrap, Caller(infer))
    assert vault.events()[-1]["action"] == "policy:deny"


def test_policy_file_errors_name_the_field(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('version = 1\n[[rule]]\nusers = ["warden"]\nops = ["unwrap", "fly"]\nkeys = ["*"]\n')
    with pytest.raises(QuorumError, match=r"p\.toml: policy: rule 1: ops are"):
        Policy.load_file(f)
    f.write_text('version = 1\n[[rule]]\nusers = ["warden"]\nops = ["unwrap"]\nkeys = ["*"]\nworkloads = ["x"]\n')
    with pytest.raises(QuorumError, match="workload 'x' is not declared"):
        Policy.load_file(f)
    f.write_text('version = 1\n[workloads]\nx = "00"\n')
    with pytest.raises(QuorumError, match="64-hex-digit"):
        Policy.load_file(f)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another OS user")
def test_another_os_user_over_the_socket(tmp_path):
    """A real agent process; a forked client that setuid()s to nobody: the policy, checked on the
    socket's peer credentials, is what lets it load a model, and nothing more."""
    from weightwarden.keys import agent

    base = Path(tempfile.mkdtemp(prefix="ww-peer-"))
    try:
        base.chmod(0o755)
        home = base / "home"
        v = Vault(home, base)
        nobody, token = 65534, "nobody's inference token"
        _apply_policy(v, _policy(nobody, token))
        v.state.keyring.close()
        agent.start(home, idle_seal=0)
        client = AgentClient(home)
        for s in v.shares[:2]:
            client.call("unseal", share=b64e(s.to_bytes()))
        home.chmod(0o711)  # let nobody reach the socket: the file system no longer stands in the way
        (home / agent.SOCKET).chmod(0o666)
        v.sealed.chmod(0o644)

        def as_nobody(workload: bool, what: str) -> str:
            rfd, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:  # child
                try:
                    os.setgid(nobody)
                    os.setuid(nobody)
                    if workload:
                        os.environ.update(WARDEN_WORKLOAD="inference", WARDEN_WORKLOAD_TOKEN=token)
                    try:
                        if what == "load":
                            out = str(float(ww.load(v.sealed, keyring=AgentKeyring(home))["w"].sum()))
                        elif what == "status":
                            out = json.dumps(AgentClient(home).call("status"), sort_keys=True)
                        else:
                            out = AgentClient(home).call("sign", message=b64e(b"x"))["signature"]
                    except Exception as e:
                        out = type(e).__name__
                    os.write(wfd, out.encode())
                finally:
                    os._exit(0)
            os.close(wfd)
            os.waitpid(pid, 0)
            with os.fdopen(rfd) as f:
                return f.read()

        assert as_nobody(True, "load") == "120.0"  # the inference node loads the model
        assert as_nobody(False, "load") == "PolicyDeniedError"  # without its workload token
        assert as_nobody(True, "sign") == "PolicyDeniedError"  # nor may it sign
        assert json.loads(as_nobody(False, "status")) == {"sealed": False}  # no custodians, no pending changes
        assert client.call("status")["custodians"] == ["c0", "c1", "c2"]  # the agent's own user: all of it
        agent.stop(home)
        ev = trail.events(home)
        mine = [e for e in ev if e["detail"].get("caller", {}).get("uid") == nobody]
        assert [(e["action"], e["outcome"]) for e in mine if e["action"] == "key:unwrap"] == [("key:unwrap", "ok")]
        assert len([e for e in mine if e["action"] == "policy:deny"]) == 2
    finally:
        pid = base / "home" / "agent.pid"
        if pid.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid.read_text()), signal.SIGKILL)
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def test_custody_changes_through_the_cli(tmp_path, st_file, cli_env):
    env = {**cli_env, "WARDEN_CUSTODIAN_PASSPHRASE_ANA": "ana's long passphrase",
           "WARDEN_CUSTODIAN_PASSPHRASE_BO": "bo's long passphrase"}  # fmt: skip
    home = Path(env["WARDEN_HOME"])

    def ok(*args: str) -> str:
        r = warden(env, *args)
        assert r.returncode == 0, r.stderr
        return r.stdout

    ok("init")
    ok("key", "new", "--name", "model-y")
    ok("seal", str(st_file), "-o", str(tmp_path / "y.wws"), "--key", "model-y")
    ok("custody", "init", "--threshold", "2", "--custodian", "ana=passphrase", "--custodian", "bo=passphrase")
    ok("agent", "start", "--idle-seal", "0")
    try:
        ok("custody", "unseal", "--custodian", "ana")
        ok("custody", "unseal", "--custodian", "bo")
        r = warden(env, "shred", "model-y", "--yes")
        assert r.returncode == 1 and "QuorumError" in r.stderr and "custody request destroy" in r.stderr
        req = json.loads(ok("custody", "request", "destroy", "model-y", "--json"))
        r = warden(env, "custody", "approve", req["op_id"], "--custodian", "ana", "--digest", "0" * 64)
        assert r.returncode == 1 and "digest" in r.stderr
        ok("custody", "approve", req["op_id"], "--custodian", "ana", "--digest", req["digest"])
        r = warden(env, "custody", "execute", req["op_id"])
        assert r.returncode == 1 and "1 of 2" in r.stderr
        ok("custody", "approve", req["op_id"], "--custodian", "bo")
        done = json.loads(ok("custody", "execute", req["op_id"], "--json"))
        assert done["approvers"] == ["ana", "bo"] and done["result"] == [1]
        r = warden(env, "open", str(tmp_path / "y.wws"), "-o", str(tmp_path / "y.safetensors"))
        assert r.returncode == 1 and "KeyDestroyedError" in r.stderr
    finally:
        warden(env, "agent", "stop")
    ev = trail.events(home)
    assert [e["detail"]["approvers"] for e in ev if e["action"] == "custody:change" and e["outcome"] == "ok"] == [
        ["ana", "bo"]
    ]


# -- issue 16 red-team fixes ---------------------------------------------------------------------
@contextlib.contextmanager
def _socket_agent(state: _State):
    """The agent's real socket server (SO_PEERCRED, the request handler) over ``state``, in a thread."""
    import shutil
    import threading

    from weightwarden.keys import agent

    d = Path(tempfile.mkdtemp(prefix="ww-sock-"))
    server = agent.AgentServer(str(d / agent.SOCKET), agent.AgentRequestHandler)
    server.state = state
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield d / agent.SOCKET
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(d, ignore_errors=True)


def _raw(path: Path, req: dict) -> dict:
    """One request as any process of the agent's user can send it: raw JSON over the socket."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


def _me() -> str:
    import pwd

    return f"uid {os.getuid()} ({pwd.getpwuid(os.getuid()).pw_name})"


def test_reshare_to_requester_chosen_passphrases_is_refused(vault):
    """The red team's HIGH finding, replayed: a reshare to passphrase custodians whose passphrases the
    requester supplies (outside the signed statement).  Refused at the request, audited, nothing
    pending to approve; the same without the passphrases, and a statement naming a passphrase
    recipient (served by a tampered agent), is refused too."""
    before = vault.files()
    mine = {"ana": "attacker's pass one", "bo": "attacker's pass two", "cy": "attacker's pass three"}
    params = {"threshold": 2, "custodians": [{"name": n, "recipient": "passphrase"} for n in mine]}
    with _socket_agent(vault.state) as sock:
        r = _raw(sock, {"op": "request", "kind": "reshare", "params": params, "passphrases": mine, "actor": "ana"})
        assert r["error"] == "QuorumError" and "age" in r["message"]
        # the passphrases alone, with age recipients: a custody change carries no secrets of the requester
        ids = _ids(3)
        ok_params = {
            "threshold": 2,
            "custodians": [{"name": c.name, "recipient": c.recipient} for c in _custodians(ids)],
        }
        r2 = _raw(sock, {"op": "request", "kind": "reshare", "params": ok_params, "passphrases": mine})
        assert r2["error"] == "QuorumError" and "no passphrases" in r2["message"]
        assert _raw(sock, {"op": "pending"}) == {"pending": []}
    with pytest.raises(QuorumError, match=r"custodian ana has recipient 'passphrase'.*warden custody keygen"):
        vault.request("reshare", params)
    # a custodian's warden rebuilds the statement it signs: one naming a passphrase recipient is refused there
    st = vault.request("audit", {"key_use": False})["statement"]
    forged = {**st, "kind": "reshare", "params": params}
    with pytest.raises(QuorumError, match="passphrase"):
        Statement.from_json(forged)
    assert vault.files() == before
    denied = _denied(vault.events(), "custody:request")
    assert len(denied) == 3 and all(e["detail"]["operation"] == "reshare" for e in denied)
    # nothing was re-shared: the attacker's passphrases open nothing, the old custodians still unseal
    doc = CustodyDoc.load(vault.home)
    assert [c["recipient"] for c in doc.custodians] == [c.recipient for c in _custodians(vault.ids)]
    assert vault.load_with(vault.shares[1:]) == 120.0


def test_reshare_to_age_recipients_gives_the_requester_nothing(vault):
    """A legitimate reshare: every new share is sealed to an age key the custodians approved, so the
    requester (who holds none of the new identities) opens no new share and cannot approve anything."""
    mallory = pyrage.x25519.Identity.generate()  # the requester's own key: not a custodian
    new_ids = _ids(3)
    new = _custodians(new_ids, "n")
    r = vault.request("reshare", {"threshold": 2, "custodians": [{"name": c.name, "recipient": c.recipient}
                                                                 for c in new]})  # fmt: skip
    st = vault.statement(r["op_id"])
    assert all(c.recipient in st.describe() for c in new)  # each custodian sees every recipient key
    for i in (0, 1):
        vault.approve(vault.sign(r["op_id"], i, at=T0 + MIN), now=T0 + MIN)
    vault.execute(r["op_id"], now=T0 + 2 * MIN)
    doc = CustodyDoc.load(vault.home)
    assert [(c["name"], c["recipient"]) for c in doc.custodians] == [(c.name, c.recipient) for c in new]
    for c in new:
        with pytest.raises(CustodyError):
            doc.open_share(c.name, identity=str(mallory))
        with pytest.raises(CustodyError, match="age identity"):
            doc.open_share(c.name, passphrase="attacker's pass one")
    # the requester cannot approve an export of the KEK to themselves: no share, no approval key
    exp = vault.request("export", {"key_id": "model-x", "version": 1, "recipient": str(mallory.to_public())},
                        now=T0 + 3 * MIN)  # fmt: skip
    with pytest.raises(QuorumError, match="another custody record"):
        vault.approve(vault.sign(exp["op_id"], 0, at=T0 + 3 * MIN), now=T0 + 3 * MIN)  # an old share
    with pytest.raises(QuorumError, match="does not verify"):
        vault.approve(_forged(vault.statement(exp["op_id"]), "n0"), now=T0 + 3 * MIN)
    with pytest.raises(QuorumError, match="0 of 2"):
        vault.execute(exp["op_id"], now=T0 + 4 * MIN)
    assert not any(e["action"] == "key:export" for e in vault.events())
    assert vault.load_with([doc.open_share(f"n{i}", identity=str(new_ids[i])) for i in (0, 2)]) == 120.0


def test_requested_by_is_the_socket_peer(vault):
    """The statement names who asked as the kernel reports it (SO_PEERCRED), the claimed name beside it."""
    with _socket_agent(vault.state) as sock:
        r = _raw(sock, {"op": "request", "kind": "audit", "params": {"key_use": False}, "actor": "the-ciso"})
        unnamed = _raw(sock, {"op": "request", "kind": "audit", "params": {"key_use": True}})
    st = Statement.from_json(r["statement"])
    assert st.requested_by == _me() and st.claimed_by == "the-ciso"
    assert f"requested by {_me()} (who says they are the-ciso)" in st.describe()
    assert st.digest == r["digest"]  # the claimed name is part of what custodians sign
    assert Statement.from_json(unnamed["statement"]).claimed_by is None
    assert Statement.from_json(unnamed["statement"]).requested_by == _me()
    ev = [e for e in vault.events() if e["action"] == "custody:request" and e["outcome"] == "ok"]
    assert ev[0]["detail"]["requested_by"] == _me() and ev[0]["detail"]["claimed_by"] == "the-ciso"


def test_status_to_other_users_is_minimal(vault):
    """Another OS user that can reach the socket learns sealed/unsealed only: not the custodians,
    the split, the unseal progress or the pending changes."""
    vault.request("audit", {"key_use": False})
    assert vault.state.handle({"op": "status"}, Caller(4242)) == {"sealed": False}
    mine = vault.state.handle({"op": "status"})
    assert mine["custodians"] == ["c0", "c1", "c2"] and len(mine["pending_changes"]) == 1
    fresh = _State(vault.home, idle_seal=0)
    fresh.handle({"op": "unseal", "share": b64e(vault.shares[0].to_bytes())})
    assert fresh.handle({"op": "status"}, Caller(4242)) == {"sealed": True}
    assert fresh.handle({"op": "status"})["progress"] == 1


def test_policy_change_is_shown_in_words_and_checked_against_a_file(vault, tmp_path):
    pol = _policy(4242, "tok")
    pol["rule"][1]["keys"] = ["model-*", "[red]x\x1b[2J"]
    r = vault.request("policy", {"policy": pol})
    st = vault.statement(r["op_id"])
    assert st.details()[1] == "rule 2: uid 4242 running as workload inference may unwrap with keys matching " \
        "model-*, [red]x\x1b[2J"  # fmt: skip
    assert st.details()[0] == f"rule 1: uid {os.getuid()} may every operation with every key"
    assert st.policy_digest == Policy.from_json(pol).digest and st.policy_digest in st.describe()
    same, other = tmp_path / "same.json", tmp_path / "other.json"
    same.write_text(json.dumps(pol))
    st.check_policy_file(same)
    other.write_text(json.dumps({**pol, "rule": pol["rule"] + [{"users": [5555], "ops": ["*"], "keys": ["*"]}]}))
    with pytest.raises(QuorumError, match=r"other\.json: this policy .* is not the one requested"):
        st.check_policy_file(other)
    with pytest.raises(QuorumError, match="not a policy change"):
        vault.statement(vault.request("audit", {"key_use": False})["op_id"]).check_policy_file(same)


def test_custody_cli_reshare_needs_age_keys_and_policy_is_shown_in_words(tmp_path, cli_env):
    env = {**cli_env, "COLUMNS": "400", "WARDEN_CUSTODIAN_PASSPHRASE_ANA": "ana's long passphrase",
           "WARDEN_CUSTODIAN_PASSPHRASE_BO": "bo's long passphrase"}  # fmt: skip
    home = Path(env["WARDEN_HOME"])

    def ok(*args: str) -> str:
        r = warden(env, *args)
        assert r.returncode == 0, r.stderr
        return r.stdout

    ok("init")
    ok("custody", "init", "--threshold", "2", "--custodian", "ana=passphrase", "--custodian", "bo=passphrase")
    record = (home / "custody.json").read_bytes()
    ok("agent", "start", "--idle-seal", "0")
    try:
        ok("custody", "unseal", "--custodian", "ana")
        ok("custody", "unseal", "--custodian", "bo")
        r = warden(env, "custody", "request", "reshare", "--threshold", "2", "--custodian", "ana=passphrase",
                   "--custodian", "bo=passphrase")  # fmt: skip
        assert r.returncode == 1 and "QuorumError" in r.stderr and "warden custody keygen" in r.stderr
        assert (home / "custody.json").read_bytes() == record
        pw = tmp_path / "cy.pass"
        pw.write_text("cy's own passphrase\n")
        pub = ok("custody", "keygen", "-o", str(tmp_path / "cy.agekey"), "--protect",
                 "--identity-passphrase-file", str(pw)).strip()  # fmt: skip
        assert pub.startswith("age1") and (tmp_path / "cy.agekey").stat().st_mode & 0o777 == 0o600
        assert b"AGE-SECRET-KEY" not in (tmp_path / "cy.agekey").read_bytes()  # protected by cy's passphrase
        r = warden(env, "custody", "keygen", "-o", str(tmp_path / "cy.agekey"))
        assert r.returncode == 1 and (tmp_path / "cy.agekey").read_bytes()[:21] == b"age-encryption.org/v1"
        pol = tmp_path / "key-use.toml"
        pol.write_text(
            f'version = 1\n[workloads]\ninference = "{token_digest("t")}"\n'
            f'[[rule]]\nusers = [{os.getuid()}]\nops = ["*"]\nkeys = ["*"]\n'
            '[[rule]]\nusers = [4242]\nworkloads = ["inference"]\nops = ["unwrap"]\n'
            'keys = ["prod-*", "[red]x\\u001b"]\n'
        )
        assert "rule 1: uid" in ok("custody", "request", "policy", str(pol))  # the requester sees it in words too
        op = json.loads(ok("custody", "request", "policy", str(pol), "--json"))["op_id"]
        shown = ok("custody", "pending")
        assert "rule 2: uid 4242 running as workload inference may unwrap with keys matching prod-*, [red]x?" in shown
        assert f"digest {Policy.load_file(pol).digest}" in shown and "\x1b" not in shown
        other = tmp_path / "other.toml"
        other.write_text(pol.read_text().replace("prod-*", "*"))
        r = warden(env, "custody", "approve", op, "--custodian", "ana", "--policy-file", str(other))
        assert r.returncode == 1 and "is not the one requested" in r.stderr
        assert shown.count("rule 2: uid 4242") == 2  # both requests pending, each in words
        r = warden(env, "custody", "approve", op, "--custodian", "ana", "--policy-file", str(pol))
        assert r.returncode == 0, r.stderr
        assert "rule 1: uid" in r.stderr and "1 of 2 approvals" in r.stdout
    finally:
        warden(env, "agent", "stop")
    ev = trail.events(home)
    assert len(_denied(ev, "custody:request")) == 1
    assert [e["detail"]["custodian"] for e in ev if e["action"] == "custody:approve" and e["outcome"] == "ok"] == [
        "ana"
    ]

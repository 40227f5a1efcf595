"""M-of-N custodians: Shamir shares sealed with age, unsealed through the agent."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import numpy as np
import pyrage
import pytest
from safetensors.numpy import save_file

import weightwarden as ww
from tests.support.cli import PASSPHRASE, TEST_KDF, warden
from weightwarden import trail
from weightwarden.errors import CustodyError, KeyringError
from weightwarden.keys.custody import Custodian, CustodyDoc, Share, UnsealSession, combine, split


def identities(n: int) -> list[pyrage.x25519.Identity]:
    return [pyrage.x25519.Identity.generate() for _ in range(n)]


def custodians(ids) -> list[Custodian]:
    return [Custodian(f"c{i}", str(ident.to_public())) for i, ident in enumerate(ids)]


def test_m_of_n_split_and_unseal():
    ids = identities(5)
    root = os.urandom(32)
    doc = split(root, custodians(ids), 3)
    shares = [doc.open_share(f"c{i}", identity=str(ids[i])) for i in range(5)]
    sess = UnsealSession(doc)
    assert sess.submit(shares[4]) is None and sess.submit(shares[1]) is None and sess.progress == 2
    with pytest.raises(CustodyError, match="already submitted"):
        sess.submit(shares[1])  # one custodian cannot count twice
    assert sess.submit(shares[2]) == root
    for trio in ([0, 1, 2], [0, 3, 4], [2, 3, 4]):
        assert combine(doc, [shares[i] for i in trio]) == root
    with pytest.raises(CustodyError, match="2 of 3"):
        combine(doc, shares[:2])  # M-1 shares: a clear error, never a wrong key
    with pytest.raises(CustodyError, match="2 of 3"):
        combine(doc, [shares[0], shares[0], shares[1]])


def test_m_minus_one_shares_reveal_nothing():
    """With M-1 shares fixed, every value of the missing share yields a different secret,
    so the M-1 shares alone leave the secret open (Shamir's perfect secrecy)."""
    from Crypto.Protocol.SecretSharing import Shamir

    shares = Shamir.split(3, 5, os.urandom(16))
    known = shares[:2]
    secrets_ = {Shamir.combine([*known, (3, i.to_bytes(16, "big"))]) for i in range(512)}
    assert len(secrets_) == 512


def test_foreign_corrupt_and_wrong_identity_shares():
    ids = identities(3)
    doc = split(os.urandom(32), custodians(ids), 2)
    other = split(os.urandom(32), custodians(ids), 2)
    sess = UnsealSession(doc)
    with pytest.raises(CustodyError, match="another split"):
        sess.submit(other.open_share("c0", identity=str(ids[0])))
    good = doc.open_share("c1", identity=str(ids[1]))
    bad = Share(good.split_id, good.index, good.custodian, bytes([good.value[0] ^ 1]) + good.value[1:])
    with pytest.raises(CustodyError, match="corrupt"):
        sess.submit(bad)
    with pytest.raises(CustodyError, match="do not match"):
        sess.submit(Share(good.split_id, 3, "c1", good.value))  # c1 holds index 2, not 3
    with pytest.raises(CustodyError, match="cannot open"):
        doc.open_share("c0", identity=str(ids[1]))  # someone else's identity
    with pytest.raises(CustodyError, match="not a custodian"):
        doc.open_share("mallory", identity=str(ids[0]))
    with pytest.raises(CustodyError):
        Share.from_bytes(b"garbage")
    with pytest.raises(CustodyError, match="threshold of 1"):
        split(os.urandom(32), custodians(ids), 1)
    with pytest.raises(CustodyError):
        Custodian("c9", "age1notakey")


def test_passphrase_custodian():
    ids = identities(1)
    cs = [Custodian("alice", "passphrase"), custodians(ids)[0]]
    root = os.urandom(32)
    doc = split(root, cs, 2, {"alice": "alice's long passphrase"})
    with pytest.raises(CustodyError):
        doc.open_share("alice", passphrase="wrong passphrase")
    shares = [doc.open_share("alice", passphrase="alice's long passphrase"), doc.open_share("c0", identity=str(ids[0]))]
    assert combine(doc, shares) == root


def test_keyring_under_custody_and_reshare(tmp_path):
    home = tmp_path / "h"
    kr = ww.Keyring.create(home, PASSPHRASE, kdf=TEST_KDF)
    src = tmp_path / "m.safetensors"
    save_file({"w": np.ones((4, 4), np.float32)}, str(src))
    ww.seal(src, tmp_path / "m.wws", keyring=kr)
    ids = identities(3)
    doc = kr.to_custody(custodians(ids), 2)
    with pytest.raises(KeyringError, match="custody"):
        ww.Keyring.unlock(home, PASSPHRASE)  # the passphrase alone no longer opens it
    old_shares = [doc.open_share(f"c{i}", identity=str(ids[i])) for i in range(3)]
    kr2 = ww.Keyring.unlock_with_root(home, combine(CustodyDoc.load(home), old_shares[:2]))
    new_ids = identities(4)
    new_doc = kr2.reshare(custodians(new_ids), 3)
    assert new_doc.split_id != doc.split_id
    with pytest.raises(CustodyError, match="another split"):
        UnsealSession(CustodyDoc.load(home)).submit(old_shares[0])
    new_shares = [new_doc.open_share(f"c{i}", identity=str(new_ids[i])) for i in (0, 2, 3)]
    kr3 = ww.Keyring.unlock_with_root(home, combine(CustodyDoc.load(home), new_shares))
    assert ww.load(tmp_path / "m.wws", keyring=kr3)["w"].sum() == 16  # same root: files still open


@pytest.fixture
def agent_home(tmp_path, cli_env):
    home = Path(cli_env["WARDEN_HOME"])
    yield home
    pid = home / "agent.pid"
    if pid.exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid.read_text()), signal.SIGKILL)


def _ok(r):
    assert r.returncode == 0, r.stderr
    return r


def test_custody_cli_end_to_end(tmp_path, st_file, cli_env, agent_home):
    _ok(warden(cli_env, "init"))
    _ok(warden(cli_env, "seal", str(st_file), "-o", str(tmp_path / "before.wws")))
    ids = identities(5)
    for i, ident in enumerate(ids):
        (tmp_path / f"c{i}.key").write_text(str(ident))
    specs = [a for i, ident in enumerate(ids) for a in ("--custodian", f"c{i}={ident.to_public()}")]
    _ok(warden(cli_env, "custody", "init", "--threshold", "3", *specs))
    r = warden(cli_env, "seal", str(st_file), "-o", str(tmp_path / "x.wws"))
    assert r.returncode == 1 and "agent is not running" in r.stderr
    _ok(warden(cli_env, "agent", "start"))
    r = warden(cli_env, "seal", str(st_file), "-o", str(tmp_path / "x.wws"))
    assert r.returncode == 1 and "sealed: 0 of 3" in r.stderr

    def unseal(i: int):
        return warden(cli_env, "--actor", f"custodian-{i}", "custody", "unseal", "--custodian", f"c{i}",
                      "--identity", str(tmp_path / f"c{i}.key"), "--json")  # fmt: skip

    assert json.loads(_ok(unseal(0)).stdout)["progress"] == 1
    r = unseal(0)
    assert r.returncode == 1 and "already submitted" in r.stderr
    assert json.loads(_ok(unseal(3)).stdout) | {} == json.loads(
        _ok(warden(cli_env, "custody", "status", "--json")).stdout
    )
    r = warden(cli_env, "custody", "unseal", "--custodian", "c1", "--identity", str(tmp_path / "c2.key"))
    assert r.returncode == 1 and "cannot open" in r.stderr
    assert json.loads(_ok(unseal(4)).stdout)["sealed"] is False
    # unsealed: the agent serves the keyring to ordinary commands
    _ok(warden(cli_env, "--reason", "ticket-7", "verify", str(tmp_path / "before.wws"), "--deep"))
    _ok(warden(cli_env, "seal", str(st_file), "-o", str(tmp_path / "after.wws")))
    _ok(warden(cli_env, "open", str(tmp_path / "after.wws"), "-o", str(tmp_path / "plain.safetensors")))
    assert (tmp_path / "plain.safetensors").read_bytes() == st_file.read_bytes()
    r = warden(cli_env, "key", "new", "--signing", "--purpose", "export-rules")  # the agent has no such call
    assert r.returncode == 1 and "under custody" in r.stderr and "Traceback" not in r.stderr
    _ok(warden(cli_env, "custody", "seal"))
    r = warden(cli_env, "open", str(tmp_path / "after.wws"), "-o", str(tmp_path / "p2.safetensors"), "--force")
    assert r.returncode == 1 and "sealed" in r.stderr
    _ok(warden(cli_env, "agent", "stop"))
    log = trail.events(agent_home)  # the tamper-evident trail
    shares = [e for e in log if e["action"] == "custody:share"]
    assert [e["actor"] for e in shares if e["outcome"] == "ok"] == ["custodian-0", "custodian-3", "custodian-4"]
    assert any(e["action"] == "custody:unseal" for e in log)
    assert any(e["action"] == "key:unwrap" and e["reason"] == "ticket-7" for e in log)
    text = json.dumps(log) + (agent_home / "custody.json").read_text()
    assert all(str(i) not in text for i in ids)  # no custodian secret is ever written


def test_agent_seals_itself_when_idle(tmp_path):
    from weightwarden.keys.agent_server import AgentState as _State
    from weightwarden.keys.provider import b64e

    home = tmp_path / "h"
    kr = ww.Keyring.create(home, PASSPHRASE, kdf=TEST_KDF)
    ids = identities(3)
    doc = kr.to_custody(custodians(ids), 2)
    state = _State(home, idle_seal=60)
    for i in (0, 2):
        st = state.handle({"op": "unseal", "share": b64e(doc.open_share(f"c{i}", identity=str(ids[i])).to_bytes())})
    assert st["sealed"] is False
    t0 = state.last_use
    assert state.seal_if_idle(now=t0 + 59) is False
    state.handle({"op": "list_keys"})  # a key operation resets the idle clock
    assert state.seal_if_idle(now=state.last_use + 30) is False
    assert state.seal_if_idle(now=state.last_use + 61) is True
    assert state.status()["sealed"] is True
    with pytest.raises(CustodyError, match="sealed: 0 of 2"):
        state.handle({"op": "list_keys"})
    # a half-finished unseal is forgotten too
    state.handle({"op": "unseal", "share": b64e(doc.open_share("c1", identity=str(ids[1])).to_bytes())})
    assert state.status()["progress"] == 1
    assert state.seal_if_idle(now=state.last_use + 61) is True and state.status()["progress"] == 0
    never = _State(home, idle_seal=0)
    assert never.seal_if_idle(now=never.last_use + 10**9) is False


def test_agent_signs_only_its_keys_own_purpose(tmp_path):
    """The agent holds keys of several purposes and signs a message only under the label of the key's
    own purpose: a client (or a process that took over the socket) asking the sealing key to sign a
    tree head, or the log key a manifest, is refused and the refusal audited."""
    from weightwarden.errors import KeyPurposeError
    from weightwarden.keys.agent_server import AgentState as _State
    from weightwarden.keys.provider import b64d, b64e, purpose_message, verify_purpose

    home = tmp_path / "h"
    kr = ww.Keyring.create(home, PASSPHRASE, kdf=TEST_KDF)
    sealing_id = kr.signer().key_id
    ids = identities(3)
    doc = kr.to_custody(custodians(ids), 2)
    state = _State(home, idle_seal=600)
    for i in (0, 1):
        state.handle({"op": "unseal", "share": b64e(doc.open_share(f"c{i}", identity=str(ids[i])).to_bytes())})
    log_key = state.handle({"op": "signer", "purpose": "audit-log", "create": True})
    assert log_key["purpose"] == "audit-log" and log_key["key_id"] != sealing_id
    assert state.handle({"op": "signer", "purpose": "audit-log"})["key_id"] == log_key["key_id"]  # made once
    with pytest.raises(KeyPurposeError):
        state.handle({"op": "signer", "key_id": sealing_id, "purpose": "audit-log"})
    head = purpose_message("audit-log", b"a tree head")
    for kid, msg in ((sealing_id, head), (log_key["key_id"], purpose_message("sealing", b"a manifest")),
                     (sealing_id, b"no label at all")):  # fmt: skip
        with pytest.raises(KeyPurposeError, match="messages only"):
            state.handle({"op": "sign", "key_id": kid, "message": b64e(msg)})
    sig = b64d(state.handle({"op": "sign", "key_id": log_key["key_id"], "message": b64e(head)})["signature"])
    verify_purpose(b64d(log_key["public_key"]), "audit-log", b"a tree head", sig)
    events = trail.events(home)  # the tamper-evident trail
    signs = [e for e in events if e["action"] == "key:sign"]
    assert [e["outcome"] for e in signs] == ["denied", "denied", "denied", "ok"]
    assert signs[-1]["detail"]["purpose"] == "audit-log"
    # KEKs through the agent: a tracing KEK is made on request, and a slot under it does not unwrap
    # as a sealing key (nor a file's data key as a tracing one)
    tracing = state.handle({"op": "provider", "purpose": "tracing", "create": True})
    assert tracing["purpose"] == "tracing"
    slot = state.handle({"op": "wrap", "key_id": tracing["key_id"], "purpose": "tracing", "dek": b64e(bytes(32)),
                         "context": b64e(b"warden-trace-secret|m")})["slot"]  # fmt: skip
    with pytest.raises(KeyPurposeError):
        state.handle({"op": "unwrap", "slot": slot, "purpose": "sealing", "context": b64e(b"warden-trace-secret|m")})
    dek = state.handle({"op": "unwrap", "slot": slot, "purpose": "tracing", "context": b64e(b"warden-trace-secret|m")})
    assert b64d(dek["dek"]) == bytes(32)
    with pytest.raises(KeyPurposeError):
        state.handle({"op": "wrap", "purpose": "tracing", "key_id": state.handle({"op": "provider"})["key_id"],
                      "dek": b64e(bytes(32)), "context": b64e(b"x")})  # fmt: skip

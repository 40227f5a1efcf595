"""Issue 16: trust boundaries.  The broker holds ciphertext, public keys and its own log key, and
nothing a compromise of its host could use to decrypt a model or sign one that `warden verify` trusts;
no long-lived process keeps a passphrase in its environment, and key holders are not dumpable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import weightwarden as ww
from tests.support.cli import PASSPHRASE, warden
from weightwarden.errors import (
    BadPassphraseError,
    KeyPurposeError,
    KeysNotHereError,
    LogKeyError,
    UntrustedSignerError,
    WrongKeyError,
)

pytest.importorskip("fastapi", reason="the broker's HTTP layer is the server extra")
pytest.importorskip("cedarpy", reason="the broker's policy engine is the server extra")


def ok(r: Any) -> Any:
    assert r.returncode == 0, r.stderr
    return r


def _strings(blob: bytes) -> set[str]:
    """Every value an attacker could try as a passphrase: NUL-separated entries, their values, lines."""
    out: set[str] = set()
    for part in blob.replace(b"\0", b"\n").split(b"\n"):
        text = part.decode("utf-8", "replace").strip()
        if text:
            out.add(text)
            out.add(text.partition("=")[2])
    return out - {""}


def _wait_health(base: str, proc: subprocess.Popen[str]) -> None:
    import httpx

    for _ in range(200):
        if proc.poll() is not None:
            raise AssertionError("warden serve exited: " + (proc.stderr.read() if proc.stderr else ""))
        try:
            if httpx.get(f"{base}/v1/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("the broker did not start")


def test_log_key_file_is_its_own_key(tmp_path: Path) -> None:
    """The file log key: created once (0600), opened only by its passphrase, never the keyring."""
    from tests.support.cli import TEST_KDF
    from weightwarden.broker.logkey import create_file, load_file, open_log_key

    p = tmp_path / "broker" / "log-key.json"
    s = create_file(p, "log key passphrase", kdf=TEST_KDF)
    assert p.stat().st_mode & 0o777 == 0o600
    assert load_file(p, "log key passphrase").public_key == s.public_key
    with pytest.raises(BadPassphraseError):
        load_file(p, "not the passphrase")
    with pytest.raises(LogKeyError):  # never overwritten: a new key would orphan the log's heads
        create_file(p, "log key passphrase", kdf=TEST_KDF)
    assert load_file(p, "log key passphrase").public_key == s.public_key
    with pytest.raises(LogKeyError, match=r"keyring\.json"):
        open_log_key(f"file:{tmp_path / 'keyring.json'}", tmp_path, lambda confirm: "x" * 8)
    with pytest.raises(LogKeyError, match="--log-key"):
        open_log_key("vault://transit/keys/x", tmp_path, lambda confirm: "x" * 8)


def test_broker_model_uses_no_key_and_refuses_a_hidden_header(cli_env: dict[str, str], tmp_path: Path,
                                                               st_file: Path) -> None:  # fmt: skip
    """Admission reads shapes from the visible header; a hidden header is classified where the keys are."""
    ok(warden(cli_env, "init"))
    hidden = tmp_path / "h.wws"
    ok(warden(cli_env, "seal", str(st_file), "-o", str(hidden), "--hide-header"))
    broker_env = {k: v for k, v in cli_env.items() if k != "WARDEN_PASSPHRASE"}  # the broker host: no keyring
    r = warden(broker_env, "broker", "model", "h", str(hidden), "--team", "core")
    assert r.returncode == 1 and "KeysNotHereError" in r.stderr and "--classification" in r.stderr
    assert not (Path(cli_env["WARDEN_HOME"]) / "broker" / "weights" / "h.wws").exists()  # nothing admitted
    c = tmp_path / "c.json"
    c.write_text(ok(warden(cli_env, "classify", str(hidden), "--json")).stdout)  # where the keys are
    ok(warden(broker_env, "broker", "model", "h", str(hidden), "--team", "core", "--classification", str(c)))
    from weightwarden.release.classify import classify

    with pytest.raises(KeysNotHereError):
        classify(hidden, keyless=True)
    plain = tmp_path / "v.wws"
    ok(warden(cli_env, "seal", str(st_file), "-o", str(plain)))
    r = ok(warden(broker_env, "broker", "model", "v", str(plain), "--team", "core"))
    assert "parameters" in r.stdout


def _broker_home(cli_env: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The broker host's environment, as docs/GUIDE.md sets it up: a home of its own holding the key
    host's trust store (public keys) and the broker's log key; WARDEN_PASSPHRASE left in it anyway."""
    bhome = tmp_path / "broker-home"
    benv = cli_env | {"WARDEN_HOME": str(bhome)}
    ok(warden(benv, "broker", "init", "--trust-from", cli_env["WARDEN_HOME"], "--json"))
    return benv, bhome


def test_broker_host_compromise_yields_no_model_and_no_trusted_signature(
    cli_env: dict[str, str], tmp_path: Path, st_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ATTACK.  The operator runs `warden serve` as docs/GUIDE.md says (a home of its own, log key in a
    file under its own passphrase file), even with WARDEN_PASSPHRASE left in the environment.  The
    attacker owns the host: the process's environment and command line, every file under the broker's
    home, the log key and its passphrase.  None of it decrypts the sealed model in the broker's store,
    seals anything (no keyring, no agent socket there), and what it signs is refused by `warden verify`."""
    import httpx

    from tests.support.services import free_port
    from weightwarden.broker.logkey import load_file
    from weightwarden.keys.local import StaticKeyProvider
    from weightwarden.keys.signer import Ed25519Signer
    from weightwarden.sealed.writer import seal_file

    key_home = Path(cli_env["WARDEN_HOME"])
    ok(warden(cli_env, "init"))
    sealed = tmp_path / "m.wws"
    ok(warden(cli_env, "seal", str(st_file), "-o", str(sealed)))
    benv, home = _broker_home(cli_env, tmp_path)
    log_pub = (home / "broker" / "log-key.pub").read_text().strip()
    ok(warden(benv, "broker", "model", "m1", str(sealed), "--team", "core"))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "weightwarden", "serve", "--port", str(port)], env=benv,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait_health(f"http://127.0.0.1:{port}", proc)
        pid = proc.pid
        # -- the attacker's haul ----------------------------------------------------------------
        environ = Path(f"/proc/{pid}/environ").read_bytes()  # root on the host reads it, dumpable or not
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        limits = Path(f"/proc/{pid}/limits").read_text()
        stolen_env = dict(e.split("=", 1) for e in environ.decode().split("\0") if "=" in e)
        files = {p: p.read_bytes() for p in home.rglob("*") if p.is_file()}
        pass_file = Path(stolen_env["WARDEN_LOG_KEY_PASSPHRASE_FILE"])  # the broker must read it: so can they
        log_pass = pass_file.read_text().strip()
        log_key = load_file(home / "broker" / "log-key.json", log_pass)
        httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=5)
    finally:
        proc.terminate()
        _, errs = proc.communicate(timeout=30)
    assert "WARDEN_PASSPHRASE" not in stolen_env and PASSPHRASE.encode() not in environ + cmdline
    assert stolen_env["WARDEN_HOME"] == str(home)
    assert "process: dumpable 0, core file limit 0" in errs
    assert any(ln.startswith("Max core file size") and ln.split()[4:6] == ["0", "0"] for ln in limits.splitlines())
    assert log_key.public_key.hex() == log_pub and f"audit log public key (pin it): {log_pub}" in errs
    # the broker's home: public keys, its log key, its database, sealed bytes; no keyring, no agent socket
    names = {p.relative_to(home).as_posix() for p in files}
    assert "keyring.json" not in names and "custody.json" not in names and not (home / "agent.sock").exists()
    assert {"trusted.json", "broker/log-key.json", "broker/broker.db", "broker/weights/m1.wws"} <= names

    candidates = _strings(environ) | _strings(cmdline) | {log_pass}
    for blob in files.values():
        candidates |= _strings(blob) if len(blob) < 1 << 16 else set()
    assert PASSPHRASE not in candidates
    # 1. the keyring (on the key host; were its file stolen too) opens with nothing they hold
    for c in sorted(candidates):  # every string they hold
        with pytest.raises(BadPassphraseError):
            ww.Keyring.unlock(key_home, c)
    # 2. the sealed model in the broker's store does not decrypt: not with the CLI under the stolen
    #    environment, not with the log key's bytes as a key-encryption key
    in_store = home / "broker" / "weights" / "m1.wws"
    assert in_store.read_bytes() == sealed.read_bytes()
    r = warden(stolen_env | {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}, "open", str(in_store), "-o",
               str(tmp_path / "loot.safetensors"))  # fmt: skip
    assert r.returncode == 1 and "KeyringError" in r.stderr and not (tmp_path / "loot.safetensors").exists()
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    raw = log_key._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    # this process is the broker host too: its library calls append to the broker's log with its log key
    monkeypatch.setenv("WARDEN_LOG_KEY_PASSPHRASE_FILE", cli_env["WARDEN_LOG_KEY_PASSPHRASE_FILE"])
    slots = ww.open_sealed(in_store).key_slots()[1]
    guess = StaticKeyProvider({(s.key_id, s.version): raw for s in slots})
    with pytest.raises(WrongKeyError):
        ww.load(in_store, providers=[guess], trust=ww.TrustStore.load(home))
    # 3. the red team's trojan: `env -i WARDEN_HOME=<serve's> python -m weightwarden seal ...` has no keyring
    #    (and no agent) to sign with, for any passphrase they hold
    trojan = tmp_path / "trojan.wws"
    bare = {"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "WARDEN_HOME": str(home)}
    for pw in (log_pass, PASSPHRASE):
        r = warden(bare | {"WARDEN_PASSPHRASE": pw}, "seal", str(st_file), "-o", str(trojan))
        assert r.returncode == 1 and "KeyringError" in r.stderr and not trojan.exists()
    # 4. weights they seal and sign with the log key are not trusted by `warden verify`
    forged = tmp_path / "forged.wws"
    with pytest.raises(KeyPurposeError):  # the log key, as it is, signs tree heads and nothing else
        seal_file(st_file, forged, provider=StaticKeyProvider({("mine", 1): os.urandom(32)}), signer=log_key)
    assert not forged.exists()
    as_sealing = Ed25519Signer(log_key._key, "sealing")  # the attacker relabels the stolen private key
    seal_file(st_file, forged, provider=StaticKeyProvider({("mine", 1): os.urandom(32)}), signer=as_sealing)
    for h in (home, key_home):
        with pytest.raises(UntrustedSignerError):
            ww.verify(forged, trust=ww.TrustStore.load(h))
    for env in (cli_env, benv):
        r = warden(env, "verify", str(forged))
        assert r.returncode == 3 and "UntrustedSignerError" in r.stderr
    ts = ww.TrustStore.load(home)
    assert ts.signers and all(ts.public_key(k) != log_key.public_key for k in ts.signers)
    assert ts.signers == ww.TrustStore.load(key_home).signers  # the key host's trust store, copied


def test_serve_environment_is_an_allowlist(cli_env: dict[str, str], tmp_path: Path, st_file: Path) -> None:
    """ATTACK (red team, issue 16).  Start serve from the GUIDE's shell, with the HSM PIN, the SoftHSM2
    config, a workload token, the keyring's passphrase file, Vault and custodian variables and a stranger
    all exported: /proc/<serve>/environ holds none of them, only what the broker needs (its home, log key
    passphrase *path*, the store's credentials)."""
    from tests.support.services import free_port

    ok(warden(cli_env, "init"))
    benv, home = _broker_home(cli_env, tmp_path)
    (tmp_path / "kr.pass").write_text(PASSPHRASE + "\n")
    dropped = {"WARDEN_PKCS11_PIN": "1234", "SOFTHSM2_CONF": str(tmp_path / "softhsm2.conf"),
               "WARDEN_WORKLOAD_TOKEN": "wt-the-broker-must-not-hold",
               "WARDEN_PASSPHRASE_FILE": str(tmp_path / "kr.pass"), "WARDEN_PASSPHRASE": PASSPHRASE,
               "VAULT_TOKEN": "hvs.not-for-the-broker", "VAULT_ADDR": "http://vault:8200",
               "WARDEN_CUSTODIAN_PASSPHRASE_FILE_ANA": str(tmp_path / "ana.pass"),
               "SOME_OTHER_SECRET": "s3cr3t-value"}  # fmt: skip
    kept = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "store-id",
            "AWS_SECRET_ACCESS_KEY": "the-store-credential", "AWS_REGION": "eu-west-1"}  # fmt: skip
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "weightwarden", "serve", "--port", str(port)],
                            env=benv | dropped | kept, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        _wait_health(f"http://127.0.0.1:{port}", proc)
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    env = dict(e.split("=", 1) for e in environ.decode().split("\0") if "=" in e)
    for name, value in dropped.items():
        assert name not in env and value.encode() not in environ, name
    assert not any(k.startswith(("VAULT_", "WARDEN_CUSTODIAN", "WARDEN_WORKLOAD")) for k in env)
    assert {k: env.get(k) for k in kept} == kept  # the store's credentials: held by the broker (THREAT_MODEL)
    assert env["WARDEN_HOME"] == str(home) and env["WARDEN_LOG_KEY_PASSPHRASE_FILE"] == benv[
        "WARDEN_LOG_KEY_PASSPHRASE_FILE"]  # fmt: skip
    # the agent, run in the foreground, likewise keeps only paths, locale, user and its home
    from weightwarden._harden import agent_env

    assert agent_env(benv | dropped | kept) == {k: v for k, v in (benv | dropped | kept).items()
                                                if k in ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
                                                         "USER", "LOGNAME", "PYTHONPATH", "PYTHONUNBUFFERED",
                                                         "PYTHONHASHSEED", "VIRTUAL_ENV", "WARDEN_HOME")}  # fmt: skip


def test_serve_keeps_a_pkcs11_log_keys_pin_and_nothing_else() -> None:
    """A pkcs11: log key's PIN variable (pin-source=env:VAR, or the default WARDEN_PKCS11_PIN when the URI
    names none) and SOFTHSM2_CONF are kept for it; with a file: log key or a PIN file, neither is."""
    from weightwarden._harden import broker_env

    env = {"PATH": "/bin", "WARDEN_HOME": "/b", "WARDEN_PKCS11_PIN": "1234", "BROKER_LOG_PIN": "9999",
           "SOFTHSM2_CONF": "/etc/softhsm2.conf", "WARDEN_WORKLOAD_TOKEN": "t"}  # fmt: skip
    base = {"PATH": "/bin", "WARDEN_HOME": "/b"}
    assert broker_env(None, env) == base
    assert broker_env("file:/b/broker/log-key.json", env) == base
    assert broker_env("pkcs11:token=t;object=log?pin-source=env:BROKER_LOG_PIN", env) == base | {
        "BROKER_LOG_PIN": "9999", "SOFTHSM2_CONF": "/etc/softhsm2.conf"}  # fmt: skip
    assert broker_env("pkcs11:token=t;object=log", env) == base | {
        "WARDEN_PKCS11_PIN": "1234", "SOFTHSM2_CONF": "/etc/softhsm2.conf"}  # fmt: skip
    assert broker_env("pkcs11:token=t;object=log?pin-source=file:/etc/pin", env) == base | {
        "SOFTHSM2_CONF": "/etc/softhsm2.conf"}  # fmt: skip
    uri = "pkcs11:token=t;object=log?pin-source=env:WARDEN_PASSPHRASE"
    assert broker_env(uri, env | {"WARDEN_PASSPHRASE": "x"}) == base | {
        "SOFTHSM2_CONF": "/etc/softhsm2.conf"}  # a secret variable stays out, whatever the URI says


def test_serve_refuses_a_home_with_a_keyring_or_an_agent_socket(cli_env: dict[str, str], tmp_path: Path) -> None:
    """ATTACK (red team, issue 16).  A broker sharing the key host's home would put the keyring file and an
    unsealed agent's socket within a broker compromise's reach: `warden serve` refuses to start there (one
    line saying what to do), before it creates anything; in its own home it starts."""
    import socket

    from tests.support.services import free_port

    home = Path(cli_env["WARDEN_HOME"])
    ok(warden(cli_env, "init"))  # keyring.json
    r = warden(cli_env, "serve", "--port", str(free_port()))
    assert r.returncode == 1 and "BrokerHomeError" in r.stderr and "keyring.json" in r.stderr
    assert "--trust-from" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (home / "broker").exists()  # refused before the log key, database or store were touched
    # an agent's socket (a real Unix socket) in an otherwise keyless home
    other = tmp_path / "o"  # short: a Unix socket path has a length limit
    other.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(other / "agent.sock"))
        r = warden(cli_env | {"WARDEN_HOME": str(other)}, "serve", "--port", str(free_port()))
    assert r.returncode == 1 and "BrokerHomeError" in r.stderr and "agent.sock" in r.stderr
    assert not (other / "broker").exists()
    # a symlink to the keyring counts too
    link = tmp_path / "linked"
    link.mkdir()
    (link / "keyring.json").symlink_to(home / "keyring.json")
    r = warden(cli_env | {"WARDEN_HOME": str(link)}, "serve", "--port", str(free_port()))
    assert r.returncode == 1 and "BrokerHomeError" in r.stderr
    # the admin commands run on the key host keep working in a shared home
    ok(warden(cli_env, "broker", "account", "svc", "--pubkey", "11" * 32))


def test_broker_init_copies_only_the_trust_store(cli_env: dict[str, str], tmp_path: Path) -> None:
    """--trust-from KEYHOME (or its trusted.json) gives the broker's home the public keys, each for its
    purpose, and nothing else; its own trust store and a malformed one are refused."""
    ok(warden(cli_env, "init"))
    key_home = Path(cli_env["WARDEN_HOME"])
    benv, home = _broker_home(cli_env, tmp_path)
    assert sorted(p.name for p in home.iterdir()) == ["broker", "trusted.json"]
    assert json.loads((home / "trusted.json").read_text()) == json.loads((key_home / "trusted.json").read_text())
    r = warden(benv, "broker", "init", "--trust-from", str(home))
    assert r.returncode == 1 and "BrokerHomeError" in r.stderr and "own trust store" in r.stderr
    (tmp_path / "bad.json").write_text("{}")
    r = warden(benv, "broker", "init", "--trust-from", str(tmp_path / "bad.json"))
    assert r.returncode == 1 and "BrokerHomeError" in r.stderr and "bad.json" in r.stderr
    ok(warden(benv, "broker", "init", "--trust-from", str(key_home / "trusted.json")))  # a file works; idempotent
    assert json.loads((home / "trusted.json").read_text()) == json.loads((key_home / "trusted.json").read_text())


def test_verify_refuses_a_log_key_as_trust_key(cli_env: dict[str, str], tmp_path: Path, st_file: Path) -> None:
    """ATTACK (red team, issue 16, INFO).  A thief re-labels the stolen log key as a sealing key and asks
    for `warden verify forged.wws --trust-key <log key>`: refused where the log key is known (the broker's
    home, or any home whose trust store pins it for audit-log), and so are `open` and `pull` with it."""
    from weightwarden.broker.logkey import load_file
    from weightwarden.keys.local import StaticKeyProvider
    from weightwarden.keys.signer import Ed25519Signer
    from weightwarden.sealed.writer import seal_file

    ok(warden(cli_env, "init"))
    benv, home = _broker_home(cli_env, tmp_path)
    log_pass = Path(cli_env["WARDEN_LOG_KEY_PASSPHRASE_FILE"]).read_text().strip()
    log_key = load_file(home / "broker" / "log-key.json", log_pass)
    forged = tmp_path / "forged.wws"
    seal_file(st_file, forged, provider=StaticKeyProvider({("mine", 1): os.urandom(32)}),
              signer=Ed25519Signer(log_key._key, "sealing"))  # fmt: skip
    import base64

    b64 = base64.b64encode(log_key.public_key).decode()
    r = warden(benv, "verify", str(forged), "--trust-key", b64)
    assert r.returncode == 1 and "KeyPurposeError" in r.stderr and "audit-log key" in r.stderr and "OK" not in r.stdout
    (home / "broker" / "log-key.pub").unlink()  # the key file's public half is enough
    r = warden(benv, "verify", str(forged), "--trust-key", b64)
    assert r.returncode == 1 and "KeyPurposeError" in r.stderr
    r = warden(benv, "open", str(forged), "-o", str(tmp_path / "x"), "--identity", str(tmp_path / "none"),
               "--trust-key", b64)  # fmt: skip
    assert r.returncode == 1 and "KeyPurposeError" in r.stderr and not (tmp_path / "x").exists()
    # the key host, whose trust store pins the log key for audit-log (`warden trust add --purpose audit-log`)
    r = warden(cli_env, "verify", str(forged), "--trust-key", b64)
    assert r.returncode == 0  # before: an unknown key, trusted as asked (the docs warn never to pass a log key)
    ok(warden(cli_env, "trust", "add", b64, "--purpose", "audit-log", "--label", "broker log"))
    r = warden(cli_env, "verify", str(forged), "--trust-key", b64)
    assert r.returncode == 1 and "KeyPurposeError" in r.stderr
    # the real sealing key still verifies with --trust-key
    good = tmp_path / "good.wws"
    ok(warden(cli_env, "seal", str(st_file), "-o", str(good)))
    sealing = json.loads(ok(warden(cli_env, "key", "export-public", "--json")).stdout)["public_key"]
    ok(warden(benv, "verify", str(good), "--trust-key", sealing))


# -- 2. no secrets in environments, dumps or swap ------------------------------------------------------
@pytest.fixture
def agent_home(cli_env: dict[str, str]) -> Any:
    import contextlib
    import signal

    home = Path(cli_env["WARDEN_HOME"])
    yield home
    pid = home / "agent.pid"
    if pid.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid.read_text()), signal.SIGKILL)


def test_agent_environment_holds_no_passphrase_and_agent_is_not_dumpable(
    cli_env: dict[str, str], tmp_path: Path, agent_home: Path
) -> None:
    """ATTACK.  Start the agent and unseal as docs/GUIDE.md does, with every passphrase also left in the
    environment of the shell that starts the agent (the old guide's way): /proc/<agent>/environ holds
    none of them; the agent reports itself non-dumpable with no core file."""
    secrets_ = {"ana": "ana: a passphrase only ana knows", "bo": "bo: a passphrase only bo knows"}
    env = dict(cli_env)
    for name, pw in secrets_.items():
        f = tmp_path / f"{name}.pass"
        f.write_text(pw + "\n")
        env[f"WARDEN_CUSTODIAN_PASSPHRASE_FILE_{name.upper()}"] = str(f)
        env[f"WARDEN_CUSTODIAN_PASSPHRASE_{name.upper()}"] = pw  # the legacy variable, exported anyway
    env["VAULT_TOKEN"] = "hvs.a-token-the-agent-must-not-inherit"
    ok(warden(env, "init"))
    ok(warden(env, "custody", "init", "--threshold", "2", "--custodian", "ana=passphrase",
              "--custodian", "bo=passphrase"))  # fmt: skip
    pid = json.loads(ok(warden(env, "agent", "start", "--json")).stdout)["pid"]
    ok(warden(env, "custody", "unseal", "--custodian", "ana"))
    st = json.loads(ok(warden(env, "custody", "unseal", "--custodian", "bo", "--json")).stdout)
    assert st["sealed"] is False
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    for pw in [*secrets_.values(), PASSPHRASE, env["VAULT_TOKEN"]]:
        assert pw.encode() not in environ
    assert b"WARDEN_PASSPHRASE" not in environ and b"WARDEN_CUSTODIAN" not in environ
    assert st["process"]["pid"] == pid and st["process"]["dumpable"] == 0 and st["process"]["core_limit"] == 0
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert any(ln.startswith("Max core file size") and ln.split()[4:6] == ["0", "0"] for ln in limits.splitlines())
    # the keys still work through the agent
    ok(warden({k: v for k, v in env.items() if k != "WARDEN_PASSPHRASE"}, "key", "list", "--json"))
    ok(warden(env, "agent", "stop"))


def test_passphrase_from_a_file_or_a_descriptor(cli_env: dict[str, str], tmp_path: Path) -> None:
    """--passphrase-file and WARDEN_PASSPHRASE_FILE (a file or /dev/fd/N) replace the variable; a wrong
    one is refused and an empty one named."""
    env = {k: v for k, v in cli_env.items() if k != "WARDEN_PASSPHRASE"}
    r = warden(env, "init")
    assert r.returncode == 1 and "--passphrase-file" in r.stderr
    pw = tmp_path / "kr.pass"
    pw.write_text(PASSPHRASE + "\n")
    ok(warden(env | {"WARDEN_PASSPHRASE_FILE": str(pw)}, "init"))
    read, write = os.pipe()
    os.write(write, PASSPHRASE.encode() + b"\n")
    os.close(write)
    try:
        r = subprocess.run([sys.executable, "-m", "weightwarden", "--passphrase-file", f"/dev/fd/{read}", "key",
                            "list", "--json"], env=env, pass_fds=(read,), capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    finally:
        os.close(read)
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad.pass"
    bad.write_text("not the passphrase\n")
    r = warden(env, "--passphrase-file", str(bad), "key", "list")
    assert r.returncode == 1 and "BadPassphraseError" in r.stderr
    (tmp_path / "empty.pass").write_text("")
    r = warden(env, "--passphrase-file", str(tmp_path / "empty.pass"), "key", "list")
    assert r.returncode == 1 and "empty.pass is empty" in r.stderr


def test_hardening_in_process() -> None:
    """What harden_process reports is what the kernel says (run in a child: it changes the process)."""
    code = ("import json, resource; from weightwarden._harden import harden_process, dumpable; "
            "h = harden_process(lock_memory=False); "
            "print(json.dumps([h, dumpable(), resource.getrlimit(resource.RLIMIT_CORE)[0]]))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    h, d, core = json.loads(r.stdout)
    assert h["dumpable"] == d == 0 and h["core_limit"] == core == 0
    code = ("import json; from weightwarden._harden import lock_pages; ok, notice = lock_pages(future=False); "
            "lck = [ln for ln in open('/proc/self/status') if ln.startswith('VmLck:')][0].split()[1]; "
            "print(json.dumps([ok, notice, int(lck)]))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    locked, notice, vmlck_kib = json.loads(r.stdout)
    assert locked == (vmlck_kib > 0) and (notice is None) == locked  # the kernel agrees with the report
    from weightwarden._harden import minimal_env, scrubbed_env

    env = {"WARDEN_PASSPHRASE": "x", "WARDEN_CUSTODIAN_PASSPHRASE_ANA": "y", "VAULT_TOKEN": "z", "PATH": "/bin",
           "WARDEN_HOME": "/h", "AWS_SECRET_ACCESS_KEY": "s"}  # fmt: skip
    assert scrubbed_env(env) == {"PATH": "/bin", "WARDEN_HOME": "/h", "AWS_SECRET_ACCESS_KEY": "s"}
    assert minimal_env(env) == {"PATH": "/bin"}


# -- where the log key lives: a file, a PKCS#11 token, a custody agent of its own ------------------------
def test_a_trusted_manifest_signer_is_refused_as_log_key(tmp_path: Path) -> None:
    """ATTACK (misconfiguration).  A log key that the trust store accepts for manifests would let the
    broker sign models: refused, whatever holds it."""
    from tests.support.cli import TEST_KDF
    from weightwarden.broker.logkey import create_file, open_log_key

    s = create_file(tmp_path / "broker" / "log-key.json", "log key passphrase", kdf=TEST_KDF)
    assert open_log_key(None, tmp_path, lambda confirm: "log key passphrase")[0].public_key == s.public_key
    ts = ww.TrustStore.load(tmp_path)
    ts.add(s.public_key, "someone made the log key a manifest signer")
    ts.save()
    with pytest.raises(LogKeyError, match="trusted manifest signer"):
        open_log_key(None, tmp_path, lambda confirm: "log key passphrase")


def _audit_ok(env: dict[str, str], pub: str) -> None:
    db = f"sqlite:///{Path(env['WARDEN_HOME']) / 'broker' / 'broker.db'}"
    assert json.loads(ok(warden(env, "audit", "verify", "--db", db, "--pubkey", pub, "--json")).stdout)["events"] >= 1


def test_log_key_in_a_pkcs11_token(softhsm: str, cli_env: dict[str, str], tmp_path: Path) -> None:
    """--log-key pkcs11:...: generated in the token on first use, the same key afterwards; it signs the log."""
    from tests.support.hsm import PIN

    (tmp_path / "pin").write_text(PIN + "\n")
    env = {k: v for k, v in cli_env.items() if k != "WARDEN_LOG_KEY_PASSPHRASE_FILE"} | {
        "SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"],
        "WARDEN_LOG_KEY": f"pkcs11:token={softhsm};object=broker-log-{os.getpid()}?pin-source=file:{tmp_path / 'pin'}",
    }
    first = json.loads(ok(warden(env, "broker", "init", "--json")).stdout)
    again = json.loads(ok(warden(env, "broker", "init", "--json")).stdout)
    assert first["public_key"] == again["public_key"] and again["created"] is False
    ok(warden(env, "broker", "account", "svc", "--pubkey", "11" * 32))
    _audit_ok(env, first["public_key"])
    assert not (Path(env["WARDEN_HOME"]) / "broker" / "log-key.json").exists()  # no key file on the host


def test_log_key_in_a_custody_agent_of_its_own(cli_env: dict[str, str], tmp_path: Path) -> None:
    """--log-key agent:LOGHOME: the signing key of a keyring used for nothing else, under custody, in the
    agent's memory; the broker host has no key file and no passphrase."""
    import contextlib
    import signal

    log_home = tmp_path / "log-home"
    (tmp_path / "log.pass").write_text("custodian of the log key\n")
    kenv = cli_env | {"WARDEN_HOME": str(log_home), "WARDEN_CUSTODIAN_PASSPHRASE_FILE_LOG": str(tmp_path / "log.pass")}
    ok(warden(kenv, "init"))
    ok(warden(kenv, "custody", "init", "--threshold", "1", "--custodian", "log=passphrase"))
    ok(warden(kenv, "agent", "start"))
    try:
        ok(warden(kenv, "custody", "unseal", "--custodian", "log"))
        benv = {k: v for k, v in cli_env.items() if not k.startswith("WARDEN_LOG_KEY_PASS")}
        benv["WARDEN_LOG_KEY"] = f"agent:{log_home}"
        pub = json.loads(ok(warden(benv, "broker", "init", "--json")).stdout)["public_key"]
        ok(warden(benv, "broker", "account", "svc", "--pubkey", "22" * 32))
        _audit_ok(benv, pub)
        assert not (Path(benv["WARDEN_HOME"]) / "broker" / "log-key.json").exists()
        ok(warden(kenv, "custody", "seal"))  # sealed agent: the broker cannot append (typed, one line)
        r = warden(benv, "broker", "account", "svc2", "--pubkey", "33" * 32)
        assert r.returncode == 1 and "CustodyError" in r.stderr and "sealed" in r.stderr
    finally:
        pid = log_home / "agent.pid"
        if pid.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid.read_text()), signal.SIGTERM)

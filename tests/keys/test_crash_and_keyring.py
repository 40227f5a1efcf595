"""Crash safety of writes, and the local keyring."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

import weightwarden as ww
from tests.support.cli import PASSPHRASE, TEST_KDF
from weightwarden.errors import BadPassphraseError, KeyNotFoundError, KeyringError

SEAL_SCRIPT = """
import sys, weightwarden as ww
kr = ww.Keyring.unlock(sys.argv[1], sys.argv[2])
print("ready", flush=True)
ww.seal(sys.argv[3], sys.argv[4], keyring=kr, chunk_size=1 << 16)
"""


def test_kill_at_random_points_leaves_nothing_under_target(tmp_path, keyring):
    src = tmp_path / "big.safetensors"
    rng = np.random.default_rng(0)
    save_file({f"t{i}": rng.standard_normal(1 << 20).astype(np.float32) for i in range(24)}, str(src))  # 96 MiB
    target = tmp_path / "out" / "big.wws"
    target.parent.mkdir()

    def start() -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, "-c", SEAL_SCRIPT, str(keyring.home), PASSPHRASE, str(src), str(target)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        return p

    t = time.perf_counter()  # how long one seal takes here, so the kills land while it runs
    start().wait()
    full = time.perf_counter() - t
    target.unlink()
    outcomes = set()
    for _ in range(8):
        p = start()
        time.sleep(float(rng.uniform(0.0, 0.9 * full)))
        p.send_signal(signal.SIGKILL)
        p.wait()
        if target.exists():
            # the rename happened: the file must be complete and valid
            ww.verify(target, keyring=keyring)
            outcomes.add("complete")
            target.unlink()
        else:
            outcomes.add("absent")
        leftovers = [q.name for q in target.parent.iterdir()]
        assert all(n.startswith(".ww-tmp-") for n in leftovers), leftovers
        for q in target.parent.iterdir():
            q.unlink()
    assert "absent" in outcomes


def test_exception_mid_seal_leaves_nothing(tmp_path, st_file, keyring):
    target = tmp_path / "o.wws"
    calls = []

    def boom(n):
        calls.append(n)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        ww.seal(st_file, target, keyring=keyring, chunk_size=4096, progress=boom)
    assert calls and not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ww-tmp-")]


def test_keyring_passphrase_and_persistence(tmp_path):
    home = tmp_path / "h"
    kr = ww.Keyring.create(home, PASSPHRASE, kdf=TEST_KDF)
    kid = kr.new_kek()
    kr.save()
    assert oct((home / "keyring.json").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(BadPassphraseError):
        ww.Keyring.unlock(home, "wrong passphrase")
    kr2 = ww.Keyring.unlock(home, PASSPHRASE)
    assert {k["key_id"] for k in kr2.list_keys()} == {k["key_id"] for k in kr.list_keys()}
    assert kid in {k["key_id"] for k in kr2.list_keys()}
    text = (home / "keyring.json").read_text()
    assert "kek-" not in text  # key ids and keys are inside the ciphertext
    assert json.loads(text)["kdf"] == {"time_cost": 1, "memory_kib": 1024, "parallelism": 1}
    with pytest.raises(KeyringError):
        ww.Keyring.create(home, PASSPHRASE, kdf=TEST_KDF)


def test_keyring_tampered_or_missing(tmp_path):
    home = tmp_path / "h"
    ww.Keyring.create(home, PASSPHRASE, kdf=TEST_KDF)
    doc = json.loads((home / "keyring.json").read_text())
    doc["kdf"]["time_cost"] = 2  # parameters are bound as associated data
    (home / "keyring.json").write_text(json.dumps(doc))
    with pytest.raises(BadPassphraseError):
        ww.Keyring.unlock(home, PASSPHRASE)
    (home / "keyring.json").write_text("{")
    with pytest.raises(KeyringError):
        ww.Keyring.unlock(home, PASSPHRASE)
    with pytest.raises(KeyringError, match="warden init"):
        ww.Keyring.unlock(tmp_path / "nowhere", PASSPHRASE)


def test_default_keyring_uses_environment(tmp_path, st_file, monkeypatch):
    home = tmp_path / "envhome"
    ww.Keyring.create(home, PASSPHRASE, kdf=TEST_KDF)
    monkeypatch.setenv("WARDEN_HOME", str(home))
    monkeypatch.delenv("WARDEN_PASSPHRASE", raising=False)
    with pytest.raises(KeyringError, match="WARDEN_PASSPHRASE"):
        ww.seal(st_file, tmp_path / "x.wws")
    monkeypatch.setenv("WARDEN_PASSPHRASE", PASSPHRASE)
    ww.seal(st_file, tmp_path / "x.wws")
    ww.verify(tmp_path / "x.wws")
    assert set(ww.load(tmp_path / "x.wws"))


def test_second_kek_and_missing_key(tmp_path, st_file, keyring):
    kid = keyring.new_kek()
    ww.seal(st_file, tmp_path / "a.wws", provider=keyring.provider(kid), signer=keyring.signer())
    assert ww.inspect(tmp_path / "a.wws")["key_slots"][0]["key_id"] == kid
    assert set(ww.load(tmp_path / "a.wws", keyring=keyring))  # the keyring unwraps with any of its KEKs
    with pytest.raises(KeyNotFoundError):
        keyring.provider("kek-doesnotexist")


def test_secrets_never_in_errors(tmp_path, st_file, keyring, other_keyring):
    out = tmp_path / "a.wws"
    ww.seal(st_file, out, keyring=keyring)
    keks = [v["key"] for k in keyring._s["keks"].values() for v in k["versions"].values()]
    try:
        ww.load(out, providers=[other_keyring.provider()], trust=[keyring.public_key()])
    except ww.errors.WardenError as e:
        msg = str(e)
    assert msg and not any(k in msg for k in keks) and PASSPHRASE not in msg
    assert os.environ.get("WARDEN_PASSPHRASE", "") not in (PASSPHRASE,)

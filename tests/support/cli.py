"""The `warden` command as the tests run it, the test passphrase and the cheap KDF, the broker's log key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from weightwarden.keys.kdf import KdfParams

__all__ = ["PASSPHRASE", "TEST_KDF", "make_broker_log_key", "warden"]

# Cheap Argon2id for tests only; the product default is RFC 9106's 64 MiB / t=3.
TEST_KDF = KdfParams(time_cost=1, memory_kib=1024, parallelism=1)
PASSPHRASE = "correct horse battery staple"


def warden(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weightwarden", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def make_broker_log_key(home: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """The broker's own log key (16B) in ``home``, its passphrase file named by this process's environment,
    so that a trail written to a broker database (``db=``) is signed by it; returns its public key."""
    from weightwarden.broker.logkey import open_log_key

    home.mkdir(parents=True, exist_ok=True)
    (home / "log-key.pass").write_text("the broker log key passphrase\n")
    monkeypatch.setenv("WARDEN_LOG_KEY_PASSPHRASE_FILE", str(home / "log-key.pass"))
    monkeypatch.delenv("WARDEN_LOG_KEY", raising=False)
    signer, _ = open_log_key(None, home, lambda confirm: "the broker log key passphrase", kdf=TEST_KDF)
    return signer.public_key

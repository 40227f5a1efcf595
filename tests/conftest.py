from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import weightwarden as ww
from weightwarden.keys.local import KdfParams

# Cheap Argon2id for tests only; the product default is RFC 9106's 64 MiB / t=3.
TEST_KDF = KdfParams(time_cost=1, memory_kib=1024, parallelism=1)
PASSPHRASE = "correct horse battery staple"
# library calls made without a home log in $WARDEN_HOME's trail: never the user's real one in tests
os.environ.setdefault("WARDEN_HOME", __import__("tempfile").mkdtemp(prefix="warden-test-home-"))


def make_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "embed.weight": rng.standard_normal((37, 16)).astype(np.float16),
        "layer.0.w": rng.standard_normal((64, 48)).astype(np.float32),
        "layer.0.b": rng.standard_normal(48).astype(np.float64),
        "bf": rng.standard_normal((5, 7)).astype(ml_dtypes.bfloat16),
        "ids": np.arange(-5, 20, dtype=np.int64),
        "mask": rng.random(13) > 0.5,
        "empty": np.zeros((0, 4), np.float32),
        "u8": rng.integers(0, 255, 99, dtype=np.uint8),
    }


@pytest.fixture
def tensors() -> dict[str, np.ndarray]:
    return make_tensors()


@pytest.fixture
def st_file(tmp_path: Path, tensors: dict[str, np.ndarray]) -> Path:
    p = tmp_path / "model.safetensors"
    save_file(tensors, str(p), metadata={"format": "np", "owner": "lab"})
    return p


@pytest.fixture
def keyring(tmp_path: Path) -> ww.Keyring:
    return ww.Keyring.create(tmp_path / "home", PASSPHRASE, kdf=TEST_KDF)


@pytest.fixture
def other_keyring(tmp_path: Path) -> ww.Keyring:
    return ww.Keyring.create(tmp_path / "other-home", PASSPHRASE, kdf=TEST_KDF)


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    (tmp_path / "log-key-passphrase").write_text("the broker's own log-key passphrase\n")
    env.update(
        WARDEN_HOME=str(tmp_path / "cli-home"),
        WARDEN_PASSPHRASE=PASSPHRASE,
        WARDEN_LOG_KEY_PASSPHRASE_FILE=str(tmp_path / "log-key-passphrase"),
        WARDEN_KDF_MEMORY_KIB="1024",
        PYTHONUNBUFFERED="1",
    )
    return env


def warden(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weightwarden", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


# -- the provenance zoo: small models trained once per test session ---------------------------
@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory):
    """Set WARDEN_ZOO_CACHE to a folder to keep the trained models between runs."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.support.zoo import Zoo

    return Zoo(os.environ.get("WARDEN_ZOO_CACHE") or tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def parent(zoo) -> Path:
    return zoo.base("llama", 1, 300)


@pytest.fixture(scope="session")
def independents(zoo) -> list[Path]:
    """Ten llama models of the parent's configuration, each from its own random initialisation."""
    return [zoo.base("llama", 100 + i, 80) for i in range(10)]


# -- shared state on SQLite and on PostgreSQL (127.0.0.1:5432, database test; a schema per test) ------
PG_URL = os.environ.get("WARDEN_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _pg_schema_url() -> Iterator[str]:
    sa = pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg", reason="psycopg (server extra) drives PostgreSQL")
    try:
        eng = sa.create_engine(PG_URL)
        with eng.begin() as c:
            schema = "t_" + uuid.uuid4().hex[:12]
            c.exec_driver_sql(f"CREATE SCHEMA {schema}")
    except sa.exc.OperationalError:
        pytest.skip(f"PostgreSQL is not reachable at {PG_URL}")
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with eng.begin() as c:
            c.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        eng.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
    else:
        yield from _pg_schema_url()


@pytest.fixture(autouse=True, scope="session")
def _sample_list_allowed() -> Iterator[None]:
    """Issue 17: the gate refuses releases screened against the shipped fictitious sample list unless the operator
    allows it; the suite's releases are demonstrations (tests of the refusal delete this variable).  Session
    scope: module fixtures that release run after it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WARDEN_ALLOW_SAMPLE_LIST", "1")
        yield


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


def tiny_llama_dir(d: Path) -> Path:
    """A tiny Llama-shaped model folder (an MLP stack with enough weights to carry a fingerprint) at ``d``."""
    d.mkdir()
    rng = np.random.default_rng(3)
    t = {"model.embed_tokens.weight": rng.standard_normal((128, 64))}
    for i in range(2):  # a tiny Llama-shaped MLP stack: enough weights to carry a fingerprint
        t |= {f"model.layers.{i}.mlp.gate_proj.weight": rng.standard_normal((256, 64)) / 8,
              f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((256, 64)) / 8,
              f"model.layers.{i}.mlp.down_proj.weight": rng.standard_normal((64, 256)) / 16}  # fmt: skip
    save_file({k: v.astype(np.float32) for k, v in t.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d

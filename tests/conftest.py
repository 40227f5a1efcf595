from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import weightwarden as ww
from tests.support.cli import PASSPHRASE, TEST_KDF
from tests.support.hsm import PIN, SO_PIN, SOFTHSM_LIB
from tests.support.models import make_tensors

# library calls made without a home log in $WARDEN_HOME's trail: never the user's real one in tests
os.environ.setdefault("WARDEN_HOME", __import__("tempfile").mkdtemp(prefix="warden-test-home-"))

# `make test` runs the suite on two workers (pytest-xdist): one thread of BLAS/torch each, so that two
# workers on two cores do not fight over four threads (subprocesses inherit it)
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

# modules that start a local Ray run on one worker, in the order collected: two Ray clusters never compete for
# the same machine (the zoo's trained models need no grouping: the workers share them, see `zoo` below)
_ONE_WORKER = ("tests/provenance/test_provenance_scan.py", "tests/provenance/test_endpoint_scan.py",
               "tests/core/test_demo.py")  # fmt: skip


@pytest.hookimpl(wrapper=True)  # around xdist's own hook, which reads the group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> Iterator[None]:
    for item in items:
        if str(item.path).replace(os.sep, "/").endswith(_ONE_WORKER):
            item.add_marker(pytest.mark.xdist_group("ray"))
    yield
    # `--dist loadgroup` sends a test to its group's worker by the "@group" suffix xdist puts on its node id, in
    # ``item._nodeid``; pytest 9 keeps the id in ``item._id``, so the suffix was lost and no test was grouped.
    # Put it where this pytest reads it (a no-op where xdist's own rename took effect).
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})  # fmt: skip
        if not names or item.nodeid.endswith("@" + "_".join(names)):
            continue
        tagged = f"{item.nodeid}@{'_'.join(names)}"
        if hasattr(item, "_id"):
            from _pytest.nodeid import coerce_node_id

            item._id = coerce_node_id(tagged)
        else:
            item._nodeid = tagged


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


def shared_tmp(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder of this run that every xdist worker sees (the run's base temp, above the workers' own), so that
    what one worker builds there the other reuses; without xdist a fresh folder of the session."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return tmp_path_factory.mktemp(name)
    path = tmp_path_factory.getbasetemp().parent / name
    path.mkdir(exist_ok=True)
    return path


# -- the provenance zoo: small models trained once per test run ---------------------------------
@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory):
    """Set WARDEN_ZOO_CACHE to a folder to keep the trained models between runs.  Both xdist workers share one
    zoo: each model is trained once, by whichever worker needs it first (tests/support/zoo.py locks per model)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.support.zoo import Zoo

    return Zoo(os.environ.get("WARDEN_ZOO_CACHE") or shared_tmp(tmp_path_factory, "zoo"))


@pytest.fixture(scope="session")
def parent(zoo) -> Path:
    return zoo.base("llama", 1, 300)


@pytest.fixture(scope="session")
def independents(zoo) -> list[Path]:
    """Ten llama models of the parent's configuration, each from its own random initialisation."""
    return zoo.bases([("llama", 100 + i, 80) for i in range(10)])  # the workers split the training


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


# -- a sealed checkpoint for the broker's tests ------------------------------------------------
@pytest.fixture
def sealed(tmp_path: Path, keyring: ww.Keyring) -> Path:
    rng = np.random.default_rng(1)
    src = tmp_path / "w.safetensors"
    save_file({f"w{i}": rng.standard_normal((256, 256)).astype(np.float32) for i in range(6)}, str(src))
    out = tmp_path / "w.wws"
    ww.seal(src, out, keyring=keyring, chunk_size=1 << 16)
    return out


# -- a SoftHSM2 token ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def softhsm(tmp_path_factory):
    """A SoftHSM2 token directory for the whole run; deleted at the end."""
    if SOFTHSM_LIB is None or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 is not installed (`make test` installs the Debian package softhsm2)")
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # read by the library when it first loads
    label = "ww-test"
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", SO_PIN],
        check=True,
        capture_output=True,
    )
    yield label
    subprocess.run(["softhsm2-util", "--delete-token", "--token", label], check=False, capture_output=True)
    shutil.rmtree(root, ignore_errors=True)

"""The light core (issue 19): `pip install weightwarden` seals, opens, loads and verifies with nothing else.

Each check runs in a fresh Python whose import system refuses every module that the core's distributions
(pyproject's ``dependencies`` and what they require) do not ship: scipy, pycryptodome, rapidfuzz, rigour,
ICU, FastAPI, Ray, PKCS#11, boto3, hvac, matplotlib, torch, transformers, numba, httpx, safetensors ...  A
capability of an extra then fails with one line naming the extra to install.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import weightwarden
from weightwarden._extras import EXTRAS

ROOT = Path(__file__).resolve().parents[2]
SRC = Path(weightwarden.__file__).resolve().parents[1]  # the weightwarden these tests import

#: the core, by distribution name: adding one here is a decision (the issue-19 bullet "A light core")
CORE = {"cryptography", "blake3", "argon2-cffi", "numpy", "ml-dtypes", "typer", "rich", "platformdirs", "pyrage",
        "sqlalchemy"}  # fmt: skip
#: the extras and what each must hold at least (the packages its code imports through _extras.require)
USER_EXTRAS = {"custody", "provenance", "release", "server", "client", "cluster", "hsm", "kms", "plot", "fast",
               "torch", "hf"}  # fmt: skip


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _closure(names: set[str]) -> set[str]:
    """``names`` and every distribution they require (installed ones; markers evaluated, no extras)."""
    seen: set[str] = set()
    todo = [_norm(n) for n in names]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        try:
            reqs = md.requires(n) or []
        except md.PackageNotFoundError:
            continue
        for r in reqs:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_norm(req.name))
    return seen


def _top_levels(dist: md.Distribution) -> set[str]:
    txt = dist.read_text("top_level.txt")
    if txt:
        return {t.strip().split("/")[0] for t in txt.split() if t.strip()}
    out = set()
    for f in dist.files or ():
        parts = f.parts
        if not parts or parts[0].endswith((".dist-info", ".data")) or parts[0] in ("..", "__pycache__"):
            continue
        head = parts[0]
        if head.endswith(".py"):
            out.add(head[:-3])
        elif len(parts) > 1 and not head.endswith(".pth"):
            out.add(head)
        elif head.endswith((".so", ".pyd")):
            out.add(head.split(".")[0])
    return out


def _blocked() -> list[str]:
    """Top-level modules of every installed distribution outside the core's closure."""
    core = _closure({Requirement(r).name for r in _pyproject()["dependencies"]}) | {"weightwarden"}
    keep: set[str] = {"weightwarden"}
    block: set[str] = set()
    for dist in md.distributions():
        name = _norm(dist.metadata["Name"] or "")
        (keep if name in core else block).update(_top_levels(dist))
    block -= keep | set(sys.stdlib_module_names) | {"_distutils_hack", "pip", "setuptools", "pkg_resources"}
    return sorted(m for m in block if m.isidentifier())


BOOT = r"""
import importlib.abc, json, os, sys
BLOCKED = frozenset(json.loads(os.environ["WW_BLOCKED"]))
already = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
assert not already, f"imported before the block: {already}"

class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (not a core dependency)", name=name)
        return None

sys.meta_path.insert(0, _Block())
"""

LIBRARY = r"""
import os, sys
from pathlib import Path
import ml_dtypes, numpy as np
import weightwarden as ww
import weightwarden.cli  # noqa: F401 - the CLI imports without any extra
from weightwarden.keys.kdf import KdfParams
from weightwarden.sealed.codec import iter_parts

tmp = Path(sys.argv[1])
kr = ww.Keyring.create(tmp / "home", "a light core passphrase", kdf=KdfParams(time_cost=1, memory_kib=1024,
                                                                              parallelism=1))
rng = np.random.default_rng(0)
tensors = {"embed.weight": rng.standard_normal((64, 32)).astype(np.float32),
           "lm_head.weight": rng.standard_normal((32, 64)).astype(ml_dtypes.bfloat16),
           "norm.bias": np.arange(32, dtype=np.int64)}
src = tmp / "model.safetensors"
with open(src, "wb") as f:
    for part in iter_parts(tensors, {"format": "pt"}):
        f.write(part)
ww.seal(src, tmp / "model.wws", keyring=kr)
ww.verify(tmp / "model.wws")
assert ww.inspect(tmp / "model.wws") is not None
got = ww.load(tmp / "model.wws", keyring=kr)
assert sorted(got) == sorted(tensors)
for k, a in tensors.items():
    assert got[k].dtype == a.dtype and got[k].tobytes() == a.tobytes(), k
with ww.safe_open(tmp / "model.wws", keyring=kr) as r:
    assert r.get_tensor("embed.weight").tobytes() == tensors["embed.weight"].tobytes()
# a model folder: a sealed bundle (its walk names files without ICU)
(tmp / "folder").mkdir()
(tmp / "folder" / "config.json").write_text('{"model_type": "llama"}')
(tmp / "folder" / "model.safetensors").write_bytes(src.read_bytes())
ww.seal(tmp / "folder", tmp / "folder.wwb", keyring=kr)
ww.verify(tmp / "folder.wwb")
with ww.safe_open(tmp / "folder.wwb", keyring=kr) as b:
    assert b"llama" in b.read_file("config.json")
ww.unseal(tmp / "model.wws", tmp / "plain.safetensors", keyring=kr)
assert (tmp / "plain.safetensors").read_bytes() == src.read_bytes()
print("light core ok")
"""


def _python(blocked: list[str], code: str, *args: str, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    e = dict(os.environ if env is None else env)
    e["WW_BLOCKED"] = json.dumps(blocked)
    e["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [e.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-c", BOOT + code, *args], env=e, cwd=cwd, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


CLI = BOOT + "\nimport sys\nfrom weightwarden.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def _warden(blocked: list[str], env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    e = dict(env, WW_BLOCKED=json.dumps(blocked))
    e["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [e.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-c", CLI, *args], env=e, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def blocked() -> list[str]:
    b = _blocked()
    installed = {m for mods in EXTRAS.values() for m in mods if _installed(m)}
    assert installed <= set(b), f"extras' modules the block misses: {sorted(installed - set(b))}"
    return b


def _installed(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def test_core_dependencies_are_the_allowed_list() -> None:
    """Nobody re-adds scipy (or anything else) to the core unnoticed: a new core dependency is a decision."""
    assert {_norm(Requirement(r).name) for r in _pyproject()["dependencies"]} == CORE


def test_extras_exist_and_all_is_their_union() -> None:
    extras = _pyproject()["optional-dependencies"]
    assert USER_EXTRAS | {"all", "dev"} <= set(extras)
    union = {str(Requirement(r)) for x in USER_EXTRAS for r in extras[x]}
    assert {str(Requirement(r)) for r in extras["all"]} == union
    # every extra holds the distributions of the modules _extras.require names for it
    tops: dict[str, set[str]] = {}
    for dist in md.distributions():
        for t in _top_levels(dist):
            tops.setdefault(t, set()).add(_norm(dist.metadata["Name"] or ""))
    for extra, mods in EXTRAS.items():
        have = _closure({Requirement(r).name for r in extras[extra]})
        for m in mods:
            if m in tops:  # installed here: its distribution must be in the extra (or the core)
                assert tops[m] & (have | CORE), f"{extra}: {m} comes from {tops[m]}, not in the extra"
    # dev still installs what left the core (the tests use it)
    dev = {_norm(Requirement(r).name) for r in extras["dev"]}
    assert {"pycryptodome", "scipy", "safetensors", "rapidfuzz", "rigour", "pyicu"} <= dev


def test_library_seals_opens_loads_verifies_without_extras(blocked: list[str], tmp_path: Path) -> None:
    for m in ("scipy", "Crypto", "rapidfuzz", "rigour", "icu", "fastapi", "ray", "torch", "safetensors"):
        if _installed(m):
            assert m in blocked
    r = _python(blocked, LIBRARY, str(tmp_path), env={**os.environ, "WARDEN_HOME": str(tmp_path / "home")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "light core ok" in r.stdout


@pytest.fixture
def core_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(WARDEN_HOME=str(tmp_path / "home"), WARDEN_PASSPHRASE="a light core passphrase",
               WARDEN_KDF_MEMORY_KIB="1024", PYTHONUNBUFFERED="1")  # fmt: skip
    return env


def test_cli_seal_verify_open_without_extras(blocked: list[str], core_env: dict[str, str], tmp_path: Path) -> None:
    import numpy as np

    from weightwarden.sealed.codec import iter_parts

    src = tmp_path / "model.safetensors"
    with open(src, "wb") as f:
        for part in iter_parts({"w": np.arange(4096, dtype=np.float32).reshape(64, 64)}, {}):
            f.write(part)
    for args in (["init"], ["seal", str(src), "-o", str(tmp_path / "m.wws")], ["verify", str(tmp_path / "m.wws")],
                 ["inspect", str(tmp_path / "m.wws")], ["open", str(tmp_path / "m.wws"), "-o", str(tmp_path / "o")],
                 ["--help"]):  # fmt: skip
        r = _warden(blocked, core_env, *args)
        assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-2000:])
    assert (tmp_path / "o").read_bytes() == src.read_bytes()


@pytest.mark.parametrize(("args", "extra"), [
    (["provenance", "compare", "SUSPECT", "REFERENCE"], "provenance"),
    (["screen", "Northwind Trading"], "release"),
])  # fmt: skip
def test_cli_names_the_missing_extra(blocked: list[str], core_env: dict[str, str], tmp_path: Path,
                                     args: list[str], extra: str) -> None:  # fmt: skip
    import numpy as np

    from weightwarden.sealed.codec import iter_parts

    for name in ("SUSPECT", "REFERENCE"):  # real files, so that nothing but the extra is missing
        with open(tmp_path / f"{name}.safetensors", "wb") as f:
            for part in iter_parts({"w": np.ones((8, 8), np.float32)}, {}):
                f.write(part)
    args = [str(tmp_path / f"{a}.safetensors") if a in ("SUSPECT", "REFERENCE") else a for a in args]
    r = _warden(blocked, core_env, *args)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].endswith(f"this needs the `{extra}` extra: pip install 'weightwarden[{extra}]'"), lines[0]
    assert "Traceback" not in r.stderr


def test_require_names_the_extra() -> None:
    from weightwarden._extras import require
    from weightwarden.errors import MissingExtraError, WardenError

    with pytest.raises(MissingExtraError) as ei:
        require("weightwarden_no_such_module", extra="plot")
    assert str(ei.value) == "this needs the `plot` extra: pip install 'weightwarden[plot]'"
    assert isinstance(ei.value, WardenError) and isinstance(ei.value, ImportError)
    assert ei.value.extra == "plot"
    assert require("json", "dumps", extra="plot") is json.dumps


def test_every_require_names_a_known_extra_of_its_module() -> None:
    """Each ``require("pkg...", extra="E")`` / ``extra_imports("E")`` in src/ names an extra of pyproject, and
    ``pkg`` is one of the modules _extras.EXTRAS lists for E (what the light-core block is checked against)."""
    extras = _pyproject()["optional-dependencies"]
    calls = 0
    for path in sorted((SRC / "weightwarden").rglob("*.py")):
        text = path.read_text()
        for m in re.finditer(r'require\(\s*"([\w.]+)"[^)]*?extra="(\w+)"', text, re.S):
            top, extra = m.group(1).partition(".")[0], m.group(2)
            assert extra in extras and top in EXTRAS[extra], f"{path.name}: require({m.group(1)!r}, extra={extra!r})"
            calls += 1
        for m in re.finditer(r'extra_imports\("(\w+)"\)', text):
            assert m.group(1) in extras, f"{path.name}: extra_imports({m.group(1)!r})"
    assert calls > 30


def test_invisible_table_matches_icu() -> None:
    """The core's Default_Ignorable_Code_Point table (no ICU needed) agrees with ICU on every code point."""
    icu = pytest.importorskip("icu")
    from weightwarden.sealed.walk import invisible

    prop = icu.UProperty.DEFAULT_IGNORABLE_CODE_POINT
    bad = [cp for cp in range(0x110000)
           if invisible(chr(cp)) != (cp == 0x2800 or bool(icu.Char.hasBinaryProperty(chr(cp), prop)))]  # fmt: skip
    assert not bad, [hex(cp) for cp in bad[:10]]

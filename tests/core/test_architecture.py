"""The package's shape, checked (docs/ARCHITECTURE.md, Layers): no private name used across package
lines, no oversized module, test modules that import only shared support code, no test-only module in
the wheel.  The layer order itself is import-linter's (`lint-imports`, contracts in pyproject.toml)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
PKG = SRC / "weightwarden"
TESTS = ROOT / "tests"

MAX_LINES = 550

# Modules over MAX_LINES that issue 19's move/split slice is taking apart; the coordinator empties this
# list when that lands (an entry that no longer needs to be here fails the test below).
PENDING_SPLIT: set[str] = set()

# Test modules that still import another test module (conftest's constants and helpers, another
# test's fixtures): to move into a shared support module (or fixtures) when tests mirror the source.
PENDING_TEST_IMPORTS: set[str] = set()

# Test-only code that still ships in the wheel (trains torch models; the demo's toy model): to move
# out of src/ (tests/support or the demo's own place).
TEST_ONLY = {"weightwarden.provenance.zoo", "weightwarden._demo_lm"}
PENDING_TEST_ONLY: set[str] = set()
TEST_PACKAGES = {"pytest", "hypothesis", "_pytest"}


def _rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def _src_files() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def _module(p: Path, src: Path = SRC) -> tuple[list[str], list[str]]:
    """(the dotted parts of the module at ``p``, the parts of the package it is in)."""
    parts = list(p.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return parts, parts
    return parts, parts[:-1]


def _unit(parts: list[str]) -> str:
    """The top-level part of weightwarden a module belongs to: a subpackage (``sealed``) or a module
    directly under the root (``trail``); the root package itself is ``""``."""
    return parts[1] if len(parts) > 1 else ""


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _is_module(parts: list[str], src: Path = SRC) -> bool:
    where = src.joinpath(*parts)
    return where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()


def _resolve(node: ast.ImportFrom, package: list[str]) -> list[str]:
    if node.level:
        base = package[: len(package) - (node.level - 1)]
        return base + (node.module.split(".") if node.module else [])
    return (node.module or "").split(".")


def _private_crossings(p: Path, src: Path = SRC) -> list[str]:
    """Private names (``_x``, not dunders) of another top-level part of weightwarden that ``p`` uses:
    imported by name, or read as an attribute of a module it imported.  A private module may be
    imported from anywhere inside its parent package (import-linter's private_modules contract)."""
    me, package = _module(p, src)
    where = p.relative_to(src.parent).as_posix()
    tree = ast.parse(p.read_text(), filename=str(p))
    found: list[str] = []
    modules: dict[str, list[str]] = {}  # local name -> the weightwarden module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(node, package)
            if target[0] != "weightwarden":
                continue
            for alias in node.names:
                full = [*target, alias.name]
                if _is_module(full, src):
                    modules[alias.asname or alias.name] = full
                elif _is_private(alias.name) and _unit(target) != _unit(me):
                    found.append(f"{where}:{node.lineno}: imports {'.'.join(full)}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("weightwarden.") and alias.asname:
                    modules[alias.asname] = alias.name.split(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            full = modules[node.value.id]
            if _is_private(node.attr) and _unit(full) != _unit(me):
                found.append(f"{where}:{node.lineno}: uses {'.'.join(full)}.{node.attr}")
    return found


def test_no_private_name_crosses_a_package_line() -> None:
    found = [line for p in _src_files() for line in _private_crossings(p)]
    assert not found, "private names used from another part of weightwarden (make them public):\n" + "\n".join(found)


def test_the_crossing_check_sees_both_forms(tmp_path: Path) -> None:
    """The check itself: a private name imported, or read off an imported module, from another part
    is found; the same inside one part, a dunder, or a private module of the root is not."""
    pkg = tmp_path / "src" / "weightwarden"
    (pkg / "a").mkdir(parents=True)
    (pkg / "b").mkdir()
    for f in ("__init__.py", "a/__init__.py", "b/__init__.py", "_util.py"):
        (pkg / f).write_text("")
    (pkg / "a" / "x.py").write_text("_secret = 1\n__version__ = '1'\n")
    (pkg / "a" / "y.py").write_text("from .x import _secret\n")
    (pkg / "b" / "z.py").write_text(
        "from ..a.x import _secret, __version__\nfrom ..a import x\nfrom .. import _util\nprint(x._secret)\n"
    )
    assert _private_crossings(pkg / "a" / "y.py", tmp_path / "src") == []
    found = _private_crossings(pkg / "b" / "z.py", tmp_path / "src")
    assert [f.split(": ", 1)[1] for f in found] == ["imports weightwarden.a.x._secret", "uses weightwarden.a.x._secret"]


def test_no_module_is_oversized() -> None:
    sizes = {_rel(p): len(p.read_text().splitlines()) for p in _src_files()}
    over = sorted(f"{path}: {n} lines" for path, n in sizes.items() if n > MAX_LINES and path not in PENDING_SPLIT)
    assert not over, f"modules over {MAX_LINES} lines (split them along their seams):\n" + "\n".join(over)
    stale = sorted(path for path in PENDING_SPLIT if sizes.get(path, 0) <= MAX_LINES)
    assert not stale, f"no longer over {MAX_LINES} lines (or gone): drop from PENDING_SPLIT: {stale}"


def _test_module_imports(p: Path) -> list[str]:
    """The test modules (``test_*``, ``conftest``) that the test file ``p`` imports."""
    tree = ast.parse(p.read_text(), filename=str(p))
    package = list(p.relative_to(ROOT).with_suffix("").parts)[:-1]
    names: list[list[str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(node, package)
            names += [target] if node.module else [[*target, a.name] for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name.split(".") for a in node.names]
    return sorted(
        ".".join(n)
        for n in names
        if n and n[0] == "tests" and any(part.startswith("test_") or part == "conftest" for part in n[1:])
    )


def test_no_test_module_imports_another() -> None:
    files = sorted(TESTS.rglob("*.py"))
    offenders = {_rel(p): _test_module_imports(p) for p in files if p.name.startswith("test_")}
    offenders = {path: imported for path, imported in offenders.items() if imported}
    new = sorted(f"{path}: {', '.join(imported)}" for path, imported in offenders.items()
                 if path not in PENDING_TEST_IMPORTS)  # fmt: skip
    assert not new, "test modules importing test modules (share code through a support module or fixtures):\n" + (
        "\n".join(new)
    )
    stale = sorted(PENDING_TEST_IMPORTS - set(offenders))
    assert not stale, f"these import no test module any more: drop from PENDING_TEST_IMPORTS: {stale}"


def _wheel_modules() -> set[str]:
    """The modules the wheel holds: every .py file of the packages setuptools finds under src/."""
    from setuptools import find_packages

    mods: set[str] = set()
    for pkg in find_packages(where=str(SRC)):
        for f in SRC.joinpath(*pkg.split(".")).glob("*.py"):
            mods.add(pkg if f.stem == "__init__" else f"{pkg}.{f.stem}")
    return mods


def test_the_wheel_holds_no_test_only_module() -> None:
    mods = _wheel_modules()
    assert "weightwarden.sealed.reader" in mods and "weightwarden.cli" in mods  # the listing sees the package
    shipped = sorted((mods & TEST_ONLY) - PENDING_TEST_ONLY)
    assert not shipped, f"test-only modules in the wheel (move them out of src/): {shipped}"
    uses_tests = []
    for p in _src_files():
        tree = ast.parse(p.read_text(), filename=str(p))
        for node in ast.walk(tree):
            roots = ([a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import)
                     else [(node.module or "").split(".")[0]] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])  # fmt: skip
            if TEST_PACKAGES & set(roots):
                uses_tests.append(f"{_rel(p)}:{node.lineno}")
    assert not uses_tests, "modules in the wheel that import a test framework:\n" + "\n".join(uses_tests)
    stale = sorted(m for m in PENDING_TEST_ONLY if m not in mods)
    assert not stale, f"no longer in the wheel: drop from PENDING_TEST_ONLY: {stale}"

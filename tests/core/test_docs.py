"""docs/GUIDE.md's commands (issue 8): the blocks marked *(run by the tests)* run in order as one shell
session, and every other `warden` line names a real command with real options."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[2]
MARK = "*(run by the tests)*"


def _blocks(text: str) -> list[tuple[bool, str]]:
    """(run by the tests?, body) of every ```sh block."""
    out = []
    for m in re.finditer(r"```sh\n(.*?)```", text, re.S):
        before = text[: m.start()].rstrip().splitlines()[-1:] or [""]
        out.append((before[0].strip() == MARK, m.group(1)))
    return out


def _warden_lines(body: str) -> list[list[str]]:
    """Each `warden ...` command of a block, continuation lines joined, comments dropped."""
    body = body.replace("\\\n", " ")
    cmds = []
    for line in body.splitlines():
        for part in re.split(r"&&|\|", line):
            part = part.split(" #")[0].strip()
            if part.startswith("warden "):
                words = shlex.split(re.sub(r"\$\([^)]*\)", "X", part), posix=True)
                cmds.append([w for w in words if w not in (">", "<") and not w.startswith((">", "2>"))])
    return cmds


def test_every_warden_line_is_a_real_command() -> None:
    import typer

    from weightwarden.cli import app

    def is_group(c: object) -> bool:
        return isinstance(getattr(c, "commands", None), dict)

    root = typer.main.get_command(app)
    seen = 0
    for doc in ("docs/GUIDE.md", "README.md", "docs/EXPORT.md", "docs/THREAT_MODEL.md"):
        path = ROOT / doc
        if not path.exists():
            continue
        for _, body in _blocks(path.read_text()):
            for words in _warden_lines(body):
                cmd, i = root, 1
                while is_group(cmd) and i < len(words):
                    group_opts = {o: prm for prm in cmd.params for o in prm.opts}
                    if words[i] in group_opts:  # a group's own option (warden --reason R shred ...)
                        i += 1 if group_opts[words[i]].is_flag else 2
                    elif words[i] in cmd.commands:
                        cmd, i = cmd.commands[words[i]], i + 1
                    else:
                        break
                assert not is_group(cmd), f"{doc}: `{' '.join(words)}` names no command"
                opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
                for w in words[i:]:
                    if w.startswith("--"):
                        assert w.split("=")[0] in opts, f"{doc}: `{' '.join(words[:i])}` has no option {w}"
                seen += 1
    assert seen >= 40


def test_the_guide_runs(tmp_path: Path) -> None:
    for tool in ("softhsm2-util", "openssl"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (make test installs it)")
    pytest.importorskip("cedarpy", reason="the guide administers the broker (the server extra)")
    pytest.importorskip("matplotlib", reason="the guide writes figures (the plot extra)")
    from demo import lm

    lm.save(lm.init(np.random.default_rng(0)), tmp_path / "model")  # a Llama-shaped checkpoint
    runnable = [body for run, body in _blocks((ROOT / "docs" / "GUIDE.md").read_text()) if run]
    assert len(runnable) >= 7
    script = "set -euo pipefail\n" + "\n".join(runnable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WARDEN_", "SOFTHSM2_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["HOME"] = str(tmp_path)
    try:
        r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run([sys.executable, "-m", "weightwarden", "agent", "stop"], cwd=tmp_path, capture_output=True,
                       env=env | {"WARDEN_HOME": str(tmp_path / "warden-home")}, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import json

    trace = json.loads((tmp_path / "trace.json").read_text())
    assert [a["recipient"] for a in trace["accused"]] == ["Acme Labs"]
    assert json.loads((tmp_path / "evidence.json").read_text())["decision"] == "derived"
    assert (tmp_path / "trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "evidence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    audit = (tmp_path / "incident-audit.jsonl").read_text().splitlines()
    assert any('"broker:suspend"' in line for line in audit)
    assert json.loads((tmp_path / "classification.json").read_text())["total_params"] > 0


def test_the_threat_model_cites_real_tests() -> None:
    """Every `test_x.py::name` (and `::name` after it in the same cell) in docs/THREAT_MODEL.md exists."""
    text = (ROOT / "docs" / "THREAT_MODEL.md").read_text()
    cited = 0
    for cell in re.split(r"\|", text):
        current = None
        for m in re.finditer(r"(test_\w+\.py)(?:::(\w+))?|(?<![\w.])::(\w+)", cell):
            if m.group(1):
                found = sorted((ROOT / "tests").rglob(m.group(1)))  # tests/<package>/test_x.py
                assert len(found) == 1, f"{m.group(1)} is cited but does not exist (or is not unique)"
                current = found[0]
            name = m.group(2) or m.group(3)
            if name:
                assert current is not None, f"::{name} without its file"
                assert re.search(rf"def {name}\(", current.read_text()), f"{current.name}::{name} does not exist"
                cited += 1
    assert cited >= 40

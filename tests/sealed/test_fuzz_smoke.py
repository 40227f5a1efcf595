"""The atheris harness runs: a short coverage-guided fuzz of the sealed-file parser in every
test run (`make fuzz` runs it for longer).  Any exception that is not a WardenError fails it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (it is in the dev extra)")

HARNESS = Path(__file__).resolve().parents[2] / "fuzz" / "fuzz_sealed.py"


# libFuzzer's 2 GB out-of-memory check reads the process's peak RSS (getrusage), which Linux carries over from the
# process that started it: a pytest worker holding trained models would trip it before the first input.  A small
# Python in between gives the harness a peak of its own, so the check measures the harness alone.
_FRESH = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"


def test_atheris_harness_finds_no_crash(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            _FRESH,
            sys.executable,
            str(HARNESS),
            "-atheris_runs=6000",
            "-seed=1",
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done 6000" in r.stderr
    assert not list(tmp_path.glob("crash-*"))

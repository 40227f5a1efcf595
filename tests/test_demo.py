"""`make demo` runs the whole lifecycle (issue 8) and fails when any step's result is wrong."""

import os
import subprocess
import sys

import pytest


def test_make_demo_runs_and_passes(tmp_path):
    pytest.importorskip("ray", reason="the demo's scan runs on a local Ray (the cluster extra)")
    pytest.importorskip("cedarpy", reason="the demo starts the broker (the server extra)")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
           "COLUMNS": "160"}  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "weightwarden.demo"], env=env, capture_output=True, text=True,
                       timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "all checks passed" in r.stdout
    for act in range(1, 7):
        assert f"{act}. " in r.stdout
    for line in ("warden trace names the partner", "one edited row is caught", "refused with reasons"):
        assert line in r.stdout
    leftovers = [p.name for p in tmp_path.iterdir() if not p.name.startswith(("ray", ".cache", ".config"))]
    assert leftovers == []  # the demo cleans up after itself

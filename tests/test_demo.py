import subprocess
import sys


def test_make_demo_runs_and_passes(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path), "COLUMNS": "160"}
    r = subprocess.run(
        [sys.executable, "-m", "weightwarden.demo"], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout
    for step in range(1, 8):
        assert f"{step}." in r.stdout
    assert list(tmp_path.iterdir()) == []  # the demo cleans up after itself

"""The `warden` command line, run as a user would (subprocesses, real files)."""

from __future__ import annotations

import json

from tests.support.cli import warden


def _ok(r):
    assert r.returncode == 0, r.stderr
    return r


def _fails(r, needle: str, code: int = 1):
    """One `error:` line naming ``needle``, and the exit code of its kind (1 error, 2 usage, 3 verification
    failed, 4 denied)."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert needle in lines[0], lines[0]
    return r


def test_cli_end_to_end(tmp_path, st_file, cli_env):
    keys = json.loads(_ok(warden(cli_env, "init", "--json")).stdout)["keys"]
    assert {k["kind"] for k in keys} == {"kek", "signing"}
    listed = json.loads(_ok(warden(cli_env, "key", "list", "--json")).stdout)
    assert [k["key_id"] for k in listed] == [k["key_id"] for k in keys]
    out = tmp_path / "m.wws"
    sealed = json.loads(_ok(warden(cli_env, "seal", str(st_file), "-o", str(out), "--hide-header", "--json")).stdout)
    assert sealed["sealed"][0]["header_hidden"] is True
    rep = json.loads(_ok(warden(cli_env, "verify", str(out), "--json")).stdout)
    assert rep["ok"] is True and rep["deep"] is False
    rep = json.loads(_ok(warden(cli_env, "verify", str(out), "--deep", "--json")).stdout)
    assert rep["deep"] is True
    info = json.loads(_ok(warden(cli_env, "inspect", str(out), "--json")).stdout)
    assert info["header_hidden"] is True and "tensors" not in info
    plain = tmp_path / "plain.safetensors"
    _ok(warden(cli_env, "open", str(out), "-o", str(plain)))
    assert plain.read_bytes() == st_file.read_bytes()
    _fails(warden(cli_env, "open", str(out), "-o", str(plain)), "--force")
    _ok(warden(cli_env, "open", str(out), "-o", str(plain), "--force"))


def test_cli_errors_are_one_line(tmp_path, st_file, cli_env):
    _ok(warden(cli_env, "init"))
    _fails(warden(cli_env, "verify", str(tmp_path / "missing.wws")), "missing.wws")
    _fails(warden(cli_env, "verify", str(st_file)), "FormatError")
    _fails(warden(cli_env, "seal", str(st_file)), "Missing option", 2)
    _fails(warden(cli_env, "nonsense"), "No such command", 2)
    bad = dict(cli_env, WARDEN_PASSPHRASE="not the passphrase")
    _fails(warden(bad, "seal", str(st_file), "-o", str(tmp_path / "x.wws")), "BadPassphraseError")
    assert not (tmp_path / "x.wws").exists()
    tampered = tmp_path / "t.wws"
    _ok(warden(cli_env, "seal", str(st_file), "-o", str(tampered)))
    b = bytearray(tampered.read_bytes())
    b[-200] ^= 1
    tampered.write_bytes(b)
    r = _fails(warden(cli_env, "verify", str(tampered)), "Error", 3)
    assert "not the passphrase" not in r.stderr


def test_cli_trust_between_two_parties(tmp_path, st_file, cli_env):
    alice = dict(cli_env, WARDEN_HOME=str(tmp_path / "alice"))
    bob = dict(cli_env, WARDEN_HOME=str(tmp_path / "bob"))
    _ok(warden(alice, "init"))
    _ok(warden(bob, "init"))
    out = tmp_path / "m.wws"
    _ok(warden(alice, "seal", str(st_file), "-o", str(out)))
    _fails(warden(bob, "verify", str(out)), "UntrustedSignerError", 3)
    pub = json.loads(_ok(warden(alice, "key", "export-public", "--json")).stdout)["public_key"]
    _ok(warden(bob, "verify", str(out), "--trust-key", pub))
    (tmp_path / "alice.pub").write_text(pub)
    _ok(warden(bob, "trust", "add", str(tmp_path / "alice.pub"), "--label", "alice"))
    labels = {t["label"] for t in json.loads(_ok(warden(bob, "trust", "list", "--json")).stdout)}
    assert "alice" in labels
    _ok(warden(bob, "verify", str(out)))
    _fails(warden(bob, "verify", str(out), "--deep"), "WrongKeyError")  # trusted, but not Bob's key


def test_cli_seals_a_model_directory(tmp_path, tensors, cli_env):
    from tests.support.models import sharded_model_dir

    d = sharded_model_dir(tmp_path, tensors)
    _ok(warden(cli_env, "init"))
    _ok(warden(cli_env, "seal", str(d), "-o", str(tmp_path / "sealed")))
    info = json.loads(_ok(warden(cli_env, "inspect", str(tmp_path / "sealed"), "--json")).stdout)
    assert len(info["members"]) == 5
    _ok(warden(cli_env, "open", str(tmp_path / "sealed"), "-o", str(tmp_path / "back")))
    assert (tmp_path / "back" / "tokenizer" / "vocab.txt").read_text() == "a\nb\nc\n"


def test_cli_key_lifecycle_rewrap_and_shred(tmp_path, st_file, cli_env):
    _ok(warden(cli_env, "init"))
    _ok(warden(cli_env, "key", "new", "--name", "model-x"))
    files = [tmp_path / f"m{i}.wws" for i in range(3)]
    for f in files:
        _ok(warden(cli_env, "seal", str(st_file), "-o", str(f), "--key", "model-x"))
    before = [f.read_bytes() for f in files]
    assert json.loads(_ok(warden(cli_env, "key", "rotate", "model-x", "--json")).stdout)["version"] == 2
    _fails(warden(cli_env, "key", "disable", "model-x", "2"), "current version")
    rep = json.loads(
        _ok(warden(cli_env, "--reason", "rotation", "rewrap", *map(str, files), "--key", "model-x", "--json")).stdout
    )
    assert rep["rewrapped"] == 3
    assert all(len(f.read_bytes()) == len(b) for f, b in zip(files, before, strict=True))
    _ok(warden(cli_env, "key", "disable", "model-x", "1"))
    _fails(warden(cli_env, "key", "destroy", "model-x", "1"), "--yes")
    _ok(warden(cli_env, "key", "destroy", "model-x", "1", "--yes"))
    _ok(warden(cli_env, "verify", str(files[0]), "--deep"))
    states = {
        (k["key_id"], k["version"]): k["state"]
        for k in json.loads(_ok(warden(cli_env, "key", "list", "--json")).stdout)
    }
    assert states[("model-x", 1)] == "destroyed" and states[("model-x", 2)] == "enabled"
    _fails(warden(cli_env, "shred", "model-x"), "--yes")
    _ok(warden(cli_env, "shred", "model-x", "--yes"))
    _fails(warden(cli_env, "verify", str(files[1]), "--deep"), "KeyDestroyedError")
    _ok(warden(cli_env, "verify", str(files[1])))  # integrity is still checkable by anyone

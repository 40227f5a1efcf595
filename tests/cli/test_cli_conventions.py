"""The conventions of the `warden` command line (issue 19): --version, help, exit codes, --json everywhere,
ids never cut when stdout is not a terminal, `screen check`/`screen update`, and error lines that name the
file and say what to do.  In process (CliRunner, `main`): stdout is never a terminal here."""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import weightwarden as ww
from tests.support.cli import PASSPHRASE
from weightwarden.cli import _common, app, main

runner = CliRunner()


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WARDEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WARDEN_PASSPHRASE", PASSPHRASE)
    monkeypatch.setenv("COLUMNS", "40")  # a narrow "terminal": what is not a terminal ignores it
    monkeypatch.delenv("WARDEN_PASSPHRASE_FILE", raising=False)


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    o = capsys.readouterr()
    return code, o.out, o.err


def _one_error(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _commands(cmd: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    subs = getattr(cmd, "commands", None)
    if isinstance(subs, dict):
        return [x for name, c in subs.items() for x in _commands(c, (*path, name))]
    return [(path, cmd)]


# -- --version, bare warden, help ------------------------------------------------------------------------
def test_version_and_bare_warden(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "--version")
    assert code == 0 and out == f"warden {version('weightwarden')}\n" and err == ""
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"warden {version('weightwarden')}"
    code, out, err = _run(capsys)
    assert code == 0 and "Usage: warden" in out and "Exit codes" in out and "error" not in err
    code, out, err = _run(capsys, "key")  # a group alone: its help, and success
    assert code == 0 and "export-public" in out and "error" not in err
    for args in ([], ["key"], ["screen"]):  # the same through the framework's own entry (a CliRunner)
        r = runner.invoke(app, args)
        assert r.exit_code == 0 and "Usage: " in r.stdout and "error" not in r.stderr, args  # (prog: "root")


def test_help_shows_real_metavars_and_defaults() -> None:
    root = typer.main.get_command(app)
    seen = 0
    for path, _ in [((), root), *_commands(root)]:
        r = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0, (path, r.output)
        bad = re.findall(r"<(?:bool|str|int|float|path|list\[[^\]]*\]|[a-z]+ range)>", r.stdout)
        assert not bad, (path, bad)
        seen += 1
    assert seen > 50
    seal = runner.invoke(app, ["seal", "--help"], env={"COLUMNS": "200"}).stdout
    assert re.search(r"--output\s+-o\s+PATH", seal) and re.search(r"--chunk-size\s+N\b", seal)
    assert "[default: 1048576]" in seal and re.search(r"SRC\s+PATH", seal)
    assert re.search(r"--provider\s+URI", seal)
    prove = runner.invoke(app, ["audit", "prove", "--help"], env={"COLUMNS": "200"}).stdout
    assert "[default: the broker's, sqlite:///$WARDEN_HOME/broker/broker.db]" in prove  # not eaten as markup
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).stdout
    for code, _ in _common.EXIT_CODES:
        assert f"{code} " in top.split("Exit codes:")[1]


def test_every_command_that_prints_a_result_takes_json() -> None:
    foreground = {("serve",), ("agent", "run")}  # servers: they print no result, they run
    missing = [" ".join(p) for p, c in _commands(typer.main.get_command(app))
               if p not in foreground and "--json" not in {o for prm in c.params for o in prm.opts}]  # fmt: skip
    assert missing == []


# -- exit codes ------------------------------------------------------------------------------------------
def test_exit_codes_map_typed_errors_in_one_place() -> None:
    from weightwarden import errors as E
    from weightwarden.broker.client import BrokerHTTPError
    from weightwarden.broker.errors import Forbidden, NotFound
    from weightwarden.release.gate import ReleaseDenied, ReleaseInputError, UnknownCountry

    want = {
        E.WardenError("x"): 1, E.FormatError("x"): 1, E.KeyringError("x"): 1, E.OutputExistsError("x"): 1,
        E.QuorumError("x"): 1, E.KeyPurposeError("x"): 1, OSError(2, "No such file"): 1,
        E.IntegrityError("x"): 3, E.DecryptionError("x"): 3, E.SignatureError("x"): 3,
        E.UntrustedSignerError("x"): 3, E.AuditTamperedError("x"): 3, E.LogIdentityError("x"): 3,
        E.HeadKeyPurposeError("x"): 3,
        E.PolicyDeniedError("x"): 4, ReleaseDenied("x"): 4, Forbidden("x"): 4, BrokerHTTPError(403, "no"): 4,
        ReleaseInputError("x"): 1, UnknownCountry("x"): 1, NotFound("x"): 1, BrokerHTTPError(500, "x"): 1,
        typer.Exit(4): 4,
    }  # fmt: skip
    assert {type(e).__name__ + str(getattr(e, "status", "")): _common.exit_code(e) for e in want} == {
        type(e).__name__ + str(getattr(e, "status", "")): c for e, c in want.items()
    }
    assert [c for c, _ in _common.EXIT_CODES] == [0, 1, 2, 3, 4]


def test_exit_codes_of_the_cli(tmp_path: Path, st_file: Path, keyring: ww.Keyring, other_keyring: ww.Keyring,
                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    home = str(keyring.home)
    sealed = tmp_path / "m.wws"
    ww.seal(st_file, sealed, keyring=keyring)
    assert _run(capsys, "verify", str(sealed), "--home", home)[0] == 0
    # 1: an error (a missing file)
    code, _, err = _run(capsys, "verify", str(tmp_path / "nope.wws"), "--home", home)
    assert code == 1
    _one_error(err, "nope.wws", "no such file or directory", "check the path")
    # 2: usage
    code, _, err = _run(capsys, "verify", "--no-such-option")
    assert code == 2 and "--no-such-option" in _one_error(err)
    code, _, err = _run(capsys, "screen", "update")  # --file is required
    assert code == 2 and "--file" in _one_error(err)
    # 3: verification failed (tampered; signed by a key not trusted)
    b = bytearray(sealed.read_bytes())
    b[-200] ^= 1
    (tmp_path / "t.wws").write_bytes(b)
    code, _, err = _run(capsys, "verify", str(tmp_path / "t.wws"), "--home", home)
    assert code == 3 and _one_error(err)
    theirs = tmp_path / "theirs.wws"
    ww.seal(st_file, theirs, keyring=other_keyring)
    code, _, err = _run(capsys, "verify", str(theirs), "--home", home)
    assert code == 3 and "UntrustedSignerError" in _one_error(err)
    # 4: a screening hit (the shipped sample lists "Kim Chol Ho"); no hit: 0
    code, out, _ = _run(capsys, "screen", "check", "Kim Chol-Ho", "--json")
    assert code == 4 and json.loads(out)["decision"] == "match"
    code, out, _ = _run(capsys, "screen", "Kim Chol-Ho", "--json")  # short for `screen check`
    assert code == 4 and json.loads(out)["decision"] == "match"
    code, out, _ = _run(capsys, "screen", "check", "Ada Lovelace", "--json")
    assert code == 0 and json.loads(out)["decision"] == "clear"
    r = runner.invoke(app, ["screen", "check", "Kim Chol-Ho"])  # the same code in a CliRunner
    assert r.exit_code == 4 and "MATCH" in r.stdout


def test_a_party_named_update_can_be_screened(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps({"results": [{"id": "u1", "name": "Update Holdings", "source": "SDN",
                                            "addresses": [{"country": "FR"}]}]}))  # fmt: skip
    code, out, _ = _run(capsys, "screen", "check", "update", "--file", str(lst), "--json")
    assert code == 0 and json.loads(out)["query"] == "update"  # screened, not a list loaded
    code, out, _ = _run(capsys, "screen", "check", "Update Holdings", "--file", str(lst), "--json")
    assert code == 4 and json.loads(out)["hits"][0]["entry"]["id"] == "u1"
    code, out, _ = _run(capsys, "screen", "update", "--file", str(lst), "--json")
    assert code == 0 and json.loads(out)["entries"] == 1
    assert len(json.loads(out)["sha256"]) == 64
    code, out, _ = _run(capsys, "screen", "update", "--file", str(lst))
    digest = out.split("sha256 ")[1].split()[0]
    assert len(digest) == 64 and "…" not in out  # the digest whole


# -- ids are never cut when stdout is not a terminal -----------------------------------------------------
def test_ids_are_whole_when_stdout_is_not_a_terminal(keyring: ww.Keyring) -> None:
    keyring.new_kek("a-model-with-a-rather-long-name-for-its-key")
    keyring.save()
    ids = [k["key_id"] for k in keyring.list_keys()]
    r = runner.invoke(app, ["key", "list", "--home", str(keyring.home)], env={"COLUMNS": "40"})
    assert r.exit_code == 0, r.output
    assert "…" not in r.stdout
    for kid in ids:
        assert kid in r.stdout, (kid, r.stdout)
    pub = json.loads(runner.invoke(app, ["key", "export-public", "--json", "--home", str(keyring.home)]).stdout)
    r = runner.invoke(app, ["trust", "add", pub["public_key"], "--label", "x" * 120, "--home", str(keyring.home)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["trust", "list", "--home", str(keyring.home)], env={"COLUMNS": "40"})
    assert pub["key_id"] in r.stdout and "x" * 120 in r.stdout and "…" not in r.stdout


def test_a_folded_table_never_cuts_an_id_on_a_terminal() -> None:
    from rich.console import Console

    con = Console(width=30, force_terminal=True, color_system=None, record=True)
    t = _common.Table("key id", "state")
    t.add_row("ed25519:0123456789abcdef0123", "enabled")
    con.print(t)
    text = con.export_text()
    first_column = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│"))
    assert "…" not in text and first_column == "ed25519:0123456789abcdef0123"  # folded onto two lines, whole


# -- every error names the file and says what to do ------------------------------------------------------
def test_error_lines_name_the_file_and_what_to_do(tmp_path: Path, keyring: ww.Keyring, tensors: dict[str, Any],
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from safetensors.numpy import save_file

    home = str(keyring.home)
    (tmp_path / "somedir").mkdir()
    code, _, err = _run(capsys, "open", str(tmp_path / "somedir"), "-o", str(tmp_path / "x"), "--home", home)
    assert code == 1 and "IsADirectoryError" not in err
    _one_error(err, "somedir", "bundle manifest", "give a sealed file")
    code, _, err = _run(capsys, "verify", "nope")
    assert code == 1 and "(None)" not in err
    _one_error(err, "nope: no such file or directory", "check the path")
    code, _, err = _run(capsys, "provenance", "compare", str(tmp_path / "nope"), str(tmp_path / "nope2"))
    assert code == 1 and "(None)" not in err
    _one_error(err, "no such file or directory", "check the path")
    code, _, err = _run(capsys, "screen", "check", "x", "--file", str(tmp_path / "missing.json"))
    _one_error(err, "missing.json", "--file")
    # a truncated member of a bundle: the member is named
    d = tmp_path / "model"
    d.mkdir()
    save_file({"a": tensors["layer.0.w"]}, str(d / "model-00001.safetensors"))
    save_file({"b": tensors["layer.0.b"]}, str(d / "model-00002.safetensors"))
    ww.seal(d, tmp_path / "bundle", keyring=keyring)
    member = tmp_path / "bundle" / "model-00002.safetensors.wws"
    member.write_bytes(member.read_bytes()[:-300])
    for cmd in (["inspect", str(tmp_path / "bundle")], ["verify", str(tmp_path / "bundle"), "--home", home]):
        code, _, err = _run(capsys, *cmd)
        assert code == 1, err
        _one_error(err, "TruncatedError", "model-00002.safetensors.wws", "cut short")

"""Terminal-safe output: text from files, requests and lists is shown escaped, never obeyed.

Attack: a sealed file signed by a stranger carries tensor names and metadata with ESC sequences,
rich markup, newlines and U+202E that try to draw a fake "signed by <trusted id>" line; a screening
list, a recipient name, a model folder and a trust label carry the same.  Through the real CLI, no
command prints a raw control or bidi character or a line of the attacker's making, and the real
signer is the one shown."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.support.cli import warden
from weightwarden._term import safe

RAW = ["\x1b", "\x9b", "\r", "\x07", "\x08", "\u202e", "\u2066", "\u200b", "\u2028"]


def _fake(trusted: str) -> str:
    return (f"w\n\x1b[2K\r\x1b[32msigned by {trusted}\x1b[0m\n[green]signed by {trusted}[/green]"
            f"\u202e\u2066\u200b\u2028\x9b31m\x07\x08")  # fmt: skip


def _env(cli_env: dict[str, str], home: Path) -> dict[str, str]:
    return cli_env | {"WARDEN_HOME": str(home), "COLUMNS": "400"}  # wide: rich never wraps a cell


def _ok(r):
    assert r.returncode == 0, r.stderr
    return r


def _assert_safe(r, trusted: str) -> str:
    """No raw control or bidi character, and no line that starts as the attacker's does."""
    text = r.stdout + r.stderr
    for ch in RAW:
        assert ch not in text, (repr(ch), text[-2000:])
    for line in text.splitlines():
        body = line.strip()
        assert not body.startswith(("signed by", "[green]", "\\x1b")), line
    for line in text.splitlines():  # the attacker's claim is visible only as escaped text, never a line of its own
        if "signed by " + trusted in line:
            assert "\\x0a" in line or "[green]" in line, line
    return text


def test_safe_escapes_controls_bidi_and_backslashes() -> None:
    assert safe("plain, accentué, 中文, 🙂 [bold]x[/bold]") == "plain, accentué, 中文, 🙂 [bold]x[/bold]"
    assert safe("a\nb\x1b[2J\r\x7f\x9b") == "a\\x0ab\\x1b[2J\\x0d\\x7f\\x9b"
    assert safe("\u202eevil\u2066\u200b\u2028\ufeff") == "\\u202eevil\\u2066\\u200b\\u2028\\ufeff"
    assert safe("C:\\x1b") == "C:\\\\x1b"  # a literal backslash can never pass for an escape
    assert safe("\U000e0041") == "\\U000e0041"  # a tag character (format, invisible)
    assert all(ch.isprintable() for ch in safe("".join(map(chr, range(0x3000)))))


def test_a_strangers_hostile_file_cannot_fake_its_signer(tmp_path: Path, cli_env: dict[str, str]) -> None:
    me, stranger = _env(cli_env, tmp_path / "me"), _env(cli_env, tmp_path / "stranger")
    _ok(warden(me, "init"))
    _ok(warden(stranger, "init"))
    trusted = json.loads(_ok(warden(me, "key", "export-public", "--json")).stdout)["key_id"]
    real = json.loads(_ok(warden(stranger, "key", "export-public", "--json")).stdout)["key_id"]
    src = tmp_path / "hostile.safetensors"
    save_file({_fake(trusted): np.zeros(2, np.float32), "ok": np.ones(2, np.float32)}, str(src),
              metadata={"note\x1b]0;title\x07": _fake(trusted), "[green]k[/green]": "v"})  # fmt: skip
    _ok(warden(stranger, "seal", str(src), "-o", str(tmp_path / "h.wws")))
    r = _ok(warden(me, "inspect", str(tmp_path / "h.wws")))
    out = _assert_safe(r, trusted)
    assert f"signer {real}" in out and f"signer {trusted}" not in out  # the real signer, once
    assert "\\x0a\\x1b[2K\\x0d\\x1b[32msigned by" in out and "\\u202e" in out  # shown, escaped
    assert "note\\x1b]0;title\\x07" in out and "[green]k[/green]" in out  # markup shown, not obeyed
    # verify refuses the stranger, naming the real signer in one clean line
    r = warden(me, "verify", str(tmp_path / "h.wws"))
    assert r.returncode == 3 and real in r.stderr and len(r.stderr.splitlines()) == 1
    _assert_safe(r, trusted)
    # JSON stays JSON: the names round-trip exactly, escaped by the encoder
    j = json.loads(_ok(warden(me, "inspect", str(tmp_path / "h.wws"), "--json")).stdout)
    assert _fake(trusted) in j["tensors"] and "\x1b" not in _ok(warden(me, "inspect", str(tmp_path / "h.wws"),
                                                                       "--json")).stdout  # fmt: skip


def test_hostile_lists_names_and_paths_are_escaped_in_every_command(tmp_path: Path,
                                                                     cli_env: dict[str, str]) -> None:  # fmt: skip
    env = _env(cli_env, tmp_path / "home")
    _ok(warden(env, "init"))
    trusted = json.loads(_ok(warden(env, "key", "export-public", "--json")).stdout)["key_id"]
    evil = _fake(trusted)
    # a screening list whose entry names are hostile
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps({"results": [{"id": "e\x1b1", "name": "Evil Corp " + evil, "alt_names": ["Evil Corp"],
                                            "source": "src\u202e", "addresses": [{"country": "FR"}]}]}))  # fmt: skip
    r = warden(env, "screen", "Evil Corp", "--file", str(lst))
    assert r.returncode == 4 and "MATCH" in _assert_safe(r, trusted)  # a hit exits 4
    _ok(warden(env, "screen", "update", "--file", str(lst)))
    r = warden(env, "screen", "check", "Evil Corp")
    assert r.returncode == 4
    _assert_safe(r, trusted)
    # a trust label
    pub = json.loads(_ok(warden(env, "key", "export-public", "--json")).stdout)["public_key"]
    _ok(warden(env, "trust", "add", pub, "--label", evil))
    _assert_safe(_ok(warden(env, "trust", "list")), trusted)
    # a model folder named by the attacker, classified; its error path too
    d = tmp_path / ("m\x1b[31m\u202e")
    d.mkdir()
    rng = np.random.default_rng(0)
    save_file({f"model.layers.0.mlp.{n}.weight": rng.standard_normal(s).astype(np.float32)
               for n, s in (("gate_proj", (64, 16)), ("up_proj", (64, 16)), ("down_proj", (16, 64)))}
              | {"model.embed_tokens.weight": rng.standard_normal((32, 16)).astype(np.float32)},
              str(d / "model.safetensors"))  # fmt: skip
    out = _assert_safe(_ok(warden(env, "classify", str(d))), trusted)
    assert "m\\x1b[31m\\u202e" in out
    r = warden(env, "inspect", str(tmp_path / ("nope\x1b[2J\nsigned by " + trusted)))
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    _assert_safe(r, trusted)
    # a recipient name: control, format and bidi characters are refused (one escaped line); markup is not
    hostile = f"[green]signed by {trusted}[/green]\u202e\u2066\x9b2J\x7f"
    r = warden(env, "release", str(d), "--to", hostile, "--country", "FR", "-o", str(tmp_path / "copy"),
               "--model-id", "m", "--plaintext")  # fmt: skip
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and not (tmp_path / "copy").exists()
    _assert_safe(r, trusted)
    who = "[bold]Acme Labs[/bold]"  # markup stays text
    r = _ok(warden(env, "release", str(d), "--to", who, "--country", "FR", "-o", str(tmp_path / "copy"),
                   "--model-id", "m", "--plaintext"))  # fmt: skip
    _assert_safe(r, trusted)
    r = _ok(warden(env, "trace", str(tmp_path / "copy"), "--model", str(d), "--model-id", "m"))
    # the trail holds the exact, unescaped values (escaping is for terminals only)
    from weightwarden import trail

    out = _assert_safe(r, trusted)
    assert "[bold]Acme Labs[/bold]" in out
    assert any(e["detail"].get("recipient") == who for e in trail.events(tmp_path / "home"))


@pytest.mark.skipif(os.name != "posix", reason="POSIX file names")
def test_errors_naming_a_hostile_file_stay_one_line(tmp_path: Path, cli_env: dict[str, str]) -> None:
    env = _env(cli_env, tmp_path / "home")
    bad = tmp_path / "x\u202e\x1b[2J.wws"
    bad.write_bytes(b"not a sealed file")
    for cmd in (["inspect", str(bad)], ["verify", str(bad)]):
        r = warden(env, *cmd)
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
        assert "\x1b" not in r.stderr and "\u202e" not in r.stderr

"""One tamper-evident trail: every security event, appended by the library to the home's Merkle log."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

import weightwarden as ww
from tests.support.cli import TEST_KDF, make_broker_log_key, warden
from tests.support.models import tiny_llama_dir
from weightwarden import api, trail
from weightwarden.errors import AuditLogError, AuditTamperedError, NoAuditLogError, UntrustedSignerError
from weightwarden.keys.provider import ed25519_key_id


def _ok(r):
    assert r.returncode == 0, r.stderr
    return r


def test_a_fresh_home_says_there_is_no_log_yet(cli_env: dict[str, str]) -> None:
    for cmd in (["audit", "verify"], ["audit", "head"], ["audit", "export"], ["audit", "prove", "0"]):
        r = warden(cli_env, *cmd)
        assert r.returncode == 1 and "no audit log yet" in r.stderr, (cmd, r.stderr)
        assert "OperationalError" not in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (Path(cli_env["WARDEN_HOME"]) / "broker" / "broker.db").exists()  # reading created nothing
    with pytest.raises(NoAuditLogError):
        trail.open_log(cli_env["WARDEN_HOME"])


def test_a_cli_only_session_is_one_verified_trail(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """seal, verify, open, release, trace, provenance compare, screen, classify in a fresh home: every one
    is in `warden audit export`, with the key use inside them, and `warden audit verify` passes."""
    home = Path(cli_env["WARDEN_HOME"])
    m = tiny_llama_dir(tmp_path / "m")
    _ok(warden(cli_env, "init"))
    _ok(warden(cli_env, "seal", str(m / "model.safetensors"), "-o", str(tmp_path / "m.wws")))
    nopw = {k: v for k, v in cli_env.items() if k != "WARDEN_PASSPHRASE"}
    _ok(warden(nopw, "verify", str(tmp_path / "m.wws")))  # no keyring unlocked: still appended and signed
    _ok(warden(cli_env, "open", str(tmp_path / "m.wws"), "-o", str(tmp_path / "plain.safetensors")))
    _ok(warden(cli_env, "release", str(m), "--to", "Acme Labs", "--country", "FR", "--plaintext", "-o",
        str(tmp_path / "acme")))
    _ok(warden(cli_env, "trace", str(tmp_path / "acme"), "--model", str(m)))
    _ok(warden(cli_env, "provenance", "compare", str(tmp_path / "acme"), str(m)))
    _ok(warden(nopw, "screen", "Acme Labs", "--country", "FR"))
    _ok(warden(nopw, "classify", str(m)))
    rows = [json.loads(x) for x in _ok(warden(cli_env, "audit", "export")).stdout.splitlines()]
    assert [r["index"] for r in rows] == list(range(len(rows)))
    acts = [r["event"]["action"] for r in rows]
    for a in ("key:create", "key:wrap", "key:sign", "model:seal", "model:verify", "key:unwrap", "model:open",
              "release:gate", "release:create", "trace:run", "provenance:compare", "release:screen",
              "release:classify"):  # fmt: skip
        assert a in acts, a
    assert acts.index("model:seal") < acts.index("model:verify") < acts.index("model:open") < acts.index(
        "release:create") < acts.index("trace:run")  # fmt: skip
    by = {r["event"]["action"]: r["event"] for r in rows}
    assert by["trace:run"]["detail"]["accused"] == ["Acme Labs"]
    assert by["release:create"]["detail"]["recipient"] == "Acme Labs"
    assert by["model:verify"]["outcome"] == "ok" and by["model:verify"]["detail"]["signer"].startswith("ed25519:")
    assert not (home / "audit.jsonl").exists()  # no second, editable trail
    rep = json.loads(_ok(warden(cli_env, "audit", "verify", "--json")).stdout)
    assert rep["events"] == len(rows)
    # the heads are signed by the dedicated audit-log key, never the sealing key; it can be pinned
    pub = _ok(warden(cli_env, "audit", "key")).stdout.strip()
    sealing = _ok(warden(cli_env, "key", "export-public", "--json"))
    assert ww.Keyring.unlock(home, cli_env["WARDEN_PASSPHRASE"]).signer().public_key.hex() != pub
    assert json.loads(sealing.stdout)["key_id"] != json.loads(_ok(warden(cli_env, "audit", "head", "--json")).stdout)[
        "key_id"]  # fmt: skip
    _ok(warden(cli_env, "audit", "verify", "--pubkey", pub))
    other = ww.Keyring.unlock(home, cli_env["WARDEN_PASSPHRASE"]).signer().public_key.hex()
    r = warden(cli_env, "audit", "verify", "--pubkey", other)  # the sealing key did not sign the log
    assert r.returncode == 3 and "AuditTamperedError" in r.stderr  # verification failed: exit 3 (issue 19)


def _filled(home: Path, n: int = 6) -> Path:
    """A home whose trail holds n events, each its own append (its own signed head)."""
    ww.Keyring.create(home, "a passphrase", kdf=TEST_KDF)
    for i in range(n):
        trail.record(ww.audit.AuditAction.RELEASE_SCREEN, home=home, subject=f"party-{i}", decision="clear")
    trail.for_home(home).close()
    return home / "audit" / "trail.db"  # a home without a broker: its local log


@pytest.mark.parametrize("how", ["edit", "delete", "reorder"])
def test_tampering_with_one_event_is_caught(tmp_path: Path, cli_env: dict[str, str], how: str) -> None:
    """An intruder with write access to the log's database edits, deletes or reorders one event:
    `warden audit verify` (the home's pinned log key) refuses the log."""
    home = Path(cli_env["WARDEN_HOME"])
    db = _filled(home)
    before = json.loads(_ok(warden(cli_env, "audit", "verify", "--json")).stdout)["events"]
    con = sqlite3.connect(db)
    with con:
        rows = dict(con.execute("SELECT idx, body FROM ww_audit_events"))
        victim = next(i for i, b in rows.items() if b"party-3" in bytes(b))
        if how == "edit":
            body = bytes(rows[victim]).replace(b'"clear"', b'"match"')
            con.execute("UPDATE ww_audit_events SET body = ? WHERE idx = ?", (body, victim))
        elif how == "delete":
            con.execute("DELETE FROM ww_audit_events WHERE idx = ?", (victim,))
        else:
            con.execute("UPDATE ww_audit_events SET body = ? WHERE idx = ?", (rows[victim + 1], victim))
            con.execute("UPDATE ww_audit_events SET body = ? WHERE idx = ?", (rows[victim], victim + 1))
    con.close()
    r = warden(cli_env, "audit", "verify")
    assert r.returncode == 3 and "AuditTamperedError" in r.stderr and len(r.stderr.splitlines()) == 1
    assert before == 8  # two key:create events, six screenings
    with pytest.raises(AuditTamperedError):
        trail.open_log(home, public_key=trail.log_public_key(home)).verify()


def test_library_calls_log_without_the_cli(tmp_path: Path, keyring: ww.Keyring, st_file: Path,
                                           other_keyring: ww.Keyring) -> None:  # fmt: skip
    """The events are written by the library: seal / verify / unseal through the API land in the trail,
    one append per operation with the key use inside it; a refused verification is logged as denied."""
    home = keyring.home
    start = len(trail.events(home))
    api.seal(st_file, tmp_path / "a.wws", keyring=keyring)
    api.verify(tmp_path / "a.wws", keyring=keyring)
    api.unseal(tmp_path / "a.wws", tmp_path / "plain.safetensors", keyring=keyring)
    api.seal(st_file, tmp_path / "b.wws", keyring=other_keyring)  # a stranger's file
    with pytest.raises(UntrustedSignerError):
        api.verify(tmp_path / "b.wws", keyring=keyring)
    ev = trail.events(home)[start:]
    assert [e["action"] for e in ev] == ["key:wrap", "key:sign", "model:seal", "model:verify", "key:unwrap",
                                         "model:open", "model:verify"]  # fmt: skip
    assert ev[-1]["outcome"] == "denied" and ev[-1]["detail"]["error"] == "UntrustedSignerError"
    assert ev[2]["detail"]["files"][0]["file_id"] and ev[2]["detail"]["signer"] == keyring.signer().key_id
    log = trail.open_log(home, public_key=trail.log_public_key(home))
    assert log.verify()["events"] == start + len(ev)
    assert log.head().key_id != keyring.signer().key_id  # heads: the audit-log key, not the sealing key


def test_the_trail_in_a_configured_database(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a broker database configured (SQLite or PostgreSQL), the trail is there; before its first
    event the database holds no log and reading says so; the events verify under the broker's log key."""
    home = tmp_path / "h"
    pub = make_broker_log_key(home, monkeypatch)
    with pytest.raises(NoAuditLogError):
        trail.open_log(home, db_url)
    assert trail.events(home, db_url) == []
    with trail.operation(home, db_url) as t:
        t.emit(ww.audit.event(ww.audit.AuditAction.RELEASE_SCREEN, subject="a"))
        t.emit(ww.audit.event(ww.audit.AuditAction.RELEASE_CLASSIFY, subject="b"))
    trail.record(ww.audit.AuditAction.TRACE_RUN, home=home, db=db_url, subject="c")
    assert [e["subject"] for e in trail.events(home, db_url)] == ["a", "b", "c"]
    assert trail.log_public_key(home, db_url) == pub
    log = trail.open_log(home, db_url, public_key=pub)
    assert log.verify()["events"] == 3 and log.head().key_id == ed25519_key_id(pub)
    assert not (home / "broker" / "broker.db").exists()  # nothing went to the home's own database
    assert not (home / "audit").exists()  # no local log, no local key: the broker's log key signed
    trail.for_home(home, db_url).close()
    log.close()



def test_an_unwritable_trail_stops_the_operation_before_it_acts(tmp_path: Path, cli_env: dict[str, str],
                                                                st_file: Path) -> None:  # fmt: skip
    """The home's audit folder is blocked (a file where the folder goes): commands refuse with one clear
    line rather than act unlogged; and a log whose key was deleted is not re-keyed behind its back."""
    blocked = cli_env | {"WARDEN_HOME": str(tmp_path / "blocked")}
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "audit").write_text("not a folder")
    r = warden(blocked, "screen", "Acme Labs")
    assert r.returncode == 1 and "AuditLogError" in r.stderr and "writable" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1
    home = Path(cli_env["WARDEN_HOME"])
    _ok(warden(cli_env, "init"))
    (home / "audit" / "log.key").unlink()
    r = warden(cli_env, "seal", str(st_file), "-o", str(tmp_path / "x.wws"))
    assert r.returncode == 1 and "key" in r.stderr and "missing" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "x.wws").exists() and not (home / "audit" / "log.key").exists()


def test_a_broker_home_logs_to_the_brokers_log_signed_by_its_log_key(tmp_path: Path, cli_env: dict[str, str],
                                                                     st_file: Path) -> None:  # fmt: skip
    """A home that first logged locally, then hosts a broker (`warden broker init`): from then on the
    trail is the broker's log, signed by the broker's log key (never by the local audit/log.key, which
    signs only the local log); `trail.events`, `warden audit key|verify` pick it; --log-id pins it."""
    home = Path(cli_env["WARDEN_HOME"])
    _ok(warden(cli_env, "init"))  # no broker yet: the home's local log
    local_pub = trail.log_signer(home, create=False).public_key
    assert [e["action"] for e in trail.events(home)] == ["key:create", "key:create"]
    broker_pub = bytes.fromhex(_ok(warden(cli_env, "broker", "init")).stdout.strip())
    assert broker_pub != local_pub
    _ok(warden(cli_env, "seal", str(st_file), "-o", str(tmp_path / "a.wws")))
    _ok(warden(cli_env, "broker", "account", "svc-1", "--pubkey", "11" * 32))  # the broker appends too
    _ok(warden(cli_env, "screen", "Acme Labs"))
    acts = [e["action"] for e in trail.events(home)]  # the rule picks the broker's log now
    assert "key:create" not in acts and acts.index("model:seal") < acts.index("release:screen"), acts
    assert any(a.startswith("broker:") or a.startswith("account") for a in acts), acts
    assert trail.locate(home) == (f"sqlite:///{home / 'broker' / 'broker.db'}", True)
    # the earlier events stay in the local log, under the local key
    local = trail.open_log(home, f"sqlite:///{home / 'audit' / 'trail.db'}", public_key=local_pub)
    assert local.verify()["events"] == 2 and local.head().key_id == ed25519_key_id(local_pub)
    local.close()
    # every head of the broker's log: the broker's log key (read from its file's public half)
    assert _ok(warden(cli_env, "audit", "key")).stdout.strip() == broker_pub.hex()
    head = json.loads(_ok(warden(cli_env, "audit", "head", "--json")).stdout)
    assert head["key_id"] == ed25519_key_id(broker_pub)
    rep = json.loads(_ok(warden(cli_env, "audit", "verify", "--json", "--log-id", head["log_id"])).stdout)
    assert rep["events"] == len(acts)
    r = warden(cli_env, "audit", "verify", "--pubkey", local_pub.hex())  # the local key signed none of it
    assert r.returncode == 3 and "AuditTamperedError" in r.stderr  # verification failed: exit 3 (issue 19)
    r = warden(cli_env, "audit", "verify", "--log-id", "00" * 16)  # another log's id: refused
    assert r.returncode == 3 and len(r.stderr.splitlines()) == 1


def test_without_the_log_keys_passphrase_a_broker_home_refuses_before_acting(
    tmp_path: Path, cli_env: dict[str, str], st_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attacker (or a misconfigured host) runs commands on a broker home without the log key's
    passphrase file, or with a wrong one: nothing is sealed, nothing appended unsigned, one clear line;
    no local log is started beside the broker's either."""
    home = Path(cli_env["WARDEN_HOME"])
    _ok(warden(cli_env, "broker", "init"))
    _ok(warden(cli_env, "init"))
    before = trail.events(home)
    nopass = {k: v for k, v in cli_env.items() if k != "WARDEN_LOG_KEY_PASSPHRASE_FILE"}
    r = warden(nopass, "seal", str(st_file), "-o", str(tmp_path / "x.wws"))
    assert r.returncode == 1 and "AuditLogError" in r.stderr and "WARDEN_LOG_KEY_PASSPHRASE_FILE" in r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    (tmp_path / "wrong").write_text("not the passphrase\n")
    r = warden(cli_env | {"WARDEN_LOG_KEY_PASSPHRASE_FILE": str(tmp_path / "wrong")}, "seal", str(st_file), "-o",
               str(tmp_path / "x.wws"))  # fmt: skip
    assert r.returncode == 1 and "AuditLogError" in r.stderr and "WARDEN_LOG_KEY" in r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert not (tmp_path / "x.wws").exists()
    assert trail.events(home) == before and not (home / "audit").exists()
    monkeypatch.delenv("WARDEN_LOG_KEY_PASSPHRASE_FILE", raising=False)
    monkeypatch.delenv("WARDEN_BROKER_DB", raising=False)
    with pytest.raises(AuditLogError, match="WARDEN_LOG_KEY_PASSPHRASE_FILE"):  # the library refuses the same way
        trail.record(ww.audit.AuditAction.RELEASE_SCREEN, home=home, subject="x")
    assert trail.events(home) == before


def test_the_custody_agent_of_a_broker_home_appends_to_the_brokers_log(cli_env: dict[str, str]) -> None:
    """The agent starts with a minimal environment; it is given where the trail goes (the log key's
    passphrase file's path, never a passphrase), so its custody events join the broker's log."""
    home = Path(cli_env["WARDEN_HOME"])
    _ok(warden(cli_env, "broker", "init"))
    _ok(warden(cli_env, "init"))
    env = cli_env | {"WARDEN_CUSTODIAN_PASSPHRASE_ANA": "ana's own passphrase",
                     "WARDEN_CUSTODIAN_PASSPHRASE_BO": "bo's own passphrase"}  # fmt: skip
    _ok(warden(env, "custody", "init", "--threshold", "2", "--custodian", "ana=passphrase", "--custodian",
               "bo=passphrase"))  # fmt: skip
    try:
        _ok(warden(env, "agent", "start"))
        _ok(warden(env, "custody", "unseal", "--custodian", "ana"))
        _ok(warden(env, "custody", "unseal", "--custodian", "bo"))
    finally:
        warden(env, "agent", "stop")
    acts = [e["action"] for e in trail.events(home)]
    assert "custody:init" in acts and acts.count("custody:share") >= 2 and "custody:unseal" in acts, acts
    assert not (home / "audit").exists()  # no local log beside the broker's
    assert json.loads(_ok(warden(cli_env, "audit", "verify", "--json")).stdout)["events"] == len(acts)

"""The tamper-evident audit log: RFC 9162 hashing and proofs, signed heads, tampering, replicas.

Every storage test runs on SQLite and on PostgreSQL (127.0.0.1:5432, database ``test``; each
test gets its own schema)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.cli import warden
from weightwarden import audit
from weightwarden.errors import AuditLogError, AuditTamperedError
from weightwarden.keys import Ed25519Signer
from weightwarden.merkle import (
    AuditLog,
    InclusionProof,
    MerkleLogSink,
    SignedHead,
    check_consistency,
    check_inclusion,
)
from weightwarden.merkle import tree as merkle

VECTORS = Path(__file__).parents[1] / "vectors" / "merkle.json"
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


# -- RFC 9162 ---------------------------------------------------------------------------------
def _tree(leaves: list[bytes]) -> tuple[dict[tuple[int, int], bytes], merkle.Frontier]:
    nodes: dict[tuple[int, int], bytes] = {}
    f = merkle.Frontier()
    for d in leaves:
        h = merkle.leaf_hash(d)
        nodes[(0, f.size)] = h
        for lv, i, x in f.push(h):
            nodes[(lv, i)] = x
    return nodes, f


def test_roots_match_the_certificate_transparency_vectors() -> None:
    v = json.loads(VECTORS.read_text())
    leaves = [bytes.fromhex(x) for x in v["leaves_hex"]]
    nodes, _ = _tree(leaves)
    for n, want in enumerate(v["roots_hex"], start=1):
        assert merkle.root_of(merkle.leaf_hash(x) for x in leaves[:n]).hex() == want
        assert merkle.subtree_hash(lambda lv, i: nodes[(lv, i)], 0, n).hex() == want
    assert merkle.root_of([]).hex() == v["empty_root_hex"]


def test_roots_agree_with_pymerkle() -> None:
    pymerkle = pytest.importorskip("pymerkle", reason="pymerkle (dev extra) is the independent implementation")
    t = pymerkle.InmemoryTree(algorithm="sha256")
    leaves = [os.urandom(1 + i % 9) for i in range(70)]
    f = merkle.Frontier()
    for d in leaves:
        t.append_entry(d)
        f.push(merkle.leaf_hash(d))
        assert f.root() == t.get_root(f.size)


def test_every_inclusion_and_consistency_proof_up_to_40_leaves() -> None:
    leaves = [b"e%d" % i for i in range(40)]
    nodes, _ = _tree(leaves)
    get = lambda lv, i: nodes[(lv, i)]
    for n in range(1, 41):
        root = merkle.subtree_hash(get, 0, n)
        for m in range(n):
            p = merkle.inclusion_proof(get, m, n)
            assert merkle.verify_inclusion(nodes[(0, m)], m, n, p, root)
            assert not merkle.verify_inclusion(merkle.leaf_hash(b"forged"), m, n, p, root)
            if m + 1 < n:
                assert not merkle.verify_inclusion(nodes[(0, m)], m + 1, n, p, root)
            for k in range(len(p)):  # any altered path element breaks it
                bad = [*p[:k], bytes(32), *p[k + 1 :]]
                assert not merkle.verify_inclusion(nodes[(0, m)], m, n, bad, root)
        for m in range(n + 1):
            p = merkle.consistency_proof(get, m, n)
            old = merkle.subtree_hash(get, 0, m)
            assert merkle.verify_consistency(m, n, old, root, p)
            if 0 < m < n:
                assert not merkle.verify_consistency(m, n, old, merkle.leaf_hash(b"x"), p)
                assert not merkle.verify_consistency(m, n, merkle.leaf_hash(b"x"), root, p)
                assert not merkle.verify_consistency(m, n, old, root, p[:-1])


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3000), st.data())
def test_proofs_hold_for_any_size(n: int, data: st.DataObject) -> None:
    leaves = [b"%d" % i for i in range(n)]
    nodes, f = _tree(leaves)
    get = lambda lv, i: nodes[(lv, i)]
    assert merkle.subtree_hash(get, 0, n) == f.root()
    m = data.draw(st.integers(0, n - 1))
    assert merkle.verify_inclusion(nodes[(0, m)], m, n, merkle.inclusion_proof(get, m, n), f.root())
    old = data.draw(st.integers(0, n))
    p = merkle.consistency_proof(get, old, n)
    assert merkle.verify_consistency(old, n, merkle.subtree_hash(get, 0, old), f.root(), p)
    assert len(merkle.needed(lambda g: merkle.inclusion_proof(g, m, n))) <= max(1, n.bit_length() ** 2)


# -- the log on SQLite and PostgreSQL (the db_url fixture is in conftest) ---------------------------------
@pytest.fixture
def signer() -> Ed25519Signer:
    return Ed25519Signer.generate("audit-log")


def _ev(i: int) -> audit.AuditEvent:
    return audit.event(audit.AuditAction.KEY_UNWRAP, subject=f"model-{i}", now=NOW, detail={"n": i})


def _filled(url: str, signer: Ed25519Signer, n: int = 300, batch: int = 7, checkpoint: int = 64) -> AuditLog:
    log = AuditLog(url, signer, checkpoint=checkpoint)
    for a in range(0, n, batch):
        log.append([_ev(i) for i in range(a, min(n, a + batch))], now=NOW)
    return log


def test_append_prove_and_verify(db_url: str, signer: Ed25519Signer) -> None:
    log = _filled(db_url, signer)
    assert log.size() == 300 and log.head().size == 300
    rep = log.verify()
    assert rep["events"] == 300 and rep["heads_checked"] >= 300 // 64 + 1
    for i in (0, 1, 63, 64, 150, 299):
        proof = log.prove(i)
        assert check_inclusion(proof, signer.public_key)["subject"] == f"model-{i}"
        # the proof travels as JSON and is checked offline, with the public key only
        again = InclusionProof.from_json(json.loads(json.dumps(proof.to_json())))
        assert check_inclusion(again, signer.public_key)["detail"] == {"n": i}
    # a head kept by a client, then more events: the new head provably extends it
    kept = log.head()
    log.append([_ev(i) for i in range(300, 333)], now=NOW)
    check_consistency(kept, log.head(), log.consistency(kept.size), signer.public_key)
    assert log.verify(against=kept)["against"] == 300
    assert [e["index"] for e in log.export(330)] == [330, 331, 332]
    # the same database opened again (another replica or a later process) sees the same log
    assert AuditLog(db_url, public_key=signer.public_key).verify()["root"] == log.head().root.hex()
    log.close()


def test_bad_requests_change_nothing(db_url: str, signer: Ed25519Signer) -> None:
    log = _filled(db_url, signer, n=20)
    before = log.head()
    with pytest.raises(AuditLogError, match="at most"):
        log.append([_ev(1), {"big": "x" * (1 << 20)}])
    with pytest.raises(AuditLogError, match="not under"):
        log.prove(20)
    with pytest.raises(AuditLogError, match="not under"):
        log.prove(-1)
    with pytest.raises(AuditLogError, match="signing key"):
        AuditLog(db_url, public_key=signer.public_key).append([_ev(0)])
    with pytest.raises(AuditLogError, match="consistency"):
        log.consistency(5, 21)
    for junk in ({}, {"size": 1}, {"size": -1, "root": "00" * 32, "at": "", "key_id": "", "signature": "00" * 64},
                 {"size": 1, "root": "zz", "at": "", "key_id": "", "signature": ""}):  # fmt: skip
        with pytest.raises(AuditLogError, match="not a signed tree head"):
            SignedHead.from_json(junk)
    assert log.head() == before and log.size() == 20
    log.verify()


def _sql(log: AuditLog, stmts: str) -> None:
    """What an intruder with write access to the database does, one statement at a time."""
    with log.engine.connect() as c:
        for stmt in stmts.split("; "):
            with c.begin():
                c.exec_driver_sql(stmt)


TAMPERING = {
    "edit an event": "UPDATE ww_audit_events SET body = CAST('{{\"forged\":1}}' AS {blob}) WHERE idx = 77",
    "delete an event": "DELETE FROM ww_audit_events WHERE idx = 5",
    "reorder two events": "UPDATE ww_audit_events SET idx = 100000 WHERE idx = 10; "
    "UPDATE ww_audit_events SET idx = 10 WHERE idx = 11; UPDATE ww_audit_events SET idx = 11 WHERE idx = 100000",
    "edit a leaf hash": "UPDATE ww_audit_nodes SET hash = {zero} WHERE level = 0 AND idx = 3",
    "edit an interior node": "UPDATE ww_audit_nodes SET hash = {zero} WHERE level = 3 AND idx = 2",
    "delete a node": "DELETE FROM ww_audit_nodes WHERE level = 2 AND idx = 7",
    "add a node": "INSERT INTO ww_audit_nodes (level, idx, hash) VALUES (9, 9, {zero})",
    "forge a head root": "UPDATE ww_audit_heads SET root = {zero} WHERE size = (SELECT MIN(size) FROM ww_audit_heads)",
    "drop the newest head": "DELETE FROM ww_audit_heads WHERE size = (SELECT MAX(size) FROM ww_audit_heads)",
    "claim more events": "UPDATE ww_audit_state SET size = size + 1",
}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_any_edit_to_the_database_is_detected(db_url: str, signer: Ed25519Signer, how: str) -> None:
    log = _filled(db_url, signer, n=150)
    log.verify()
    pg = db_url.startswith("postgresql")
    zero = "decode(repeat('00', 32), 'hex')" if pg else "zeroblob(32)"
    _sql(log, TAMPERING[how].format(zero=zero, blob="bytea" if pg else "BLOB"))
    with pytest.raises(AuditTamperedError):
        log.verify()


def test_a_consistent_rewrite_still_disagrees_with_the_signed_heads(db_url: str, signer: Ed25519Signer) -> None:
    """An intruder edits an event and recomputes every node above it; without the key the heads
    cannot follow."""
    log = _filled(db_url, signer, n=100)
    bodies = [json.dumps(e["event"], sort_keys=True, separators=(",", ":")).encode() for e in log.export()]
    bodies[42] = bodies[42].replace(b"model-42", b"model-00")
    nodes, _ = _tree(bodies)
    blob = "bytea" if db_url.startswith("postgresql") else "BLOB"
    stmts = [f"UPDATE ww_audit_events SET body = CAST('{bodies[42].decode()}' AS {blob}) WHERE idx = 42"]
    stmts += [f"UPDATE ww_audit_nodes SET hash = {_hex_sql(db_url, h)} WHERE level = {lv} AND idx = {i}"
              for (lv, i), h in nodes.items()]  # fmt: skip
    _sql(log, "; ".join(stmts))
    with pytest.raises(AuditTamperedError, match="disagree with the signed head"):
        log.verify()


def _hex_sql(url: str, h: bytes) -> str:
    return f"decode('{h.hex()}', 'hex')" if url.startswith("postgresql") else f"X'{h.hex()}'"


def test_a_rewritten_event_fails_its_inclusion_proof(db_url: str, signer: Ed25519Signer) -> None:
    log = _filled(db_url, signer, n=50)
    good = log.prove(20).to_json()
    good["event"]["subject"] = "someone-else"  # the holder of a proof edits the event it carries
    with pytest.raises(AuditTamperedError, match="not in the signed tree"):
        check_inclusion(InclusionProof.from_json(good), signer.public_key)
    other = Ed25519Signer.generate()
    with pytest.raises(AuditTamperedError, match="not signed by"):
        check_inclusion(log.prove(20), other.public_key)


def test_cutting_the_tail_is_caught_by_a_head_kept_outside(db_url: str, signer: Ed25519Signer) -> None:
    log = _filled(db_url, signer, n=130, checkpoint=64)  # heads kept at sizes 63, 126 and 130
    kept = log.head()  # e.g. shipped to the SIEM with the events
    # an intruder removes events 126.. (back to an older signed head) with every node that covers
    # them, and rolls the size back: every remaining row is consistent and signed, so only the
    # kept head shows the cut
    for stmt in ("DELETE FROM ww_audit_events WHERE idx >= 126",
                 "DELETE FROM ww_audit_nodes WHERE (idx + 1) << level > 126",
                 "DELETE FROM ww_audit_heads WHERE size > 126", "UPDATE ww_audit_state SET size = 126"):  # fmt: skip
        _sql(log, stmt)
    log.verify()
    with pytest.raises(AuditTamperedError, match="events were cut"):
        log.verify(against=kept)


def test_heads_signed_by_another_key_are_rejected(db_url: str, signer: Ed25519Signer) -> None:
    log = _filled(db_url, signer, n=40)
    intruder = AuditLog(db_url, Ed25519Signer.generate("audit-log"))
    intruder.append([_ev(999)], now=NOW)  # someone with database access but not the key
    with pytest.raises(AuditTamperedError, match="not signed by"):
        log.verify()


def test_two_replicas_append_concurrently_without_loss(db_url: str, signer: Ed25519Signer) -> None:
    replicas = [AuditLog(db_url, signer, checkpoint=32) for _ in range(2)]
    seen: list[int] = []
    lock = threading.Lock()

    def work(r: AuditLog, t: int) -> None:
        for k in range(25):
            idx = r.append([_ev(t * 1000 + k)], now=NOW)
            with lock:
                seen.extend(idx)

    threads = [threading.Thread(target=work, args=(replicas[t % 2], t)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(seen) == list(range(150))  # no index given twice, none lost
    assert replicas[0].verify()["events"] == 150
    subjects = {e["event"]["subject"] for e in replicas[1].export()}
    assert subjects == {f"model-{t * 1000 + k}" for t in range(6) for k in range(25)}


def test_group_commit_sink(db_url: str, signer: Ed25519Signer) -> None:
    log = AuditLog(db_url, signer)
    sink = MerkleLogSink(log)
    got: list[int] = []

    def work(t: int) -> None:
        for k in range(40):
            got.append(sink.append(_ev(t * 100 + k)))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    with audit.context(actor="alice"):
        sink.emit(audit.event(audit.AuditAction.RELEASE_CREATE, subject="m"))
    sink.close()
    assert sorted(got) == list(range(320)) and log.size() == 321
    assert log.event(320)["actor"] == "alice"
    log.verify()
    with pytest.raises(AuditLogError, match="closed"):
        sink.append(_ev(0))


# -- CLI ---------------------------------------------------------------------------------------
def test_cli_head_prove_verify_export(cli_env: dict[str, str], tmp_path: Path, signer: Ed25519Signer) -> None:
    url = f"sqlite:///{tmp_path / 'cli-audit.db'}"
    log = _filled(url, signer, n=40)
    pub = signer.public_key.hex()
    r = warden(cli_env, "audit", "head", "--db", url, "--json")
    assert r.returncode == 0, r.stderr
    head = json.loads(r.stdout)
    assert head["size"] == 40
    (tmp_path / "head.json").write_text(json.dumps(head))
    r = warden(cli_env, "audit", "prove", "7", "--db", url, "--json")
    assert r.returncode == 0, r.stderr
    (tmp_path / "proof.json").write_text(r.stdout)
    r = warden(cli_env, "audit", "check-proof", str(tmp_path / "proof.json"), "--pubkey", pub, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["event"]["subject"] == "model-7"
    log.append([_ev(40)], now=NOW)
    r = warden(cli_env, "audit", "verify", "--db", url, "--pubkey", pub, "--against", str(tmp_path / "head.json"),
               "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["events"] == 41
    r = warden(cli_env, "audit", "export", "--db", url, "--start", "39")
    assert [json.loads(x)["index"] for x in r.stdout.splitlines()] == [39, 40]
    _sql(log, "UPDATE ww_audit_events SET body = CAST('{}' AS BLOB) WHERE idx = 3")
    r = warden(cli_env, "audit", "verify", "--db", url, "--pubkey", pub)
    assert r.returncode == 3 and "event 3 does not match" in r.stderr  # verification failed (issue 19)
    r = warden(cli_env, "audit", "verify", "--db", url)  # no key pinned: refuse rather than trust the database
    assert r.returncode == 1 and "public key" in r.stderr


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=70),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=6),
                     max_leaves=20)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(_json, st.sampled_from(["size", "root", "at", "key_id", "signature", "index", "event", "path", "head",
                                "log_id", "version"]))  # fmt: skip
def test_hostile_proof_and_head_json_is_a_typed_error(junk: object, key: str) -> None:
    """Parsers of proofs and heads from outside raise AuditLogError and nothing else."""
    head = {"version": 2, "log_id": "00" * 16, "size": 3, "root": "00" * 32, "at": "x", "key_id": "k",
            "signature": "00" * 64}  # fmt: skip
    proof = {"index": 0, "event": {}, "path": [], "head": head}
    docs = [junk, {**head, key: junk}, {**proof, key: junk}, {**proof, "head": {**head, key: junk}}]
    for doc in docs:
        for parse in (SignedHead.from_json, InclusionProof.from_json):
            with contextlib.suppress(AuditLogError):
                parse(doc)


# -- one key, one purpose; heads name their log (issue 16) --------------------------------------------
def _tables(url: str) -> set[str]:
    import sqlalchemy as sa

    eng = sa.create_engine(url)
    try:
        return {t for t in sa.inspect(eng).get_table_names() if t.startswith("ww_audit")}
    finally:
        eng.dispose()


def _blob(url: str, b: bytes) -> str:
    return f"decode('{b.hex()}', 'hex')" if url.startswith("postgresql") else f"x'{b.hex()}'"


def test_a_sealing_key_cannot_sign_tree_heads(db_url: str) -> None:
    """The log refuses a signer of another purpose before it touches the database."""
    from weightwarden.errors import KeyPurposeError

    for purpose in ("sealing", "export-rules"):
        with pytest.raises(KeyPurposeError, match="'audit-log' key"):
            AuditLog(db_url, Ed25519Signer.generate(purpose))
    assert _tables(db_url) == set()  # nothing was created
    AuditLog(db_url, Ed25519Signer.generate("audit-log")).close()
    assert "ww_audit_meta" in _tables(db_url)  # (what a log of the right key creates)


def test_a_tree_head_signed_by_a_sealing_key_is_refused(db_url: str, signer: Ed25519Signer) -> None:
    """An intruder holding the database and a sealing key (not the log's) re-signs the latest head
    under the sealing label: refused offline and by verify, whichever key the verifier pins."""
    from weightwarden.errors import HeadKeyPurposeError

    log = _filled(db_url, signer, n=20)
    h = log.head()
    sealing = Ed25519Signer.generate("sealing")
    forged_sig = sealing.sign_unaudited(SignedHead.message(h.log_id, h.size, h.root, h.at))
    forged = SignedHead(h.size, h.root, h.at, sealing.key_id, forged_sig, h.log_id)
    with pytest.raises(HeadKeyPurposeError, match="purpose 'sealing'"):
        forged.check(sealing.public_key)
    with pytest.raises(AuditTamperedError, match="not signed by"):
        forged.check(signer.public_key)
    before = list(log.export())
    _sql(log, f"UPDATE ww_audit_heads SET signature = {_blob(db_url, forged_sig)}, key_id = '{sealing.key_id}' "
              f"WHERE size = {h.size}")  # fmt: skip
    with pytest.raises(HeadKeyPurposeError):
        log.verify(public_key=sealing.public_key)  # pinned on the wrong (sealing) key: still refused
    with pytest.raises(AuditTamperedError, match="not signed by"):
        log.verify()
    with pytest.raises(HeadKeyPurposeError):
        check_inclusion(log.prove(3), sealing.public_key)
    assert log.size() == 20 and list(log.export()) == before  # refusals change nothing


def test_another_log_signed_by_the_same_key_is_refused_when_pinned(db_url: str, signer: Ed25519Signer) -> None:
    """The broker's key signs a whole different log (an intruder swapped the database for it): every
    head, proof and the database itself name another log id, refused once the log id is pinned."""
    from weightwarden.errors import LogIdentityError

    log = _filled(db_url, signer, n=30)
    pinned, kept, proof = log.log_id, log.head(), log.prove(5)
    for t in ("ww_audit_events", "ww_audit_nodes", "ww_audit_heads", "ww_audit_state", "ww_audit_meta"):
        _sql(log, f"DROP TABLE {t}")
    log.close()
    other = AuditLog(db_url, signer)  # a fresh log in its place, same key
    other.append([audit.event(audit.AuditAction.KEY_UNWRAP, subject="nothing-to-see", now=NOW)], now=NOW)
    assert other.log_id != pinned
    other.verify()  # unpinned, it is a valid log of that key: why the id must be pinned
    swapped = AuditLog(db_url, public_key=signer.public_key, log_id=pinned.hex(), create=False)
    for call in (swapped.verify, swapped.head, lambda: swapped.prove(0)):
        with pytest.raises(LogIdentityError, match="not the pinned log"):
            call()
    with pytest.raises(LogIdentityError):
        other.verify(against=kept)  # a head kept from the real log, even without a pinned id
    with pytest.raises(LogIdentityError):
        check_inclusion(other.prove(0), signer.public_key, pinned)
    with pytest.raises(LogIdentityError):
        check_consistency(kept, other.head(), [], signer.public_key)
    check_inclusion(proof, signer.public_key, pinned)  # the real log's proof still checks offline
    assert other.size() == 1  # refusals wrote nothing


def test_heads_copied_from_another_log_do_not_verify(db_url: str, tmp_path: Path, signer: Ed25519Signer) -> None:
    """Same key, same events, another log: its signed heads do not pass for this log's (the log id is
    in the signed message)."""
    a = _filled(db_url, signer, n=10)
    b = _filled(f"sqlite:///{tmp_path / 'twin.db'}", signer, n=10)
    assert a.head().root == b.head().root and a.log_id != b.log_id
    hb = b.head()
    _sql(a, f"UPDATE ww_audit_heads SET signature = {_blob(db_url, hb.signature)}, at = '{hb.at}' WHERE size = 10")
    with pytest.raises(AuditTamperedError, match="not signed by"):
        a.verify()


def test_a_log_without_a_log_id_is_refused(db_url: str, signer: Ed25519Signer) -> None:
    """A log written before heads named their log (events, no id) is not verified, nor appended to."""
    log = _filled(db_url, signer, n=5)
    _sql(log, "DELETE FROM ww_audit_meta")
    log.close()
    again = AuditLog(db_url, signer)  # opening does not invent an id for a log that holds events
    for call in (again.verify, again.head, lambda: again.append([_ev(9)], now=NOW)):
        with pytest.raises(AuditLogError, match="no log id"):
            call()
    assert again.size() == 5
    rows = list(again.export())  # its events can still be moved out
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4] and rows[0]["log_id"] is None


def test_cli_pins_the_log_id(cli_env: dict[str, str], tmp_path: Path, signer: Ed25519Signer) -> None:
    url = f"sqlite:///{tmp_path / 'cli-audit.db'}"
    log = _filled(url, signer, n=12)
    pub, lid = signer.public_key.hex(), log.log_id.hex()
    r = warden(cli_env, "audit", "head", "--db", url, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["log_id"] == lid
    r = warden(cli_env, "audit", "export", "--db", url, "--start", "10")
    assert [json.loads(x)["log_id"] for x in r.stdout.splitlines()] == [lid, lid]
    r = warden(cli_env, "audit", "verify", "--db", url, "--pubkey", pub, "--log-id", lid, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["log_id_pinned"] is True
    r = warden(cli_env, "audit", "verify", "--db", url, "--pubkey", pub, "--log-id", "ab" * 16)
    assert r.returncode == 3 and "not the pinned log" in r.stderr
    r = warden({**cli_env, "WARDEN_AUDIT_LOG_ID": "cd" * 16}, "audit", "verify", "--db", url, "--pubkey", pub)
    assert r.returncode == 3 and "not the pinned log" in r.stderr
    r = warden(cli_env, "audit", "verify", "--db", url, "--pubkey", pub, "--log-id", "xyz")
    assert r.returncode == 1 and "--log-id must be 32 hex digits" in r.stderr
    r = warden(cli_env, "audit", "prove", "4", "--db", url, "--json")
    (tmp_path / "proof.json").write_text(r.stdout)
    r = warden(cli_env, "audit", "check-proof", str(tmp_path / "proof.json"), "--pubkey", pub, "--log-id", "ab" * 16)
    assert r.returncode == 3 and "not of the pinned log" in r.stderr
    r = warden(cli_env, "audit", "check-proof", str(tmp_path / "proof.json"), "--pubkey", pub, "--log-id", lid)
    assert r.returncode == 0 and lid in r.stdout

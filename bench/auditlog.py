"""Audit-log benchmark (issue 6 targets): append rate on SQLite and PostgreSQL, proof latency at 10^7.

    python bench/auditlog.py [--events 20000] [--big 10000000] [--threads 32] [--no-pg]

Prints JSON.  Baseline: the same canonical event bodies inserted into a plain table (no
Merkle nodes, no signature), side by side in one run; the machine is shared and noisy, so
read the ratios.  Appends are measured three ways: one transaction per event, the group-commit
sink under ``--threads`` concurrent writers (what the broker uses), and batches of 500.  The
proof latency is measured on a SQLite log of ``--big`` events whose nodes are bulk-loaded
(building it event by event would take hours on two cores); the proof path is the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from weightwarden import audit
from weightwarden.keys import Ed25519Signer
from weightwarden.merkle import AuditLog, MerkleLogSink, SignedHead, check_inclusion
from weightwarden.merkle import tree as merkle
from weightwarden.merkle.heads import event_body as _canonical

PG = os.environ.get("WARDEN_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
NOW = datetime(2026, 11, 28, tzinfo=UTC)


def _ev(i: int) -> audit.AuditEvent:
    return audit.event(audit.AuditAction.KEY_UNWRAP, subject=f"model-{i % 97}", now=NOW, detail={"bytes": i})


def _pg_schema() -> tuple[str, object]:
    import sqlalchemy as sa

    eng = sa.create_engine(PG)
    schema = "bench_" + uuid.uuid4().hex[:10]
    with eng.begin() as c:
        c.exec_driver_sql(f"CREATE SCHEMA {schema}")
    return f"{PG}?options=-csearch_path%3D{schema}", (eng, schema)


def _drop(handle: object) -> None:
    eng, schema = handle  # type: ignore[misc]
    with eng.begin() as c:
        c.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    eng.dispose()


def plain_rate(url: str, bodies: list[bytes], batch: int, table: str) -> float:
    """Events/s inserting the bodies into a plain table: the floor any log pays."""
    import sqlalchemy as sa

    log = AuditLog(url, None, create=True)  # reuse its engine settings (WAL + full fsync on SQLite)
    md = sa.MetaData()
    t = sa.Table(table, md, sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
                 sa.Column("body", sa.LargeBinary))  # fmt: skip
    md.create_all(log.engine)
    t0 = time.perf_counter()
    for a in range(0, len(bodies), batch):
        with log.engine.connect() as c0, c0.execution_options(ww_write=True).begin():
            c0.execute(sa.insert(t), [{"idx": a + k, "body": b} for k, b in enumerate(bodies[a : a + batch])])
    dt = time.perf_counter() - t0
    log.close()
    return len(bodies) / dt


def log_rates(url: str, n: int, threads: int) -> dict:
    signer = Ed25519Signer.generate("audit-log")
    bodies = [_canonical(_ev(i)) for i in range(n)]
    single_n = max(200, n // 20)
    out: dict = {}
    out["plain_insert_per_event_tx_per_s"] = round(plain_rate(url, bodies[:single_n], 1, "plain_single"))
    out["plain_insert_batch500_per_s"] = round(plain_rate(url, bodies, 500, "plain_batch"))
    log = AuditLog(url, signer)
    t0 = time.perf_counter()
    for i in range(single_n):
        log.append([_ev(i)], now=NOW)
    out["log_append_per_event_tx_per_s"] = round(single_n / (time.perf_counter() - t0))
    sink = MerkleLogSink(log)
    per = n // threads

    def work(t: int) -> None:
        for k in range(per):
            sink.append(_ev(t * per + k))

    ths = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    dt = time.perf_counter() - t0
    sink.close()
    out[f"log_group_commit_{threads}_writers_per_s"] = round(per * threads / dt)
    t0 = time.perf_counter()
    for a in range(0, n, 500):
        log.append([_ev(i) for i in range(a, min(n, a + 500))], now=NOW)
    out["log_append_batch500_per_s"] = round(n / (time.perf_counter() - t0))
    size = log.size()
    t0 = time.perf_counter()
    rep = log.verify()
    out["verify_events_per_s"] = round(rep["events"] / (time.perf_counter() - t0))
    out["events_in_log"] = size
    out["ratio_group_commit_over_plain_per_event_tx"] = round(
        out[f"log_group_commit_{threads}_writers_per_s"] / out["plain_insert_per_event_tx_per_s"], 2)  # fmt: skip
    out["ratio_append_per_event_over_plain_per_event"] = round(
        out["log_append_per_event_tx_per_s"] / out["plain_insert_per_event_tx_per_s"], 2)  # fmt: skip
    b, pb = out["log_append_batch500_per_s"], out["plain_insert_batch500_per_s"]
    out["ratio_batch500_over_plain_batch500"] = round(b / pb, 2)
    log.close()
    return out


def build_big(path: Path, n: int, signer: Ed25519Signer) -> SignedHead:
    """A SQLite log of ``n`` events: every node bulk-loaded, bodies stored for a sample only."""
    log = AuditLog(f"sqlite:///{path}", signer)
    log_id = log.log_id
    log.close()
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=OFF")
    f = merkle.Frontier()
    rows: list[tuple[int, int, bytes]] = []
    bodies: list[tuple[int, bytes]] = []
    for i in range(n):
        b = _canonical({"action": "key:unwrap", "i": i})
        h = merkle.leaf_hash(b)
        rows.append((0, i, h))
        rows.extend(f.push(h))
        if i % 9973 == 0:
            bodies.append((i, b))
        if len(rows) >= 500_000:
            con.executemany("INSERT INTO ww_audit_nodes (level, idx, hash) VALUES (?, ?, ?)", rows)
            rows.clear()
    con.executemany("INSERT INTO ww_audit_nodes (level, idx, hash) VALUES (?, ?, ?)", rows)
    con.executemany("INSERT INTO ww_audit_events (idx, body) VALUES (?, ?)", bodies)
    at = NOW.isoformat(timespec="microseconds")
    sig = signer.sign_unaudited(SignedHead.message(log_id, n, f.root(), at))
    con.execute("INSERT INTO ww_audit_heads (size, root, at, key_id, signature) VALUES (?, ?, ?, ?, ?)",
                (n, f.root(), at, signer.key_id, sig))  # fmt: skip
    con.execute("UPDATE ww_audit_state SET size = ?", (n,))
    con.commit()
    con.close()
    return SignedHead(n, f.root(), at, signer.key_id, sig, log_id)


def proof_latency(n: int, tmp: Path) -> dict:
    signer = Ed25519Signer.generate("audit-log")
    t0 = time.perf_counter()
    head = build_big(tmp / "big.db", n, signer)
    build = time.perf_counter() - t0
    log = AuditLog(f"sqlite:///{tmp / 'big.db'}", public_key=signer.public_key, create=False)
    idx = list(range(0, n, 9973))
    for i in idx[:20]:  # warm the connection pool and page cache
        log.prove(i, head)
    lat, lat_head = [], []
    for i in idx[:500]:
        t = time.perf_counter()
        p = log.prove(i, head)
        lat.append(time.perf_counter() - t)
        check_inclusion(p, signer.public_key)
    for i in idx[:200]:
        t = time.perf_counter()
        log.prove(i)  # also reads the latest head
        lat_head.append(time.perf_counter() - t)
    t = time.perf_counter()
    for i in idx[:500]:
        check_inclusion(log.prove(i, head), signer.public_key)
    check = (time.perf_counter() - t) / len(idx[:500])
    log.close()
    return {
        "events": n,
        "build_seconds": round(build, 1),
        "proof_path_length": len(p.path),
        "prove_ms_median": round(1000 * statistics.median(lat), 3),
        "prove_ms_p99": round(1000 * sorted(lat)[int(0.99 * len(lat))], 3),
        "prove_with_latest_head_ms_median": round(1000 * statistics.median(lat_head), 3),
        "prove_and_check_offline_ms_mean": round(1000 * check, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--big", type=int, default=10_000_000)
    ap.add_argument("--no-pg", action="store_true")
    args = ap.parse_args()
    out: dict = {"cores": os.cpu_count(), "python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        out["sqlite"] = log_rates(f"sqlite:///{tmp / 'rates.db'}", args.events, args.threads)
        if not args.no_pg:
            try:
                url, handle = _pg_schema()
            except Exception as e:  # report it; the other measures still run
                out["postgresql"] = {"error": f"unreachable: {type(e).__name__}"}
            else:
                try:
                    out["postgresql"] = log_rates(url, args.events, args.threads)
                finally:
                    _drop(handle)
        if args.big:
            out["inclusion_proof"] = proof_latency(args.big, tmp)
    out["targets"] = {
        "append_per_s_at_least": 5000,
        "proof_ms_under": 1.0,
    }
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

"""What writing each probe query's audit event as it happens costs (issue 21).  Prints JSON.

    python bench/query_events.py [--events 200]

A probe's ``provenance:query`` events are appended one by one (``trail.record_now``: a transaction and a
signed head each), so that a killed probe keeps them; before, they were buffered and appended in one batch
when the probe ended.  This times both on a fresh home's local trail (SQLite).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from weightwarden import trail
from weightwarden.audit import AuditAction


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200)
    n = ap.parse_args().events
    home = tempfile.mkdtemp(prefix="warden-bench-")
    detail = {"subject": "http://127.0.0.1:8000/v1", "route": "/completions", "status": 200, "attempt": 0, "ms": 1.0}
    trail.record_now(AuditAction.PROVENANCE_QUERY, home=home, **detail)  # creates the log and its key
    t0 = time.perf_counter()
    for i in range(n):
        trail.record_now(AuditAction.PROVENANCE_QUERY, home=home, request=f"{i:016x}", **detail)
    t1 = time.perf_counter()
    with trail.operation(home):
        for i in range(n):
            trail.record(AuditAction.PROVENANCE_QUERY, home=home, request=f"{i:016x}", **detail)
    t2 = time.perf_counter()
    print(json.dumps({"events": n, "ms_per_event_as_it_happens": round((t1 - t0) / n * 1000, 2),
                      "ms_per_event_one_batch": round((t2 - t1) / n * 1000, 3),
                      "events_in_trail": len(trail.events(home))}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()

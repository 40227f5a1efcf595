"""The zero-copy door meters the next span while the current one goes out (issue 18, the faster door):
the bookkeeping stays exact — every byte is debited before it leaves, a span metered ahead and never sent
is not counted as sent (it is a resume's credit, never charged twice), and the audit trail is unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import Http, make_broker, serving
from weightwarden.broker.service import BrokerConfig, Limit

pytest.importorskip("uvicorn", reason="the zero-copy protocol is in the server extra")

SPAN = 1 << 16  # the sealed fixture is ~1.5 MiB: some 24 spans, each metered while the one before goes out


def _stream_events(b: Any) -> list[dict[str, Any]]:
    return [e["event"]["detail"] | {"outcome": e["event"]["outcome"]} for e in b.log.export()
            if e["event"]["action"] == "broker:stream"]  # fmt: skip


def _egress(b: Any) -> list[int]:
    import sqlalchemy as sa

    with b.engine.connect() as c:
        return list(c.execute(sa.select(b.t.egress.c.bytes).order_by(b.t.egress.c.id)).scalars())


def _tokens(b: Any, key: str) -> float:
    import sqlalchemy as sa

    with b.engine.connect() as c:
        return float(c.execute(sa.select(b.t.buckets.c.tokens).where(b.t.buckets.c.key == key)).scalar_one())


def test_a_span_metered_ahead_and_never_sent_is_not_charged_twice(tmp_path: Path, sealed: Path) -> None:
    """ATTACK (on the budget's fairness, and on the record): a span the server metered ahead but never sent
    (the client went away) must not count as sent, or a resume would pay for it a second time.  The stream
    keeps it charged; the resume of everything after the bytes really sent is served without a new charge
    (the budget could not pay twice), and only the last chunk taken can be given back."""
    data = sealed.read_bytes()
    n = len(data)
    cfg = BrokerConfig(chunk=SPAN, zero_copy_span=SPAN, max_models_per_hour=99,
                       per_principal=Limit(rate=0.0, burst=n + 4096))  # fmt: skip
    b, a = make_broker(f"sqlite:///{tmp_path / 'b.db'}", tmp_path, sealed, cfg)
    it = b.stream(b.principal("loader"), "m1", zero_copy=True)
    first = next(it)  # sent
    ahead = next(it)  # metered ahead, then the client went away: never sent
    it.unsent(10 * n)  # more than the last chunk: bounded to it
    it.close()
    assert len(first) == len(ahead) == SPAN
    closed = [d for d in _stream_events(b) if d["phase"] == "closed"]
    assert [(d["bytes"], d["charged"]) for d in closed] == [(SPAN, n)]
    assert _egress(b) == [SPAN]  # what the anomaly rules count: bytes sent, not bytes metered
    # the resume from the bytes really sent is the credit (the tail paid for and never sent): not charged again
    r = Http(b)(a["loader"], "GET", "/v1/models/m1/weights", headers={"range": f"bytes={SPAN}-", "if-match": it.etag})
    assert r.status_code == 206 and data[:SPAN] + r.content == data
    assert _egress(b) == [SPAN, n - SPAN]
    b.close()


@pytest.mark.parametrize("ahead", [True, False])
def test_zero_copy_streams_metered_ahead_are_exact_over_a_real_server(tmp_path: Path, sealed: Path,
                                                                      ahead: bool) -> None:  # fmt: skip
    """Over uvicorn with the zero-copy protocol (as `warden serve` runs it), with spans small enough that
    every one of some 24 is metered while the one before goes out (``ahead``; or each after the one before,
    ``zero_copy_ahead=False``): the bytes are the file's, the budget is debited exactly what was sent, and
    the trail holds one start and one end per stream."""
    import httpx

    data = sealed.read_bytes()
    n = len(data)
    burst = 3 * n
    cfg = BrokerConfig(chunk=SPAN, zero_copy_span=SPAN, max_models_per_hour=99,
                       per_principal=Limit(rate=0.0, burst=burst), zero_copy_ahead=ahead)  # fmt: skip
    b, a = make_broker(f"sqlite:///{tmp_path / 'b.db'}", tmp_path, sealed, cfg)
    ld = a["loader"]
    with serving(b, tmp_path / "b.sock") as url, httpx.Client(
            transport=httpx.HTTPTransport(uds=url[5:]), base_url="http://localhost") as h:  # fmt: skip

        def get(**headers: str) -> Any:
            path = "/v1/models/m1/weights"
            return h.get(path, headers={**headers, "authorization": f"Bearer {ld.token('GET', path)}"})

        full = get()
        assert full.status_code == 200 and full.content == data
        part = get(range=f"bytes={SPAN + 7}-{3 * SPAN + 100}")  # spans that start and end inside spans
        assert part.status_code == 206 and part.content == data[SPAN + 7 : 3 * SPAN + 101]
    assert _egress(b) == [n, 2 * SPAN + 94]
    assert _tokens(b, "p:loader") == pytest.approx(burst - n - (2 * SPAN + 94), abs=1)
    ev = _stream_events(b)
    assert [(d["phase"], d["outcome"]) for d in ev] == [("start", "ok"), ("end", "ok")] * 2
    assert all(d["zero_copy"] for d in ev if d["phase"] == "start")
    assert [d["bytes"] for d in ev if d["phase"] == "end"] == [n, 2 * SPAN + 94]
    b.close()


def test_the_last_span_is_marked_even_in_a_file_shorter_than_its_record(tmp_path: Path) -> None:
    """The door meters ahead only while a span follows: asking past the last one closes the file the last
    span is still being sent from.  A file shorter than the range asked (its record) still marks its last
    span, so the door never asks past it."""
    from weightwarden.broker.zerocopy import file_spans

    f = tmp_path / "x.wws"
    f.write_bytes(b"a" * 100)
    spans = list(file_spans(f, 0, 1000, 40))
    assert [(x.offset, x.count, x.last) for x in spans] == [(0, 40, False), (40, 40, False), (80, 20, True)]
    assert [(x.offset, x.count, x.last) for x in file_spans(f, 10, 50, 40)] == [(10, 40, True)]

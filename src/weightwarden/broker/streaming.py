"""Metered weight streams: single byte ranges, resumes, egress debited per lease, cuts on suspension."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from ..audit import AuditAction
from .errors import (
    BrokerError,
    Conflict,
    EgressLimitError,
    Forbidden,
    PreconditionFailed,
    RangeError,
    RangeNotSatisfiable,
    StreamCut,
)
from .policy import Permission, Principal
from .schema import BrokerState, _ts
from .storage import CHUNK

__all__ = ["Streaming", "WeightStream", "parse_range"]

_RANGE = re.compile(r"bytes=(?:(\d{1,19})-(\d{0,19})|-(\d{1,19}))")


def parse_range(header: str, total: int) -> tuple[int, int]:
    """A single ``Range`` (``bytes=a-b``, ``a-``, ``-n``) against a file of ``total`` bytes:
    ``(start, end)``, end exclusive.  Several ranges, or a malformed one, raise :class:`RangeError`;
    one outside the file, :class:`RangeNotSatisfiable`."""
    h = header.strip()
    if "," in h:
        raise RangeError("only a single byte range is served (multiple or overlapping ranges are refused)")
    m = _RANGE.fullmatch(h)
    if m is None:
        raise RangeError("malformed Range header: use bytes=START-END, bytes=START- or bytes=-LENGTH")
    a, b, n = m.groups()
    if n is not None:
        if int(n) == 0 or total == 0:
            raise RangeNotSatisfiable("the range is empty", total)
        return max(0, total - int(n)), total
    start = int(a)
    if b and int(b) < start:
        raise RangeError("malformed Range header: END is before START")
    if start >= total:
        raise RangeNotSatisfiable(f"the range starts at or past the end of the file ({total} bytes)", total)
    return start, min(total, int(b) + 1) if b else total

class WeightStream(Iterator[bytes]):
    """The chunks of a weight stream (debited from the egress buckets as they go) and its ``size``."""

    def __init__(self, chunks: Iterator[bytes], size: int, *, start: int = 0, total: int | None = None,
                 etag: str | None = None, partial: bool = False, file_id: str | None = None,
                 state: dict[str, int] | None = None):  # fmt: skip
        self._chunks, self.size, self.file_id = chunks, size, file_id  # file_id: the sealed header's, hex
        self._state = state  # shared with the metering generator: what the consumer did not send
        self.start, self.total, self.etag, self.partial = start, size if total is None else total, etag, partial

    def __iter__(self) -> WeightStream:
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    def unsent(self, n: int) -> None:
        """The consumer took the last chunk (``n`` bytes: a span metered ahead) and never sent it: when the
        stream is closed it is not counted as sent (it stays charged, and a resume gets it back as credit).
        Only the last chunk taken can be given back; call before :meth:`close`."""
        if self._state is not None:
            self._state["unsent"] = n

    def close(self) -> None:
        getattr(self._chunks, "close", lambda: None)()


class Streaming(BrokerState):
    """A stream of a sealed file to a workload, or the single-use copy of an approved request."""

    def stream(self, p: Principal, model: str, *, request_id: str | None = None, network: str | None = None,
               range_: str | None = None, if_match: str | None = None, zero_copy: bool = False,
               now: datetime | None = None) -> WeightStream:  # fmt: skip
        """Authorize, then return an iterator over the sealed file that debits the egress buckets per chunk.

        Without ``request_id``: a stream to a workload (``model:weights:stream``).  With it: the full
        copy of an approved request, usable once (its requester may resume it with ranged requests until
        the request's window closes).  ``range_``: one HTTP byte range; ``if_match``: the ETag the
        caller's partial copy came from (a resume against another version of the file fails with
        :class:`PreconditionFailed`).  The stream is registered with the anomaly rules before its first
        byte, and ends (:class:`StreamCut`) at the next chunk after its principal is suspended.
        ``zero_copy`` (a server that sends files with ``sendfile``): from a local store, the stream yields
        :class:`~.zerocopy.FileSpan` objects (metered alike) instead of bytes."""
        import sqlalchemy as sa

        if request_id is None:
            self.authorize(p, Permission.MODEL_WEIGHTS_STREAM, model, now=now, hide=True)
        info = self.model(model)
        obj, extra, resume = model, {}, False
        if request_id is not None:
            req = self.request(request_id, now=now)
            if req["model"] != model or req["requester"] != p.id:
                raise Forbidden("the request is for another model or requester")
            # a used request's requester may resume it (ranged requests) while its window is open
            resume = req["status"] == "used" and range_ is not None and int(_ts(now)) < req["expires"]
            if req["status"] in ("used", "expired") and not resume:
                raise Conflict(f"the request is {req['status']}")
            release = req["action"] == "release"
            if release and not req["artifact"]:
                raise Conflict("a release streams its fingerprinted copy: make it first (warden release --request)")
            perm = Permission.RELEASE_COPY_CREATE if release else Permission.MODEL_WEIGHTS_COPY
            ready = resume or req["status"] == ("released" if release else "approved")
            self.authorize(p, perm, model, context={"approved": ready}, now=now)
            if release:
                obj, extra = req["artifact"], {"copy": req["artifact"]}
                info = {"size": self.store.size(obj)}
        total, etag = info["size"], self.store.etag(obj)
        try:
            if if_match is not None and if_match.strip() not in ("*", etag):
                raise PreconditionFailed("the file changed since your partial copy (ETag differs): download it "
                                         "again from the start")  # fmt: skip
            first, stop = parse_range(range_, total) if range_ is not None else (0, total)
        except BrokerError as e:
            self.audit(AuditAction.BROKER_STREAM, "denied", p.id, model, now=now, phase="refused", reason=str(e),
                       range=(range_ or "")[:100], request=request_id)  # fmt: skip
            raise
        if request_id is not None and not resume:
            with self._write() as c:  # single use: approved (released) -> used, atomically
                n = c.execute(sa.update(self.t.requests).where(self.t.requests.c.id == request_id,
                              self.t.requests.c.status == ("released" if release else "approved"))
                              .values(status="used")).rowcount  # fmt: skip
            if n != 1:
                raise Conflict("the approved request was already used")
        download = f"{p.id}:{obj}:{etag}"[:300]
        sid = self._admit(p, model, stop - first, network, now)
        free = self._take_credit(p, download, stop - first, now) if range_ is not None else 0
        local_path: Callable[[str], Path] | None = getattr(self.store, "path", None)  # LocalWeightStore's
        zero_copy = zero_copy and callable(local_path)
        try:
            if zero_copy and local_path is not None:
                from .zerocopy import file_spans

                chunks: Iterator[Any] = file_spans(local_path(obj), first, stop, self.config.zero_copy_span)
            else:
                chunks = self.store.read(obj, self.config.chunk, first, stop)
        except BaseException:
            self._finish(sid, p, model, download, 0, 0, free, 0, now)
            raise
        if range_ is not None:
            extra |= {"range": f"{first}-{stop - 1}/{total}", "free": free}
        if zero_copy:
            extra["zero_copy"] = True
        self.audit(AuditAction.BROKER_STREAM, "ok", p.id, model, now=now, phase="start", bytes=stop - first,
                   request=request_id, network=network, **extra)  # fmt: skip
        state = {"unsent": 0}
        it = self._metered(sid, p, model, chunks, first, stop, free, download, now, state)
        file_id = None if extra.get("copy") else info.get("detail", {}).get("file_id")
        return WeightStream(it, stop - first, start=first, total=total, etag=etag, partial=range_ is not None,
                            file_id=file_id, state=state)  # fmt: skip

    def _take_credit(self, p: Principal, download: str, n: int, now: datetime | None) -> int:
        """A ranged request takes, from its download's record, up to ``n`` bytes it may be sent without
        charge: at most what was charged and not sent (a cut stream's reserved tail), within
        ``resume_window_s``.  The credit is reserved now (counted as sent) so two resumes at once cannot
        both spend it; :meth:`_finish` gives back what the stream did not send.  Serialised per principal."""
        import sqlalchemy as sa

        t = int(_ts(now))
        d, a = self.t.downloads, self.t.accounts
        with self._write() as c:
            c.execute(sa.select(a.c.id).where(a.c.id == p.id).with_for_update())
            r = c.execute(sa.select(d).where(d.c.download == download).with_for_update()).first()
            if r is None or r.at <= t - self.config.resume_window_s:
                return 0
            free = max(0, min(n, int(r.charged) - int(r.sent)))
            if free:
                c.execute(sa.update(d).where(d.c.download == download).values(sent=d.c.sent + free))
        return free

    def _finish(self, sid: str, p: Principal, model: str, download: str, charged: int, sent: int, free: int,
                free_used: int, now: datetime | None) -> None:  # fmt: skip
        """A stream ends: its registration becomes an egress record of the bytes it *sent* (what the
        volume rule counts), and its download's record adds the bytes it was charged (a cut stream's
        reserved, unsent tail included) and sent; the part of its resume credit (``free``) it did not
        use is given back.  Serialised per principal (its row locked)."""
        import sqlalchemy as sa

        t = int(_ts(now))
        d, a = self.t.downloads, self.t.accounts
        self._finishes += 1
        with self._write() as c:
            c.execute(sa.select(a.c.id).where(a.c.id == p.id).with_for_update())
            if self._finishes % 256 == 1:  # downloads past the resume window are swept now and then
                c.execute(sa.delete(d).where(d.c.at < t - self.config.resume_window_s))
            r = c.execute(sa.select(d).where(d.c.download == download).with_for_update()).first()
            # the credit was counted as sent when taken: what it did not use goes back to the record
            dsent = sent - free
            if r is None:
                c.execute(sa.insert(d).values(download=download, charged=charged, sent=sent, at=t))
            else:
                c.execute(sa.update(d).where(d.c.download == download).values(
                    charged=d.c.charged + charged, sent=d.c.sent + dsent, at=t))  # fmt: skip
            c.execute(sa.delete(self.t.streams).where(self.t.streams.c.id == sid))
            c.execute(sa.insert(self.t.egress).values(principal=p.id, model=model, at=t, bytes=sent))

    def _metered(self, sid: str, p: Principal, model: str, chunks: Iterator[bytes], first: int, stop: int,
                 free: int, download: str, now: datetime | None,
                 state: dict[str, int] | None = None) -> Iterator[bytes]:  # fmt: skip
        """Yield ``chunks`` (bytes ``[first, stop)`` of the file) while debiting the buckets for every
        byte past the first ``free`` (a resume's credit).  Bytes are reserved a lease at a time (one
        transaction per ``config.lease`` bytes, not per chunk), falling back to the exact chunk when
        the buckets hold less.  A stream that ends normally is credited back what it reserved and did
        not send; a cut one keeps it charged, as its download's resume credit.  Before each chunk the
        principal is checked (a suspended principal's stream is cut there), and before each lease the
        volume rule is re-checked with the bytes this stream is about to send (over it: an alert, a
        suspension if the rule is in ``auto_suspend``, and the stream cut).  ``state["unsent"]``, set by the
        consumer before it closes the stream (:meth:`WeightStream.unsent`): bytes of the last chunk it took
        and never sent, not counted as sent."""
        cfg = self.config
        keys = [(f"p:{p.id}", cfg.per_principal), (f"m:{model}", cfg.per_model), ("g:*", cfg.global_)]
        sent = reserved = charged = free_used = last = 0
        uncharged = (stop - first) - free
        ended = "closed"  # the consumer stopped early (a client that went away), unless set below
        try:
            for b in chunks:
                if self._is_suspended(p.id):
                    self.audit(AuditAction.BROKER_STREAM, "denied", p.id, model, now=now, phase="cut", bytes=sent,
                               reason="account suspended")  # fmt: skip
                    ended = ""
                    raise StreamCut("account suspended: stream cut")
                f = min(free - free_used, len(b))
                cost = len(b) - f
                while reserved < cost:  # reserve in pieces of at most 1 MiB, a lease at a time when possible
                    vol = self._volume_exceeded(sid, p, sent + len(b), now)
                    if vol is not None:
                        self._volume_cut(p, model, sent, vol, now)
                        ended = ""
                        raise StreamCut("hourly volume exceeded: stream cut")
                    need = min(cost - reserved, CHUNK)
                    want = max(need, min(cfg.lease, uncharged - charged - reserved))
                    short = self._take(keys, want, now)
                    if short is not None and want > need:
                        want, short = need, self._take(keys, need, now)
                    if short is not None:
                        self.alert(p.id, "egress-limit", {"bucket": short, "model": model, "sent": sent}, now=now)
                        self.audit(AuditAction.BROKER_STREAM, "denied", p.id, model, now=now, phase="suspended",
                                   bytes=sent, bucket=short)  # fmt: skip
                        ended = ""
                        raise EgressLimitError(f"egress budget {short.split(':')[0]} exhausted; stream suspended")
                    reserved += want
                reserved -= cost
                charged += cost
                free_used += f
                sent += len(b)
                last = len(b)
                yield b
            ended = "end"
        finally:
            if ended == "closed" and state is not None:  # the consumer took the last chunk and did not send it
                sent -= min(max(state.get("unsent", 0), 0), last)
            if reserved > 0 and ended == "end":
                self._refund(keys, reserved, now)
            elif reserved > 0:  # cut: the reserved tail stays charged, and a resume may take it back
                charged += reserved
            self._finish(sid, p, model, download, charged, sent, free, free_used, now)
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            if ended:
                self.audit(AuditAction.BROKER_STREAM, "ok", p.id, model, now=now, phase=ended, bytes=sent,
                           charged=charged)  # fmt: skip

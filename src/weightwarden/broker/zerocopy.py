"""Zero-copy sends of sealed bytes: ``os.sendfile`` from the stored file to the socket.

The broker's weight streams are metered in spans (:class:`FileSpan`: a file, an offset, a length);
each span is debited from the egress buckets and checked against the principal's suspension before
it is sent, exactly as the byte chunks of the copying path are.  A span goes out as the ASGI
message ``{"type": "http.response.zerocopy", "file", "offset", "count"}`` (the zero-copy extension
of the ASGI HTTP spec), which :class:`ZeroCopyH11Protocol` implements for uvicorn's h11 protocol:
h11 frames the body (``send_with_data_passthrough``, made for sendfile) and ``loop.sendfile``
moves the bytes from the page cache to the socket without entering Python.  Servers without the
extension get the copying path.

    uvicorn.run(create_app(broker), http=ZeroCopyH11Protocol)      # what `warden serve` does
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any, cast

from .._extras import extra_imports

__all__ = ["EXTENSION", "FileSpan", "file_spans"]  # and ZeroCopyH11Protocol, made on first use (needs uvicorn)

EXTENSION = "http.response.zerocopy"
SEND_BUFFER = 4 << 20  # bytes the kernel may hold for a stream socket (capped by net.core.wmem_max)


class FileSpan:
    """``count`` bytes of the open file ``file`` from ``offset``; ``len()`` is its length (so metering
    treats it as a chunk).  ``last``: no span follows (asking for the next one closes the file)."""

    __slots__ = ("count", "file", "last", "offset")

    def __init__(self, file: Any, offset: int, count: int, last: bool = False):
        self.file, self.offset, self.count, self.last = file, offset, count, last

    def __len__(self) -> int:
        return self.count

    def read(self) -> bytes:
        """The bytes themselves (for a server without the zero-copy extension)."""
        return os.pread(self.file.fileno(), self.count, self.offset)


def file_spans(path: Any, start: int, end: int, span: int) -> Iterator[FileSpan]:
    """Spans of ``span`` bytes covering ``[start, end)`` of the file at ``path`` (opened once, closed
    when the iterator is closed or exhausted)."""
    with open(path, "rb") as fh:
        end = min(end, os.fstat(fh.fileno()).st_size)
        off = start
        while off < end:
            n = min(span, end - off)
            yield FileSpan(fh, off, n, last=off + n >= end)
            off += n


def _protocol_classes() -> tuple[Any, Any]:
    import asyncio

    with extra_imports("server"):
        import h11
        from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

    class _Cycle(RequestResponseCycle):
        async def send(self, message: Any) -> None:
            if message.get("type") != EXTENSION:
                await super().send(message)
                return
            if self.flow.write_paused and not self.disconnected:
                await self.flow.drain()
            if self.disconnected:
                raise OSError("the client disconnected")
            if not self.response_started or self.response_complete:
                raise RuntimeError("a zero-copy body belongs between the response start and its end")
            count = int(message["count"])
            if self.scope["method"] == "HEAD" or count == 0:
                return
            # h11 hands Data.data back untouched in send_with_data_passthrough (its documented use for
            # sendfile), though it types the field as bytes
            span = cast(bytes, FileSpan(message["file"], 0, count))
            parts = self.conn.send_with_data_passthrough(h11.Data(data=span))
            loop = asyncio.get_running_loop()
            for part in parts or ():  # None only for ConnectionClosed
                if isinstance(part, FileSpan):
                    sent = await loop.sendfile(self.transport, message["file"], int(message.get("offset", 0)), count)
                    if sent != count:
                        raise OSError("the file ended before the span")
                else:
                    self.transport.write(part)

    class ZeroCopyH11Protocol(H11Protocol):
        """uvicorn's h11 protocol with the ASGI zero-copy extension (``os.sendfile`` via ``loop.sendfile``)."""

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            # a larger send buffer: fewer event-loop wake-ups per sendfile span (a bare server to curl over a
            # Unix socket: 2.2 -> 5.4 GB/s).  On TCP it turns off the kernel's autotuning: a bare blocking
            # server is faster without it, the broker's event loop was slower (docs/BROKER.md), so it stays
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)

        def handle_events(self) -> None:
            super().handle_events()
            # the request's cycle was just made (its task has not started yet): give it the extension
            cyc = getattr(self, "cycle", None)
            if type(cyc) is RequestResponseCycle and not cyc.response_started:
                cyc.__class__ = _Cycle
                cyc.scope.setdefault("extensions", {})[EXTENSION] = {}

    return ZeroCopyH11Protocol, _Cycle


def __getattr__(name: str) -> Any:
    if name == "ZeroCopyH11Protocol":
        cls = _protocol_classes()[0]
        globals()[name] = cls
        return cls
    raise AttributeError(name)

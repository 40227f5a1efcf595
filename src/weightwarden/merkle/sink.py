"""The audit sink over a Merkle log, with group commit: concurrent events share one transaction and
one signed head."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

from ..audit import AuditEvent, AuditSink
from ..errors import AuditLogError
from .heads import event_body
from .store import AuditLog

__all__ = ["MerkleLogSink"]


class MerkleLogSink(AuditSink):
    """An :class:`AuditSink` that appends to an :class:`AuditLog` with group commit.

    ``emit`` returns once its event is committed under a signed head (so a caller never acts
    on something unlogged), but events emitted concurrently share one transaction and one
    signature: a writer thread takes whatever is queued, up to ``max_batch`` events."""

    def __init__(self, log: AuditLog, *, max_batch: int = 1000):
        self.log = log
        self.max_batch = max_batch
        self._q: list[tuple[bytes, Future[int]]] = []
        self._cv = threading.Condition()
        self._closed = False
        self._writer: threading.Thread | None = None

    def emit(self, ev: AuditEvent) -> None:
        self.append(ev)

    def append(self, ev: AuditEvent | dict[str, Any]) -> int:
        """Queue ``ev``, wait for its commit and return its index."""
        body = event_body(ev)  # a bad event fails here, alone, not the batch it would join
        fut: Future[int] = Future()
        with self._cv:
            if self._closed:
                raise AuditLogError("the audit sink is closed")
            self._q.append((body, fut))
            if self._writer is None:
                self._writer = threading.Thread(target=self._run, name="warden-audit-writer", daemon=True)
                self._writer.start()
            self._cv.notify()
        return fut.result()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._q and not self._closed:
                    self._cv.wait()
                if not self._q:
                    return
                batch, self._q = self._q[: self.max_batch], self._q[self.max_batch :]
            try:
                idx = self.log._append_bodies([b for b, _ in batch])
            except BaseException as e:  # every waiter learns the batch failed
                for _, f in batch:
                    f.set_exception(e)
            else:
                for i, (_, f) in zip(idx, batch, strict=True):
                    f.set_result(i)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            w = self._writer
        if w is not None:
            w.join()

"""`warden release` and `warden trace` as library calls (the names the ``weightwarden.trace.api`` callers know).

Recipients are :mod:`.recipients`; the master's inventory and the copy guard :mod:`.master`; the checks of a
release :mod:`.releases`, the gate, marking and writing after them :mod:`.copies`; tracing :mod:`.accuse`."""

from __future__ import annotations

from .accuse import DEFAULT_EPS, TraceReport, trace
from .recipients import add_recipient, recipients
from .releases import DEFAULT_LENGTH, ENROLLED, release

__all__ = ["DEFAULT_EPS", "DEFAULT_LENGTH", "ENROLLED", "TraceReport", "add_recipient", "recipients", "release",
           "trace"]  # fmt: skip

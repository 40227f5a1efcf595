"""Leak attribution: per-recipient Tardos fingerprints in released weights, and tracing (docs/TRACING.md)."""

from .api import DEFAULT_EPS, DEFAULT_LENGTH, ENROLLED, TraceReport, add_recipient, recipients, release, trace
from .mark import DEFAULT_ALPHA, Extraction, embed_tensors, extract
from .store import RecipientName, ReleaseRecord, TraceError, TraceStore, recipient_name
from .tardos import TardosCode, accusation_threshold, code_length

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_EPS",
    "DEFAULT_LENGTH",
    "ENROLLED",
    "Extraction",
    "RecipientName",
    "ReleaseRecord",
    "TardosCode",
    "TraceError",
    "TraceReport",
    "TraceStore",
    "accusation_threshold",
    "add_recipient",
    "code_length",
    "embed_tensors",
    "extract",
    "recipient_name",
    "recipients",
    "release",
    "trace",
]

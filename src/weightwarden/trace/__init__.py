"""Leak attribution: per-recipient Tardos fingerprints in released weights, and tracing (docs/TRACING.md)."""

from .api import DEFAULT_EPS, DEFAULT_LENGTH, TraceReport, release, trace
from .mark import DEFAULT_ALPHA, Extraction, embed_tensors, extract
from .store import ReleaseRecord, TraceError, TraceStore
from .tardos import TardosCode, accusation_threshold, code_length

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_EPS",
    "DEFAULT_LENGTH",
    "Extraction",
    "ReleaseRecord",
    "TardosCode",
    "TraceError",
    "TraceReport",
    "TraceStore",
    "accusation_threshold",
    "code_length",
    "embed_tensors",
    "extract",
    "release",
    "trace",
]

"""The tamper-evident Merkle log (RFC 9162), used by the broker, the CLI's ``audit`` commands, the trail
and tracing.

- :mod:`.tree`: hashing, inclusion and consistency proofs (RFC 9162 §2.1), the growing right edge;
- :mod:`.heads`: signed tree heads, log ids, inclusion proofs and their offline checks;
- :mod:`.store`: :class:`AuditLog`, the log over a SQL database (SQLite or PostgreSQL, :mod:`weightwarden.db`);
- :mod:`.sink`: :class:`MerkleLogSink`, an audit sink appending to a log with group commit.
"""

from __future__ import annotations

from . import tree
from .heads import (
    HEAD_CONTEXT,
    HEAD_VERSION,
    LOG_ID_LEN,
    PURPOSE,
    InclusionProof,
    SignedHead,
    check_consistency,
    check_inclusion,
    event_body,
    parse_log_id,
)
from .sink import MerkleLogSink
from .store import AuditLog

__all__ = ["HEAD_CONTEXT", "HEAD_VERSION", "LOG_ID_LEN", "PURPOSE", "AuditLog", "InclusionProof", "MerkleLogSink",
           "SignedHead", "check_consistency", "check_inclusion", "event_body", "parse_log_id", "tree"]  # fmt: skip

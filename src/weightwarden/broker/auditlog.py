"""Moved: see :mod:`weightwarden.merkle` (this shim goes after the issue-19 merge)."""

from ..db import sqlite_pragmas as _sqlite_begin_immediate  # noqa: F401  moved: see weightwarden.db
from ..merkle import (  # noqa: F401  moved: see weightwarden.merkle
    HEAD_CONTEXT,
    HEAD_VERSION,
    LOG_ID_LEN,
    PURPOSE,
    AuditLog,
    InclusionProof,
    MerkleLogSink,
    SignedHead,
    check_consistency,
    check_inclusion,
    parse_log_id,
)
from ..merkle.heads import event_body as _canonical  # noqa: F401  moved: see weightwarden.merkle.heads

"""Canonical JSON: the one byte form of every document weightwarden signs, hashes or commits to.

Keys sorted, no whitespace, no NaN or infinity. Two forms exist because signed data already exists in
both and its bytes must not change:

- ``canonical_json(obj)``: ASCII only (non-ASCII as ``\\uXXXX``): sealed-file contexts (docs/FORMAT.md),
  keyrings, custody documents and approvals, key-use policies.
- ``canonical_json(obj, ascii=False)``: UTF-8 as is: audit-log event bodies (docs/AUDIT_LOG.md).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["canonical_json"]


def canonical_json(obj: Any, *, ascii: bool = True) -> bytes:
    """``obj`` as canonical JSON bytes (sorted keys, ``,``/``:`` separators, no NaN)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=ascii, allow_nan=False).encode()

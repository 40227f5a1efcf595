"""Signed tree heads, log identities, inclusion proofs and their offline checks (docs/AUDIT_LOG.md).

A head signs the log id with size, root and time (:meth:`SignedHead.message`), under a key of purpose
``audit-log`` (never the sealing key), so a head of one log never passes for another's, even under the
same key.  Anyone holding a signed head and the log's public key can check an inclusion proof offline
(:func:`check_inclusion`), and a head they kept against a later one (:func:`check_consistency`).
An event's leaf is its canonical JSON body (:func:`event_body`: UTF-8 as is, keys sorted).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..audit import AuditEvent
from ..canonical import canonical_json
from ..errors import AuditLogError, AuditTamperedError, HeadKeyPurposeError, LogIdentityError
from ..keys.provider import verify_purpose
from . import tree

__all__ = ["HEAD_CONTEXT", "HEAD_VERSION", "LOG_ID_LEN", "PURPOSE", "InclusionProof", "SignedHead",
           "check_consistency", "check_inclusion", "event_body", "parse_log_id"]  # fmt: skip

HEAD_CONTEXT = b"weightwarden audit tree head v2\n"
HEAD_VERSION = 2
LOG_ID_LEN = 16
PURPOSE = "audit-log"
_MAX_BODY = 1 << 20


def parse_log_id(value: bytes | str | None, what: str = "log id") -> bytes | None:
    """A log id given as 16 bytes or 32 hex digits (None stays None)."""
    if value is None or isinstance(value, bytes):
        raw = value
    else:
        try:
            raw = bytes.fromhex(value.strip())
        except ValueError:
            raw = b""
    if raw is not None and len(raw) != LOG_ID_LEN:
        raise AuditLogError(f"{what} must be {2 * LOG_ID_LEN} hex digits (as `warden serve` and every head print it)")
    return raw


def event_body(ev: AuditEvent | dict[str, Any]) -> bytes:
    """An event's leaf data: its canonical JSON (UTF-8 as is), at most 1 MiB."""
    obj = ev.to_json() if isinstance(ev, AuditEvent) else ev
    data = canonical_json(obj, ascii=False)
    if len(data) > _MAX_BODY:
        raise AuditLogError(f"an audit event is at most {_MAX_BODY} bytes of JSON")
    return data


@dataclass(frozen=True)
class SignedHead:
    """A signed statement "log ``log_id`` held ``size`` events, with this root, at this time"."""

    size: int
    root: bytes
    at: str  # ISO 8601, UTC
    key_id: str
    signature: bytes
    log_id: bytes

    @staticmethod
    def message(log_id: bytes, size: int, root: bytes, at: str) -> bytes:
        """The head message (version 2); the signer prefixes the ``audit-log`` purpose label."""
        if len(log_id) != LOG_ID_LEN:
            raise AuditLogError("a log id is 16 bytes")
        return HEAD_CONTEXT + log_id + size.to_bytes(8, "big") + root + at.encode()

    def check(self, public_key: bytes, log_id: bytes | None = None) -> None:
        """Raise :class:`AuditTamperedError` unless ``public_key`` signed this head as an audit-log key
        (:class:`HeadKeyPurposeError` if a key of another purpose did), and, given ``log_id`` (the pinned
        log), :class:`LogIdentityError` unless the head is of that log."""
        if log_id is not None and not hmac.compare_digest(self.log_id, log_id):
            raise LogIdentityError(f"the tree head of size {self.size} is of log {self.log_id.hex()}, not of the "
                                   f"pinned log {log_id.hex()}: another log, refused")  # fmt: skip
        try:
            verify_purpose(public_key, PURPOSE, self.message(self.log_id, self.size, self.root, self.at),
                           self.signature, what=f"the tree head of size {self.size}", error=AuditTamperedError,
                           purpose_error=HeadKeyPurposeError)  # fmt: skip
        except HeadKeyPurposeError:
            raise
        except AuditTamperedError:
            raise AuditTamperedError(f"the tree head of size {self.size} is not signed by the log's key") from None

    def to_json(self) -> dict[str, Any]:
        return {"version": HEAD_VERSION, "log_id": self.log_id.hex(), "size": self.size, "root": self.root.hex(),
                "at": self.at, "key_id": self.key_id, "signature": self.signature.hex()}  # fmt: skip

    @classmethod
    def from_json(cls, obj: Any) -> SignedHead:
        if isinstance(obj, dict) and "log_id" not in obj and "signature" in obj:
            raise AuditLogError("not a signed tree head of version 2 (a version-1 head names no log)")
        try:
            if obj.get("version", HEAD_VERSION) != HEAD_VERSION:
                raise ValueError
            h = cls(int(obj["size"]), bytes.fromhex(obj["root"]), str(obj["at"]), str(obj["key_id"]),
                    bytes.fromhex(obj["signature"]), bytes.fromhex(obj["log_id"]))  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError):
            raise AuditLogError("not a signed tree head") from None
        if h.size < 0 or len(h.root) != 32 or len(h.signature) != 64 or len(h.log_id) != LOG_ID_LEN:
            raise AuditLogError("not a signed tree head")
        return h


@dataclass(frozen=True)
class InclusionProof:
    index: int
    body: bytes
    path: tuple[bytes, ...]
    head: SignedHead

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "event": json.loads(self.body), "leaf_hash": tree.leaf_hash(self.body).hex(),
                "path": [p.hex() for p in self.path], "head": self.head.to_json()}  # fmt: skip

    @classmethod
    def from_json(cls, obj: Any) -> InclusionProof:
        try:
            return cls(int(obj["index"]), event_body(obj["event"]), tuple(bytes.fromhex(p) for p in obj["path"]),
                       SignedHead.from_json(obj["head"]))  # fmt: skip
        except (KeyError, TypeError, ValueError):
            raise AuditLogError("not an inclusion proof") from None


def check_inclusion(proof: InclusionProof, public_key: bytes, log_id: bytes | None = None) -> dict[str, Any]:
    """Offline check: the head is signed by ``public_key`` (and is of log ``log_id``, when pinned) and
    the event is leaf ``index`` under it."""
    proof.head.check(public_key, log_id)
    if not tree.verify_inclusion(tree.leaf_hash(proof.body), proof.index, proof.head.size, proof.path,
                                   proof.head.root):  # fmt: skip
        raise AuditTamperedError(f"event {proof.index} is not in the signed tree of size {proof.head.size}")
    return json.loads(proof.body)


def check_consistency(old: SignedHead, new: SignedHead, proof: Sequence[bytes], public_key: bytes,
                      log_id: bytes | None = None) -> None:  # fmt: skip
    """Offline check: both heads are signed, of one log (``log_id``, when pinned), and ``new``'s tree
    extends ``old``'s (nothing rewritten)."""
    old.check(public_key, log_id)
    new.check(public_key, old.log_id)
    if not tree.verify_consistency(old.size, new.size, old.root, new.root, proof):
        raise AuditTamperedError(f"the log of size {new.size} does not extend the head of size {old.size}")

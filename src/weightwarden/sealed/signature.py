"""Manifest signatures of sealed files and bundles (docs/FORMAT.md §1.4): the signature itself, then trust.

Two steps, two names: :func:`verify_manifest_signature` checks only that the signature is valid under the
key the file names (self-consistency, what ``inspect`` shows); :func:`check_manifest_signature` does that
and then requires the key to be trusted for sealing.  There is no "no trust store means skip the trust
check": a caller that wants no trust decision calls the first, by name.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..errors import FormatError, KeyPurposeError, SignatureError, UntrustedSignerError
from ..keys.provider import LEGACY_SEALING, verify_purpose
from ..keys.truststore import TrustStore

__all__ = [
    "SIG_FIELDS_V1", "SIG_FIELDS_V2", "Trust", "check_manifest_signature", "require_trust", "sig_purpose",
    "verify_manifest_signature",
]  # fmt: skip

#: What a trust decision is made against: a trust store, or the raw public keys to accept for sealing.
Trust = TrustStore | Iterable[bytes]

SIG_FIELDS_V1 = frozenset({"alg", "key_id", "public_key", "signature"})
SIG_FIELDS_V2 = SIG_FIELDS_V1 | {"purpose"}


def sig_purpose(block: dict[str, Any], what: str) -> str | None:
    """The ``purpose`` of a signature block (None: a version-1 block, signed without a purpose label)."""
    if "purpose" not in block:
        return None
    p = block["purpose"]
    if not isinstance(p, str) or not 0 < len(p) <= 32:
        raise FormatError(f"{what}: purpose must be a short string")
    return p


def require_trust(trust: Trust | None, what: str) -> Trust:
    """``trust``, refusing None: a trust check needs something to trust."""
    if trust is None:
        raise UntrustedSignerError(
            f"{what}: no trust store or keys given; pass one (a TrustStore or public keys), or call "
            "check_self_consistent() to check the signature without a trust decision"
        )
    return trust


def verify_manifest_signature(
    public_key: bytes, signature: bytes, purpose: str | None, message: bytes, key_id: str, what: str
) -> str:
    """Verify a manifest signature under the key the file names, with no trust decision; return its key id.

    A block of another purpose, or a signature made under another purpose's label, raise
    :class:`KeyPurposeError`; a version-1 block (no purpose label) is checked as it was signed."""
    if purpose is None:
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        except InvalidSignature:
            raise SignatureError(f"{what} is invalid") from None
    elif purpose != "sealing":
        raise KeyPurposeError(f"{what} is by a key of purpose {purpose[:32]!r}, not a sealing key: refused")
    else:
        verify_purpose(public_key, "sealing", message, signature, what=what)
    return key_id


def check_manifest_signature(
    public_key: bytes,
    signature: bytes,
    purpose: str | None,
    message: bytes,
    key_id: str,
    trust: Trust,
    what: str,
) -> str:
    """Verify a manifest signature (:func:`verify_manifest_signature`) and that its key is trusted *for
    sealing*.  A trust entry of another purpose raises :class:`KeyPurposeError`.  A version-1 block (no
    purpose label) is accepted only from a trust entry marked ``legacy-sealing``."""
    trust = require_trust(trust, what)
    verify_manifest_signature(public_key, signature, purpose, message, key_id, what)
    if isinstance(trust, TrustStore):
        known = trust.public_key(key_id)
        ok = known is not None and hmac.compare_digest(known, public_key)
        have = trust.purpose(key_id) if ok else None
    else:
        ok = any(hmac.compare_digest(bytes(k), public_key) for k in trust)
        have = "sealing"
    if not ok:
        raise UntrustedSignerError(f"file is signed by {key_id}, which is not trusted")
    if purpose is None and have != LEGACY_SEALING:
        raise KeyPurposeError(
            f"{what} is version 1 (no purpose label): it verifies only against a trust entry marked "
            f"{LEGACY_SEALING!r} (`warden trust add KEY --purpose {LEGACY_SEALING}`); {key_id} is not one"
        )
    if have not in ("sealing", LEGACY_SEALING):
        raise KeyPurposeError(f"{key_id} is trusted for {have!r}, not for sealing: refused")
    return key_id

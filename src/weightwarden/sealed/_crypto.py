"""Key derivation for sealed files: one data key -> AEAD key + key commitment."""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import WrongKeyError
from .format import INFO_AEAD, INFO_COMMIT


def _hkdf(dek: bytes | bytearray, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(bytes(dek))


def commitment(dek: bytes | bytearray, file_id: bytes) -> bytes:
    """A commitment to the data key, stored in the signed context.

    AES-GCM is not key-committing; checking this before decrypting stops a file
    from decrypting to different plaintexts under different keys.
    """
    return _hkdf(dek, file_id, INFO_COMMIT)


def content_cipher(dek: bytearray, file_id: bytes, expected_commitment: bytes | None = None) -> AESGCM:
    if expected_commitment is not None and not hmac.compare_digest(commitment(dek, file_id), expected_commitment):
        raise WrongKeyError("the data key does not match this file's key commitment")
    key = bytearray(_hkdf(dek, file_id, INFO_AEAD))
    try:
        return AESGCM(bytes(key))
    finally:
        zero(key)


def zero(buf: bytearray) -> None:
    """Best-effort zeroization (Python may hold other copies; OpenSSL holds its own)."""
    for i in range(len(buf)):
        buf[i] = 0

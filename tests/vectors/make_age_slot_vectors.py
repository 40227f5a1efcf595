"""Regenerate the recipient key-slot vectors (docs/FORMAT.md §1.2.1, alg ``AGE-X25519-V1``).

python tests/vectors/make_age_slot_vectors.py

Written from the specs' text, not from the package's code or from rage: the age v1 file
(age-encryption.org/v1, X25519 recipient stanza, header MAC, STREAM payload) is built here with
fixed ephemeral key, file key and payload nonce from pyca/cryptography primitives (X25519, HKDF-SHA256,
ChaCha20-Poly1305, HMAC-SHA256) and a plain Bech32 encoder; the slot's plaintext is
``wrap_aad("age", key_id, 1, file_id) ‖ DEK`` as FORMAT.md §1.2 defines ``wrap_aad``.  The tests check
that this rebuilds the committed vector byte for byte, that pyrage (an independent age implementation)
decrypts it, and that the package's identity provider unwraps it to the DEK, for that file id only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

HERE = Path(__file__).parent
# published test values: never use outside tests
IDENTITY_SCALAR = bytes(range(1, 33))
EPHEMERAL_SCALAR = bytes(range(33, 65))
FILE_KEY = bytes(range(65, 81))
PAYLOAD_NONCE = bytes(range(81, 97))
FILE_ID = bytes(range(0xA0, 0xB0))
DEK = bytes(range(0xC0, 0xE0))

_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


def _polymod(values: list[int]) -> int:
    gen = [0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3]
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= gen[i] if (top >> i) & 1 else 0
    return chk


def bech32(hrp: str, data: bytes) -> str:
    """BIP 173 Bech32 (the checksum constant 1), as age encodes its keys."""
    acc, bits, five = 0, 0, []
    for b in data:
        acc = (acc << 8) | b
        bits += 8
        while bits >= 5:
            bits -= 5
            five.append((acc >> bits) & 31)
    if bits:
        five.append((acc << (5 - bits)) & 31)
    h = hrp.lower()
    expand = [ord(c) >> 5 for c in h] + [0] + [ord(c) & 31 for c in h]
    pm = _polymod(expand + five + [0] * 6) ^ 1
    check = [(pm >> 5 * (5 - i)) & 31 for i in range(6)]
    return h + "1" + "".join(_CHARSET[d] for d in five + check)


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt, info).derive(ikm)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode().rstrip("=")


def wrap_aad(provider: str, key_id: str, version: int, context: bytes) -> bytes:
    h = hashlib.sha256()
    for part in (b"weightwarden/v1/wrap", provider.encode(), key_id.encode(), str(version).encode(), context):
        h.update(len(part).to_bytes(4, "big") + part)
    return h.digest()


def age_encrypt(recipient_pub: bytes, plaintext: bytes) -> bytes:
    """age v1 to one X25519 recipient, with the fixed ephemeral key, file key and payload nonce."""
    eph = X25519PrivateKey.from_private_bytes(EPHEMERAL_SCALAR)
    share = eph.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    shared = eph.exchange(X25519PublicKey.from_public_bytes(recipient_pub))
    wrap_key = _hkdf(shared, share + recipient_pub, b"age-encryption.org/v1/X25519")
    body = ChaCha20Poly1305(wrap_key).encrypt(bytes(12), FILE_KEY, None)
    lines = [_b64(body)[i : i + 64] for i in range(0, len(_b64(body)), 64)]
    if len(lines[-1]) == 64:
        lines.append("")
    header = "age-encryption.org/v1\n" + f"-> X25519 {_b64(share)}\n" + "\n".join(lines) + "\n---"
    mac = hmac.new(_hkdf(FILE_KEY, b"", b"header"), header.encode(), hashlib.sha256).digest()
    assert len(plaintext) <= 64 * 1024  # one STREAM chunk, the last
    payload_key = _hkdf(FILE_KEY, PAYLOAD_NONCE, b"payload")
    chunk = ChaCha20Poly1305(payload_key).encrypt(bytes(11) + b"\x01", plaintext, None)
    return (header + f" {_b64(mac)}\n").encode() + PAYLOAD_NONCE + chunk


def build() -> dict[str, object]:
    ident = X25519PrivateKey.from_private_bytes(IDENTITY_SCALAR)
    pub = ident.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    recipient = bech32("age", pub)
    identity = bech32("age-secret-key-", IDENTITY_SCALAR).upper()
    wrapped = age_encrypt(pub, wrap_aad("age", recipient, 1, FILE_ID) + DEK)
    return {
        "spec": "docs/FORMAT.md 1.2.1 (AGE-X25519-V1); age-encryption.org/v1",
        "identity": identity,
        "recipient": recipient,
        "file_id": FILE_ID.hex(),
        "dek": DEK.hex(),
        "slot": {
            "provider": "age",
            "key_id": recipient,
            "version": 1,
            "alg": "AGE-X25519-V1",
            "wrapped": base64.b64encode(wrapped).decode(),
        },
    }


if __name__ == "__main__":
    (HERE / "age-slot.json").write_text(json.dumps(build(), indent=1) + "\n")
    print("wrote", HERE / "age-slot.json")

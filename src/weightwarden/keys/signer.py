"""An Ed25519 signing key held in this process's memory (the keyring's signers, test vectors)."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from .provider import Signer, check_purpose

__all__ = ["Ed25519Signer"]


class Ed25519Signer(Signer):
    def __init__(self, private: Ed25519PrivateKey, purpose: str = "sealing"):
        self.purpose = check_purpose(purpose)
        self._key = private
        self._pub = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def public_key(self) -> bytes:
        return self._pub

    def _sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def private_bytes(self) -> bytes:
        """The raw 32-byte private key (for the keyring to store it encrypted; never logged)."""
        return self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @classmethod
    def generate(cls, purpose: str = "sealing") -> Ed25519Signer:
        return cls(Ed25519PrivateKey.generate(), purpose)

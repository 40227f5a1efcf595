"""Key providers, signers and trust."""

from .local import Ed25519Signer, KdfParams, Keyring, LocalProvider, StaticKeyProvider, TrustStore, default_home
from .provider import KeyProvider, KeySlot, Signer

__all__ = [
    "Ed25519Signer",
    "KdfParams",
    "KeyProvider",
    "KeySlot",
    "Keyring",
    "LocalProvider",
    "Signer",
    "StaticKeyProvider",
    "TrustStore",
    "default_home",
]

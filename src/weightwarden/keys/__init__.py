"""Key providers, signers and trust."""

from ..home import default_home
from .kdf import KdfParams
from .keyring import Keyring
from .local import LocalProvider, StaticKeyProvider
from .protocols import KeyringLike
from .provider import KeyProvider, KeySlot, Signer
from .registry import provider_from_uri, signer_from_uri
from .signer import Ed25519Signer
from .truststore import TrustStore

__all__ = [
    "Ed25519Signer",
    "KdfParams",
    "KeyProvider",
    "KeySlot",
    "Keyring",
    "KeyringLike",
    "LocalProvider",
    "Signer",
    "StaticKeyProvider",
    "TrustStore",
    "default_home",
    "provider_from_uri",
    "signer_from_uri",
]

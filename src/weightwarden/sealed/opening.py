"""Opening sealed files and bundles for reading: check the signer is trusted, then unwrap the data key.

The one path by which every loader (``weightwarden.api``, ``weightwarden.safetensors``, ``.torch``,
``.hf``, the vLLM integration, provenance's ``TensorSource``) turns a path into a decrypting reader.  The
defaults (the keyring and trust store under ``$WARDEN_HOME``) are resolved here, below the API layer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import FormatError, KeyringError
from ..home import default_home
from ..keys.keyring import Keyring
from ..keys.protocols import KeyringLike
from ..keys.provider import KeyProvider
from ..keys.truststore import TrustStore
from .bundle import BundleReader, SealedBundle
from .decrypt import SealedReader
from .detect import BUNDLE_MANIFEST, is_bundle
from .reader import SealedFile
from .signature import Trust

__all__ = ["default_keyring", "open_reader", "open_sealed", "resolve_providers", "resolve_trust"]


def default_keyring(home: Path | None = None) -> KeyringLike:
    """The keyring under ``$WARDEN_HOME``: through the custody agent when it is under
    M-of-N custody, else unlocked with the passphrase in ``$WARDEN_PASSPHRASE_FILE`` (or ``$WARDEN_PASSPHRASE``)."""
    from ..keys.agent import AgentKeyring, under_custody

    home = home or default_home()
    if under_custody(home):
        return AgentKeyring(home)
    pw = os.environ.get("WARDEN_PASSPHRASE")
    if os.environ.get("WARDEN_PASSPHRASE_FILE"):
        from .._harden import read_secret_file

        pw = read_secret_file(os.environ["WARDEN_PASSPHRASE_FILE"], "WARDEN_PASSPHRASE_FILE")
    if pw is None:
        raise KeyringError("set WARDEN_PASSPHRASE_FILE (or pass keyring=) to unlock the keyring")
    return Keyring.unlock(home, pw)


def resolve_trust(trust: Trust | None, keyring: KeyringLike | None) -> Trust:
    """``trust``, else the keyring's trust store, else the trust store under ``$WARDEN_HOME``."""
    if trust is not None:
        return trust
    if keyring is not None:
        return keyring.trust
    return TrustStore.load(default_home())


def resolve_providers(keyring: KeyringLike | None, providers: Sequence[KeyProvider] | None) -> Sequence[KeyProvider]:
    """``providers``, else the provider of ``keyring`` (default: :func:`default_keyring`)."""
    if providers is not None:
        return providers
    return [(keyring or default_keyring()).provider()]


def open_sealed(path: str | os.PathLike[str]) -> SealedFile | SealedBundle:
    """Parse a sealed file or bundle without any key (no decryption, no trust check)."""
    p = Path(path)
    if is_bundle(p):
        return SealedBundle(p)
    if p.is_dir():
        raise FormatError(f"{p} is a folder without a bundle manifest ({BUNDLE_MANIFEST}): give a sealed file, "
                          "or a folder that `warden seal` wrote")  # fmt: skip
    return SealedFile(p)


def open_reader(
    path: str | os.PathLike[str],
    *,
    keyring: KeyringLike | None = None,
    providers: Sequence[KeyProvider] | None = None,
    trust: Trust | None = None,
) -> SealedReader | BundleReader:
    """A decrypting reader over a sealed file or bundle: the manifest signature is checked against
    ``trust`` (default: see :func:`resolve_trust`) before any key is used."""
    sealed = open_sealed(path)
    try:
        sealed.check_signature(resolve_trust(trust, keyring))
        return sealed.unlock(resolve_providers(keyring, providers))
    except BaseException:
        sealed.close()
        raise

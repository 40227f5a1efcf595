"""What callers use of a keyring, as a protocol: the local :class:`~.keyring.Keyring` (a passphrase or
custody root key in this process) and the custody agent's :class:`~.agent_client.AgentKeyring` (an
unsealed agent over its socket) both satisfy :class:`KeyringLike`, so code that only wraps, unwraps,
signs and lists keys takes either without pretending one is the other.

Creating a keyring, putting it under custody and making a new signing key are the local keyring's own
(:class:`~.keyring.Keyring`), not part of the protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..audit import AuditSink
    from .provider import KeyProvider, Signer
    from .truststore import TrustStore

__all__ = ["KeyringLike"]


@runtime_checkable
class KeyringLike(Protocol):
    """A keyring as commands and the library use it: its home, trust store and audit sink; a provider
    over one KEK and a signer by key id or purpose; its public keys and key listing; a new KEK."""

    home: Path
    trust: TrustStore
    audit: AuditSink

    @property
    def under_custody(self) -> bool:
        """Whether M-of-N custodians (not a passphrase) protect the keyring."""
        ...

    def provider(self, key_id: str | None = None, *, purpose: str | None = None, create: bool = False) -> KeyProvider:
        """A provider over ``key_id`` or the default KEK of ``purpose`` (made when missing, with ``create``)."""
        ...

    def signer(self, key_id: str | None = None, *, purpose: str | None = None, create: bool = False) -> Signer:
        """A signing key: ``key_id`` or the default key of ``purpose``."""
        ...

    def public_key(self, key_id: str | None = None, *, purpose: str | None = None) -> bytes:
        """The raw Ed25519 public key of a signing key."""
        ...

    def list_keys(self) -> list[dict[str, Any]]:
        """Every key and version (key_id, kind, version, state, current, default, created, purpose)."""
        ...

    def new_kek(self, name: str | None = None, *, purpose: str = "sealing") -> str:
        """A new key-encryption key of ``purpose``; returns its id."""
        ...

    def save(self) -> None:
        """Write what changed (the local keyring's file; nothing for the agent, which saves itself)."""
        ...

"""The trust store: public keys of trusted signers, each for one purpose (``$WARDEN_HOME/trusted.json``).

Public data whose integrity rests on file permissions, like ``~/.ssh/known_hosts``.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .._atomic import atomic_write_bytes
from ..canonical import canonical_json
from ..errors import KeyNotFoundError, KeyPurposeError, KeyringError
from ..home import Home, default_home
from .provider import TRUST_PURPOSES, b64d, b64e, check_purpose, ed25519_key_id

__all__ = ["TRUST_FILE", "TrustStore"]

TRUST_FILE = Home(Path()).trust_store.name  # "trusted.json"; the path is Home(h).trust_store


class TrustStore:
    """Public keys of trusted signers, each for one purpose (``sealing``: manifests ``verify`` accepts;
    ``legacy-sealing``: also version-1 manifests without a purpose label; ``audit-log``;
    ``export-rules``).  An entry written before purposes existed reads as ``sealing``."""

    def __init__(self, path: Path | None = None, signers: dict[str, dict[str, str]] | None = None):
        self.path = path
        self.signers: dict[str, dict[str, str]] = dict(signers or {})

    @classmethod
    def load(cls, home: Path | None = None) -> TrustStore:
        path = Home(home or default_home()).trust_store
        if not path.exists():
            return cls(path)
        try:
            obj = json.loads(path.read_text())
            signers = obj["signers"]
            if not isinstance(signers, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise KeyringError(f"trust store {path} is unreadable or malformed") from e
        return cls(path, signers)

    def add(self, public_key: bytes, label: str = "", purpose: str = "sealing") -> str:
        """Trust ``public_key`` for ``purpose``.  A key already trusted for another purpose is refused
        (:class:`KeyPurposeError`): a purpose is never widened by adding the key again; remove it first."""
        check_purpose(purpose, TRUST_PURPOSES, "trust purpose")
        if len(public_key) != 32:
            raise KeyringError("an Ed25519 public key is 32 bytes")
        Ed25519PublicKey.from_public_bytes(public_key)
        kid = ed25519_key_id(public_key)
        old = self.purpose(kid)
        if old is not None and old != purpose:
            raise KeyPurposeError(
                f"{kid} is already trusted for {old!r}; a key has one purpose: `warden trust remove {kid}` first"
            )
        self.signers[kid] = {"public_key": b64e(public_key), "label": label, "purpose": purpose}
        return kid

    def purpose(self, key_id: str) -> str | None:
        entry = self.signers.get(key_id)
        return None if entry is None else str(entry.get("purpose", "sealing"))

    def remove(self, key_id: str) -> None:
        if self.signers.pop(key_id, None) is None:
            raise KeyNotFoundError(f"signer {key_id} is not trusted")

    def public_key(self, key_id: str) -> bytes | None:
        entry = self.signers.get(key_id)
        return None if entry is None else b64d(entry["public_key"], "trusted key")

    def save(self) -> None:
        if self.path is None:
            raise KeyringError("this trust store has no file")
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(self.path, canonical_json({"signers": self.signers}) + b"\n", force=True, mode=0o644)

"""The local key providers: AES-256-GCM wrapping under KEKs held in the keyring, or given as bytes.

(The keyring, KDF, signer and trust store are in keys/keyring.py, kdf.py, signer.py, truststore.py;
``default_home`` is weightwarden.home's.)
"""

from __future__ import annotations

import secrets
from abc import abstractmethod
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import KeyDestroyedError, KeyDisabledError, KeyNotFoundError, KeyPurposeError, WrongKeyError
from .provider import KeyProvider, KeySlot, wrap_aad

if TYPE_CHECKING:
    from .keyring import Keyring

__all__ = ["LocalProvider", "StaticKeyProvider"]

_WRAP_ALG = "A256GCM"


class _AesGcmWrapProvider(KeyProvider):
    """Wraps data keys with AES-256-GCM under a 32-byte KEK; subclasses say where KEKs live."""

    name = "local"

    @abstractmethod
    def _kek(self, key_id: str, version: int) -> bytes: ...

    def _wrap(self, dek: bytes, context: bytes) -> KeySlot:
        version = self._current_version(self.key_id)
        kek = self._kek(self.key_id, version)
        nonce = secrets.token_bytes(12)
        ct = AESGCM(kek).encrypt(nonce, dek, wrap_aad(self.name, self.key_id, version, context))
        return KeySlot(self.name, self.key_id, version, _WRAP_ALG, nonce + ct)

    def _unwrap(self, slot: KeySlot, context: bytes) -> bytearray:
        if slot.alg != _WRAP_ALG:
            raise WrongKeyError(f"unknown wrap algorithm {slot.alg!r}")
        kek = self._kek(slot.key_id, slot.version)
        if len(slot.wrapped) != 12 + 32 + 16:
            raise WrongKeyError("wrapped key has the wrong length")
        try:
            dek = AESGCM(kek).decrypt(
                slot.wrapped[:12], slot.wrapped[12:], wrap_aad(self.name, slot.key_id, slot.version, context)
            )
        except InvalidTag:
            raise WrongKeyError("this key does not unwrap the data key") from None
        return bytearray(dek)


class LocalProvider(_AesGcmWrapProvider):
    """KEKs held in the passphrase-protected local keyring; wraps with its current version."""

    def __init__(self, keyring: Keyring, key_id: str, purpose: str = "sealing"):
        self._kr = keyring
        self.key_id = key_id
        self.purpose = purpose

    def _kek(self, key_id: str, version: int) -> bytes:
        have = self._kr.kek_purpose(key_id)
        if have != self.purpose:  # a tracing KEK never unwraps a file's data key, nor the reverse
            raise KeyPurposeError(f"key {key_id} is a {have!r} KEK; this provider unwraps {self.purpose!r} keys only")
        return self._kr._kek(key_id, version)

    def _current_version(self, key_id: str) -> int:
        return int(self._kr._key_entry(key_id)["current"])

    def _rotate(self, key_id: str) -> int:
        return self._kr._rotate(key_id)

    def _set_state(self, key_id: str, version: int, state: str) -> None:
        self._kr._set_state(key_id, version, state)

    def _destroy(self, key_id: str, version: int | None) -> list[int]:
        return self._kr._destroy(key_id, version)

    def _versions(self, key_id: str) -> list[dict[str, Any]]:
        vs = self._kr._key_entry(key_id)["versions"]
        return [{"version": int(v), "state": vs[v]["state"]} for v in sorted(vs, key=int)]


class StaticKeyProvider(_AesGcmWrapProvider):
    """KEKs given as bytes, in memory only (test vectors, KEKs delivered by another system)."""

    def __init__(self, keks: dict[tuple[str, int], bytes], current: tuple[str, int] | None = None):
        if any(len(k) != 32 for k in keks.values()):
            raise ValueError("KEKs are 32 bytes")
        self._keks: dict[tuple[str, int], bytes | None] = dict(keks)
        self._state = {k: "enabled" for k in keks}
        self.key_id, cur = current or next(iter(self._keks))
        self._cur = {self.key_id: cur}

    def _kek(self, key_id: str, version: int) -> bytes:
        state = self._state.get((key_id, version))
        if state is None:
            raise KeyNotFoundError(f"key {key_id} version {version} is not available")
        if state == "destroyed":
            raise KeyDestroyedError(f"key {key_id} version {version} was destroyed")
        if state != "enabled":
            raise KeyDisabledError(f"key {key_id} version {version} is disabled")
        kek = self._keks[(key_id, version)]
        if kek is None:  # erased with its state set to destroyed, so not reached
            raise KeyDestroyedError(f"key {key_id} version {version} was destroyed")
        return kek

    def _current_version(self, key_id: str) -> int:
        if key_id in self._cur:
            return self._cur[key_id]
        versions = [v for (k, v) in self._keks if k == key_id]
        if not versions:
            raise KeyNotFoundError(f"key {key_id} is not available")
        return max(versions)

    def _rotate(self, key_id: str) -> int:
        v = self._current_version(key_id) + 1
        self._keks[(key_id, v)] = secrets.token_bytes(32)
        self._state[(key_id, v)] = "enabled"
        self._cur[key_id] = v
        return v

    def _set_state(self, key_id: str, version: int, state: str) -> None:
        if (key_id, version) not in self._state:
            raise KeyNotFoundError(f"key {key_id} version {version} is not available")
        if self._state[(key_id, version)] == "destroyed":
            raise KeyDestroyedError(f"key {key_id} version {version} was destroyed")
        self._state[(key_id, version)] = state

    def _destroy(self, key_id: str, version: int | None) -> list[int]:
        targets = [v for (k, v) in self._keks if k == key_id] if version is None else [version]
        done = []
        for v in targets:
            if self._state.get((key_id, v)) not in (None, "destroyed"):
                self._keks[(key_id, v)] = None
                self._state[(key_id, v)] = "destroyed"
                done.append(v)
        return done

    def _versions(self, key_id: str) -> list[dict[str, Any]]:
        return [{"version": v, "state": self._state[(k, v)]} for (k, v) in sorted(self._keks) if k == key_id]

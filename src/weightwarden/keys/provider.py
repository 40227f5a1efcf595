"""The key-provider interface: wrap and unwrap data keys, sign manifests.

A provider never hands out its key-encryption key (KEK).  It wraps a fresh
32-byte data key (DEK) into a :class:`KeySlot` and unwraps it again, binding a
caller-supplied ``context`` (the sealed file's id) as associated data so a slot
cannot be moved to another file.  Backends (local keyring, PKCS#11 HSM, cloud
KMS) implement ``_wrap``/``_unwrap``; the shared checks live here.
"""

from __future__ import annotations

import base64
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ..errors import FormatError, KeyNotFoundError, WrongKeyError

DEK_LEN = 32


def b64e(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def b64d(s: Any, what: str = "field") -> bytes:
    if not isinstance(s, str):
        raise FormatError(f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(s.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as e:
        raise FormatError(f"{what} is not valid base64") from e
    if base64.b64encode(raw).decode("ascii") != s:  # one encoding per value: no malleable spare bits
        raise FormatError(f"{what} is not canonical base64")
    return raw


@dataclass(frozen=True)
class KeySlot:
    """One wrapped copy of a file's data key."""

    provider: str
    key_id: str
    version: int
    alg: str
    wrapped: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "key_id": self.key_id,
            "version": self.version,
            "alg": self.alg,
            "wrapped": b64e(self.wrapped),
        }

    @classmethod
    def from_json(cls, obj: Any) -> KeySlot:
        if not isinstance(obj, dict):
            raise FormatError("key slot must be an object")
        try:
            provider, key_id, version, alg = obj["provider"], obj["key_id"], obj["version"], obj["alg"]
        except KeyError as e:
            raise FormatError(f"key slot lacks {e.args[0]!r}") from None
        if not all(isinstance(x, str) and 0 < len(x) <= 256 for x in (provider, key_id, alg)):
            raise FormatError("key slot fields must be short strings")
        if not isinstance(version, int) or isinstance(version, bool) or not 0 < version < 2**31:
            raise FormatError("key slot version must be a positive integer")
        wrapped = b64d(obj.get("wrapped"), "key slot 'wrapped'")
        if len(wrapped) > 4096:
            raise FormatError("wrapped key is too long")
        return cls(provider, key_id, version, alg, wrapped)


def wrap_aad(slot_provider: str, key_id: str, version: int, context: bytes) -> bytes:
    """Associated data for a key wrap: provider, key id, version and file context."""
    h = hashlib.sha256()
    for part in (b"weightwarden/v1/wrap", slot_provider.encode(), key_id.encode(), str(version).encode(), context):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


class KeyProvider(ABC):
    """Wraps and unwraps data keys under key-encryption keys it keeps to itself."""

    #: short name stored in key slots ("local", "pkcs11", ...)
    name: str

    def wrap(self, dek: bytes | bytearray, context: bytes) -> KeySlot:
        if len(dek) != DEK_LEN:
            raise ValueError("data keys are 32 bytes")
        slot = self._wrap(bytes(dek), context)
        if slot.provider != self.name:
            raise AssertionError("provider produced a slot for another provider")
        return slot

    def unwrap(self, slot: KeySlot, context: bytes) -> bytearray:
        if slot.provider != self.name:
            raise KeyNotFoundError(f"slot belongs to provider {slot.provider!r}, not {self.name!r}")
        dek = self._unwrap(slot, context)
        if len(dek) != DEK_LEN:
            raise WrongKeyError("unwrapped key has the wrong length")
        return dek

    def can_unwrap(self, slot: KeySlot) -> bool:
        return slot.provider == self.name and self._has_key(slot.key_id, slot.version)

    @abstractmethod
    def _wrap(self, dek: bytes, context: bytes) -> KeySlot: ...

    @abstractmethod
    def _unwrap(self, slot: KeySlot, context: bytes) -> bytearray: ...

    @abstractmethod
    def _has_key(self, key_id: str, version: int) -> bool: ...


class Signer(ABC):
    """Signs sealed-file manifests."""

    alg: str = "ed25519"

    @property
    @abstractmethod
    def key_id(self) -> str: ...

    @property
    @abstractmethod
    def public_key(self) -> bytes: ...

    @abstractmethod
    def sign(self, message: bytes) -> bytes: ...


def ed25519_key_id(public_key: bytes) -> str:
    return "ed25519:" + hashlib.sha256(public_key).hexdigest()[:16]

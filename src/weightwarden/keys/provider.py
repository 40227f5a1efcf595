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

from ..audit import AMBIENT, AuditAction, AuditSink
from ..audit import event as audit_event
from ..errors import (
    FormatError,
    KeyDestroyedError,
    KeyDisabledError,
    KeyNotFoundError,
    KeyPurposeError,
    SignatureError,
    WardenError,
    WrongKeyError,
)

DEK_LEN = 32

#: What a signing key is for: one key, one purpose (docs/FORMAT.md §1.4).  Every signature made
#: through :class:`Signer` covers ``SIG_LABEL ‖ purpose ‖ 0x00 ‖ message``.
SIGNING_PURPOSES = ("sealing", "audit-log", "export-rules", "compliance")
#: What a key-encryption key is for: data keys of sealed files, or per-model tracing secrets.
KEK_PURPOSES = ("sealing", "tracing")
#: A trust entry for a pre-purpose key that may still verify version-1 manifests (no purpose label).
LEGACY_SEALING = "legacy-sealing"
TRUST_PURPOSES = (*SIGNING_PURPOSES, LEGACY_SEALING)
SIG_LABEL = b"weightwarden/signature/v2\x00"


def check_purpose(purpose: Any, allowed: tuple[str, ...] = SIGNING_PURPOSES, what: str = "purpose") -> str:
    if purpose not in allowed:
        raise KeyPurposeError(f"{what} {str(purpose)[:32]!r} is not one of {', '.join(allowed)}")
    return str(purpose)


def wraps_for(provider: KeyProvider, purpose: str, what: str) -> KeyProvider:
    """``provider`` if it wraps keys of ``purpose`` (providers that do not say are taken at their word), else
    :class:`KeyPurposeError` naming ``what`` it was asked to wrap."""
    have = getattr(provider, "purpose", purpose)
    if have != purpose:
        raise KeyPurposeError(f"{what} are wrapped by a {purpose} KEK, not a {have!r} one "
                              f"(Keyring.provider(purpose={purpose!r}, create=True))")  # fmt: skip
    return provider


def purpose_message(purpose: str, message: bytes) -> bytes:
    """The bytes a key of ``purpose`` actually signs for ``message``."""
    return SIG_LABEL + check_purpose(purpose).encode() + b"\x00" + bytes(message)


def verify_purpose(
    public_key: bytes,
    purpose: str,
    message: bytes,
    signature: bytes,
    *,
    what: str = "signature",
    error: type[WardenError] = SignatureError,
    purpose_error: type[WardenError] = KeyPurposeError,
) -> None:
    """Check ``signature`` over ``message`` under ``purpose``'s label.  A signature that verifies under
    another purpose's label raises ``purpose_error`` (a key of that purpose made it); anything else
    that fails raises ``error``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        pk = Ed25519PublicKey.from_public_bytes(bytes(public_key))
    except ValueError:
        raise error(f"{what}: not an Ed25519 public key") from None
    try:
        pk.verify(signature, purpose_message(purpose, message))
        return
    except InvalidSignature:
        pass
    for other in SIGNING_PURPOSES:
        if other == purpose:
            continue
        try:
            pk.verify(signature, purpose_message(other, message))
        except InvalidSignature:
            continue
        raise purpose_error(f"{what} was made by a key of purpose {other!r}, not {purpose!r}: refused")
    raise error(f"{what} is invalid")


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
    """A key store that wraps and unwraps data keys under key-encryption keys it keeps.

    ``key_id`` names the KEK new data keys are wrapped under (its current version);
    ``unwrap`` takes any key of this store that a slot names.  Subclasses implement
    the ``_`` methods; this base does the shared checks and emits an audit event for
    every use and every change of key material.
    """

    #: short name stored in key slots ("local", "pkcs11", ...)
    name: str
    key_id: str
    audit: AuditSink = AMBIENT  # the trail of the operation in progress

    # -- use -----------------------------------------------------------------------
    def wrap(self, dek: bytes | bytearray, context: bytes) -> KeySlot:
        if len(dek) != DEK_LEN:
            raise ValueError("data keys are 32 bytes")
        try:
            slot = self._wrap(bytes(dek), context)
        except WardenError as e:
            self._emit(AuditAction.KEY_WRAP, _outcome(e), self.key_id, None, context, error=type(e).__name__)
            raise
        if slot.provider != self.name:
            raise AssertionError("provider produced a slot for another provider")
        self._emit(AuditAction.KEY_WRAP, "ok", slot.key_id, slot.version, context)
        return slot

    def unwrap(self, slot: KeySlot, context: bytes) -> bytearray:
        if slot.provider != self.name:
            raise KeyNotFoundError(f"slot belongs to provider {slot.provider!r}, not {self.name!r}")
        try:
            dek = self._unwrap(slot, context)
            if len(dek) != DEK_LEN:
                raise WrongKeyError("unwrapped key has the wrong length")
        except KeyNotFoundError:
            raise  # not this store's key: nothing was attempted
        except WardenError as e:
            self._emit(AuditAction.KEY_UNWRAP, _outcome(e), slot.key_id, slot.version, context, error=type(e).__name__)
            raise
        self._emit(AuditAction.KEY_UNWRAP, "ok", slot.key_id, slot.version, context)
        return dek

    def current_version(self, key_id: str | None = None) -> int:
        return self._current_version(key_id or self.key_id)

    # -- lifecycle -------------------------------------------------------------------
    def rotate(self, key_id: str | None = None) -> int:
        """Make a new version of the KEK; new wraps use it.  Returns the version."""
        kid = key_id or self.key_id
        version = self._rotate(kid)
        self._emit(AuditAction.KEY_ROTATE, "ok", kid, version, None)
        return version

    def disable(self, version: int, key_id: str | None = None) -> None:
        kid = key_id or self.key_id
        if version == self.current_version(kid):
            raise KeyDisabledError("the current version cannot be disabled; rotate first")
        self._set_state(kid, version, "disabled")
        self._emit(AuditAction.KEY_DISABLE, "ok", kid, version, None)

    def enable(self, version: int, key_id: str | None = None) -> None:
        kid = key_id or self.key_id
        self._set_state(kid, version, "enabled")
        self._emit(AuditAction.KEY_ENABLE, "ok", kid, version, None)

    def destroy(self, version: int | None = None, key_id: str | None = None) -> list[int]:
        """Destroy one version (not the current one), or with ``version=None`` every
        version of the key: crypto-shredding of all it protects.  Returns what was destroyed."""
        kid = key_id or self.key_id
        if version is not None and version == self.current_version(kid):
            raise KeyDisabledError("the current version cannot be destroyed alone; rotate first or shred the key")
        done = self._destroy(kid, version)
        for v in done:
            self._emit(AuditAction.KEY_DESTROY, "ok", kid, v, None)
        return done

    def versions(self, key_id: str | None = None) -> list[dict[str, Any]]:
        """[{"version": n, "state": "enabled" | "disabled" | "destroyed"}, ...]"""
        return self._versions(key_id or self.key_id)

    # -- backend ------------------------------------------------------------------------
    @abstractmethod
    def _wrap(self, dek: bytes, context: bytes) -> KeySlot: ...

    @abstractmethod
    def _unwrap(self, slot: KeySlot, context: bytes) -> bytearray: ...

    @abstractmethod
    def _current_version(self, key_id: str) -> int: ...

    @abstractmethod
    def _rotate(self, key_id: str) -> int: ...

    @abstractmethod
    def _set_state(self, key_id: str, version: int, state: str) -> None: ...

    @abstractmethod
    def _destroy(self, key_id: str, version: int | None) -> list[int]: ...

    @abstractmethod
    def _versions(self, key_id: str) -> list[dict[str, Any]]: ...

    def _emit(
        self, action: AuditAction, outcome: str, key_id: str, version: int | None, context: bytes | None, **detail: Any
    ) -> None:
        self.audit.emit(
            audit_event(
                action,
                outcome,
                key_id=key_id,
                key_version=version,
                provider=self.name,
                subject=context.hex() if context else None,
                detail=detail,
            )
        )


def _outcome(e: Exception) -> str:
    return "denied" if isinstance(e, (WrongKeyError, KeyDisabledError, KeyDestroyedError)) else "error"


class Signer(ABC):
    """Signs with an Ed25519 key of one ``purpose`` (``sealing``: manifests; ``audit-log``: tree heads;
    ``export-rules``: rules files).  What it signs is always ``purpose_message(purpose, message)``, so a
    signature of one purpose never verifies as another.  ``sign`` emits an audit event."""

    alg: str = "ed25519"
    audit: AuditSink = AMBIENT  # the trail of the operation in progress
    purpose: str = "sealing"

    def sign(self, message: bytes) -> bytes:
        sig = self._sign(purpose_message(self.purpose, message))
        self.audit.emit(audit_event(AuditAction.KEY_SIGN, "ok", key_id=self.key_id, provider=self.provider_name,
                                    detail={"purpose": self.purpose}))  # fmt: skip
        return sig

    provider_name: str = "local"

    def sign_unaudited(self, message: bytes) -> bytes:
        """Sign without an audit event: only for the audit log's own tree heads, which would
        otherwise log themselves without end."""
        return self._sign(purpose_message(self.purpose, message))

    def require(self, purpose: str) -> Signer:
        """This signer, if its key is of ``purpose``; else :class:`KeyPurposeError` (nothing signed)."""
        if self.purpose != purpose:
            raise KeyPurposeError(f"key {self.key_id} is a {self.purpose!r} key; this needs a {purpose!r} key")
        return self

    @property
    def key_id(self) -> str:
        return ed25519_key_id(self.public_key)

    @property
    @abstractmethod
    def public_key(self) -> bytes: ...

    @abstractmethod
    def _sign(self, message: bytes) -> bytes: ...


def shred(provider: KeyProvider, key_id: str | None = None) -> list[int]:
    """Crypto-shred: destroy every version of a key, so every copy of every file whose
    data key only that key wrapped is unreadable, wherever the copies went."""
    kid = key_id or provider.key_id
    done = provider.destroy(None, kid)
    provider.audit.emit(
        audit_event(AuditAction.MODEL_SHRED, key_id=kid, provider=provider.name, detail={"versions": done})
    )
    return done


def ed25519_key_id(public_key: bytes) -> str:
    return "ed25519:" + hashlib.sha256(public_key).hexdigest()[:16]

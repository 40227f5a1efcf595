"""Key slots for a release's recipient: the data key sealed to their age X25519 public key.

A released copy is sealed under a fresh data key like any sealed file, but its one key slot is
wrapped to the *recipient's* public key (``age1…``) with age (pyrage), not under one of our
key-encryption keys: the partner opens it with their own private identity (``AGE-SECRET-KEY-1…``),
and we never hold that identity.  The slot (docs/FORMAT.md §1.2.1):

    provider "age", key_id = the recipient (``age1…``), version 1, alg "AGE-X25519-V1",
    wrapped = age_encrypt(to = recipient, plaintext = wrap_aad("age", key_id, 1, file_id) ‖ DEK)

age has no associated data, so the file binding travels inside the age payload: the reader
compares the first 32 bytes with the ``wrap_aad`` it expects (constant time) before it accepts the
data key, which the sealed file's key commitment then checks again.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Any

from ..errors import KeyManagementError, RecipientKeyError, WrongKeyError
from .provider import DEK_LEN, KeyProvider, KeySlot, wrap_aad

__all__ = ["ALG", "PROVIDER", "AgeIdentityProvider", "AgeRecipientProvider", "check_recipient"]

PROVIDER = "age"
ALG = "AGE-X25519-V1"
MAX_IDENTITY_FILE = 64 * 1024


def check_recipient(recipient: str, what: str = "--recipient-key") -> str:
    """The canonical form of an age X25519 recipient (``age1…``), or :class:`RecipientKeyError`."""
    import pyrage

    r = recipient.strip() if isinstance(recipient, str) else ""
    if not r.startswith("age1") or len(r) > 128:
        raise RecipientKeyError(f"{what}: an age X25519 public key starts with age1 (e.g. from `age-keygen -y`)")
    try:
        pyrage.x25519.Recipient.from_str(r)
    except Exception:  # pyrage.RecipientError: bad Bech32, bad length
        raise RecipientKeyError(f"{what}: {r[:16]!r}… is not a valid age X25519 public key") from None
    return r


class _NoLifecycle(KeyProvider):
    def _current_version(self, key_id: str) -> int:
        return 1

    def _rotate(self, key_id: str) -> int:
        raise KeyManagementError("an age recipient key has no versions to rotate (the recipient owns it)")

    def _set_state(self, key_id: str, version: int, state: str) -> None:
        raise KeyManagementError("an age recipient key has no versions to enable or disable")

    def _destroy(self, key_id: str, version: int | None) -> list[int]:
        raise KeyManagementError("an age recipient key cannot be destroyed here (the recipient owns it)")

    def _versions(self, key_id: str) -> list[dict[str, Any]]:
        return [{"version": 1, "state": "enabled"}]


class AgeRecipientProvider(_NoLifecycle):
    """Wraps data keys to one recipient's public key.  It cannot unwrap anything."""

    name = PROVIDER

    def __init__(self, recipient: str, audit: Any = None):
        self.key_id = check_recipient(recipient)
        if audit is not None:
            self.audit = audit

    def _wrap(self, dek: bytes, context: bytes) -> KeySlot:
        import pyrage

        aad = wrap_aad(PROVIDER, self.key_id, 1, context)
        wrapped = pyrage.encrypt(aad + dek, [pyrage.x25519.Recipient.from_str(self.key_id)])
        return KeySlot(PROVIDER, self.key_id, 1, ALG, wrapped)

    def _unwrap(self, slot: KeySlot, context: bytes) -> bytearray:
        raise WrongKeyError("a recipient's public key cannot open a slot; the recipient's identity can")


class AgeIdentityProvider(_NoLifecycle):
    """Unwraps slots sealed to this age identity (the recipient's side: ``warden open --identity FILE``)."""

    name = PROVIDER

    def __init__(self, identity: str, audit: Any = None):
        import pyrage

        text = identity.strip()
        try:
            self._identity = pyrage.x25519.Identity.from_str(text)
        except Exception:
            raise RecipientKeyError("--identity: not an age X25519 identity (AGE-SECRET-KEY-1…)") from None
        self.key_id = str(self._identity.to_public())
        if audit is not None:
            self.audit = audit

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], audit: Any = None) -> AgeIdentityProvider:
        """The first ``AGE-SECRET-KEY-1`` line of an age identity file (``age-keygen`` output)."""
        p = Path(path)
        try:
            if p.stat().st_size > MAX_IDENTITY_FILE:
                raise RecipientKeyError(f"--identity {p.name}: too large for an age identity file")
            lines = p.read_text("utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            raise RecipientKeyError(f"--identity {p.name}: cannot read the identity file") from None
        keys = [ln.strip() for ln in lines if ln.strip().startswith("AGE-SECRET-KEY-1")]
        if not keys:
            raise RecipientKeyError(f"--identity {p.name}: no AGE-SECRET-KEY-1… line (make one with age-keygen)")
        return cls(keys[0], audit)

    def _wrap(self, dek: bytes, context: bytes) -> KeySlot:
        return AgeRecipientProvider(self.key_id)._wrap(dek, context)

    def _unwrap(self, slot: KeySlot, context: bytes) -> bytearray:
        import pyrage

        if slot.alg != ALG or slot.version != 1:
            raise WrongKeyError(f"age slot algorithm {slot.alg!r} v{slot.version} is not {ALG} v1")
        if slot.key_id != self.key_id:
            raise WrongKeyError("this file's age slot is sealed to another recipient")
        try:
            plain = bytearray(pyrage.decrypt(slot.wrapped, [self._identity]))
        except Exception:  # pyrage.DecryptError
            raise WrongKeyError("the age slot does not open with this identity") from None
        want = wrap_aad(PROVIDER, slot.key_id, 1, context)
        if len(plain) != len(want) + DEK_LEN or not hmac.compare_digest(bytes(plain[: len(want)]), want):
            plain[:] = bytes(len(plain))
            raise WrongKeyError("the age slot is bound to another file")
        dek = bytearray(plain[len(want) :])
        plain[:] = bytes(len(plain))
        return dek

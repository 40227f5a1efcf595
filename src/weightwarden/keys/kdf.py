"""Argon2id parameters (RFC 9106) that turn a passphrase into a keyring's wrapping key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from argon2.low_level import Type, hash_secret_raw

from ..errors import KeyringError

__all__ = ["KdfParams"]


@dataclass(frozen=True)
class KdfParams:
    """Argon2id parameters (RFC 9106).  The default is RFC 9106's second recommendation."""

    time_cost: int = 3
    memory_kib: int = 64 * 1024
    parallelism: int = 1

    def derive(self, passphrase: str, salt: bytes) -> bytes:
        return hash_secret_raw(
            passphrase.encode("utf-8"), salt, self.time_cost, self.memory_kib, self.parallelism, 32, Type.ID
        )

    @classmethod
    def from_json(cls, obj: Any) -> KdfParams:
        try:
            p = cls(int(obj["time_cost"]), int(obj["memory_kib"]), int(obj["parallelism"]))
        except (KeyError, TypeError, ValueError) as e:
            raise KeyringError("keyring KDF parameters are malformed") from e
        if not (1 <= p.time_cost <= 64 and 8 <= p.memory_kib <= 4 * 1024 * 1024 and 1 <= p.parallelism <= 64):
            raise KeyringError("keyring KDF parameters are out of range")
        return p

"""HashiCorp Vault (or OpenBao) transit key provider (hvac; extra ``weightwarden[kms]``).

A transit key (aes256-gcm96) wraps the data key in the service and binds the sealed file's id as
*associated data*, so a wrapped key cannot be moved to another file.  Vault's ciphertext names its
version (``vault:vN:``).

URIs as users write them (keys/registry.py dispatches on the scheme)::

    vault://transit/keys/model-a     (address and token from VAULT_ADDR / VAULT_TOKEN)
"""

from __future__ import annotations

import base64
import os
from typing import Any

from .._extras import require
from ..errors import (
    KeyDestroyedError,
    KeyDisabledError,
    KeyManagementError,
    KeyNotFoundError,
    KeyProviderError,
    ProviderUnavailableError,
    WrongKeyError,
)
from .provider import KeyProvider, KeySlot

__all__ = ["VaultTransitProvider", "from_uri"]


class VaultTransitProvider(KeyProvider):
    """A Vault transit key (aes256-gcm96) wraps data keys; the file id is associated data."""

    name = "vault"
    ALG = "VAULT-TRANSIT"

    def __init__(self, key_name: str, *, mount: str = "transit", client: Any = None):
        if client is None:
            hvac = require("hvac", extra="kms")

            client = hvac.Client(url=os.environ.get("VAULT_ADDR"), token=os.environ.get("VAULT_TOKEN"))
        self._v = client
        self._mount = mount
        self.key_id = key_name

    def _transit(self, fn: str, **kw: Any) -> Any:
        hx = require("hvac.exceptions", extra="kms")
        import requests

        try:
            return getattr(self._v.secrets.transit, fn)(mount_point=self._mount, **kw)
        except hx.InvalidRequest as e:
            # messages as a real server (OpenBao 2.x, Vault 1.x transit) words them; tests/keys/test_key_providers.py
            msg = str(e)
            if "disallowed by policy" in msg or "min_decryption_version" in msg or "archived" in msg:
                raise KeyDisabledError(f"Vault key {self.key_id}: that version is no longer allowed") from None
            if "key not found" in msg:
                raise KeyNotFoundError(f"Vault transit key {self.key_id} does not exist") from None
            if any(m in msg for m in ("message authentication failed", "invalid ciphertext", "decryption")):
                raise WrongKeyError("Vault refused to decrypt: wrong key, associated data or ciphertext") from None
            raise KeyManagementError(f"Vault rejected the request: {msg[:120]}") from None
        except hx.InvalidPath:
            raise KeyNotFoundError(f"Vault transit key {self.key_id} does not exist") from None
        except (hx.Forbidden, hx.Unauthorized):
            raise ProviderUnavailableError("Vault denied access (token or policy)") from None
        except (hx.VaultError, requests.RequestException) as e:
            raise ProviderUnavailableError(f"Vault unreachable: {type(e).__name__}") from None

    def _wrap(self, dek: bytes, context: bytes) -> KeySlot:
        # transit's encrypt *creates* a missing key (upsert) for a token allowed to: a typo in the name,
        # or a key shredded earlier, would silently get a fresh key.  Read it first (KeyNotFoundError).
        self._key(self.key_id)
        r = self._transit(
            "encrypt_data",
            name=self.key_id,
            plaintext=base64.b64encode(dek).decode(),
            associated_data=base64.b64encode(context).decode(),
        )
        ct: str = r["data"]["ciphertext"]
        return KeySlot(self.name, self.key_id, int(ct.split(":")[1][1:]), self.ALG, ct.encode())

    def _unwrap(self, slot: KeySlot, context: bytes) -> bytearray:
        if slot.alg != self.ALG:
            raise WrongKeyError("not a Vault transit wrapped key")
        try:
            r = self._transit(
                "decrypt_data",
                name=slot.key_id,
                ciphertext=slot.wrapped.decode(),
                associated_data=base64.b64encode(context).decode(),
            )
        except KeyNotFoundError:  # a slot names a key that was made here: gone means deleted (shredded)
            raise KeyDestroyedError(f"Vault transit key {slot.key_id} no longer exists (deleted: shredded)") from None
        return bytearray(base64.b64decode(r["data"]["plaintext"]))

    def _key(self, key_id: str) -> dict[str, Any]:
        return self._transit("read_key", name=key_id)["data"]

    def _current_version(self, key_id: str) -> int:
        return int(self._key(key_id)["latest_version"])

    def _rotate(self, key_id: str) -> int:
        self._transit("rotate_key", name=key_id)
        return self._current_version(key_id)

    def _set_state(self, key_id: str, version: int, state: str) -> None:
        # Vault disables versions from the oldest up: min_decryption_version
        k = self._key(key_id)
        floor = int(k["min_decryption_version"])
        if version < int(k.get("min_available_version") or 0):
            raise KeyDestroyedError(f"Vault key {key_id} version {version} was trimmed (destroyed)")
        new = version + 1 if state == "disabled" else min(floor, version)
        if state == "disabled" and version != floor:
            raise KeyManagementError("Vault disables versions oldest first: disable the lowest enabled version")
        self._transit("update_key_configuration", name=key_id, min_decryption_version=new)

    def _destroy(self, key_id: str, version: int | None) -> list[int]:
        # read_key lists only versions >= min_decryption_version: count from the numbers instead
        k = self._key(key_id)
        first = max(1, int(k.get("min_available_version") or 0))
        if version is None:
            self._transit("update_key_configuration", name=key_id, deletion_allowed=True)
            self._transit("delete_key", name=key_id)
            return list(range(first, int(k["latest_version"]) + 1))
        floor = int(k["min_decryption_version"])
        if version >= floor:
            raise KeyManagementError("disable a Vault key version before trimming it")
        if version < first:
            return []
        if int(k.get("min_encryption_version") or 0) < version + 1:  # trim needs min_available <= min_encryption
            self._transit("update_key_configuration", name=key_id, min_encryption_version=version + 1)
        self._transit("trim_key", name=key_id, min_version=version + 1)
        return list(range(first, version + 1))

    def _versions(self, key_id: str) -> list[dict[str, Any]]:
        # every version up to latest: trimmed ones (below min_available_version) are destroyed, those
        # below min_decryption_version disabled (read_key's "keys" omits both)
        k = self._key(key_id)
        floor, gone = int(k["min_decryption_version"]), int(k.get("min_available_version") or 0)
        return [
            {"version": v, "state": "destroyed" if v < gone else "enabled" if v >= floor else "disabled"}
            for v in range(1, int(k["latest_version"]) + 1)
        ]


def from_uri(uri: str) -> VaultTransitProvider:
    """``vault://MOUNT/keys/NAME``: the transit key NAME under the mount MOUNT."""
    if not uri.startswith("vault://"):
        raise KeyProviderError(f"not a Vault URI (vault://MOUNT/keys/NAME): {uri[:40]!r}")
    mount, sep, name = uri[len("vault://") :].partition("/keys/")
    if not sep or not mount or not name:
        raise KeyProviderError("a Vault URI is vault://MOUNT/keys/NAME")
    return VaultTransitProvider(name, mount=mount)

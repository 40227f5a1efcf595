"""AWS KMS key provider (boto3; extra ``weightwarden[kms]``).

A KMS key (symmetric, ENCRYPT_DECRYPT) wraps the data key in the service and binds the sealed file's id
as *encryption context*, so a wrapped key cannot be moved to another file.  AWS KMS rotates behind one
key id (our slots record version 1).

URIs as users write them (keys/registry.py dispatches on the scheme)::

    awskms:///arn:aws:kms:eu-west-1:111122223333:key/1234abcd-...   (also aws-kms://arn:...)
"""

from __future__ import annotations

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

__all__ = ["AwsKmsProvider", "from_uri"]

PREFIXES = ("awskms:///", "awskms://", "aws-kms://")


def _context(context: bytes) -> dict[str, str]:
    return {"weightwarden:file": context.hex(), "weightwarden:format": "1"}


class AwsKmsProvider(KeyProvider):
    """A KMS key (symmetric, ENCRYPT_DECRYPT) wraps data keys with KMS Encrypt/Decrypt."""

    name = "awskms"
    ALG = "AWS-KMS-ENCRYPT"

    def __init__(self, key_arn: str, *, client: Any = None, region: str | None = None, endpoint_url: str | None = None):
        if client is None:
            boto3 = require("boto3", extra="kms")

            region = region or (key_arn.split(":")[3] if key_arn.startswith("arn:") else None)
            client = boto3.client(
                "kms", region_name=region, endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_KMS")
            )
        self._kms = client
        self.key_id = key_arn

    def _call(self, fn: str, **kw: Any) -> Any:
        BotoCoreError, ClientError = require("botocore.exceptions", "BotoCoreError", "ClientError", extra="kms")

        try:
            return getattr(self._kms, fn)(**kw)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("InvalidCiphertextException", "IncorrectKeyException"):
                raise WrongKeyError("KMS refused to decrypt: wrong key or encryption context") from None
            if code == "DisabledException":
                raise KeyDisabledError(f"KMS key {self.key_id} is disabled") from None
            if code == "KMSInvalidStateException":
                raise KeyDestroyedError(f"KMS key {self.key_id} is pending deletion or deleted") from None
            if code == "NotFoundException":
                raise KeyNotFoundError(f"KMS key {self.key_id} does not exist") from None
            raise ProviderUnavailableError(f"KMS error {code or 'unknown'}") from None
        except BotoCoreError as e:
            raise ProviderUnavailableError(f"KMS unreachable: {type(e).__name__}") from None

    def _wrap(self, dek: bytes, context: bytes) -> KeySlot:
        r = self._call("encrypt", KeyId=self.key_id, Plaintext=dek, EncryptionContext=_context(context))
        return KeySlot(self.name, self.key_id, 1, self.ALG, bytes(r["CiphertextBlob"]))

    def _unwrap(self, slot: KeySlot, context: bytes) -> bytearray:
        if slot.alg != self.ALG:
            raise WrongKeyError("not an AWS KMS wrapped key")
        r = self._call("decrypt", KeyId=slot.key_id, CiphertextBlob=slot.wrapped, EncryptionContext=_context(context))
        return bytearray(r["Plaintext"])

    def _current_version(self, key_id: str) -> int:
        return 1

    def _rotate(self, key_id: str) -> int:
        self._call("rotate_key_on_demand", KeyId=key_id)
        return 1  # KMS keeps old key material behind the same key id; slots need no rewrap

    def _set_state(self, key_id: str, version: int, state: str) -> None:
        self._call("enable_key" if state == "enabled" else "disable_key", KeyId=key_id)

    def _destroy(self, key_id: str, version: int | None) -> list[int]:
        if version not in (None, 1):
            raise KeyManagementError("AWS KMS destroys whole keys, not versions")
        bare = key_id.rsplit("key/", 1)[-1]  # AWS takes an id or an ARN; some emulators only an id
        self._call("schedule_key_deletion", KeyId=bare, PendingWindowInDays=7)
        return [1]

    def _versions(self, key_id: str) -> list[dict[str, Any]]:
        meta = self._call("describe_key", KeyId=key_id)["KeyMetadata"]
        state = {"Enabled": "enabled", "Disabled": "disabled"}.get(meta["KeyState"], "destroyed")
        return [{"version": 1, "state": state}]

    # KMS has no per-version state: lifecycle acts on the whole key
    def disable(self, version: int, key_id: str | None = None) -> None:
        self._set_state(key_id or self.key_id, version, "disabled")


def from_uri(uri: str) -> AwsKmsProvider:
    """``awskms:///ARN`` (or ``awskms://ARN``, ``aws-kms://ARN``): the KMS key with that ARN."""
    for prefix in PREFIXES:
        if uri.startswith(prefix):
            arn = uri[len(prefix) :]
            if not arn.startswith("arn:") or ":kms:" not in arn:
                raise KeyProviderError("an AWS KMS URI names a key ARN: awskms:///arn:aws:kms:REGION:ACCOUNT:key/ID")
            return AwsKmsProvider(arn)
    raise KeyProviderError(f"not an AWS KMS URI (awskms:///ARN): {uri[:40]!r}")

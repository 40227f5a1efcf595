"""The local keyring: the embedded default key provider.

The keyring is one JSON file, ``$WARDEN_HOME/keyring.json``.  Its secret part
(key-encryption keys and Ed25519 signing keys) is encrypted with AES-256-GCM
under a key derived from a passphrase by Argon2id.  Public trust (signers whose
manifests ``verify`` accepts) lives beside it in ``trusted.json``: public data
whose integrity rests on file permissions, like ``~/.ssh/known_hosts``.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .._atomic import atomic_write_bytes
from ..errors import BadPassphraseError, KeyNotFoundError, KeyringError, WrongKeyError
from .provider import KeyProvider, KeySlot, Signer, b64d, b64e, ed25519_key_id, wrap_aad

KEYRING_FILE = "keyring.json"
TRUST_FILE = "trusted.json"
_FORMAT = "weightwarden-keyring"
_WRAP_ALG = "A256GCM"


def default_home() -> Path:
    env = os.environ.get("WARDEN_HOME")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("weightwarden"))


def _canon(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _now(now: datetime | None) -> str:
    return (now or datetime.now(UTC)).isoformat(timespec="seconds")


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


class Ed25519Signer(Signer):
    def __init__(self, private: Ed25519PrivateKey):
        self._key = private
        self._pub = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def key_id(self) -> str:
        return ed25519_key_id(self._pub)

    @property
    def public_key(self) -> bytes:
        return self._pub

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    @classmethod
    def generate(cls) -> Ed25519Signer:
        return cls(Ed25519PrivateKey.generate())


class TrustStore:
    """Public keys of signers whose manifests are accepted."""

    def __init__(self, path: Path | None = None, signers: dict[str, dict[str, str]] | None = None):
        self.path = path
        self.signers: dict[str, dict[str, str]] = dict(signers or {})

    @classmethod
    def load(cls, home: Path | None = None) -> TrustStore:
        path = (home or default_home()) / TRUST_FILE
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

    def add(self, public_key: bytes, label: str = "") -> str:
        if len(public_key) != 32:
            raise KeyringError("an Ed25519 public key is 32 bytes")
        Ed25519PublicKey.from_public_bytes(public_key)
        kid = ed25519_key_id(public_key)
        self.signers[kid] = {"public_key": b64e(public_key), "label": label}
        return kid

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
        atomic_write_bytes(self.path, _canon({"signers": self.signers}) + b"\n", force=True, mode=0o644)


class Keyring:
    """Key-encryption keys (versioned) and signing keys, sealed by a passphrase."""

    def __init__(self, home: Path, passphrase: str, kdf: KdfParams, salt: bytes, secrets_: dict[str, Any]):
        self.home = home
        self._kdf = kdf
        self._salt = salt
        self._wrapping_key = bytearray(kdf.derive(passphrase, salt))
        self._s = secrets_
        self.trust = TrustStore.load(home)

    # -- lifecycle ------------------------------------------------------------
    @classmethod
    def create(
        cls, home: Path | None, passphrase: str, *, kdf: KdfParams | None = None, now: datetime | None = None
    ) -> Keyring:
        home = Path(home) if home is not None else default_home()
        if (home / KEYRING_FILE).exists():
            raise KeyringError(f"a keyring already exists in {home}")
        if len(passphrase) < 8:
            raise KeyringError("the passphrase must be at least 8 characters")
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        kr = cls(home, passphrase, kdf or KdfParams(), secrets.token_bytes(16), {"keks": {}, "signing": {}})
        kr.new_kek(now=now)
        kr.new_signing_key(now=now)
        kr.save()
        return kr

    @classmethod
    def unlock(cls, home: Path | None, passphrase: str) -> Keyring:
        home = Path(home) if home is not None else default_home()
        path = home / KEYRING_FILE
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise KeyringError(f"no keyring in {home}; run `warden init`") from None
        except (OSError, ValueError) as e:
            raise KeyringError(f"keyring {path} is unreadable") from e
        if not isinstance(obj, dict) or obj.get("format") != _FORMAT or obj.get("version") != 1:
            raise KeyringError(f"{path} is not a version-1 weightwarden keyring")
        kdf = KdfParams.from_json(obj.get("kdf"))
        salt = b64d(obj.get("salt"), "keyring salt")
        nonce = b64d(obj.get("nonce"), "keyring nonce")
        ct = b64d(obj.get("ciphertext"), "keyring ciphertext")
        kr = cls.__new__(cls)
        kr.home, kr._kdf, kr._salt = home, kdf, salt
        kr._wrapping_key = bytearray(kdf.derive(passphrase, salt))
        try:
            plain = AESGCM(bytes(kr._wrapping_key)).decrypt(nonce, ct, kr._aad())
        except InvalidTag:
            kr.close()
            raise BadPassphraseError("the passphrase does not unlock this keyring") from None
        kr._s = json.loads(plain)
        kr.trust = TrustStore.load(home)
        return kr

    def _aad(self) -> bytes:
        return _canon({"format": _FORMAT, "version": 1, "kdf": asdict(self._kdf), "salt": b64e(self._salt)})

    def save(self) -> None:
        nonce = secrets.token_bytes(12)
        ct = AESGCM(bytes(self._wrapping_key)).encrypt(nonce, _canon(self._s), self._aad())
        doc = {
            "format": _FORMAT,
            "version": 1,
            "kdf": asdict(self._kdf),
            "salt": b64e(self._salt),
            "nonce": b64e(nonce),
            "ciphertext": b64e(ct),
        }
        atomic_write_bytes(self.home / KEYRING_FILE, _canon(doc) + b"\n", force=True, mode=0o600)
        self.trust.save()

    def close(self) -> None:
        """Best-effort zeroization of the passphrase-derived key."""
        for i in range(len(self._wrapping_key)):
            self._wrapping_key[i] = 0

    def __enter__(self) -> Keyring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- keys -------------------------------------------------------------------
    def new_kek(self, *, now: datetime | None = None) -> str:
        kid = "kek-" + secrets.token_hex(8)
        self._s["keks"][kid] = {
            "current": 1,
            "versions": {"1": {"key": b64e(secrets.token_bytes(32)), "state": "enabled", "created": _now(now)}},
        }
        self._s.setdefault("default_kek", kid)
        return kid

    def new_signing_key(self, *, now: datetime | None = None) -> str:
        signer = Ed25519Signer.generate()
        from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

        raw = signer._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        self._s["signing"][signer.key_id] = {"private": b64e(raw), "created": _now(now)}
        self._s.setdefault("default_signer", signer.key_id)
        self.trust.add(signer.public_key, label="own key")
        return signer.key_id

    def list_keys(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for kid, k in sorted(self._s["keks"].items()):
            for ver, v in sorted(k["versions"].items(), key=lambda kv: int(kv[0])):
                out.append(
                    {
                        "key_id": kid,
                        "kind": "kek",
                        "version": int(ver),
                        "state": v["state"],
                        "current": int(ver) == k["current"],
                        "default": kid == self._s.get("default_kek"),
                        "created": v["created"],
                    }
                )
        for kid, k in sorted(self._s["signing"].items()):
            out.append(
                {
                    "key_id": kid,
                    "kind": "signing",
                    "version": 1,
                    "state": "enabled",
                    "current": True,
                    "default": kid == self._s.get("default_signer"),
                    "created": k["created"],
                }
            )
        return out

    def _kek(self, key_id: str, version: int) -> bytes:
        try:
            v = self._s["keks"][key_id]["versions"][str(version)]
        except KeyError:
            raise KeyNotFoundError(f"key {key_id} version {version} is not in this keyring") from None
        if v["state"] != "enabled":
            raise KeyNotFoundError(f"key {key_id} version {version} is {v['state']}")
        return b64d(v["key"], "key")

    def provider(self, key_id: str | None = None) -> LocalProvider:
        kid = key_id or self._s.get("default_kek")
        if not kid or kid not in self._s["keks"]:
            raise KeyNotFoundError(f"no key-encryption key {kid!r} in this keyring")
        return LocalProvider(self, kid)

    def signer(self, key_id: str | None = None) -> Ed25519Signer:
        kid = key_id or self._s.get("default_signer")
        entry = self._s["signing"].get(kid) if kid else None
        if entry is None:
            raise KeyNotFoundError(f"no signing key {kid!r} in this keyring")
        return Ed25519Signer(Ed25519PrivateKey.from_private_bytes(b64d(entry["private"], "signing key")))

    def public_key(self, key_id: str | None = None) -> bytes:
        return self.signer(key_id).public_key


class _AesGcmWrapProvider(KeyProvider):
    """Wraps data keys with AES-256-GCM under a 32-byte KEK; subclasses say where KEKs live."""

    name = "local"

    def _kek(self, key_id: str, version: int) -> bytes:
        raise NotImplementedError

    def _current(self) -> tuple[str, int]:
        raise NotImplementedError

    def _has_key(self, key_id: str, version: int) -> bool:
        try:
            self._kek(key_id, version)
        except KeyNotFoundError:
            return False
        return True

    def _wrap(self, dek: bytes, context: bytes) -> KeySlot:
        key_id, version = self._current()
        kek = self._kek(key_id, version)
        nonce = secrets.token_bytes(12)
        ct = AESGCM(kek).encrypt(nonce, dek, wrap_aad(self.name, key_id, version, context))
        return KeySlot(self.name, key_id, version, _WRAP_ALG, nonce + ct)

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

    def __init__(self, keyring: Keyring, key_id: str):
        self._kr = keyring
        self.key_id = key_id

    def _kek(self, key_id: str, version: int) -> bytes:
        return self._kr._kek(key_id, version)

    def _current(self) -> tuple[str, int]:
        return self.key_id, int(self._kr._s["keks"][self.key_id]["current"])


class StaticKeyProvider(_AesGcmWrapProvider):
    """KEKs given as bytes (test vectors, KEKs delivered by another system)."""

    def __init__(self, keks: dict[tuple[str, int], bytes], current: tuple[str, int] | None = None):
        if any(len(k) != 32 for k in keks.values()):
            raise ValueError("KEKs are 32 bytes")
        self._keks = dict(keks)
        self._cur = current or next(iter(self._keks))

    def _kek(self, key_id: str, version: int) -> bytes:
        try:
            return self._keks[(key_id, version)]
        except KeyError:
            raise KeyNotFoundError(f"key {key_id} version {version} is not available") from None

    def _current(self) -> tuple[str, int]:
        return self._cur

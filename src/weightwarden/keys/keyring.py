"""The local keyring: the embedded default key provider's key-encryption keys and signing keys.

The keyring is one JSON file, ``Home(h).keyring`` (``$WARDEN_HOME/keyring.json``).  Its secret part
(key-encryption keys and Ed25519 signing keys) is encrypted with AES-256-GCM under a key derived from a
passphrase by Argon2id (:mod:`.kdf`), or under a random root key that M-of-N custodians recover
(:mod:`.custody`).  Public trust lives beside it in the trust store (:mod:`.truststore`).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .._atomic import atomic_write_bytes
from ..audit import AuditAction, AuditSink
from ..audit import event as audit_event
from ..canonical import canonical_json
from ..errors import (
    BadPassphraseError,
    KeyDestroyedError,
    KeyDisabledError,
    KeyNotFoundError,
    KeyPurposeError,
    KeyringError,
)
from ..home import Home, default_home
from .kdf import KdfParams
from .protocols import KeyringLike
from .provider import KEK_PURPOSES, b64d, b64e, check_purpose
from .signer import Ed25519Signer
from .truststore import TrustStore

if TYPE_CHECKING:
    from ..trail import Trail
    from .local import LocalProvider

__all__ = ["KEYRING_FILE", "KEY_NAME", "Keyring", "KeyringLike"]

KEYRING_FILE = Home(Path()).keyring.name  # "keyring.json"; the path is Home(h).keyring
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FORMAT = "weightwarden-keyring"


def _now(now: datetime | None) -> str:
    return (now or datetime.now(UTC)).isoformat(timespec="seconds")


def _default_slot(kind: str, purpose: str) -> str:
    """Where the keyring records a purpose's default key (``default_kek`` / ``default_signer`` for
    sealing, as before purposes existed)."""
    return f"default_{kind}" if purpose == "sealing" else f"default_{kind}:{purpose}"


def _trail(home: Path) -> Trail:
    from .. import trail

    return trail.for_home(home)


def _split_detail(doc: Any) -> dict[str, Any]:
    return {"threshold": doc.threshold, "custodians": [c["name"] for c in doc.custodians]}


class Keyring:
    """Key-encryption keys (versioned) and signing keys, sealed by a passphrase."""

    def __init__(self, home: Path, passphrase: str, kdf: KdfParams, salt: bytes, secrets_: dict[str, Any]):
        self.home = home
        self._kdf: KdfParams | None = kdf  # None: under custody (a root key, no passphrase)
        self._salt = salt
        self._wrapping_key = bytearray(kdf.derive(passphrase, salt))
        self._s = secrets_
        self.trust = TrustStore.load(home)
        self.audit: AuditSink = _trail(home)

    # -- lifecycle ------------------------------------------------------------
    @classmethod
    def create(
        cls, home: Path | None, passphrase: str, *, kdf: KdfParams | None = None, now: datetime | None = None
    ) -> Keyring:
        home = Path(home) if home is not None else default_home()
        if Home(home).keyring.exists():
            raise KeyringError(f"a keyring already exists in {home}")
        if len(passphrase) < 8:
            raise KeyringError("the passphrase must be at least 8 characters")
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        kr = cls(home, passphrase, kdf or KdfParams(), secrets.token_bytes(16), {"keks": {}, "signing": {}})
        kr.audit = trail = _trail(home)
        with trail.operation():
            kr.new_kek(now=now)
            kr.new_signing_key(now=now)  # the sealing key; audit-log and other keys are made when needed
            kr.save()
        return kr

    @classmethod
    def unlock(cls, home: Path | None, passphrase: str) -> Keyring:
        """Unlock a passphrase-protected keyring."""
        home = Path(home) if home is not None else default_home()
        obj = cls._read(home)
        if obj.get("protector") == "custody":
            raise KeyringError("this keyring is under M-of-N custody: custodians unseal it (`warden custody unseal`)")
        kdf = KdfParams.from_json(obj.get("kdf"))
        salt = b64d(obj.get("salt"), "keyring salt")
        return cls._open(home, obj, bytearray(kdf.derive(passphrase, salt)), kdf, salt)

    @classmethod
    def unlock_with_root(cls, home: Path | None, root_key: bytes) -> Keyring:
        """Unlock a keyring under custody with its root key (rebuilt from M shares)."""
        home = Path(home) if home is not None else default_home()
        obj = cls._read(home)
        if obj.get("protector") != "custody":
            raise KeyringError("this keyring is protected by a passphrase, not by custodians")
        return cls._open(home, obj, bytearray(root_key), None, b"")

    @classmethod
    def _read(cls, home: Path) -> dict[str, Any]:
        path = Home(home).keyring
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise KeyringError(f"no keyring in {home}; run `warden init`") from None
        except (OSError, ValueError) as e:
            raise KeyringError(f"keyring {path} is unreadable") from e
        if not isinstance(obj, dict) or obj.get("format") != _FORMAT or obj.get("version") != 1:
            raise KeyringError(f"{path} is not a version-1 weightwarden keyring")
        return obj

    @classmethod
    def _open(cls, home: Path, obj: dict[str, Any], key: bytearray, kdf: KdfParams | None, salt: bytes) -> Keyring:
        kr = cls.__new__(cls)
        kr.home, kr._kdf, kr._salt, kr._wrapping_key = home, kdf, salt, key
        nonce = b64d(obj.get("nonce"), "keyring nonce")
        ct = b64d(obj.get("ciphertext"), "keyring ciphertext")
        try:
            plain = AESGCM(bytes(kr._wrapping_key)).decrypt(nonce, ct, kr._aad())
        except InvalidTag:
            kr.close()
            if kdf is None:
                raise KeyringError("the root key does not unlock this keyring") from None
            raise BadPassphraseError("the passphrase does not unlock this keyring") from None
        kr._s = json.loads(plain)
        kr.trust = TrustStore.load(home)
        kr.audit = _trail(home)
        return kr

    @property
    def under_custody(self) -> bool:
        return self._kdf is None

    def _aad(self) -> bytes:
        if self._kdf is None:
            return canonical_json({"format": _FORMAT, "version": 1, "protector": "custody"})
        return canonical_json({"format": _FORMAT, "version": 1, "kdf": asdict(self._kdf), "salt": b64e(self._salt)})

    def save(self) -> None:
        nonce = secrets.token_bytes(12)
        ct = AESGCM(bytes(self._wrapping_key)).encrypt(nonce, canonical_json(self._s), self._aad())
        doc: dict[str, Any] = {"format": _FORMAT, "version": 1, "nonce": b64e(nonce), "ciphertext": b64e(ct)}
        if self._kdf is None:
            doc["protector"] = "custody"
        else:
            doc |= {"kdf": asdict(self._kdf), "salt": b64e(self._salt)}
        atomic_write_bytes(Home(self.home).keyring, canonical_json(doc) + b"\n", force=True, mode=0o600)
        self.trust.save()

    def to_custody(self, custodians: list[Any], threshold: int, passphrases: dict[str, str] | None = None) -> Any:
        """Put this keyring under M-of-N custody: a fresh root key, split among custodians.

        Afterwards the passphrase no longer opens it.  Returns the custody record.
        """
        from .custody import split

        if self.under_custody:
            raise KeyringError("this keyring is already under custody; use reshare")
        root = secrets.token_bytes(32)
        doc = split(root, custodians, threshold, passphrases)
        doc.save(self.home)  # first the record, then the keyring: a crash in between keeps the passphrase working
        self.close()
        self._wrapping_key, self._kdf, self._salt = bytearray(root), None, b""
        self.save()
        self.audit.emit(audit_event(AuditAction.CUSTODY_INIT, subject=doc.split_id, detail=_split_detail(doc)))
        return doc

    def reshare(self, custodians: list[Any], threshold: int, passphrases: dict[str, str] | None = None) -> Any:
        """New custodians (or threshold) for the same root key: keys and sealed files stay as they are;
        the old shares no longer open anything."""
        from .custody import split

        if not self.under_custody:
            raise KeyringError("this keyring is not under custody; use custody init")
        doc = split(bytes(self._wrapping_key), custodians, threshold, passphrases)
        doc.save(self.home)
        self.audit.emit(audit_event(AuditAction.CUSTODY_RESHARE, subject=doc.split_id, detail=_split_detail(doc)))
        return doc

    def close(self) -> None:
        """Best-effort zeroization of the passphrase-derived key."""
        for i in range(len(self._wrapping_key)):
            self._wrapping_key[i] = 0

    def __enter__(self) -> Keyring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- keys -------------------------------------------------------------------
    def new_kek(self, name: str | None = None, *, purpose: str = "sealing", now: datetime | None = None) -> str:
        """A new key-encryption key; ``name`` (e.g. one per model, for shredding) or a random id.
        ``purpose``: ``sealing`` (data keys of sealed files) or ``tracing`` (tracing secrets)."""
        check_purpose(purpose, KEK_PURPOSES, "KEK purpose")
        prefix = "kek-" if purpose == "sealing" else f"{purpose}-kek-"
        kid = name if name is not None else prefix + secrets.token_hex(8)
        if not KEY_NAME.match(kid):
            raise KeyringError("key names are 1-64 characters of letters, digits, '.', '_' and '-'")
        if kid in self._s["keks"]:
            raise KeyringError(f"key {kid} already exists")
        self._s["keks"][kid] = {"current": 1, "versions": {"1": self._new_version(now)}, "purpose": purpose}
        self._s.setdefault(_default_slot("kek", purpose), kid)
        self.audit.emit(audit_event(AuditAction.KEY_CREATE, key_id=kid, key_version=1, provider="local",
                                    detail={"purpose": purpose}))  # fmt: skip
        return kid

    def kek_purpose(self, key_id: str) -> str:
        return str(self._key_entry(key_id).get("purpose", "sealing"))

    @staticmethod
    def _new_version(now: datetime | None) -> dict[str, str]:
        return {"key": b64e(secrets.token_bytes(32)), "state": "enabled", "created": _now(now)}

    def new_signing_key(self, *, purpose: str = "sealing", now: datetime | None = None) -> str:
        """A new Ed25519 key of one ``purpose`` (sealing, audit-log, export-rules); the first of each
        purpose is that purpose's default.  It is trusted here for that purpose only."""
        signer = Ed25519Signer.generate(purpose)
        raw = signer.private_bytes()
        self._s["signing"][signer.key_id] = {"private": b64e(raw), "created": _now(now), "purpose": purpose}
        self._s.setdefault(_default_slot("signer", purpose), signer.key_id)
        self.trust.add(signer.public_key, label="own key" if purpose == "sealing" else f"own {purpose} key",
                       purpose=purpose)  # fmt: skip
        self.audit.emit(audit_event(AuditAction.KEY_CREATE, key_id=signer.key_id, key_version=1, provider="local",
                                    detail={"purpose": purpose}))  # fmt: skip
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
                        "default": kid == self._s.get(_default_slot("kek", k.get("purpose", "sealing"))),
                        "created": v["created"],
                        "purpose": k.get("purpose", "sealing"),
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
                    "default": kid == self._s.get(_default_slot("signer", k.get("purpose", "sealing"))),
                    "created": k["created"],
                    "purpose": k.get("purpose", "sealing"),
                }
            )
        return out

    def _key_entry(self, key_id: str) -> dict[str, Any]:
        try:
            return self._s["keks"][key_id]
        except KeyError:
            raise KeyNotFoundError(f"key {key_id} is not in this keyring") from None

    def _kek(self, key_id: str, version: int) -> bytes:
        v = self._key_entry(key_id)["versions"].get(str(version))
        if v is None:
            raise KeyNotFoundError(f"key {key_id} version {version} is not in this keyring")
        if v["state"] == "destroyed":
            raise KeyDestroyedError(f"key {key_id} version {version} was destroyed")
        if v["state"] != "enabled":
            raise KeyDisabledError(f"key {key_id} version {version} is disabled")
        return b64d(v["key"], "key")

    def _rotate(self, key_id: str, now: datetime | None = None) -> int:
        entry = self._key_entry(key_id)
        version = max(int(v) for v in entry["versions"]) + 1
        entry["versions"][str(version)] = self._new_version(now)
        entry["current"] = version
        self.save()
        return version

    def _set_state(self, key_id: str, version: int, state: str) -> None:
        v = self._key_entry(key_id)["versions"].get(str(version))
        if v is None:
            raise KeyNotFoundError(f"key {key_id} version {version} is not in this keyring")
        if v["state"] == "destroyed":
            raise KeyDestroyedError(f"key {key_id} version {version} was destroyed")
        v["state"] = state
        self.save()

    def _destroy(self, key_id: str, version: int | None) -> list[int]:
        entry = self._key_entry(key_id)
        targets = [int(x) for x in entry["versions"]] if version is None else [version]
        done = []
        for ver in targets:
            v = entry["versions"].get(str(ver))
            if v is None:
                raise KeyNotFoundError(f"key {key_id} version {ver} is not in this keyring")
            if v["state"] != "destroyed":
                v.pop("key", None)
                v["state"] = "destroyed"
                done.append(ver)
        self.save()  # the keyring file is rewritten without the key bytes
        return done

    def provider(self, key_id: str | None = None, *, purpose: str | None = None, create: bool = False) -> LocalProvider:
        """A provider over one KEK: ``key_id``, or the default KEK of ``purpose`` (default ``sealing``;
        with ``create``, made and saved when there is none).  It wraps and unwraps only with KEKs of its
        purpose; a ``key_id`` of another purpose than the one asked for is refused."""
        if purpose is not None:
            check_purpose(purpose, KEK_PURPOSES, "KEK purpose")
        kid = key_id or self._s.get(_default_slot("kek", purpose or "sealing"))
        if not kid and create:
            kid = self.new_kek(purpose=purpose or "sealing")
            self.save()
        if not kid:
            what = purpose or "sealing"
            fix = ("the first `warden release` makes it: trace with the keyring that released the copy"
                   if what == "tracing" else f"make one with `warden key new --kind kek --purpose {what}`")
            raise KeyNotFoundError(f"this keyring has no {what} key-encryption key: {fix}")
        if kid not in self._s["keks"]:
            raise KeyNotFoundError(f"no {purpose or 'sealing'} key-encryption key {kid!r} in this keyring: "
                                   "`warden key list` shows its keys")  # fmt: skip
        have = self.kek_purpose(kid)
        if purpose is not None and have != purpose:
            raise KeyPurposeError(f"key {kid} is a {have!r} KEK, not a {purpose!r} one")
        from .local import LocalProvider

        p = LocalProvider(self, kid, have)
        p.audit = self.audit
        return p

    def _signing_entry(self, key_id: str | None, purpose: str | None, create: bool) -> tuple[str, dict[str, Any]]:
        if purpose is not None:
            check_purpose(purpose)
        kid = key_id or self._s.get(_default_slot("signer", purpose or "sealing"))
        if not kid and create:
            kid = self.new_signing_key(purpose=purpose or "sealing")
            self.save()
        entry = self._s["signing"].get(kid) if kid else None
        if entry is None:
            raise KeyNotFoundError(f"no {purpose or 'sealing'} signing key {kid!r} in this keyring")
        have = entry.get("purpose", "sealing")
        if purpose is not None and have != purpose:
            raise KeyPurposeError(f"key {kid} is a {have!r} key, not a {purpose!r} key")
        return str(kid), entry

    def signer(self, key_id: str | None = None, *, purpose: str | None = None, create: bool = False) -> Ed25519Signer:
        """A signing key: ``key_id``, or the default key of ``purpose`` (default ``sealing``).  A key of
        another purpose than the one asked for is refused (:class:`KeyPurposeError`).  With ``create``,
        a purpose's first key is made (and saved) when there is none: an audit log's key, for example."""
        _, entry = self._signing_entry(key_id, purpose, create)
        s = Ed25519Signer(Ed25519PrivateKey.from_private_bytes(b64d(entry["private"], "signing key")),
                          entry.get("purpose", "sealing"))  # fmt: skip
        s.audit = self.audit
        return s

    def public_key(self, key_id: str | None = None, *, purpose: str | None = None) -> bytes:
        _, entry = self._signing_entry(key_id, purpose, False)
        priv = Ed25519PrivateKey.from_private_bytes(b64d(entry["private"], "signing key"))
        return priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

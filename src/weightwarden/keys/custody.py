"""M-of-N custodians for the keyring's root key, in the manner of Vault's unseal.

* The keyring (KEKs, signing keys) is encrypted under a random **root key**.
* The root key is wrapped by an **unseal key** R (AES-256-GCM, split id as associated data).
* R is split with Shamir's scheme (pycryptodome's ``Shamir``, over GF(2^128); R's two
  16-byte halves are split with the same share indices) into N shares, M of which
  rebuild it.  Each share is sealed to one custodian with age (pyrage): to an X25519
  recipient (``age1...``) or to a passphrase (scrypt).
* ``custody.json`` (public) holds the split id, M, the custodians, their sealed shares, a
  digest of each plaintext share (to name a corrupt share), a commitment to R and the
  wrapped root key.  M−1 shares reveal nothing about R.
* Each share also yields an Ed25519 **approval key** (HKDF of the share); its public half is in
  the record and bound into the wrapped root key's associated data, so editing the record
  breaks the unseal.  Custodians sign custody changes with it (``keys/quorum.py``): the
  share never leaves their terminal.
* Unsealing gathers shares in memory (:class:`UnsealSession`, held by the agent);
  re-sharing draws a new R for a new set of custodians and re-wraps the same root key,
  so every key and every sealed file stays as it is, and the old shares open nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyrage
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .._atomic import atomic_write_bytes
from .._extras import require
from ..canonical import canonical_json
from ..errors import CustodyError
from ..home import Home
from .provider import b64d, b64e

CUSTODY_FILE = Home(Path()).custody.name  # "custody.json"; the path is Home(h).custody
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MAX_CUSTODIANS = 255


def _shamir() -> Any:
    """pycryptodome's Shamir secret sharing, from the custody extra."""
    return require("Crypto.Protocol.SecretSharing", extra="custody").Shamir


def _commit(r: bytes, split_id: str) -> str:
    return HKDF(hashes.SHA256(), 32, bytes.fromhex(split_id), b"weightwarden/v1/unseal-commit").derive(r).hex()


def approval_key(share: Share) -> Ed25519PrivateKey:
    """The Ed25519 key a custodian signs custody-change approvals with, derived from their share."""
    seed = HKDF(
        hashes.SHA256(), 32, bytes.fromhex(share.split_id), b"weightwarden/v1/approve\0" + bytes([share.index])
    ).derive(share.value)
    return Ed25519PrivateKey.from_private_bytes(seed)


def _root_aad(split_id: str, threshold: int, entries: list[dict[str, Any]]) -> bytes:
    """Associated data of the wrapped root key.  Records with approval keys bind the threshold and
    every custodian's name, index, recipient and approval key, so a record edited to change who
    approves (or how many must) no longer unwraps the root key."""
    aad = b"weightwarden/v1/root\0" + bytes.fromhex(split_id)
    if not any("approver" in c for c in entries):
        return aad  # a record made before approval keys existed
    who = [{k: c.get(k) for k in ("name", "index", "recipient", "approver")} for c in entries]
    return aad + b"\0approvers\0" + hashlib.sha256(canonical_json({"threshold": threshold, "custodians": who})).digest()


def _share_digest(split_id: str, index: int, share: bytes) -> str:
    return hashlib.sha256(b"weightwarden/v1/share\0" + bytes.fromhex(split_id) + bytes([index]) + share).hexdigest()


@dataclass(frozen=True)
class Custodian:
    """``recipient`` is an age X25519 public key (``age1...``) or ``"passphrase"``."""

    name: str
    recipient: str

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise CustodyError(f"bad custodian name {self.name[:40]!r}")
        if self.recipient != "passphrase":
            try:
                pyrage.x25519.Recipient.from_str(self.recipient)
            except Exception:
                raise CustodyError(f"custodian {self.name}: not an age X25519 recipient") from None


@dataclass(frozen=True)
class Share:
    """One custodian's plaintext share (exists only in memory while unsealing)."""

    split_id: str
    index: int
    custodian: str
    value: bytes  # 32 bytes

    def to_bytes(self) -> bytes:
        return canonical_json(
            {"split_id": self.split_id, "index": self.index, "custodian": self.custodian, "share": self.value.hex()}
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> Share:
        try:
            obj = json.loads(raw)
            s = cls(str(obj["split_id"]), int(obj["index"]), str(obj["custodian"]), bytes.fromhex(obj["share"]))
        except (ValueError, KeyError, TypeError):
            raise CustodyError("not a weightwarden custody share") from None
        if len(s.value) != 32 or not 1 <= s.index <= MAX_CUSTODIANS:
            raise CustodyError("share has the wrong size or index")
        return s


class CustodyDoc:
    """The public custody record (``$WARDEN_HOME/custody.json``)."""

    def __init__(self, doc: dict[str, Any]):
        try:
            self.split_id: str = doc["split_id"]
            self.threshold: int = int(doc["threshold"])
            self.custodians: list[dict[str, Any]] = list(doc["custodians"])
            self.commitment: str = doc["commitment"]
            self.wrapped_root: bytes = b64d(doc["wrapped_root"], "wrapped root")
            bytes.fromhex(self.split_id)
        except (KeyError, TypeError, ValueError):
            raise CustodyError("custody record is malformed") from None
        if doc.get("format") != "weightwarden-custody" or doc.get("version") != 1:
            raise CustodyError("not a version-1 custody record")
        if not 1 <= self.threshold <= len(self.custodians) <= MAX_CUSTODIANS:
            raise CustodyError("custody record has an impossible threshold")
        self.doc = doc

    @classmethod
    def load(cls, home: Path) -> CustodyDoc:
        try:
            return cls(json.loads(Home(home).custody.read_text()))
        except FileNotFoundError:
            raise CustodyError(f"no custody record in {home}; run `warden custody init`") from None
        except ValueError:
            raise CustodyError("custody record is not JSON") from None

    def save(self, home: Path) -> None:
        atomic_write_bytes(Home(home).custody, canonical_json(self.doc) + b"\n", force=True, mode=0o644)

    def custodian(self, name: str) -> dict[str, Any]:
        for c in self.custodians:
            if c["name"] == name:
                return c
        raise CustodyError(f"{name} is not a custodian of this split")

    def approver(self, name: str) -> bytes:
        """The custodian's Ed25519 approval public key (trusted once the record unsealed the keyring)."""
        key = self.custodian(name).get("approver")
        if key is None:
            raise CustodyError(
                "this custody record has no approval keys (made before quorum approvals); "
                "custody changes cannot be approved until the keyring is put under a new custody record"
            )
        return b64d(key, "approval key")

    def open_share(self, name: str, *, identity: str | None = None, passphrase: str | None = None) -> Share:
        """Decrypt one custodian's sealed share with their age identity or passphrase."""
        c = self.custodian(name)
        sealed = b64d(c["sealed_share"], "sealed share")
        try:
            if c["recipient"] == "passphrase":
                if passphrase is None:
                    raise CustodyError(f"custodian {name} unlocks their share with a passphrase")
                raw = pyrage.passphrase.decrypt(sealed, passphrase)
            else:
                if identity is None:
                    raise CustodyError(f"custodian {name} unlocks their share with an age identity")
                raw = pyrage.decrypt(sealed, [pyrage.x25519.Identity.from_str(_identity_line(identity))])
        except CustodyError:
            raise
        except Exception:
            raise CustodyError(f"cannot open {name}'s share with what was given") from None
        return Share.from_bytes(raw)


def _identity_line(text: str) -> str:
    """The AGE-SECRET-KEY line of an identity file (age-keygen's comment lines skipped)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return lines[0] if len(lines) == 1 else text.strip()


_AGE_HEADER = b"age-encryption.org/v1"


def new_identity(passphrase: str | None = None) -> tuple[bytes, str]:
    """A fresh age X25519 identity for a custodian: (the identity file's bytes, its public key ``age1...``).
    With ``passphrase`` the file is itself age-encrypted to it (scrypt), as ``age -p`` would."""
    ident = pyrage.x25519.Identity.generate()
    pub = str(ident.to_public())
    text = f"# public key: {pub}\n{ident}\n".encode()
    if passphrase is None:
        return text, pub
    if len(passphrase) < 8:
        raise CustodyError("an identity file's passphrase needs at least 8 characters")
    return pyrage.passphrase.encrypt(text, passphrase), pub


def identity_is_protected(raw: bytes) -> bool:
    return raw.startswith(_AGE_HEADER)


def read_identity(raw: bytes, passphrase: str | None = None, *, where: str = "identity file") -> str:
    """The identity in an identity file (decrypted with ``passphrase`` if it is protected)."""
    if identity_is_protected(raw):
        if passphrase is None:
            raise CustodyError(f"{where} is protected by a passphrase: give it")
        try:
            raw = pyrage.passphrase.decrypt(raw, passphrase)
        except Exception:
            raise CustodyError(f"{where}: wrong passphrase, or not a protected age identity") from None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise CustodyError(f"{where} is not an age identity file") from None


def split(
    root_key: bytes, custodians: list[Custodian], threshold: int, passphrases: dict[str, str] | None = None
) -> CustodyDoc:
    """A fresh unseal key for ``root_key``, split M-of-N among ``custodians``."""
    n = len(custodians)
    if not 1 <= threshold <= n <= MAX_CUSTODIANS:
        raise CustodyError(f"need 1 <= threshold <= custodians <= {MAX_CUSTODIANS}")
    if len({c.name for c in custodians}) != n:
        raise CustodyError("custodian names must differ")
    if threshold == 1 and n > 1:
        raise CustodyError("a threshold of 1 lets any single custodian unseal: use 2 or more")
    passphrases = passphrases or {}
    split_id = secrets.token_hex(16)
    r = secrets.token_bytes(32)
    Shamir = _shamir()
    halves = [Shamir.split(threshold, n, r[:16]), Shamir.split(threshold, n, r[16:])]
    entries = []
    for i, c in enumerate(custodians):
        (idx1, a), (idx2, b) = halves[0][i], halves[1][i]
        assert idx1 == idx2 == i + 1
        share = Share(split_id, i + 1, c.name, a + b)
        if c.recipient == "passphrase":
            pw = passphrases.get(c.name)
            if not pw or len(pw) < 8:
                raise CustodyError(f"custodian {c.name} needs a passphrase of at least 8 characters")
            sealed = pyrage.passphrase.encrypt(share.to_bytes(), pw)
        else:
            sealed = pyrage.encrypt(share.to_bytes(), [pyrage.x25519.Recipient.from_str(c.recipient)])
        entries.append(
            {
                "name": c.name,
                "recipient": c.recipient,
                "index": i + 1,
                "sealed_share": b64e(sealed),
                "share_digest": _share_digest(split_id, i + 1, share.value),
                "approver": b64e(approval_key(share).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)),
            }
        )
    nonce = secrets.token_bytes(12)
    wrapped = nonce + AESGCM(r).encrypt(nonce, root_key, _root_aad(split_id, threshold, entries))
    return CustodyDoc(
        {
            "format": "weightwarden-custody",
            "version": 1,
            "split_id": split_id,
            "threshold": threshold,
            "custodians": entries,
            "commitment": _commit(r, split_id),
            "wrapped_root": b64e(wrapped),
        }
    )


class UnsealSession:
    """Shares gathered towards the threshold, in memory only."""

    def __init__(self, doc: CustodyDoc):
        self.doc = doc
        self._shares: dict[int, Share] = {}

    @property
    def progress(self) -> int:
        return len(self._shares)

    def submit(self, share: Share) -> bytes | None:
        """Add one share; returns the root key once the threshold is reached."""
        doc = self.doc
        if share.split_id != doc.split_id:
            raise CustodyError("this share belongs to another split (an old or foreign custody record)")
        entry = next((c for c in doc.custodians if c["index"] == share.index), None)
        if entry is None or entry["name"] != share.custodian:
            raise CustodyError("share index and custodian do not match the custody record")
        if share.index in self._shares:
            raise CustodyError(f"custodian {share.custodian} has already submitted a share")
        if not hmac.compare_digest(_share_digest(doc.split_id, share.index, share.value), entry["share_digest"]):
            raise CustodyError(f"the share of {share.custodian} is corrupt")
        self._shares[share.index] = share
        if len(self._shares) < doc.threshold:
            return None
        return combine(doc, list(self._shares.values()))

    def reset(self) -> None:
        self._shares.clear()


def combine(doc: CustodyDoc, shares: list[Share]) -> bytes:
    """Rebuild the unseal key from at least M distinct shares and unwrap the root key."""
    distinct = {s.index: s for s in shares if s.split_id == doc.split_id}
    if len(distinct) < doc.threshold:
        raise CustodyError(f"{len(distinct)} of {doc.threshold} shares: the vault stays sealed")
    use = sorted(distinct.values(), key=lambda s: s.index)[: doc.threshold]
    Shamir = _shamir()
    r = Shamir.combine([(s.index, s.value[:16]) for s in use]) + Shamir.combine([(s.index, s.value[16:]) for s in use])
    if not hmac.compare_digest(_commit(r, doc.split_id), doc.commitment):
        raise CustodyError("the shares do not rebuild this record's unseal key")
    w = doc.wrapped_root
    try:
        return AESGCM(r).decrypt(w[:12], w[12:], _root_aad(doc.split_id, doc.threshold, doc.custodians))
    except InvalidTag:
        raise CustodyError("the custody record's wrapped root key is corrupt") from None

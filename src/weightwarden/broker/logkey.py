"""The broker's own log key: the only private key a broker holds.

The broker signs its audit log's tree heads with an Ed25519 key of its own, never with the keyring
(which holds the key-encryption keys and the manifest signing key).  Where it lives is the
operator's choice (``--log-key URI``):

* ``file:PATH`` (default ``file:$WARDEN_HOME/broker/log-key.json``): the private key encrypted with
  AES-256-GCM under Argon2id of a passphrase of its own (read from a file, a descriptor or a prompt);
* ``pkcs11:token=T;object=LABEL?pin-source=file:PATH``: an Ed25519 key pair generated in the token;
* ``agent:LOGHOME``: the signing key of a keyring of its own (``LOGHOME``, under M-of-N custody),
  served by the custody agent for that home, so the key lives in the agent's memory only.

A log key that ``$WARDEN_HOME``'s trust store accepts as a manifest signer is refused.

The key is created on first use.  A log key opens nothing and signs nothing that ``warden verify``
trusts: it is not in the trust store, and sealed files are never signed with it.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from .._atomic import atomic_write_bytes
from ..canonical import canonical_json
from ..errors import BadPassphraseError, LogKeyError
from ..home import Home
from ..keys.kdf import KdfParams
from ..keys.provider import Signer, b64d, b64e
from ..keys.signer import Ed25519Signer

LOG_KEY_FILE = Home(Path()).broker_log_key.name  # log-key.json
_FORMAT = "weightwarden-log-key"


def default_path(home: Path) -> Path:
    return Home(home).broker_log_key


def _aad(kdf: KdfParams, salt: bytes) -> bytes:
    return canonical_json({"format": _FORMAT, "version": 1, "kdf": asdict(kdf), "salt": b64e(salt)})


def create_file(path: Path, passphrase: str, *, kdf: KdfParams | None = None) -> Ed25519Signer:
    """A fresh log key in ``path`` (0600), encrypted under ``passphrase``; refuses to overwrite."""
    if path.exists():
        raise LogKeyError(f"a log key already exists at {path.name}; remove it only to start a new log")
    if len(passphrase) < 8:
        raise LogKeyError("the log key's passphrase must be at least 8 characters")
    kdf = kdf or KdfParams()
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    key = Ed25519PrivateKey.generate()
    raw = bytearray(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
    wrapping = bytearray(kdf.derive(passphrase, salt))
    try:
        ct = AESGCM(bytes(wrapping)).encrypt(nonce, bytes(raw), _aad(kdf, salt))
    finally:
        for b in (raw, wrapping):
            b[:] = bytes(len(b))
    signer = Ed25519Signer(key, "audit-log")
    doc = {"format": _FORMAT, "version": 1, "kdf": asdict(kdf), "salt": b64e(salt), "nonce": b64e(nonce),
           "ciphertext": b64e(ct), "public_key": signer.public_key.hex()}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_bytes(path, json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n", mode=0o600)
    return signer


def load_file(path: Path, passphrase: str) -> Ed25519Signer:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise LogKeyError(f"no log key at {path}; create it with `warden broker init`") from None
    except (OSError, ValueError) as e:
        raise LogKeyError(f"log key {path.name} is unreadable ({type(e).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or doc.get("version") != 1:
        raise LogKeyError(f"{path.name} is not a version-1 weightwarden log key")
    kdf = KdfParams.from_json(doc.get("kdf"))
    salt, nonce = b64d(doc.get("salt"), "log key salt"), b64d(doc.get("nonce"), "log key nonce")
    wrapping = bytearray(kdf.derive(passphrase, salt))
    try:
        raw = bytearray(AESGCM(bytes(wrapping)).decrypt(nonce, b64d(doc.get("ciphertext"), "log key"), _aad(kdf, salt)))
    except InvalidTag:
        raise BadPassphraseError(f"the passphrase does not open the log key {path.name}") from None
    finally:
        wrapping[:] = bytes(len(wrapping))
    try:
        return Ed25519Signer(Ed25519PrivateKey.from_private_bytes(bytes(raw)), "audit-log")
    finally:
        raw[:] = bytes(len(raw))


def open_log_key(uri: str | None, home: Path, passphrase: Any, *, create: bool = True,
                 kdf: KdfParams | None = None) -> tuple[Signer, bool]:  # fmt: skip
    """The broker's log signer named by ``uri`` and whether it was just created.

    ``passphrase`` is a callable returning the file key's passphrase (asked only for ``file:``)."""
    signer, created = _open(uri, home, passphrase, create, kdf)
    from ..keys.truststore import TrustStore

    trust = TrustStore.load(home)
    if any(trust.public_key(k) == signer.public_key for k in trust.signers):
        raise LogKeyError(
            f"the log key {signer.key_id} is a trusted manifest signer in {home.name}: give the broker a key of "
            "its own (a file, a token object or an agent home used for nothing else)"
        )
    from .home import write_log_public_key

    write_log_public_key(home, signer.public_key)  # so `warden verify --trust-key` here refuses it
    return signer, created


def _open(uri: str | None, home: Path, passphrase: Any, create: bool, kdf: KdfParams | None) -> tuple[Signer, bool]:
    if uri and uri.startswith("pkcs11:"):
        from ..keys.pkcs11 import signer_from_uri

        try:
            return signer_from_uri(uri, create=create, purpose="audit-log"), False
        except ValueError as e:
            raise LogKeyError(f"--log-key: {e}") from None
    if uri and uri.startswith("agent:"):
        from ..keys.agent import AgentClient, AgentSigner

        where = uri[len("agent:") :]
        if not where:
            raise LogKeyError("--log-key agent:LOGHOME names the home of the agent that holds the log key")
        return AgentSigner(AgentClient(Path(where)), purpose="audit-log", create=create), False
    if uri and not uri.startswith("file:"):
        raise LogKeyError("--log-key takes file:PATH, pkcs11:token=..;object=LABEL or agent:LOGHOME")
    path = Path(uri[len("file:") :]) if uri else default_path(home)
    h = Home(Path())
    if path.name in (h.keyring.name, h.trust_store.name, h.custody.name):
        raise LogKeyError(f"--log-key names {path.name}: the log key is a file of its own")
    if not path.exists() and create:
        return create_file(path, passphrase(confirm=True), kdf=kdf), True
    return load_file(path, passphrase(confirm=False)), False


__all__ = ["LOG_KEY_FILE", "LogKeyError", "create_file", "default_path", "load_file", "open_log_key"]

"""PKCS#11 HSM key provider (extra: ``weightwarden[hsm]``), tested against SoftHSM2.

Each KEK version is an AES-256 token object ``<key_id>.v<n>`` generated inside the
token as sensitive and non-extractable: its value never leaves the HSM.  Data keys are
wrapped by AES-GCM *inside* the token, with the file id bound as associated data.  The
key's state (current version, destroyed versions) lives in a token data object
``<key_id>.state``; a disabled version has CKA_ENCRYPT/CKA_DECRYPT cleared.  An Ed25519
signing key can live in the token too (:class:`Pkcs11Signer`).

URI (RFC 7512 style)::

    pkcs11:token=warden;object=model-a?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=env:WARDEN_PKCS11_PIN
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from typing import Any
from urllib.parse import parse_qs, unquote

from .._extras import extra_imports

with extra_imports("hsm"):
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11 import exceptions as px
    from pkcs11.mechanisms import GCMParams

from ..errors import (
    KeyDestroyedError,
    KeyDisabledError,
    KeyNotFoundError,
    KeyProviderError,
    KeyPurposeError,
    ProviderUnavailableError,
    WrongKeyError,
)
from .provider import KeyProvider, KeySlot, Signer, check_purpose, wrap_aad

WRAP_ALG = "A256GCM-PKCS11"
SOFTHSM_MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
_KEK_TEMPLATE = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.ENCRYPT: True,
    Attribute.DECRYPT: True,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.MODIFIABLE: True,
}


_SALT = secrets.token_bytes(16)
_OPEN: dict[tuple[str, str], list[Any]] = {}  # (module, token) -> [session, pin digest, lock, refcount]
_OPEN_LOCK = threading.Lock()


# The token refuses an operation the key's attributes forbid (a disabled version: CKA_ENCRYPT/DECRYPT
# cleared) with CKR_KEY_FUNCTION_NOT_PERMITTED; python-pkcs11 (0.7 to 0.10 at least) has no exception
# class for it and raises its base PKCS11Error("Unmapped error code 0x68").
CKR_KEY_FUNCTION_NOT_PERMITTED = 0x68


def _not_permitted(e: px.PKCS11Error) -> bool:
    """Whether ``e`` is the token's CKR_KEY_FUNCTION_NOT_PERMITTED."""
    cls = getattr(px, "KeyFunctionNotPermitted", None)  # should python-pkcs11 map it one day
    if cls is not None and isinstance(e, cls):
        return True
    return type(e) is px.PKCS11Error and str(e).endswith(hex(CKR_KEY_FUNCTION_NOT_PERMITTED))


def _pin_digest(pin: str) -> bytes:
    return hashlib.sha256(_SALT + pin.encode()).digest()


class Pkcs11Session:
    """A logged-in session on one token, shared by providers and signers (serialised).

    PKCS#11 keeps the login state per process and token, so sessions on the same token
    share one login; a later open must still present the right PIN.
    """

    def __init__(self, module: str, token_label: str, pin: str):
        key = (module, token_label)
        with _OPEN_LOCK:
            entry = _OPEN.get(key)
            if entry is not None:
                if not hmac.compare_digest(entry[1], _pin_digest(pin)):
                    raise ProviderUnavailableError(f"wrong PIN for token {token_label!r}")
                entry[3] += 1
            else:
                entry = [self._login(module, token_label, pin), _pin_digest(pin), threading.RLock(), 1]
                _OPEN[key] = entry
        self._key = key
        self.session, self.lock = entry[0], entry[2]
        self.token_label = token_label
        self._closed = False

    @staticmethod
    def _login(module: str, token_label: str, pin: str) -> Any:
        try:
            lib = pkcs11.lib(module)
            token = lib.get_token(token_label=token_label)
            return token.open(user_pin=pin, rw=True)
        except (px.PinIncorrect, px.PinInvalid, px.PinLenRange):
            raise ProviderUnavailableError(f"wrong PIN for token {token_label!r}") from None
        except (px.NoSuchToken, px.TokenNotPresent):
            raise ProviderUnavailableError(f"no token labelled {token_label!r}") from None
        except (px.PKCS11Error, RuntimeError, OSError) as e:
            raise ProviderUnavailableError(f"cannot open PKCS#11 token {token_label!r}: {type(e).__name__}") from None

    def close(self) -> None:
        with _OPEN_LOCK:
            if self._closed:
                return
            self._closed = True
            entry = _OPEN[self._key]
            entry[3] -= 1
            if entry[3] == 0:
                del _OPEN[self._key]
                with entry[2]:
                    entry[0].close()

    def find_one(self, cls: ObjectClass, label: str) -> Any | None:
        objs = list(self.session.get_objects({Attribute.CLASS: cls, Attribute.LABEL: label}))
        if len(objs) > 1:
            raise ProviderUnavailableError(f"token holds {len(objs)} objects labelled {label!r}")
        return objs[0] if objs else None


class Pkcs11Provider(KeyProvider):
    name = "pkcs11"
    #: seconds a cached key state / handle is trusted; the token enforces disabled and
    #: destroyed keys regardless, the cache only saves object searches
    CACHE_TTL = 5.0

    def __init__(self, session: Pkcs11Session, key_id: str):
        self._s = session
        self.key_id = key_id
        self._cache: dict[Any, tuple[float, Any]] = {}

    def _cached(self, key: Any, load: Any) -> Any:
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self.CACHE_TTL:
            return hit[1]
        value = load()
        self._cache[key] = (now, value)
        return value

    def _invalidate(self) -> None:
        self._cache.clear()

    # -- key objects and state ---------------------------------------------------
    def create_key(self, key_id: str | None = None) -> str:
        """Generate version 1 of a KEK inside the token."""
        kid = key_id or self.key_id
        with self._s.lock:
            if self._s.find_one(ObjectClass.DATA, f"{kid}.state") is not None:
                raise ProviderUnavailableError(f"key {kid} already exists on the token")
            self._generate(kid, 1)
            self._save_state(kid, {"current": 1, "destroyed": []})
        return kid

    def _generate(self, kid: str, version: int) -> None:
        self._s.session.generate_key(
            KeyType.AES, 256, label=f"{kid}.v{version}", id=f"{kid}.v{version}".encode(), template=_KEK_TEMPLATE
        )

    def _state(self, kid: str, *, fresh: bool = False) -> tuple[Any, dict[str, Any]]:
        def load() -> tuple[Any, dict[str, Any]]:
            obj = self._s.find_one(ObjectClass.DATA, f"{kid}.state")
            if obj is None:
                raise KeyNotFoundError(f"key {kid} is not on token {self._s.token_label!r}")
            return obj, json.loads(bytes(obj[Attribute.VALUE]))

        if fresh:
            self._invalidate()
        return self._cached(("state", kid), load)

    def _save_state(self, kid: str, state: dict[str, Any]) -> None:
        self._invalidate()
        old = self._s.find_one(ObjectClass.DATA, f"{kid}.state")
        self._s.session.create_object(
            {
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.LABEL: f"{kid}.state",
                Attribute.VALUE: json.dumps(state, sort_keys=True).encode(),
            }
        )
        if old is not None:
            old.destroy()

    def _key(self, kid: str, version: int, *, for_use: bool = True) -> Any:
        _, state = self._state(kid, fresh=not for_use)
        if version in state["destroyed"]:
            raise KeyDestroyedError(f"key {kid} version {version} was destroyed")

        def load() -> tuple[Any, bool]:
            obj = self._s.find_one(ObjectClass.SECRET_KEY, f"{kid}.v{version}")
            if obj is None:
                raise KeyNotFoundError(f"key {kid} version {version} is not on the token")
            return obj, bool(obj[Attribute.DECRYPT])

        obj, usable = self._cached(("key", kid, version), load)
        if for_use and not usable:
            raise KeyDisabledError(f"key {kid} version {version} is disabled")
        return obj

    # -- KeyProvider ---------------------------------------------------------------
    def _current_version(self, key_id: str) -> int:
        with self._s.lock:
            return int(self._state(key_id)[1]["current"])

    def _wrap(self, dek: bytes, context: bytes) -> KeySlot:
        with self._s.lock:
            version = int(self._state(self.key_id)[1]["current"])
            key = self._key(self.key_id, version)
            nonce = secrets.token_bytes(12)
            aad = wrap_aad(self.name, self.key_id, version, context)
            try:
                ct = key.encrypt(dek, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, aad, 128))
            except px.PKCS11Error as e:
                self._invalidate()
                if _not_permitted(e):
                    raise KeyDisabledError(f"key {self.key_id} version {version} is disabled") from None
                raise ProviderUnavailableError(f"token refused to wrap: {type(e).__name__}") from None
        return KeySlot(self.name, self.key_id, version, WRAP_ALG, nonce + bytes(ct))

    def _unwrap(self, slot: KeySlot, context: bytes) -> bytearray:
        if slot.alg != WRAP_ALG or len(slot.wrapped) != 12 + 32 + 16:
            raise WrongKeyError("not a PKCS#11 AES-GCM wrapped key")
        with self._s.lock:
            key = self._key(slot.key_id, slot.version)
            aad = wrap_aad(self.name, slot.key_id, slot.version, context)
            try:
                dek = key.decrypt(
                    slot.wrapped[12:],
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(slot.wrapped[:12], aad, 128),
                )
            except (px.EncryptedDataInvalid, px.GeneralError, px.FunctionFailed):
                raise WrongKeyError("the token's key does not unwrap the data key") from None
            except (px.ObjectHandleInvalid, px.KeyHandleInvalid):
                self._invalidate()
                raise KeyNotFoundError(f"key {slot.key_id} version {slot.version} vanished; try again") from None
            except px.PKCS11Error as e:
                if not _not_permitted(e):
                    raise
                self._invalidate()
                raise KeyDisabledError(f"key {slot.key_id} version {slot.version} is disabled") from None
        return bytearray(dek)

    def _rotate(self, key_id: str) -> int:
        with self._s.lock:
            _, state = self._state(key_id)
            existing = [int(o.label.rsplit(".v", 1)[1]) for o in self._secret_objects(key_id)]
            version = max([*existing, *state["destroyed"], state["current"]]) + 1
            self._generate(key_id, version)
            state["current"] = version
            self._save_state(key_id, state)
        return version

    def _secret_objects(self, key_id: str) -> list[Any]:
        objs = self._s.session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})
        return [o for o in objs if o.label.startswith(f"{key_id}.v") and o.label[len(key_id) + 2 :].isdigit()]

    def _set_state(self, key_id: str, version: int, state: str) -> None:
        with self._s.lock:
            key = self._key(key_id, version, for_use=False)
            flag = state == "enabled"
            key[Attribute.ENCRYPT] = flag
            key[Attribute.DECRYPT] = flag
            self._invalidate()

    def _destroy(self, key_id: str, version: int | None) -> list[int]:
        with self._s.lock:
            _, st = self._state(key_id)
            done = []
            self._invalidate()
            for obj in self._secret_objects(key_id):
                v = int(obj.label.rsplit(".v", 1)[1])
                if version is None or v == version:
                    obj.destroy()
                    done.append(v)
            if version is not None and not done and version not in st["destroyed"]:
                raise KeyNotFoundError(f"key {key_id} version {version} is not on the token")
            st["destroyed"] = sorted(set(st["destroyed"]) | set(done))
            self._save_state(key_id, st)
        return sorted(done)

    def _versions(self, key_id: str) -> list[dict[str, Any]]:
        with self._s.lock:
            _, st = self._state(key_id)
            out = {v: "destroyed" for v in st["destroyed"]}
            for obj in self._secret_objects(key_id):
                out[int(obj.label.rsplit(".v", 1)[1])] = "enabled" if obj[Attribute.DECRYPT] else "disabled"
        return [{"version": v, "state": out[v]} for v in sorted(out)]

    def read_key_value(self, version: int, key_id: str | None = None) -> bytes:
        """Try to read a KEK's value out of the token.  A correctly made key refuses
        (``pkcs11.exceptions.AttributeSensitive``): used by the tests to prove it."""
        with self._s.lock:
            return bytes(self._key(key_id or self.key_id, version, for_use=False)[Attribute.VALUE])


_PURPOSE_ID = b"ww-purpose="


def _id_purpose(cka_id: bytes) -> str:
    """The purpose recorded in a key pair's CKA_ID (``ww-purpose=P;LABEL``); a pair made before purposes
    existed (CKA_ID = label) is a sealing key."""
    if cka_id.startswith(_PURPOSE_ID):
        return cka_id[len(_PURPOSE_ID) :].split(b";", 1)[0].decode("ascii", "replace")
    return "sealing"


class Pkcs11Signer(Signer):
    """An Ed25519 signing key generated and kept inside the token, of one purpose: fixed at creation in
    the key pair's CKA_ID; asking for it as another purpose is refused (:class:`KeyPurposeError`)."""

    provider_name = "pkcs11"

    def __init__(self, session: Pkcs11Session, label: str, *, create: bool = False, purpose: str | None = None):
        if purpose is not None:
            check_purpose(purpose)
        self._s = session
        with session.lock:
            priv = session.find_one(ObjectClass.PRIVATE_KEY, label)
            if priv is None and create:
                from pkcs11.util.ec import encode_named_curve_parameters

                params = session.session.create_domain_parameters(
                    KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: encode_named_curve_parameters("1.3.101.112")}, local=True
                )
                cka_id = _PURPOSE_ID + (purpose or "sealing").encode() + b";" + label.encode()
                params.generate_keypair(store=True, label=label, id=cka_id)
                priv = session.find_one(ObjectClass.PRIVATE_KEY, label)
            pub = session.find_one(ObjectClass.PUBLIC_KEY, label)
            if priv is None or pub is None:
                raise KeyNotFoundError(f"no Ed25519 key pair labelled {label!r} on the token")
            point = bytes(pub[Attribute.EC_POINT])
            have = _id_purpose(bytes(priv[Attribute.ID]))
        if have != _id_purpose(bytes(pub[Attribute.ID])):
            raise KeyPurposeError(f"the key pair {label!r} on the token records two purposes")
        if purpose is not None and have != purpose:
            raise KeyPurposeError(f"the token's key {label!r} is a {have!r} key, not a {purpose!r} key")
        self.purpose = check_purpose(have)
        self._priv = priv
        self._pub = point[-32:]  # DER OCTET STRING 04 20 || key

    @property
    def public_key(self) -> bytes:
        return self._pub

    def _sign(self, message: bytes) -> bytes:
        with self._s.lock:
            return bytes(self._priv.sign(message, mechanism=Mechanism.EDDSA))


def parse_uri(uri: str) -> dict[str, str]:
    """``pkcs11:token=T;object=O?module-path=...&pin-source=env:VAR`` -> fields."""
    if not uri.startswith("pkcs11:"):
        raise KeyProviderError("not a pkcs11: URI")
    path, _, query = uri[len("pkcs11:") :].partition("?")
    out: dict[str, str] = {}
    for part in filter(None, path.split(";")):
        k, _, v = part.partition("=")
        out[unquote(k)] = unquote(v)
    for k, vs in parse_qs(query).items():
        out[k] = vs[-1]
    return out


def _session_from_uri(uri: str) -> tuple[Pkcs11Session, str]:
    f = parse_uri(uri)
    if "token" not in f or "object" not in f:
        raise KeyProviderError("a pkcs11 URI needs token= and object=")
    module = f.get("module-path") or next((m for m in SOFTHSM_MODULES if os.path.exists(m)), "")
    src = f.get("pin-source", "env:WARDEN_PKCS11_PIN")
    if src.startswith("env:"):
        pin = os.environ.get(src[4:])
    elif src.startswith("file:"):
        pin = open(src[5:]).read().strip()
    else:
        raise KeyProviderError("pin-source must be env:VAR or file:PATH")
    if pin is None:
        raise ProviderUnavailableError(f"no PIN: set {src[4:]}")
    return Pkcs11Session(module, f["token"], pin), f["object"]


def from_uri(uri: str) -> Pkcs11Provider:
    """The KEK named by ``object=`` on the token."""
    session, label = _session_from_uri(uri)
    return Pkcs11Provider(session, label)


def signer_from_uri(uri: str, *, create: bool = False, purpose: str | None = None) -> Pkcs11Signer:
    """The Ed25519 key pair labelled ``object=`` on the token; ``purpose`` (or the URI's ``purpose=``)
    is the purpose it must have (made with, when ``create``)."""
    purpose = purpose or parse_uri(uri).get("purpose")
    session, label = _session_from_uri(uri)
    return Pkcs11Signer(session, label, create=create, purpose=purpose)

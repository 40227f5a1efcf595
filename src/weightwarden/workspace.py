"""The composition layer: one object that builds the services of one home.

A :class:`Workspace` is a home (:mod:`weightwarden.home`) and the few settings a front end takes (the
database URL, the weights store, the token audience, the broker's log key, where passphrases come from).
Each service is built on first use from those, the same way for every caller: the ``warden`` command line,
``warden serve`` and the demo.  A front end parses its options, asks its workspace for what a command
needs, makes one library call, and prints.

Nothing here prompts or prints: passphrases come from the callables given (``passphrase``,
``log_key_passphrase``), notices go to ``notice`` when one is given.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import audit, trail
from .errors import WardenError
from .home import Home, default_home

if TYPE_CHECKING:
    from .keys.keyring import Keyring
    from .keys.protocols import KeyringLike

__all__ = ["Workspace", "kdf_from_env"]


def kdf_from_env() -> Any:
    """The Argon2id cost of new keyrings and log keys: the default, or (automated test environments only) a
    cheaper one from WARDEN_KDF_MEMORY_KIB (never lower than the RFC 9106 minimums)."""
    from .keys.kdf import KdfParams

    mem = os.environ.get("WARDEN_KDF_MEMORY_KIB")
    return KdfParams(time_cost=1, memory_kib=max(8, int(mem))) if mem else KdfParams()


def _no_passphrase(confirm: bool = False) -> str:
    from .errors import KeyringError

    raise KeyringError("no passphrase source was given")


class Workspace:
    """The services of one home, built lazily.

    ``home`` is kept as given (``None``: the default home, resolved by each library call the same way);
    ``root`` is the folder itself.  ``db`` is the broker's SQLAlchemy URL (default: the home's embedded
    database), ``store`` its sealed-weights folder or ``s3://bucket/prefix``, ``log_key`` its log key URI
    (``file:``, ``pkcs11:``, ``agent:``)."""

    def __init__(self, home: str | os.PathLike[str] | None = None, *,
                 passphrase: Callable[..., str] = _no_passphrase,
                 log_key_passphrase: Callable[[bool], str] = _no_passphrase,
                 db: str | None = None, store: str | None = None, audience: str | None = None,
                 log_key: str | None = None, notice: Callable[[str], None] | None = None) -> None:  # fmt: skip
        self.home: Path | None = Path(home) if home is not None else None
        self.paths = Home(self.home if self.home is not None else default_home())
        self.db = db
        self.store = store
        self.audience = audience
        self.log_key = log_key
        self._passphrase = passphrase
        self._log_key_passphrase = log_key_passphrase
        self._notice = notice
        self._keyring: KeyringLike | None = None

    @property
    def root(self) -> Path:
        return self.paths.root

    # -- who ----------------------------------------------------------------------------------
    @staticmethod
    def actor() -> str:
        """Who acts: the audit context's actor (--actor / WARDEN_ACTOR), else the OS user."""
        return audit.default_actor()

    # -- keys ---------------------------------------------------------------------------------
    def create_keyring(self) -> Keyring:
        """A new local keyring, under the passphrase (asked twice)."""
        from .keys.keyring import Keyring

        return Keyring.create(self.home, self._passphrase(confirm=True), kdf=kdf_from_env())

    def unlock_keyring(self) -> Keyring:
        """The local keyring file itself, unlocked with the passphrase (never the agent's)."""
        from .keys.keyring import Keyring

        return Keyring.unlock(self.root, self._passphrase())

    @property
    def keyring(self) -> KeyringLike:
        """The keyring: the custody agent's when the home is under custody, else the local one unlocked with the
        passphrase (asked once)."""
        if self._keyring is None:
            from .keys.agent import AgentKeyring, under_custody

            self._keyring = AgentKeyring(self.root) if under_custody(self.root) else self.unlock_keyring()
        return self._keyring

    def trust_store(self) -> Any:
        from .keys.truststore import TrustStore

        return TrustStore.load(self.root)

    def trust(self, trust_keys: Sequence[bytes] | None) -> Any:
        """Manifest signers to accept: the keys given (an audit-log key of this home is refused), else the
        trust store."""
        if trust_keys:
            from .broker.home import refuse_log_keys

            return refuse_log_keys(list(trust_keys), self.root)
        return self.trust_store()

    def signer(self, uri: str | None = None, purpose: str | None = None) -> Any:
        """The keyring's signer, or an Ed25519 key in a PKCS#11 token (``pkcs11:`` URI)."""
        if uri is None:
            return self.keyring.signer()
        if not uri.startswith("pkcs11:"):
            raise WardenError("--signer takes a pkcs11: URI")
        from .keys.pkcs11 import signer_from_uri

        try:
            return signer_from_uri(uri, purpose=purpose)
        except ValueError as e:
            raise WardenError(str(e)) from None

    @staticmethod
    def providers(uris: Sequence[str] | None) -> list[Any]:
        """Key providers by URI (pkcs11:, awskms://, vault://)."""
        from .keys.registry import provider_from_uri as from_uri

        out = []
        for u in uris or []:
            try:
                out.append(from_uri(u))
            except ValueError as e:
                raise WardenError(str(e)) from None
        return out

    # -- the broker ----------------------------------------------------------------------------
    @property
    def broker_url(self) -> str:
        return self.db or self.paths.broker_db_url

    def log_signer(self) -> tuple[Any, bool]:
        """The broker's log key (created on first use) and whether it was just created: never the keyring."""
        from .broker.logkey import open_log_key

        def passphrase(confirm: bool) -> str:
            return self._log_key_passphrase(confirm)

        return open_log_key(self.log_key, self.root, passphrase, kdf=kdf_from_env())

    def weight_store(self) -> Any:
        """Where the broker keeps sealed weights: S3 (``s3://bucket/prefix``) or a folder."""
        from .broker.storage import LocalWeightStore, S3WeightStore

        if self.store and self.store.startswith("s3://"):
            bucket, _, prefix = self.store[5:].partition("/")
            return S3WeightStore(bucket, prefix, os.environ.get("AWS_ENDPOINT_URL"))
        return LocalWeightStore(Path(self.store) if self.store else self.paths.broker_weights)

    def broker(self, *, gate: bool = False, per_principal: tuple[float, float] | None = None,
               allow_sample_list: bool | None = None) -> Any:  # fmt: skip
        """A broker that holds no key but its own log key (it signs the audit log's tree heads); with ``gate``,
        the export-control gate configured under the home decides its release requests."""
        from .broker.service import Broker, BrokerConfig
        from .merkle import AuditLog

        self.paths.broker_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        url = self.broker_url
        ws = self.weight_store()
        signer, created = self.log_signer()
        if created and self._notice is not None:
            self._notice(f"created the broker's log key; its public key (pin it): {signer.public_key.hex()}")
        log = AuditLog(url, signer)
        trail.use_broker_signer(url, signer)  # this process's trail appends to the broker's log sign with it
        cfg = BrokerConfig(audience=self.audience) if self.audience else BrokerConfig()
        if per_principal is not None:
            from .broker.service import Limit

            cfg = dataclasses.replace(cfg, per_principal=Limit(rate=per_principal[0], burst=per_principal[1]))
        if gate:
            return Broker(url, ws, log, cfg, gate=self.release_gate(allow_sample_list=allow_sample_list))
        return Broker(url, ws, log, cfg)

    # -- release ------------------------------------------------------------------------------
    def release_gate(self, *, allow_sample_list: bool | None = None) -> Any:
        """The export-control gate as configured under the home (rules, screening list, licenses)."""
        from .release.gate import ReleaseGate

        return ReleaseGate.from_home(self.root, allow_sample_list=allow_sample_list)

    def licenses(self) -> Any:
        from .release.gate import LicenseBook

        return LicenseBook.load(self.paths.licenses)

    def screening_list(self) -> Any:
        """The restricted-party list loaded under the home (`warden screen update`), else the shipped sample."""
        from .release.screen import ScreeningList

        return ScreeningList.from_home(self.root)

    def declaration_kw(self, declaration: Path | None) -> dict[str, Any]:
        """classify()'s arguments for a signed training declaration, checked with the home's compliance keys."""
        if declaration is None:
            return {}
        from .release.declaration import compliance_keys

        return {"declaration": declaration, "compliance_keys": compliance_keys(self.home)}

    # -- detection ------------------------------------------------------------------------------
    def registry(self, folder: Path | None = None) -> Any:
        """The provenance registry: ``folder``, else the home's."""
        from .provenance import Registry, default_registry

        return Registry(folder, home=self.home) if folder else default_registry(self.home)

    def trace_store(self) -> Any:
        """Tracing secrets under the home; recipients and releases in the broker's database."""
        from .trace.store import TraceStore

        if self.db is None:
            self.paths.broker_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return TraceStore(self.paths.trace_dir, self.broker_url)

    def model_kw(self, path: Path, keyring: KeyringLike | None = None) -> dict[str, Any]:
        """How to read a model: a sealed input is read with the keyring (decrypted in memory only); a plain one
        needs nothing."""
        from .sealed import is_sealed_path

        if is_sealed_path(path):
            return {"keyring": keyring or self.keyring}
        return {}

    # -- the trail ------------------------------------------------------------------------------
    def audit_log(self, public_key: bytes | None = None, log_id: bytes | None = None) -> Any:
        """The log the trail rule picks (trail.locate): ``db``, else the home's broker log, else its local log."""
        return trail.open_log(self.home, self.db, public_key=public_key, log_id=log_id)

    def log_public_key(self) -> bytes | None:
        """The public half of the key that signs the picked log, read outside the database (or None)."""
        return trail.log_public_key(self.home, self.db)

    def trail_is_broker_log(self) -> bool:
        return trail.locate(self.home, self.db)[1]

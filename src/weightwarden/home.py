"""Every path under ``$WARDEN_HOME``, in one place.

A *home* is the folder that holds one party's state: the keyring (or the custody file and the agent's
socket), the trust store, the local trail, and, for a home that hosts one, the broker's database and log
key. Code anywhere in the library asks a :class:`Home` for a path instead of joining string literals, so
a layout change is one edit here and ``docs/ARCHITECTURE.md`` lists the layout from this module.

Nothing here creates, reads or locks a file: the owning module does (the keyring module its keyring, the
broker its database...). ``Home`` is a value: two homes with the same root are equal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Home", "default_home", "resolve_home"]

ENV = "WARDEN_HOME"


def default_home() -> Path:
    """``$WARDEN_HOME``, else the platform's per-user data folder for weightwarden."""
    env = os.environ.get(ENV)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("weightwarden"))


def resolve_home(home: str | os.PathLike[str] | Home | None = None) -> Home:
    """The :class:`Home` for ``home`` (a path or a Home), else the default home."""
    if isinstance(home, Home):
        return home
    return Home(Path(home) if home is not None else default_home())


@dataclass(frozen=True)
class Home:
    """The layout of one home folder (``root``). Every property is a path; none is created here."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def __fspath__(self) -> str:
        return str(self.root)

    # --- keys (keys/) ---------------------------------------------------------------------------
    @property
    def keyring(self) -> Path:
        """The local keyring: wrapped keys and signers (keys/local.py)."""
        return self.root / "keyring.json"

    @property
    def trust_store(self) -> Path:
        """Signers whose manifests `verify` accepts."""
        return self.root / "trusted.json"

    @property
    def custody(self) -> Path:
        """M-of-N custodians of the keyring's root key, their age-sealed shares (keys/custody.py)."""
        return self.root / "custody.json"

    @property
    def agent_socket(self) -> Path:
        """The custody agent's 0600 Unix socket (keys/agent.py)."""
        return self.root / "agent.sock"

    @property
    def agent_pid(self) -> Path:
        return self.root / "agent.pid"

    @property
    def agent_log(self) -> Path:
        return self.root / "agent.log"

    # --- the trail (trail.py) -------------------------------------------------------------------
    @property
    def audit_dir(self) -> Path:
        return self.root / "audit"

    @property
    def trail_db(self) -> Path:
        """The local tamper-evident trail (a home that hosts no broker)."""
        return self.audit_dir / "trail.db"

    @property
    def trail_key(self) -> Path:
        """The local trail's signing key (0600)."""
        return self.audit_dir / "log.key"

    # --- the broker (broker/) -------------------------------------------------------------------
    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def broker_db(self) -> Path:
        """The broker's embedded database (SQLite): accounts, requests, the Merkle log, trace records."""
        return self.broker_dir / "broker.db"

    @property
    def broker_db_url(self) -> str:
        return f"sqlite:///{self.broker_db}"

    @property
    def broker_log_key(self) -> Path:
        """The broker's own log key, under its own passphrase (broker/logkey.py)."""
        return self.broker_dir / "log-key.json"

    @property
    def broker_log_key_pub(self) -> Path:
        return self.broker_dir / "log-key.pub"

    @property
    def broker_weights(self) -> Path:
        """Sealed weights the broker serves from a folder (broker/storage.py)."""
        return self.broker_dir / "weights"

    # --- release (release/) ---------------------------------------------------------------------
    @property
    def release_dir(self) -> Path:
        return self.root / "release"

    @property
    def licenses(self) -> Path:
        return self.release_dir / "licenses.json"

    @property
    def rules(self) -> Path:
        """This home's own signed export rules (optional; the shipped ones otherwise)."""
        return self.release_dir / "rules.toml"

    @property
    def rules_keys(self) -> Path:
        return self.release_dir / "rules-keys"

    @property
    def rules_version(self) -> Path:
        """The highest rules version used, bound to its bytes (no rollback)."""
        return self.release_dir / "rules-version.json"

    @property
    def compliance_keys(self) -> Path:
        return self.release_dir / "compliance-keys"

    @property
    def screening_dir(self) -> Path:
        """The loaded restricted-party screening list."""
        return self.root / "screening"

    # --- detection (provenance/, trace/) --------------------------------------------------------
    @property
    def registry(self) -> Path:
        """The provenance registry: signatures and the sketch index."""
        return self.root / "provenance"

    @property
    def trace_dir(self) -> Path:
        """Wrapped per-model fingerprint secrets (trace/store.py)."""
        return self.root / "trace"

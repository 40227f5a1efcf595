"""The broker's own home (issue 16, red-team findings).

A broker host holds the trust store (public keys), its log key and its database: nothing that seals
a model `warden verify` trusts or opens one.  ``warden serve`` refuses a home that holds a keyring
(``keyring.json``) or a custody agent's socket (``agent.sock``), where a compromise of the broker
would reach the keyring file or an unsealed agent; ``warden broker init --trust-from KEYHOME`` gives
the broker's home the trust store.  A log key is never a manifest signer: :func:`refuse_log_keys`
keeps one out of ``warden verify --trust-key``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BrokerHomeError, KeyPurposeError
from ..home import Home
from ..keys.provider import ed25519_key_id
from ..keys.truststore import TrustStore

TRUST_FILE = Home(Path()).trust_store.name


def check_own_home(home: Path) -> None:
    """Refuse (:class:`BrokerHomeError`) a broker home that holds a keyring or an agent socket."""
    h = Home(home)
    found = [p.name for p in (h.keyring, h.agent_socket) if p.exists() or p.is_symlink()]
    if found:
        raise BrokerHomeError(
            f"{home} holds {' and '.join(found)}: run `warden serve` in a home of its own (e.g. "
            f"`warden broker init --home BROKER_HOME --trust-from {home}`, then `warden serve --home BROKER_HOME`)"
        )


def copy_trust(source: Path, home: Path) -> int:
    """Add the signers of ``source`` (a home, or a ``trusted.json``) to ``home``'s trust store, each for
    the purpose it has there; returns how many.  Public keys only: nothing else is read or copied."""
    src = Home(source).trust_store if source.is_dir() else source
    if not src.is_file():
        raise BrokerHomeError(f"--trust-from {source}: no {TRUST_FILE} there (give the key host's home or its "
                              f"{TRUST_FILE})")  # fmt: skip
    dst = Home(home).trust_store
    if dst.exists() and src.resolve() == dst.resolve():
        raise BrokerHomeError(f"--trust-from {source} is this home's own trust store: name the key host's home")
    theirs = TrustStore.load(src.parent) if src.name == TRUST_FILE else _load_file(src)
    ours = TrustStore.load(home)
    for kid in sorted(theirs.signers):
        pub = theirs.public_key(kid)
        assert pub is not None
        ours.add(pub, str(theirs.signers[kid].get("label", "")), theirs.purpose(kid) or "sealing")
    ours.save()
    return len(theirs.signers)


def _load_file(path: Path) -> TrustStore:
    try:
        signers = json.loads(path.read_text())["signers"]
        if not isinstance(signers, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise BrokerHomeError(f"--trust-from {path.name} is not a trust store (trusted.json)") from None
    return TrustStore(None, signers)


def write_log_public_key(home: Path, public_key: bytes) -> None:
    """Record the log key's public half as ``home/broker/log-key.pub`` (hex): `verify` refuses it."""
    from .._atomic import atomic_write_bytes

    path = Home(home).broker_log_key_pub
    text = public_key.hex() + "\n"
    try:
        if path.exists() and path.read_text() == text:
            return
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(path, text.encode(), force=True, mode=0o644)
    except OSError:  # a read-only home: the log key still works; verify falls back to the key file
        pass


def log_public_keys(home: Path) -> set[bytes]:
    """Every audit-log key this home knows: the broker's log key (its file's public half, its
    ``log-key.pub``) and the trust store's ``audit-log`` entries."""
    keys: set[bytes] = set()
    h = Home(home)
    for path, read in ((h.broker_log_key, lambda t: json.loads(t)["public_key"]),
                       (h.broker_log_key_pub, lambda t: t.split()[0])):  # fmt: skip
        try:
            raw = bytes.fromhex(read(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue
        if len(raw) == 32:
            keys.add(raw)
    try:
        ts = TrustStore.load(home)
    except Exception:  # a malformed trust store is reported by whoever uses it
        return keys
    for kid in ts.signers:
        pub = ts.public_key(kid)
        if pub is not None and ts.purpose(kid) == "audit-log":
            keys.add(pub)
    return keys


def refuse_log_keys(trusted: list[bytes], home: Path) -> list[bytes]:
    """``trusted`` (keys offered as manifest signers), unless one of them is an audit-log key of
    ``home``: :class:`KeyPurposeError`.  A log key signs tree heads, never models."""
    known = log_public_keys(home)
    for k in trusted:
        if k in known:
            raise KeyPurposeError(
                f"--trust-key {ed25519_key_id(k)} is an audit-log key of {home.name} (the broker's log key): a log "
                "key never signs models; trust the key host's sealing key (`warden key export-public`) instead"
            )
    return trusted


__all__ = ["check_own_home", "copy_trust", "log_public_keys", "refuse_log_keys", "write_log_public_key"]

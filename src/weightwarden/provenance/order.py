"""The training order of a model, recorded at training time and kept as a secret  (docs/PROVENANCE.md).

The exact test of :mod:`.ordertest` needs the order in which the training examples were seen, and needs it
to be a *uniformly random* permutation that no one else knows: :func:`shuffle` draws it from the operating
system's CSPRNG (:class:`secrets.SystemRandom`), the training loop reads :attr:`TrainingOrder.examples` in
that order, and the owner keeps the result:

* as a plain file (:meth:`TrainingOrder.save`; JSON ``{"format": "warden-training-order", "version": 1,
  "examples": [text, ...], "shuffled": "csprng" | "given"}``, the texts in the order they were seen), to
  hand to ``warden provenance order add``; shred it afterwards;
* sealed in the home (:class:`OrderStore`, ``$WARDEN_HOME/provenance/orders/NAME.json``): a fresh 32-byte
  data key encrypts the JSON with AES-256-GCM (``cryptography``), its associated data binding the name; the
  data key is wrapped by a key provider of purpose ``tracing`` (the keyring's tracing KEK, an HSM or KMS),
  as tracing secrets are (trace/store.py): an order is an owner-side forensic secret like them.

Whoever learns the order can forge the test's evidence against anyone who trained on the same texts (train
on them in our order) or blunt it (train more on our earliest examples last), hence the sealing.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .._atomic import atomic_write_bytes
from ..errors import FormatError, ProbeError, WrongKeyError
from ..keys.provider import KeyProvider, KeySlot, b64d, b64e, wraps_for

__all__ = ["ORDER_FORMAT", "OrderStore", "TrainingOrder", "default_order_store", "record_order", "shuffle"]

ORDER_FORMAT = "warden-training-order"
_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_MAX_EXAMPLES = 10_000_000


@dataclass(frozen=True)
class TrainingOrder:
    """The training examples in the order the model saw them (each once); ``shuffled`` says how the order
    was drawn: ``csprng`` by :func:`shuffle`, ``given`` when the owner supplied it (its randomness is then
    the owner's claim, assumption A1 of the test)."""

    examples: tuple[str, ...]
    shuffled: str = "given"

    def __post_init__(self) -> None:
        if len(self.examples) < 4:
            raise ProbeError(f"a training order needs at least 4 examples (got {len(self.examples)})")
        if not all(isinstance(e, str) and e for e in self.examples):
            raise ProbeError("every example of a training order is a non-empty text")
        if len(set(self.examples)) != len(self.examples):
            raise ProbeError("a training order lists each example once: remove the duplicates (a text seen "
                             "twice has no single position)")  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {"format": ORDER_FORMAT, "version": _VERSION, "shuffled": self.shuffled,
                "examples": list(self.examples)}  # fmt: skip

    @classmethod
    def from_json(cls, obj: Any, where: str = "the training order") -> TrainingOrder:
        if not isinstance(obj, dict) or obj.get("format") != ORDER_FORMAT:
            raise ProbeError(f"{where}: not a training order (a JSON object with \"format\": \"{ORDER_FORMAT}\"; "
                             "write it with weightwarden.provenance.order.shuffle(...).save(path))")  # fmt: skip
        if obj.get("version") != _VERSION:
            raise ProbeError(f"{where}: training order version {obj.get('version')!r} is not supported (this "
                             f"weightwarden reads version {_VERSION})")  # fmt: skip
        ex = obj.get("examples")
        if not isinstance(ex, list) or len(ex) > _MAX_EXAMPLES or not all(isinstance(e, str) for e in ex):
            raise ProbeError(f"{where}: 'examples' must be a list of texts (at most {_MAX_EXAMPLES})")
        how = obj.get("shuffled", "given")
        if how not in ("csprng", "given"):
            raise ProbeError(f"{where}: 'shuffled' is 'csprng' or 'given', not {str(how)[:20]!r}")
        try:
            return cls(tuple(ex), how)
        except ProbeError as e:
            raise ProbeError(f"{where}: {e}") from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        atomic_write_bytes(p, json.dumps(self.to_json(), ensure_ascii=False).encode(), force=True)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrainingOrder:
        p = Path(path)
        try:
            obj = json.loads(p.read_bytes())
        except OSError as e:
            raise ProbeError(f"--order {p}: cannot read it ({e.strerror})") from None
        except ValueError:
            raise ProbeError(f"--order {p}: not JSON (a training order written by TrainingOrder.save)") from None
        return cls.from_json(obj, f"--order {p}")

    def positions(self) -> dict[str, int]:
        return {e: i for i, e in enumerate(self.examples)}


def shuffle(examples: Iterable[str]) -> TrainingOrder:
    """A uniformly random order of ``examples`` drawn from the OS's CSPRNG: train on ``.examples`` in turn."""
    ex = list(examples)
    secrets.SystemRandom().shuffle(ex)
    return TrainingOrder(tuple(ex), "csprng")


# -- sealed in the home ----------------------------------------------------------------------------------
def _context(name: str) -> bytes:
    return b"warden-training-order|" + name.encode()


def _check_purpose(provider: KeyProvider) -> KeyProvider:
    return wraps_for(provider, "tracing", "training orders")


class OrderStore:
    """Sealed training orders under ``root`` (``$WARDEN_HOME/provenance/orders``), one file per name."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def _path(self, name: str) -> Path:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ProbeError(f"order name {str(name)[:40]!r}: 1-128 characters, letters, digits and . _ : @ -")
        return self.root / f"{name}.json"

    def has(self, name: str) -> bool:
        return self._path(name).exists()

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.json")) if self.root.is_dir() else []

    def add(self, name: str, order: TrainingOrder, provider: KeyProvider, *, replace: bool = False,
            now: datetime | None = None) -> Path:  # fmt: skip
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        path = self._path(name)
        if path.exists() and not replace:
            raise ProbeError(f"an order is already registered as {name!r}: give --replace to replace it")
        _check_purpose(provider)
        dek = bytearray(AESGCM.generate_key(bit_length=256))
        try:
            slot = provider.wrap(dek, _context(name))
            nonce = secrets.token_bytes(12)
            body = json.dumps(order.to_json(), ensure_ascii=False).encode()
            ct = AESGCM(bytes(dek)).encrypt(nonce, body, _context(name))
        finally:
            dek[:] = bytes(len(dek))
        doc = {"format": ORDER_FORMAT + "-sealed", "version": _VERSION, "name": name, "examples": len(order.examples),
               "created": (now or datetime.now(UTC)).isoformat(), "slot": slot.to_json(), "alg": "AES-256-GCM",
               "nonce": b64e(nonce), "ciphertext": b64e(ct)}  # fmt: skip
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(path, json.dumps(doc, sort_keys=True).encode(), force=replace)
        return path

    def get(self, name: str, provider: KeyProvider) -> TrainingOrder:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        path = self._path(name)
        if not path.exists():
            raise ProbeError(f"no training order is registered as {name!r}: add one with "
                             "`warden provenance order add NAME --file ORDER`")  # fmt: skip
        try:
            doc = json.loads(path.read_bytes())
            if not isinstance(doc, dict) or doc.get("format") != ORDER_FORMAT + "-sealed" or doc.get("name") != name:
                raise ValueError
            slot = KeySlot.from_json(doc["slot"])
            nonce, ct = b64d(doc["nonce"], "nonce"), b64d(doc["ciphertext"], "ciphertext")
        except (ValueError, KeyError, TypeError, FormatError):
            raise FormatError(f"{path}: not a sealed training order (damaged): add the order again") from None
        dek = _check_purpose(provider).unwrap(slot, _context(name))
        try:
            body = AESGCM(bytes(dek)).decrypt(nonce, ct, _context(name))
        except InvalidTag:
            raise WrongKeyError(f"{path}: the sealed training order does not decrypt (altered, or sealed under "
                                "another name)") from None  # fmt: skip
        finally:
            dek[:] = bytes(len(dek))
        return TrainingOrder.from_json(json.loads(body), str(path))


def record_order(name: str, examples: Sequence[str], provider: KeyProvider, *,
                 home: str | os.PathLike[str] | None = None) -> TrainingOrder:  # fmt: skip
    """Draw a random order of ``examples`` (:func:`shuffle`), seal it in the home under ``name`` and return
    it: train on its ``examples`` in turn, each once."""
    order = shuffle(examples)
    default_order_store(home).add(name, order, provider)
    return order


def default_order_store(home: str | os.PathLike[str] | None = None) -> OrderStore:
    """The home's sealed training orders: ``$WARDEN_HOME/provenance/orders``."""
    from ..home import resolve_home

    return OrderStore(resolve_home(home).root / "provenance" / "orders")

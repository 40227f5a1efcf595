"""Signed training declarations (issue 17): what a model's training compute and tokens were, said
by someone accountable and bound to the exact weights.

A declaration is a small JSON document (UTF-8)::

    {"format": "weightwarden-declaration/1",
     "model_sha256": "<hex: weights_digest() of the model>",
     "training_compute_flop": 3.1e23,        # and / or
     "training_tokens": 1.5e13,
     "declared_by": "Jane Roe, export compliance",
     "declared_at": "2026-11-30T12:00:00Z"}

with ``<file>.sig`` beside it: a hex Ed25519 signature over the file's exact bytes by a key the
operator trusts for declarations (``$WARDEN_HOME/release/compliance-keys``: one public key a line,
hex or as ``warden key export-public`` prints it).  Only a verified declaration counts as
*declared*; the same fields unsigned in a model folder's ``config.json`` are reported as *claimed*
and can only make an outcome stricter.

``weights_digest`` is SHA-256 over every tensor in name order (name, dtype, shape, raw bytes), so a
plain folder, its shards and its sealed copy have one digest, and a declaration made for one set of
weights does not fit another.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ..errors import DeclarationError

__all__ = ["FORMAT", "Declaration", "compliance_keys", "declare", "load_declaration", "make_declaration",
           "weights_digest"]  # fmt: skip

FORMAT = "weightwarden-declaration/1"
_CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class Declaration:
    model_sha256: str
    training_compute_flop: float | None
    training_tokens: float | None
    declared_by: str
    declared_at: str
    signed_by: str  # the key id that signed it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def weights_digest(source: Any) -> str:
    """SHA-256 over the tensors of an open :class:`~weightwarden.provenance.source.TensorSource`."""
    import numpy as np

    h = hashlib.sha256(b"weightwarden-weights/1\n")
    for name in sorted(source.shapes):
        a = np.ascontiguousarray(source.raw(name))
        h.update(json.dumps([name, str(a.dtype), list(a.shape)]).encode() + b"\n")
        h.update(a.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _number(doc: dict[str, Any], key: str, origin: str) -> float | None:
    v = doc.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise DeclarationError(f"{origin}: {key} must be a positive number")
    return float(v)


def make_declaration(model_sha256: str, *, declared_by: str, compute_flop: float | None = None,
                     tokens: float | None = None, now: datetime | None = None) -> bytes:  # fmt: skip
    """The bytes of a declaration (sign them with :meth:`Signer.sign` and write the hex to ``<file>.sig``)."""
    doc = {"format": FORMAT, "model_sha256": model_sha256, "training_compute_flop": compute_flop,
           "training_tokens": tokens, "declared_by": declared_by,
           "declared_at": (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")}  # fmt: skip
    data = json.dumps({k: v for k, v in doc.items() if v is not None}, indent=1).encode() + b"\n"
    _parse(data, "the declaration", "")  # what is made must load
    return data


def _parse(data: bytes, origin: str, signed_by: str) -> Declaration:
    try:
        doc = json.loads(data)
    except ValueError:
        raise DeclarationError(f"{origin} is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DeclarationError(f"{origin}: format must be {FORMAT!r}")
    digest = doc.get("model_sha256")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise DeclarationError(f"{origin}: model_sha256 must be 64 lower-case hex digits")
    by = doc.get("declared_by")
    if not isinstance(by, str) or not by.strip() or len(by) > 200 or not by.isprintable():
        raise DeclarationError(f"{origin}: declared_by names who declares (1-200 printable characters)")
    try:
        datetime.strptime(str(doc.get("declared_at")), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise DeclarationError(f"{origin}: declared_at is a UTC time YYYY-MM-DDTHH:MM:SSZ") from None
    flop, tokens = _number(doc, "training_compute_flop", origin), _number(doc, "training_tokens", origin)
    if flop is None and tokens is None:
        raise DeclarationError(f"{origin}: declares neither training_compute_flop nor training_tokens")
    return Declaration(digest, flop, tokens, by, doc["declared_at"], signed_by)


def compliance_keys(home: str | os.PathLike[str] | None) -> list[bytes]:
    """The public keys trusted to sign declarations: ``release/compliance-keys`` under ``home``."""
    import base64
    import binascii

    from ..home import default_home

    f = Path(home or default_home()) / "release" / "compliance-keys"
    if not f.exists():
        return []
    keys = []
    for line in f.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word = line.split()[-1]  # a hex key, or `warden key export-public`'s "KEY_ID BASE64"
        try:
            k = bytes.fromhex(word) if len(word) == 64 else base64.b64decode(word, validate=True)
        except (ValueError, binascii.Error):
            k = b""
        if len(k) != 32:
            raise DeclarationError(f"{f}: one Ed25519 public key a line (hex, or the output of "
                                   "`warden key export-public`)")  # fmt: skip
        keys.append(k)
    return keys


def load_declaration(path: str | os.PathLike[str], *, model_sha256: str, trusted: list[bytes],
                     now: datetime | None = None) -> Declaration:  # fmt: skip
    """Read and verify ``path`` and ``path.sig`` for the model whose weights digest is ``model_sha256``."""
    from ..keys.provider import ed25519_key_id, verify_purpose

    p = Path(path)
    origin = f"declaration {p.name}"
    try:
        data = p.read_bytes()
        sig = bytes.fromhex(Path(f"{os.fspath(p)}.sig").read_text().strip())
    except FileNotFoundError as e:
        raise DeclarationError(f"{os.path.basename(e.filename or '')} is missing: a declaration is signed "
                               "(--declaration FILE with FILE.sig)") from None  # fmt: skip
    except (OSError, ValueError):
        raise DeclarationError(f"{origin}: unreadable, or its .sig is not hex") from None
    if not trusted:
        raise DeclarationError(f"{origin}: no key is trusted for declarations (list one in "
                               "release/compliance-keys)")  # fmt: skip
    for key in trusted:
        try:
            verify_purpose(key, "compliance", data, sig, what=origin, error=DeclarationError,
                           purpose_error=DeclarationError)  # fmt: skip
        except DeclarationError:
            continue
        d = _parse(data, origin, ed25519_key_id(key))
        break
    else:
        raise DeclarationError(f"{origin} is not signed by a key trusted for declarations (release/compliance-keys)")
    if d.model_sha256 != model_sha256:
        raise DeclarationError(f"{origin} is for other weights (model_sha256 {d.model_sha256[:16]}..., these are "
                               f"{model_sha256[:16]}...)")  # fmt: skip
    when = datetime.strptime(d.declared_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    if when > (now or datetime.now(UTC)) + _CLOCK_SKEW:
        raise DeclarationError(f"{origin}: declared_at is in the future")
    return d


def declare(model: str | os.PathLike[str], out: str | os.PathLike[str], *, signer: Any, declared_by: str,
            compute_flop: float | None = None, tokens: float | None = None, now: datetime | None = None,
            **open_kw: Any) -> Declaration:  # fmt: skip
    """Write ``out`` and ``out.sig``: a declaration for ``model``'s weights signed by ``signer`` (a
    :class:`~weightwarden.keys.provider.Signer`; the signature is an audit event)."""
    from .._atomic import atomic_write_bytes
    from ..errors import OutputExistsError
    from ..provenance.source import open_source

    o = Path(out)
    sig_path = Path(f"{os.fspath(o)}.sig")
    if o.exists() or sig_path.exists():
        raise OutputExistsError(f"{o.name} or {sig_path.name} exists: choose another -o")
    with open_source(model, **open_kw) as src:
        digest = weights_digest(src)
    data = make_declaration(digest, declared_by=declared_by, compute_flop=compute_flop, tokens=tokens, now=now)
    signer.require("compliance")  # declarations are signed under their own purpose label
    sig = signer.sign(data)
    atomic_write_bytes(o, data)
    try:
        atomic_write_bytes(sig_path, sig.hex().encode() + b"\n")
    except BaseException:
        o.unlink(missing_ok=True)  # nothing half-written: no declaration without its signature
        raise
    return _parse(data, o.name, signer.key_id)

"""Sealed weights for serving engines, with no engine imported here.

:func:`iter_weights` yields ``(name, tensor)`` pairs from a sealed file or bundle, the
shape every engine's weight-loading path takes (vLLM's ``model.load_weights(weights)``,
SGLang's ``load_weights``, TGI's ``Weights``).  Data keys are unwrapped through the
node's providers: provider URIs (``pkcs11:...`` for an HSM, ``awskms:///...``,
``vault://...``) and the node's keyring (the custody agent when the keyring is under
M-of-N custody, else ``$WARDEN_PASSPHRASE``).  The manifest signature is checked
against the node's trust store before any key is used.

Tensor parallelism: with ``world_size > 1`` and ``shard_dims`` (glob pattern -> dim),
each matching tensor is cut along ``dim`` into ``world_size`` blocks and rank ``rank``
decrypts and receives only its block (``get_slice``; block size ``ceil(size /
world_size)``, as TGI cuts).  Adapters: ``weightwarden.integrations.vllm``; see docs/SERVING.md.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .errors import KeyringError, LoaderError
from .keys.protocols import KeyringLike
from .keys.provider import KeyProvider

__all__ = ["iter_weights", "load_into", "node_providers", "shard_bounds"]


def node_providers(provider_uris: Sequence[str] | None = None, *,
                   keyring: KeyringLike | None = None) -> list[KeyProvider]:  # fmt: skip
    """The key providers of a serving node: each URI's provider, then the node's keyring.

    The keyring is optional when URIs are given (a node may hold no keyring at all and
    unwrap through its HSM or KMS only).
    """
    from .keys.registry import provider_from_uri as from_uri
    from .sealed.opening import default_keyring

    out: list[KeyProvider] = []
    for uri in provider_uris or []:
        try:
            out.append(from_uri(uri))
        except ValueError as e:
            raise LoaderError(f"key provider {str(uri)[:60]!r}: {e}") from None
    try:
        out.append((keyring or default_keyring()).provider())
    except KeyringError:
        if not out:
            raise
    return out


def shard_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s block ``[start, stop)`` of a dimension of ``size`` cut into ``world_size`` blocks."""
    block = -(-size // world_size)
    start = min(size, rank * block)
    return start, min(size, start + block)


def _shard_dim(name: str, shard_dims: Mapping[str, int] | None) -> int | None:
    for pattern, dim in (shard_dims or {}).items():
        if fnmatch.fnmatchcase(name, pattern):
            return dim
    return None


def iter_weights(
    path: str | os.PathLike[str],
    *,
    keyring: KeyringLike | None = None,
    providers: Sequence[KeyProvider] | None = None,
    provider_uris: Sequence[str] | None = None,
    trust: Any = None,
    rank: int = 0,
    world_size: int = 1,
    shard_dims: Mapping[str, int] | None = None,
    device: Any = "cpu",
    threads: int | None = None,
    check_digests: bool = True,
) -> Iterator[tuple[str, Any]]:
    """``(name, torch.Tensor)`` for every tensor of a sealed file or bundle, one tensor at a time.

    Each tensor is decrypted (on ``threads`` threads), its chunks' tags and signed digests
    checked, then yielded; the consumer copies it into its parameters, so peak memory
    stays near the largest tensor.  Tensors come in file order, shard by shard.
    """
    from .safetensors import safe_open

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise LoaderError(f"world_size must be a positive integer, not {str(world_size)[:16]!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise LoaderError(f"rank must be in [0, {world_size}), not {str(rank)[:16]!r}")
    if providers is None:
        providers = node_providers(provider_uris, keyring=keyring)
    if trust is None and keyring is not None:
        trust = keyring.trust
    with safe_open(
        path, "pt", device, providers=providers, trust=trust, threads=threads, check_digests=check_digests
    ) as f:
        for name in f.offset_keys():
            dim = _shard_dim(name, shard_dims) if world_size > 1 else None
            if dim is None:
                yield name, f.get_tensor(name)
                continue
            sl = f.get_slice(name)
            shape = sl.get_shape()
            if not -len(shape) <= dim < len(shape):
                raise LoaderError(f"tensor {name[:64]!r} has {len(shape)} dimensions; cannot shard it along {dim}")
            dim %= len(shape)
            start, stop = shard_bounds(shape[dim], rank, world_size)
            yield name, sl[(slice(None),) * dim + (slice(start, stop),)]


def load_into(model: Any, weights: Iterator[tuple[str, Any]], *, strict: bool = True) -> set[str]:
    """Hand ``weights`` to an engine model's ``load_weights`` (vLLM's convention: it returns the
    names of the parameters it filled) and, when ``strict``, refuse a model left with
    parameters the sealed checkpoint did not fill."""
    loaded = model.load_weights(weights)
    if loaded is None:
        return set()
    loaded = set(loaded)
    if strict:
        missing = sorted(n for n, _ in model.named_parameters() if n not in loaded)
        if missing:
            raise LoaderError(f"the sealed checkpoint left {len(missing)} parameter(s) unfilled: {missing[:5]}")
    return loaded

"""Load sealed checkpoints straight into PyTorch tensors (extra: ``weightwarden[torch]``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .api import Trust, _open_reader
from .keys.local import Keyring
from .keys.provider import KeyProvider
from .sealed.bundle import BundleReader

DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def load(
    path: str | os.PathLike[str],
    *,
    keyring: Keyring | None = None,
    providers: Sequence[KeyProvider] | None = None,
    trust: Trust | None = None,
    device: str | torch.device = "cpu",
    check_digests: bool = True,
    threads: int | None = None,
) -> dict[str, torch.Tensor]:
    """A ``state_dict`` from a sealed file or bundle; plaintext only in memory.

    On the CPU the tensors share one decrypted buffer per file (no copies); each file
    is decrypted on ``threads`` threads (None: every core).
    """
    from .safetensors import _buffer_tensor

    state: dict[str, torch.Tensor] = {}
    with _open_reader(path, keyring=keyring, providers=providers, trust=trust) as r:
        readers = r.tensor_readers() if isinstance(r, BundleReader) else [r]
        for member in readers:
            buf, tensors = member.load_raw(check_digests=check_digests, threads=threads)
            for t in tensors.values():
                state[t.name] = _buffer_tensor(buf, t, "pt", "cpu")
    if torch.device(device).type != "cpu":
        state = {k: to_device(v, device) for k, v in state.items()}
    return state


def to_device(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``."""
    return t.to(device)

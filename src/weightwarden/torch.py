"""Load sealed checkpoints straight into PyTorch tensors (extra: ``weightwarden[torch]``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ._extras import extra_imports

with extra_imports("torch"):
    import torch

from .errors import LoaderError
from .keys.protocols import KeyringLike
from .keys.provider import KeyProvider
from .sealed import format as F
from .sealed.bundle import BundleReader
from .sealed.codec import DTYPES as _CODEC_DTYPES
from .sealed.decrypt import SealedReader
from .sealed.opening import open_reader
from .sealed.signature import Trust

PIPE_PIECE = 64 << 20  # bytes decrypted per pinned host buffer before its copy to the device

#: safetensors dtype -> torch dtype, from the codec's one table (torch names its dtypes as numpy does)
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, d.numpy) for name, d in _CODEC_DTYPES.items()}


def load(
    path: str | os.PathLike[str],
    *,
    keyring: KeyringLike | None = None,
    providers: Sequence[KeyProvider] | None = None,
    trust: Trust | None = None,
    device: str | torch.device = "cpu",
    check_digests: bool = True,
    threads: int | None = None,
) -> dict[str, torch.Tensor]:
    """A ``state_dict`` from a sealed file or bundle; plaintext only in memory.

    On the CPU the tensors share one decrypted buffer per file (no copies); each file
    is decrypted on ``threads`` threads (None: every core).  On a CUDA device each file
    goes through pinned host buffers to one device buffer in a pipeline
    (:func:`to_device_pipelined`); the tensors are views of it.
    """
    from .safetensors import buffer_tensor

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoaderError(f"device {str(device)[:32]!r}: this torch build or machine has no CUDA")
    state: dict[str, torch.Tensor] = {}
    with open_reader(path, keyring=keyring, providers=providers, trust=trust) as r:
        readers = r.tensor_readers() if isinstance(r, BundleReader) else [r]
        for member in readers:
            if dev.type == "cpu":
                buf, tensors = member.load_raw(check_digests=check_digests, threads=threads)
                for t in tensors.values():
                    state[t.name] = buffer_tensor(buf, t, "pt", "cpu")
                continue
            flat = to_device_pipelined(member, dev, threads=threads, check_digests=check_digests)
            for t in member.tensor_table().values():
                state[t.name] = device_view(flat, t)
    return state


def device_view(flat: torch.Tensor, t: F.TensorInfo) -> torch.Tensor:
    """Tensor ``t`` as a view of a file's data section on a device (a copy where its offset is unaligned)."""
    dt = DTYPES[t.dtype]
    piece = flat[t.start : t.end]
    if t.start % dt.itemsize:
        piece = piece.clone()
    return piece.view(dt).reshape(t.shape)


def to_device(t: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoaderError(f"device {str(device)[:32]!r}: this torch build or machine has no CUDA")
    return t.to(dev)


def to_device_pipelined(
    reader: SealedReader,
    device: str | torch.device,
    *,
    threads: int | None = None,
    check_digests: bool = True,
    piece: int = PIPE_PIECE,
    pin: bool | None = None,
) -> torch.Tensor:
    """The decrypted data section of one file as one uint8 tensor on ``device``.

    Pieces of ``piece`` bytes are decrypted (on ``threads`` threads, digests and tags
    checked) into two alternating host buffers, pinned on CUDA; each is copied to the
    device asynchronously on a side stream while the next piece is decrypted into the
    other buffer, which is reused only once its copy's event has completed.  Returns
    after the last copy; on any failure it raises and the device buffer is dropped.
    On a non-CUDA device the same loop runs with plain buffers and blocking copies
    (the CPU fallback the tests run).
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    n = reader.data_len
    out = torch.empty(n, dtype=torch.uint8, device=dev)
    if n == 0:
        reader.read_all(check_digests=check_digests)  # authenticates the empty final chunk
        return out
    size = min(piece, n)
    pin = cuda if pin is None else pin
    host = [torch.empty(size, dtype=torch.uint8, pin_memory=pin) for _ in range(2 if n > size else 1)]
    done: list[Any] = [None] * len(host)
    stream = torch.cuda.Stream(device=dev) if cuda else None
    for k, start in enumerate(range(0, n, size)):
        end, b = min(n, start + size), k % len(host)
        if done[b] is not None:
            done[b].synchronize()  # the copy out of this buffer has finished
        hv = host[b][: end - start]
        reader.read_into(start, end, hv.numpy().data, check_digests=check_digests, threads=threads)
        if stream is not None:
            with torch.cuda.stream(stream):
                out[start:end].copy_(hv, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
                done[b] = ev
        else:
            out[start:end].copy_(hv)
    if stream is not None:
        stream.synchronize()
    return out

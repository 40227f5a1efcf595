"""Sealed checkpoints through the ``safetensors`` API: change one import.

    from weightwarden.safetensors import safe_open        # was: from safetensors import safe_open
    with safe_open("model.wws", framework="pt", device="cpu") as f:
        w = f.get_tensor("lm_head.weight")
        shard = f.get_slice("mlp.up.weight")[:, 1024:2048]  # decrypts only the chunks it needs

    from weightwarden.safetensors.torch import load_file  # was: from safetensors.torch import load_file

Keys, metadata, tensors and slices are those ``safetensors.safe_open`` gives for the
plaintext.  On top: the manifest signature is checked against the trust store before
any key is used, every chunk read is authenticated (GCM tag) and, by default, checked
against its signed BLAKE3 digest before a tensor is handed out.  Plaintext lives in
memory only; torch tensors share the decrypted buffer (no second copy).

The keyword arguments of :func:`weightwarden.safe_open` (``keyring``, ``providers``,
``trust``) work here too.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._extras import require
from ..errors import LoaderError
from ..keys.protocols import KeyringLike
from ..sealed import format as F
from ..sealed.bundle import BundleReader
from ..sealed.codec import DTYPE_SIZES, np_dtype
from ..sealed.decrypt import SealedReader, resolve_threads
from ..sealed.opening import open_reader

_FRAMEWORKS = {
    "pt": "pt", "torch": "pt", "pytorch": "pt", "np": "np", "numpy": "np", "flax": "flax", "jax": "flax",
    "tf": "tf", "tensorflow": "tf", "mlx": "mlx",
}  # fmt: skip
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

__all__ = ["SealedSlice", "buffer_tensor", "convert", "load", "load_file", "safe_open", "torch_dtype"]


def framework_name(framework: str) -> str:
    fw = _FRAMEWORKS.get(str(framework).lower())
    if fw is None:
        raise LoaderError(
            f"framework {str(framework)[:32]!r} is not supported; use one of: {', '.join(sorted(_FRAMEWORKS))}"
        )
    return fw


def _torch() -> Any:
    return require("torch", extra="torch")


def torch_dtype(dtype: str) -> Any:
    from ..torch import DTYPES

    return DTYPES[dtype]


def _is_cpu(device: Any) -> bool:
    if device is None:
        return True
    if isinstance(device, str):
        return device.split(":")[0] == "cpu"
    return getattr(device, "type", None) == "cpu"


def convert(raw: np.ndarray, dtype: str, framework: str, device: Any = "cpu") -> Any:
    """A C-contiguous array of ``dtype``'s raw bytes (a uint of its item size) as a framework tensor.

    No copy on the CPU: numpy views, ``torch.from_numpy`` shares the buffer.
    """
    if framework == "np":
        if not _is_cpu(device):
            raise LoaderError(f"framework 'np' loads to the CPU only, not {str(device)[:32]!r}")
        return raw.view(np_dtype(dtype))
    if framework == "pt":
        torch = _torch()
        t = torch.from_numpy(raw).view(torch_dtype(dtype))
        if _is_cpu(device):
            return t
        from ..torch import to_device

        return to_device(t, device)
    arr = raw.view(np_dtype(dtype))
    try:
        if framework == "flax":
            import jax.numpy as jnp

            return jnp.asarray(arr)
        if framework == "tf":
            import tensorflow as tf

            return tf.convert_to_tensor(arr)
        import mlx.core as mx

        return mx.array(arr)
    except ImportError as e:
        raise LoaderError(f"framework {framework!r} needs {e.name or 'its package'} installed") from None


def buffer_tensor(buf: np.ndarray, info: F.TensorInfo, framework: str, device: Any) -> Any:
    """One tensor of a decrypted data section (``buf``), sharing its memory where aligned."""
    size = DTYPE_SIZES[info.dtype]
    piece = buf[info.start : info.end]
    if piece.ctypes.data % size:
        piece = piece.copy()  # an unaligned offset: copy to aligned storage
    return convert(piece.view(_RAW[size]).reshape(info.shape), info.dtype, framework, device)


class SealedSlice:
    """A lazy tensor, like ``safetensors``' ``PySafeSlice``: ``get_shape``, ``get_dtype`` and indexing.

    Indexing decrypts only the chunks between the slice's first and last element: a
    tensor-parallel rank that reads rows ``[r0:r1]`` never decrypts the other ranks' rows.
    Slices follow Python's rules (bounds clamp, negative indices count from the end);
    steps must be positive, as in safetensors.
    """

    def __init__(
        self,
        reader: SealedReader,
        info: F.TensorInfo,
        framework: str = "np",
        device: Any = "cpu",
        *,
        check_digests: bool = True,
    ):
        self._reader = reader
        self._check = check_digests
        self._info = info
        self._fw = framework
        self._device = device

    def get_shape(self) -> list[int]:
        return list(self._info.shape)

    def get_dtype(self) -> str:
        return self._info.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self._info.shape

    def _normalise(self, index: Any) -> list[tuple[int, int, int, bool]]:
        shape = self._info.shape
        idx = list(index) if isinstance(index, tuple) else [index]
        if sum(1 for i in idx if i is Ellipsis) > 1:
            raise LoaderError("a slice may hold at most one Ellipsis (...)")
        if Ellipsis in idx:
            at = idx.index(Ellipsis)
            idx[at : at + 1] = [slice(None)] * (len(shape) - len(idx) + 1)
        if len(idx) > len(shape):
            raise LoaderError(f"{len(idx)} indices for a tensor of {len(shape)} dimensions {self._info.name[:64]!r}")
        idx += [slice(None)] * (len(shape) - len(idx))
        out = []
        for d, (i, n) in enumerate(zip(idx, shape, strict=True)):
            if isinstance(i, slice):
                start, stop, step = i.indices(n)
                if step <= 0:
                    raise LoaderError(f"dimension {d}: slice steps must be positive, not {step}")
                out.append((start, len(range(start, stop, step)), step, True))
            elif isinstance(i, (int, np.integer)) and not isinstance(i, bool):
                j = int(i) + n if i < 0 else int(i)
                if not 0 <= j < n:
                    raise LoaderError(f"dimension {d}: index {int(i)} is out of range for size {n}")
                out.append((j, 1, 1, False))
            else:
                raise LoaderError(f"dimension {d}: index with ints, slices or ..., not {type(i).__name__}")
        return out

    def raw(self, index: Any) -> np.ndarray:
        """The selected elements as their raw bytes (a C-contiguous uint array of the item size)."""
        info = self._info
        size = DTYPE_SIZES[info.dtype]
        dims = self._normalise(index)
        strides = [math.prod(info.shape[d + 1 :]) for d in range(len(info.shape))]
        out_shape = [count for _, count, _, keep in dims if keep]
        if any(count == 0 for _, count, _, _ in dims):
            return np.empty(out_shape, dtype=_RAW[size])
        first = sum(s * st for (s, _, _, _), st in zip(dims, strides, strict=True))
        last = sum((s + (c - 1) * k) * st for (s, c, k, _), st in zip(dims, strides, strict=True))
        lo, hi = info.start + first * size, info.start + (last + 1) * size
        span = np.empty(hi - lo, dtype=np.uint8)
        self._reader.read_into(lo, hi, span.data, check_digests=self._check)
        view = np.lib.stride_tricks.as_strided(
            span.view(_RAW[size]),
            shape=out_shape,
            strides=[k * st * size for (_, _, k, keep), st in zip(dims, strides, strict=True) if keep],
            writeable=False,
        )
        return np.ascontiguousarray(view) if not view.flags.c_contiguous else span.view(_RAW[size]).reshape(out_shape)

    def __getitem__(self, index: Any) -> Any:
        return convert(self.raw(index), self._info.dtype, self._fw, self._device)

    def __repr__(self) -> str:
        return f"SealedSlice({self._info.name!r}, shape={list(self._info.shape)}, dtype={self._info.dtype})"


def _by_offset(r: SealedReader) -> list[str]:
    """``r``'s tensor names in the order of their data."""
    return sorted(r.keys(), key=lambda k: r.tensor_info(k).start)


class safe_open:  # named as safetensors names it
    """``safetensors.safe_open`` for a sealed file or bundle (every shard's tensors by name)."""

    def __init__(
        self,
        filename: str | os.PathLike[str],
        framework: str = "pt",
        device: Any = "cpu",
        *,
        keyring: KeyringLike | None = None,
        providers: Sequence[Any] | None = None,
        trust: Any = None,
        check_digests: bool = True,
        threads: int | None = None,
    ):
        self._fw = framework_name(framework)
        self._threads = resolve_threads(threads)
        self._device = device
        self._check = check_digests
        if self._fw == "np" and not _is_cpu(device):
            raise LoaderError(f"framework 'np' loads to the CPU only, not {str(device)[:32]!r}")
        self._r: SealedReader | BundleReader = open_reader(filename, keyring=keyring, providers=providers, trust=trust)

    @property
    def reader(self) -> SealedReader | BundleReader:
        """The underlying decrypting reader (weightwarden's own API)."""
        return self._r

    def _owner(self, name: str) -> tuple[SealedReader, F.TensorInfo]:
        r = self._r.tensor_reader(name) if isinstance(self._r, BundleReader) else self._r
        return r, r.tensor_info(name)

    def keys(self) -> list[str]:
        return self._r.keys()

    def offset_keys(self) -> list[str]:
        readers = self._r.tensor_readers() if isinstance(self._r, BundleReader) else [self._r]
        return [k for r in readers for k in _by_offset(r)]

    def metadata(self) -> dict[str, str] | None:
        """The ``__metadata__`` of the header (merged over a bundle's shards); None when there is none."""
        readers = self._r.tensor_readers() if isinstance(self._r, BundleReader) else [self._r]
        found: dict[str, str] | None = None
        for r in readers:
            raw = r.raw_header
            if raw is not None and "__metadata__" in json.loads(raw):
                found = (found or {}) | r.metadata()
        return found

    def get_tensor(self, name: str) -> Any:
        r, info = self._owner(name)
        buf = np.empty(info.nbytes, dtype=np.uint8)
        r.read_into(info.start, info.end, buf.data, check_digests=self._check, threads=self._threads)
        raw = buf.view(_RAW[DTYPE_SIZES[info.dtype]]).reshape(info.shape)
        return convert(raw, info.dtype, self._fw, self._device)

    def get_slice(self, name: str) -> SealedSlice:
        r, info = self._owner(name)
        return SealedSlice(r, info, self._fw, self._device, check_digests=self._check)

    def close(self) -> None:
        self._r.close()

    def __enter__(self) -> safe_open:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_file(
    filename: str | os.PathLike[str],
    device: Any = "cpu",
    *,
    framework: str = "pt",
    keyring: KeyringLike | None = None,
    providers: Sequence[Any] | None = None,
    trust: Any = None,
    check_digests: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """Every tensor of a sealed file or bundle, like ``safetensors.<framework>.load_file``.

    Each file is decrypted once into one buffer (on ``threads`` threads, default all
    cores); the tensors are views of it.
    """
    fw = framework_name(framework)
    if fw == "pt" and not _is_cpu(device):
        from ..torch import load as torch_load

        return torch_load(
            filename, keyring=keyring, providers=providers, trust=trust, device=device,
            check_digests=check_digests, threads=threads,
        )  # fmt: skip
    out: dict[str, Any] = {}
    with open_reader(filename, keyring=keyring, providers=providers, trust=trust) as r:
        readers = r.tensor_readers() if isinstance(r, BundleReader) else [r]
        for member in readers:
            buf, tensors = member.load_raw(check_digests=check_digests, threads=threads)
            for t in tensors.values():
                out[t.name] = buffer_tensor(buf, t, fw, device)
    return out


def load(data: bytes, *, framework: str = "pt", **kwargs: Any) -> dict[str, Any]:
    """Every tensor of a sealed file held in memory (``bytes``), like ``safetensors.torch.load``.

    The bytes go to an anonymous in-memory file (``memfd``), never to disk.
    """
    if not hasattr(os, "memfd_create"):  # pragma: no cover - Linux has it
        raise LoaderError("load(bytes) needs os.memfd_create (Linux); write the sealed file and use load_file")
    fd = os.memfd_create("weightwarden-sealed", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        return load_file(Path(f"/proc/self/fd/{fd}"), framework=framework, **kwargs)
    finally:
        os.close(fd)

"""The safetensors codec: the one dtype table and the one safetensors writer.

Every dtype weightwarden reads or writes is a row of :data:`DTYPES`: its safetensors name, its item size
and its numpy name (``ml_dtypes`` supplies the numpy types safetensors has and numpy lacks; torch names
its dtypes the same).  The header parser (:func:`weightwarden.sealed.format.parse_tensor_header`), the
loaders (``weightwarden.safetensors``, ``weightwarden.torch``), provenance and tracing all read this
table; :func:`iter_parts` is the only code that writes a plain safetensors file (:func:`write_file` to a
file, atomically; :func:`to_memory` to anonymous memory).
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._atomic import atomic_output, write_all
from ..errors import UnsupportedModelError

__all__ = ["DTYPES", "DTYPE_SIZES", "DType", "header_bytes", "iter_parts", "np_dtype", "st_dtype",
           "to_memory", "write_file"]  # fmt: skip


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its name in a header, its item size, its numpy (and torch) name."""

    name: str
    itemsize: int
    numpy: str
    ml_dtypes: bool = False  # the numpy type comes from ml_dtypes


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("BOOL", 1, "bool"),
        DType("U8", 1, "uint8"),
        DType("I8", 1, "int8"),
        DType("F8_E4M3", 1, "float8_e4m3fn", ml_dtypes=True),
        DType("F8_E5M2", 1, "float8_e5m2", ml_dtypes=True),
        DType("I16", 2, "int16"),
        DType("U16", 2, "uint16"),
        DType("F16", 2, "float16"),
        DType("BF16", 2, "bfloat16", ml_dtypes=True),
        DType("I32", 4, "int32"),
        DType("U32", 4, "uint32"),
        DType("F32", 4, "float32"),
        DType("I64", 8, "int64"),
        DType("U64", 8, "uint64"),
        DType("F64", 8, "float64"),
    )
}
#: safetensors dtype -> item size in bytes
DTYPE_SIZES: dict[str, int] = {d.name: d.itemsize for d in DTYPES.values()}
_BY_NUMPY: dict[str, str] = {d.numpy: d.name for d in DTYPES.values()}


def np_dtype(dtype: str) -> np.dtype[Any]:
    """The little-endian numpy dtype of safetensors dtype ``dtype`` (``KeyError`` if there is none)."""
    d = DTYPES[dtype]
    if not d.ml_dtypes:
        return np.dtype(d.numpy).newbyteorder("<")
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - ml_dtypes is a core dependency
        raise UnsupportedModelError(f"dtype {dtype} needs ml_dtypes (or use weightwarden.torch)") from None
    return np.dtype(getattr(ml_dtypes, d.numpy))


def st_dtype(dtype: np.dtype[Any]) -> str | None:
    """The safetensors name of numpy dtype ``dtype``; None when safetensors has no such dtype."""
    return _BY_NUMPY.get(dtype.name)


# -- the writer ------------------------------------------------------------------------------
def header_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """The JSON header of a safetensors file holding ``tensors`` in order (space-padded to 8 bytes)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    off = 0
    for name, a in tensors.items():
        dt = st_dtype(a.dtype)
        if dt is None:
            raise UnsupportedModelError(f"tensor {name[:64]!r}: dtype {a.dtype} cannot be written")
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def iter_parts(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> Iterator[Any]:
    """A safetensors file's bytes in order: header length, header, each tensor's data."""
    raw = header_bytes(tensors, metadata)
    yield len(raw).to_bytes(8, "little")
    yield raw
    for a in tensors.values():
        yield np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def write_file(path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str], *,
               on_part: Callable[[Any], object] | None = None) -> None:  # fmt: skip
    """Write a safetensors file at ``path`` atomically (replacing one there); ``on_part`` sees each part
    written, in order (to hash the file as it is written)."""
    with atomic_output(path, force=True) as fd:
        for part in iter_parts(tensors, metadata):
            write_all(fd, part)
            if on_part is not None:
                on_part(part)


def to_memory(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str], *,
              on_part: Callable[[Any], object] | None = None) -> mmap.mmap:  # fmt: skip
    """A safetensors file in anonymous memory (an mmap with no file behind it); ``on_part`` sees each part
    copied in, in order."""
    raw = header_bytes(tensors, metadata)
    buf = mmap.mmap(-1, max(8 + len(raw) + sum(a.nbytes for a in tensors.values()), 1))
    off = 0
    for part in iter_parts(tensors, metadata):
        mv = memoryview(part).cast("B")
        buf[off : off + len(mv)] = mv
        if on_part is not None:
            on_part(mv)
        off += len(mv)
    return buf

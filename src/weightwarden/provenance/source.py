"""Reading checkpoints one tensor at a time, for provenance signatures.

A :class:`TensorSource` lists tensor names and shapes without reading data, and
returns one tensor (or a few rows of one) as ``float32`` on demand.  Plain
safetensors files are memory-mapped, so only the rows asked for are read; sealed
files and bundles are decrypted tensor by tensor into memory, never to disk.
Peak memory while walking a checkpoint is therefore about the largest tensor
plus the caller's working set, whatever the checkpoint's total size.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import struct
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError, HeaderError, TruncatedError, UnsupportedModelError
from ..keys.protocols import KeyringLike
from ..sealed import format as F
from ..sealed.bundle import BundleReader
from ..sealed.codec import np_dtype
from ..sealed.detect import is_sealed_path
from ..sealed.opening import open_reader

__all__ = ["TensorSource", "open_source"]


class _PlainFile:
    """A memory-mapped, strictly validated safetensors file."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 8:
                raise TruncatedError(f"{path.name}: too short for a safetensors file")
            (hlen,) = struct.unpack("<Q", fh.read(8))
            if hlen > F.MAX_SAFETENSORS_HEADER or 8 + hlen > size:
                raise HeaderError(f"{path.name}: safetensors header length out of range")
            raw = fh.read(hlen)
            self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + hlen else None
        self.data_off = 8 + hlen
        self.tensors, self.metadata = F.parse_tensor_header(raw, size - self.data_off)

    def array(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        dt = np_dtype(t.dtype)
        if self._mm is None or t.nbytes == 0:
            return np.zeros(t.shape, dtype=dt)
        return np.frombuffer(self._mm, dtype=dt, count=int(np.prod(t.shape)), offset=self.data_off + t.start).reshape(
            t.shape
        )

    def close(self) -> None:
        if self._mm is not None:
            # an array handed out may still view the map; it then closes when that array goes
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None


class TensorSource:
    """Tensor names, shapes and on-demand ``float32`` reads over one checkpoint.

    ``path`` may be a ``.safetensors`` file, a directory of them (a Hugging Face
    model folder, sharded or not), or a sealed file or bundle (``keyring`` or
    ``providers`` must then unlock it).
    """

    def __init__(self, path: str | os.PathLike[str], *, keyring: KeyringLike | None = None, providers: Any = None,
                 trust: Any = None):  # fmt: skip
        self.path = Path(path)
        self._stack = ExitStack()
        self._where: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.config: dict[str, Any] = {}
        try:
            self._open(keyring, providers, trust)
            if not self.shapes:
                raise UnsupportedModelError(f"{self.path.name}: no tensors found")
        except BaseException:  # nothing opened is left open
            self._stack.close()
            raise

    def _open(self, keyring: KeyringLike | None, providers: Any, trust: Any) -> None:
        p = self.path
        if not p.exists():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(p))
        if is_sealed_path(p):
            reader = open_reader(p, keyring=keyring, providers=providers, trust=trust)
            self._stack.callback(reader.close)
            if isinstance(reader, BundleReader) and "config.json" in reader.files():
                import json

                try:
                    self.config = json.loads(reader.read_file("config.json"))
                except ValueError:
                    self.config = {}
            for name in reader.keys():  # noqa: SIM118 - readers are not mappings
                self._where[name] = ("sealed", reader)
                self.shapes[name] = tuple(_sealed_shape(reader, name))
            return
        files: Sequence[Path]
        if p.is_dir():
            files = sorted(p.glob("*.safetensors"))
            if not files:
                raise UnsupportedModelError(f"{p.name}: no .safetensors files in this folder")
            cfg = p / "config.json"
            if cfg.exists():
                import json

                try:
                    self.config = json.loads(cfg.read_text())
                except ValueError:
                    self.config = {}
        else:
            files = [p]
        for f in files:
            try:
                pf = _PlainFile(f)
            except (HeaderError, TruncatedError, FormatError):
                raise
            except OSError as e:
                raise UnsupportedModelError(f"{f.name}: cannot read ({e.strerror})") from None
            self._stack.callback(pf.close)
            for name, t in pf.tensors.items():
                if name in self._where:
                    raise HeaderError(f"tensor {name[:64]!r} appears in more than one shard")
                self._where[name] = ("plain", pf)
                self.shapes[name] = t.shape

    def names(self) -> list[str]:
        return list(self.shapes)

    def file_metadata(self, name: str) -> dict[str, str]:
        """The ``__metadata__`` of the file that holds tensor ``name`` (a bundle's: its shard's)."""
        kind, obj = self._where[name]
        if kind == "plain":
            return dict(obj.metadata)
        return obj.tensor_reader(name).metadata() if hasattr(obj, "tensor_reader") else obj.metadata()

    def raw(self, name: str) -> np.ndarray:
        """Tensor ``name`` in its stored dtype: a memory map for plain files, decrypted memory for sealed ones."""
        kind, obj = self._where[name]
        return obj.array(name) if kind == "plain" else obj.get_tensor(name)

    def get(self, name: str, rows: np.ndarray | slice | None = None,
            cols: np.ndarray | slice | None = None) -> np.ndarray:  # fmt: skip
        """Tensor ``name`` as ``float32`` (only ``rows`` / ``cols`` of a 2-D tensor, sliced before the copy)."""
        arr = self.raw(name)
        if rows is not None:
            arr = arr[rows]
        if cols is not None:
            arr = arr[:, cols]
        out = np.asarray(arr, dtype=np.float32)
        if not np.isfinite(out).all():
            raise UnsupportedModelError(f"tensor {name[:64]!r} holds non-finite values")
        return out

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sealed_shape(reader: Any, name: str) -> tuple[int, ...]:
    if hasattr(reader, "tensor_info"):
        return reader.tensor_info(name).shape
    return reader.tensor_reader(name).tensor_info(name).shape


def open_source(path: str | os.PathLike[str] | TensorSource, **kw: Any) -> TensorSource:
    return path if isinstance(path, TensorSource) else TensorSource(path, **kw)

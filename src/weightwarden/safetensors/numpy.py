"""``safetensors.numpy`` for sealed files: ``load_file`` and ``load``."""

from __future__ import annotations

import os
from typing import Any

from . import load as _load
from . import load_file as _load_file

__all__ = ["load", "load_file"]


def load_file(filename: str | os.PathLike[str], **kwargs: Any) -> dict[str, Any]:
    """Like ``safetensors.numpy.load_file``: numpy arrays (views of one decrypted buffer per file)."""
    return _load_file(filename, framework="np", **kwargs)


def load(data: bytes, **kwargs: Any) -> dict[str, Any]:
    """Like ``safetensors.numpy.load``, for the bytes of a sealed file (kept in memory)."""
    return _load(data, framework="np", **kwargs)

"""``safetensors.torch`` for sealed files: ``load_file``, ``load`` and ``safe_open`` (framework "pt")."""

from __future__ import annotations

import os
from typing import Any

from . import load as _load
from . import load_file as _load_file
from . import safe_open as _safe_open

__all__ = ["load", "load_file", "safe_open"]


def load_file(filename: str | os.PathLike[str], device: Any = "cpu", **kwargs: Any) -> dict[str, Any]:
    """Like ``safetensors.torch.load_file``: a state_dict of torch tensors on ``device``."""
    return _load_file(filename, device, framework="pt", **kwargs)


def load(data: bytes, **kwargs: Any) -> dict[str, Any]:
    """Like ``safetensors.torch.load``: the bytes of a sealed file (kept in memory) to torch tensors."""
    return _load(data, framework="pt", **kwargs)


def safe_open(filename: str | os.PathLike[str], device: Any = "cpu", **kwargs: Any) -> _safe_open:
    return _safe_open(filename, "pt", device, **kwargs)

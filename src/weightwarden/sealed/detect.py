"""Is this path sealed?  The one place that tells a sealed file or bundle from anything else, without a key."""

from __future__ import annotations

import os
from pathlib import Path

from .format import MAGIC

__all__ = ["BUNDLE_MANIFEST", "is_bundle", "is_sealed", "is_sealed_path"]

#: The signed manifest every sealed bundle (a sealed model directory) holds.
BUNDLE_MANIFEST = "BUNDLE.wwb"


def is_sealed(path: str | os.PathLike[str]) -> bool:
    """Does ``path`` start like a sealed file (magic bytes)?  Unreadable paths and folders: no."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """Is ``path`` a folder holding a bundle manifest?"""
    p = Path(path)
    return p.is_dir() and (p / BUNDLE_MANIFEST).is_file()


def is_sealed_path(path: str | os.PathLike[str]) -> bool:
    """A sealed bundle, or a file that starts like a sealed file."""
    p = Path(path)
    return is_bundle(p) or (p.is_file() and is_sealed(p))

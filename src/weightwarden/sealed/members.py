"""The sealed files that paths name: a sealed file is itself, a bundle directory is its members (every file
in it but the bundle manifest), in a stable order.  What `warden rewrap` and any other per-file operation
walks."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .bundle import MANIFEST

__all__ = ["sealed_files"]


def sealed_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Each path that is a file, and each bundle directory's members (sorted; the manifest left out)."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(q for q in p.iterdir() if q.name != MANIFEST) if p.is_dir() else [p]
    return files

"""Sealed checkpoint format v1 (see docs/FORMAT.md)."""

from .bundle import BundleReader, SealedBundle
from .decrypt import SealedReader
from .detect import BUNDLE_MANIFEST, is_bundle, is_sealed, is_sealed_path
from .reader import SealedFile
from .writer import SealResult, seal_file

__all__ = [
    "BUNDLE_MANIFEST", "BundleReader", "SealResult", "SealedBundle", "SealedFile", "SealedReader", "is_bundle",
    "is_sealed", "is_sealed_path", "seal_file",
]  # fmt: skip

"""Sealed checkpoint format v1 (see docs/FORMAT.md)."""

from .bundle import BundleReader, SealedBundle
from .reader import SealedFile, SealedReader
from .writer import SealResult, seal_file

__all__ = ["BundleReader", "SealResult", "SealedBundle", "SealedFile", "SealedReader", "seal_file"]

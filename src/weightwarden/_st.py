"""sentence-transformers' Transformer module, wherever this version keeps it."""

try:
    from sentence_transformers.sentence_transformer.modules import Transformer
except ImportError:  # sentence-transformers < 6
    from sentence_transformers.models import Transformer  # type: ignore[no-redef]  # the same class, older home

__all__ = ["Transformer"]

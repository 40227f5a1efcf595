"""Clone detection: was a model derived from one of ours?  (docs/PROVENANCE.md)

- :func:`compare` tests H0 "suspect and reference were initialised independently"
  and returns a :class:`Comparison` with a p-value and per-layer evidence;
- :class:`Registry` keeps compact :class:`Signature` s of protected models and
  ``identify`` ranks them against a suspect with corrected p-values;
- :func:`scan` walks a whole hub on Ray, resumably; :func:`.endpoint_scan.scan_endpoints` probes many
  endpoints (``warden scan --endpoints``) the same way.
"""

from .compare import DEFAULT_ALPHA, Comparison, LayerEvidence, compare, compare_many
from .layout import Layout, detect_layout
from .registry import Identification, Registry, default_registry
from .scan import ScanReport, scan
from .signature import Signature, extract_signature
from .source import TensorSource

__all__ = [
    "DEFAULT_ALPHA",
    "Comparison",
    "Identification",
    "LayerEvidence",
    "Layout",
    "Registry",
    "ScanReport",
    "Signature",
    "TensorSource",
    "compare",
    "compare_many",
    "default_registry",
    "detect_layout",
    "extract_signature",
    "scan",
]

"""Cloud KMS adapters: moved to one module per backend (keys/awskms.py, keys/vault.py); provider URIs
are keys/registry.py's.  The names stay importable from here (shims)."""

from __future__ import annotations

from .awskms import AwsKmsProvider  # moved: see keys/awskms.py
from .registry import provider_from_uri as from_uri  # moved: see keys/registry.py
from .vault import VaultTransitProvider  # moved: see keys/vault.py

__all__ = ["AwsKmsProvider", "VaultTransitProvider", "from_uri"]

"""Load a sealed model directory into a Hugging Face ``transformers`` model, in memory only.

Needs ``transformers`` (extra: ``weightwarden[hf]``).  Config and weights are
decrypted into memory; nothing is written to disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from .api import Trust, safe_open
from .errors import UnsupportedModelError
from .keys.local import Keyring
from .keys.provider import KeyProvider
from .sealed.bundle import BundleReader


def from_pretrained(
    model_cls: Any,
    path: str | os.PathLike[str],
    *,
    keyring: Keyring | None = None,
    providers: Sequence[KeyProvider] | None = None,
    trust: Trust | None = None,
    strict: bool = True,
) -> Any:
    """Like ``model_cls.from_pretrained(dir)`` for a sealed bundle (``warden seal MODEL_DIR``)."""
    from transformers import AutoConfig

    from .torch import load as torch_load

    with safe_open(path, keyring=keyring, providers=providers, trust=trust) as r:
        if not isinstance(r, BundleReader) or "config.json" not in r.files():
            raise UnsupportedModelError("a Hugging Face model needs a sealed model directory with config.json")
        cfg = json.loads(r.read_file("config.json"))
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise UnsupportedModelError("config.json has no model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    state = torch_load(path, keyring=keyring, providers=providers, trust=trust)
    model = model_cls(config) if not hasattr(model_cls, "from_config") else model_cls.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if strict and (missing or unexpected):
        raise UnsupportedModelError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    return model

"""vLLM model loader for sealed weights: ``--load-format warden``.

Installed with weightwarden, the ``vllm.general_plugins`` entry point calls :func:`register`
in every vLLM process, which registers :class:`WardenModelLoader` under the load format
``warden``::

    vllm serve /models/llama-config --load-format warden \\
        --model-loader-extra-config '{"sealed": "/models/llama.sealed", "providers": ["pkcs11:token=node;object=kek"]}'

``--model`` names a directory with the model's config and tokenizer (not secret; written by
:func:`export_config`); ``sealed`` names the sealed bundle (default: ``--model`` itself).
Extra-config keys: ``sealed``, ``providers`` (key provider URIs tried before the node's
keyring / custody agent), ``threads``, ``check_digests`` (default true).

vLLM is imported only inside :func:`register` and the loader class; the work is done by
the vLLM-free :func:`weightwarden.serving.iter_weights`.  NOT run end to end: vLLM needs
a GPU, and none was available when this was written (docs/SERVING.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import LoaderError
from ..serving import iter_weights, load_into

LOAD_FORMAT = "warden"
EXTRA_KEYS = frozenset({"sealed", "providers", "threads", "check_digests"})

__all__ = ["EXTRA_KEYS", "LOAD_FORMAT", "export_config", "register", "weights_for"]


def weights_for(model_path: str, extra: dict[str, Any] | None) -> Any:
    """The weight iterator for vLLM's ``model_config.model`` and ``model_loader_extra_config``."""
    extra = dict(extra or {})
    unknown = sorted(set(extra) - EXTRA_KEYS)
    if unknown:
        raise LoaderError(
            f"--model-loader-extra-config: unknown key(s) {unknown[:3]}; use {', '.join(sorted(EXTRA_KEYS))}"
        )
    providers = extra.get("providers") or []
    if not isinstance(providers, list) or not all(isinstance(p, str) for p in providers):
        raise LoaderError("--model-loader-extra-config: providers must be a list of key provider URIs")
    return iter_weights(
        extra.get("sealed") or model_path, provider_uris=providers, threads=extra.get("threads"),
        check_digests=bool(extra.get("check_digests", True)),
    )  # fmt: skip


def export_config(sealed: str | os.PathLike[str], out: str | os.PathLike[str], **open_kwargs: Any) -> list[Path]:
    """Write the sealed bundle's non-weight files (config, generation config, tokenizer) to ``out``,
    the directory vLLM's ``--model`` names.  Weights are never written."""
    from ..hf import aux_file_names, sealed_model_dir
    from ..sealed.bundle import safe_relpath
    from ..sealed.opening import open_reader

    out = Path(out)
    written = []
    with open_reader(sealed, **open_kwargs) as r:
        bundle = sealed_model_dir(r)
        for name in aux_file_names(bundle, None):
            target = out / safe_relpath(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(bundle.read_file(name))
            written.append(target)
    return written


def _loader_class() -> type:
    try:
        from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    except ImportError:
        raise LoaderError("--load-format warden needs vLLM installed in this environment") from None

    class WardenModelLoader(BaseModelLoader):
        """Decrypts sealed weights into the model vLLM built; nothing is downloaded or written."""

        def download_model(self, model_config: Any) -> None:
            return None  # sealed weights are local; nothing to fetch

        def load_weights(self, model: Any, model_config: Any) -> None:
            extra = getattr(self.load_config, "model_loader_extra_config", None)
            load_into(model, weights_for(model_config.model, extra), strict=True)  # as vLLM checks

    return WardenModelLoader


def register() -> None:
    """The ``vllm.general_plugins`` entry point: ``--load-format warden``."""
    try:
        from vllm.model_executor.model_loader import register_model_loader
    except ImportError:
        raise LoaderError("--load-format warden needs vLLM (a version with register_model_loader)") from None
    register_model_loader(LOAD_FORMAT)(_loader_class())

"""Hugging Face models from a sealed model directory: change one call.

    model = weightwarden.hf.from_pretrained(AutoModelForCausalLM, "llama.sealed", dtype=torch.bfloat16)
    tok = weightwarden.hf.tokenizer("llama.sealed")          # AutoTokenizer.from_pretrained's twin

Needs ``transformers`` (extra: ``weightwarden[hf]``).

Weights are decrypted into memory only (one buffer per shard, on every core) and
handed to transformers' own ``from_pretrained`` as its ``state_dict``: transformers
builds the model on the meta device and assigns those tensors (no random init, no
second copy when the dtype is kept), and applies everything it applies to a plain
directory: the keywords (``dtype``/``torch_dtype``, ``device_map``,
``attn_implementation``, ...), the model's ignore-keys and non-persistent buffers,
key renames, weight tying.

Small non-weight files (config, generation config, tokenizer, sentence-transformers
module configs) are decrypted into a private directory (mode 0700, files 0600) on a
tmpfs (``/dev/shm`` where it exists, else the temp dir), read by transformers, and
removed before the call returns.  Weight files never go there.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ._extras import require
from .errors import LoaderError, UnsupportedModelError
from .keys.protocols import KeyringLike
from .keys.provider import KeyProvider
from .sealed.bundle import BundleReader, safe_relpath
from .sealed.opening import open_reader
from .sealed.signature import Trust

#: Members that are weights (never written to the private directory).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
MAX_AUX_FILE = 64 * 1024 * 1024  # a tokenizer.json is a few MB; anything larger is not a config

__all__ = ["from_pretrained", "generation_config", "private_files", "sentence_transformer", "tokenizer"]


def _transformers() -> Any:
    return require("transformers", extra="hf")


def sealed_model_dir(r: Any) -> BundleReader:
    if not isinstance(r, BundleReader) or "config.json" not in r.files():
        raise UnsupportedModelError(
            "a Hugging Face model needs a sealed model directory with config.json (warden seal MODEL_DIR OUT)"
        )
    return r


def aux_file_names(r: BundleReader, only: Sequence[str] | None) -> list[str]:
    names = []
    for name in r.files():
        m = r.member(name)
        if m.kind == "safetensors" or name.lower().endswith(WEIGHT_SUFFIXES):
            continue
        if only is not None and name not in only:
            continue
        if m.data_len > MAX_AUX_FILE:
            continue
        names.append(name)
    return names


def _tmp_base() -> str | None:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


@contextlib.contextmanager
def private_files(r: BundleReader, only: Sequence[str] | None = None) -> Iterator[Path]:
    """The bundle's non-weight files, decrypted into a private directory that is removed on exit."""
    d = Path(tempfile.mkdtemp(prefix="weightwarden-", dir=_tmp_base()))  # mode 0700
    try:
        for name in aux_file_names(r, only):
            rel = safe_relpath(name)
            target = d / rel
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(r.read_file(name))
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def state_dict(r: BundleReader, *, threads: int | None = None, check_digests: bool = True) -> dict[str, Any]:
    """Every tensor of every shard, as torch tensors sharing one decrypted buffer per shard."""
    from .safetensors import buffer_tensor

    state: dict[str, Any] = {}
    for member in r.tensor_readers():
        buf, tensors = member.load_raw(check_digests=check_digests, threads=threads)
        for t in tensors.values():
            state[t.name] = buffer_tensor(buf, t, "pt", "cpu")
    if not state:
        raise UnsupportedModelError("the sealed model directory holds no safetensors weights")
    return state


def _concrete(model_cls: Any, cfg_dir: Path, config: Any) -> Any:
    """An Auto class resolved to the model class for this config (transformers' Auto classes need a path)."""
    mapping = getattr(model_cls, "_model_mapping", None)
    if mapping is None:
        return model_cls
    transformers = _transformers()
    _get_model_class = require("transformers.models.auto.auto_factory", "_get_model_class", extra="hf")

    if not isinstance(config, transformers.PreTrainedConfig):
        config = transformers.AutoConfig.from_pretrained(config or cfg_dir)
    try:
        return _get_model_class(config, mapping)
    except (KeyError, ValueError):
        raise UnsupportedModelError(
            f"{model_cls.__name__} has no model class for config type {type(config).__name__}"
        ) from None


def _load(
    model_cls: Any, r: BundleReader, cfg_dir: Path, state: dict[str, Any], model_args: tuple, kwargs: dict, strict: bool
) -> Any:
    transformers = _transformers()
    config = kwargs.pop("config", None)
    cls = _concrete(model_cls, cfg_dir, config)
    want_info = bool(kwargs.pop("output_loading_info", False))
    model, info = cls.from_pretrained(
        None, *model_args, config=config if config is not None else str(cfg_dir), state_dict=state,
        output_loading_info=True, **kwargs,
    )  # fmt: skip
    missing = sorted(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if strict and (missing or mismatched):
        raise UnsupportedModelError(
            f"the sealed weights do not fit {cls.__name__}: missing {missing[:5]}, mismatched {mismatched[:3]} "
            "(pass strict=False to keep the model's initial values for them)"
        )
    gen = cfg_dir / "generation_config.json"
    if gen.is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config = transformers.GenerationConfig.from_pretrained(cfg_dir)
    return (model, info) if want_info else model


def from_pretrained(
    model_cls: Any,
    path: str | os.PathLike[str],
    *model_args: Any,
    keyring: KeyringLike | None = None,
    providers: Sequence[KeyProvider] | None = None,
    trust: Trust | None = None,
    threads: int | None = None,
    check_digests: bool = True,
    strict: bool = False,
    **kwargs: Any,
) -> Any:
    """``model_cls.from_pretrained(dir, **kwargs)`` for a sealed model directory (``warden seal MODEL_DIR``).

    ``model_cls`` is a model class or an Auto class; ``kwargs`` are transformers'
    (``dtype``/``torch_dtype``, ``device_map``, ``low_cpu_mem_usage``, ``attn_implementation``,
    ``config``, ``output_loading_info``, ...).  As in transformers, parameters the checkpoint
    lacks keep their initial values (a new task head) and are reported; ``strict=True``
    refuses that instead (missing or wrongly shaped, after the model's own ignore lists).
    The generation config sealed in the same directory is attached.
    """
    with open_reader(path, keyring=keyring, providers=providers, trust=trust) as r:
        bundle = sealed_model_dir(r)
        state = state_dict(bundle, threads=threads, check_digests=check_digests)
        with private_files(bundle, only=("config.json", "generation_config.json")) as d:
            return _load(model_cls, bundle, d, state, model_args, kwargs, strict)


def _aux_loader(path: Any, keyring: KeyringLike | None, providers: Any, trust: Any, fn: Callable[[Path], Any]) -> Any:
    with (
        open_reader(path, keyring=keyring, providers=providers, trust=trust) as r,
        private_files(sealed_model_dir(r)) as d,
    ):
        return fn(d)


def tokenizer(
    path: str | os.PathLike[str],
    *,
    keyring: KeyringLike | None = None,
    providers: Sequence[KeyProvider] | None = None,
    trust: Trust | None = None,
    **kwargs: Any,
) -> Any:
    """``AutoTokenizer.from_pretrained(dir, **kwargs)`` for a sealed model directory."""
    transformers = _transformers()
    return _aux_loader(
        path, keyring, providers, trust, lambda d: transformers.AutoTokenizer.from_pretrained(d, **kwargs)
    )


def generation_config(
    path: str | os.PathLike[str],
    *,
    keyring: KeyringLike | None = None,
    providers: Sequence[KeyProvider] | None = None,
    trust: Trust | None = None,
    **kwargs: Any,
) -> Any:
    """``GenerationConfig.from_pretrained(dir)`` for a sealed model directory."""
    transformers = _transformers()
    return _aux_loader(
        path, keyring, providers, trust, lambda d: transformers.GenerationConfig.from_pretrained(d, **kwargs)
    )


# -- sentence-transformers -------------------------------------------------------------------
_SEALED: contextvars.ContextVar[Callable[..., Any] | None] = contextvars.ContextVar("weightwarden_st", default=None)


def _sealed_transformer_class() -> type:
    from ._st import Transformer

    class SealedTransformer(Transformer):
        """sentence-transformers' Transformer module whose weights come from the sealed bundle."""

        def _load_model(self, model_name_or_path: str, transformer_task: Any, config: Any, backend: str,
                        is_peft_model: bool, **model_kwargs: Any) -> Any:  # fmt: skip
            load = _SEALED.get()
            if load is None or backend != "torch" or is_peft_model:
                raise LoaderError("a sealed sentence-transformers model loads with the torch backend, without PEFT")
            from sentence_transformers.base.modules.transformer import TRANSFORMER_TASK_TO_AUTO_MODEL

            return load(TRANSFORMER_TASK_TO_AUTO_MODEL[transformer_task], config, model_kwargs)

    return SealedTransformer


def sentence_transformer(
    path: str | os.PathLike[str],
    *,
    keyring: KeyringLike | None = None,
    providers: Sequence[KeyProvider] | None = None,
    trust: Trust | None = None,
    threads: int | None = None,
    check_digests: bool = True,
    **kwargs: Any,
) -> Any:
    """``SentenceTransformer(dir, **kwargs)`` for a sealed sentence-transformers directory, whole
    (transformer, pooling, normalisation, tokenizer).  Needs ``sentence-transformers``."""
    try:
        from sentence_transformers import SentenceTransformer

        from ._st import Transformer
    except ImportError:
        raise LoaderError("sentence_transformer() needs sentence-transformers installed") from None
    if not hasattr(SentenceTransformer, "_load_with_module_classes"):
        raise LoaderError("this sentence-transformers is too old to load a sealed model (needs module_classes)")
    from sentence_transformers.util import import_from_string

    with open_reader(path, keyring=keyring, providers=providers, trust=trust) as r:
        bundle = sealed_model_dir(r)
        if "modules.json" not in bundle.files():
            raise UnsupportedModelError("a sentence-transformers model needs modules.json in the sealed directory")
        state = state_dict(bundle, threads=threads, check_digests=check_digests)
        with private_files(bundle) as d:
            sealed_cls = _sealed_transformer_class()
            classes = {}
            for entry in json.loads((d / "modules.json").read_text()):
                ref = str(entry.get("type", ""))
                with contextlib.suppress(ImportError, AttributeError, ValueError):
                    if isinstance(cls := import_from_string(ref), type) and issubclass(cls, Transformer):
                        classes[ref] = sealed_cls

            def load(auto_cls: Any, config: Any, model_kwargs: dict[str, Any]) -> Any:
                return _load(auto_cls, bundle, d, state, (), {"config": config, **model_kwargs}, False)

            token = _SEALED.set(load)
            try:
                return SentenceTransformer._load_with_module_classes(str(d), classes, **kwargs)
            finally:
                _SEALED.reset(token)


# -- Auto classes: `from weightwarden.hf import AutoModelForCausalLM, AutoTokenizer` ---------------
class SealedAuto:
    """A transformers Auto class (or model class) whose ``from_pretrained`` reads a sealed directory."""

    def __init__(self, name: str):
        self.__name__ = name
        self._name = name

    def from_pretrained(self, path: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        if self._name == "AutoTokenizer":
            return tokenizer(path, *args, **kwargs)
        if self._name == "GenerationConfig":
            return generation_config(path, *args, **kwargs)
        if self._name == "AutoConfig":
            transformers = _transformers()
            keys = {k: kwargs.pop(k) for k in ("keyring", "providers", "trust") if k in kwargs}
            return _aux_loader(
                path, keys.get("keyring"), keys.get("providers"), keys.get("trust"),
                lambda d: transformers.AutoConfig.from_pretrained(d, *args, **kwargs),
            )  # fmt: skip
        return from_pretrained(getattr(_transformers(), self._name), path, *args, **kwargs)

    def __repr__(self) -> str:
        return f"weightwarden.hf.{self._name}"


def __getattr__(name: str) -> SealedAuto:
    """``weightwarden.hf.AutoModel``, ``.AutoModelForCausalLM``, ``.LlamaForCausalLM``, ``.AutoTokenizer``, ..."""
    if name[:1].isupper():
        obj = getattr(_transformers(), name, None)
        special = name in ("AutoTokenizer", "AutoConfig", "GenerationConfig")
        model_like = hasattr(obj, "from_pretrained") and (name.startswith("AutoModel") or hasattr(obj, "config_class"))
        if obj is not None and (special or model_like):
            return SealedAuto(name)
    raise AttributeError(f"module 'weightwarden.hf' has no attribute {name!r}")

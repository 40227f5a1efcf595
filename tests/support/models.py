"""The test models: one builder of tiny Llama-shaped checkpoints (embedding, then per layer a gated MLP),
the mixed-dtype tensor set the round-trip tests seal, and a sharded model folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

__all__ = ["assert_same", "llama_tensors", "make_tensors", "sharded_model_dir", "tiny_llama_dir",
           "tiny_llama_file"]  # fmt: skip


def llama_tensors(rng: np.random.Generator, *, d: int, ff: int, layers: int, vocab: int,
                  scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
                  norms: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
    """A Llama-shaped state dict in float32: ``model.embed_tokens.weight`` (vocab x d), then per layer
    ``mlp.{gate,up,down}_proj.weight`` (standard normal divided by ``scale``) and, with ``norms``, a
    ``post_attention_layernorm.weight`` of ones.  Drawn from ``rng`` in that order."""
    sd = {"model.embed_tokens.weight": rng.standard_normal((vocab, d)).astype(np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "mlp.gate_proj.weight"] = (rng.standard_normal((ff, d)) / scale[0]).astype(np.float32)
        sd[p + "mlp.up_proj.weight"] = (rng.standard_normal((ff, d)) / scale[1]).astype(np.float32)
        sd[p + "mlp.down_proj.weight"] = (rng.standard_normal((d, ff)) / scale[2]).astype(np.float32)
        if norms:
            sd[p + "post_attention_layernorm.weight"] = np.ones(d, np.float32)
    return sd


def tiny_llama_file(path: Path, seed: int = 0, d: int = 16, ff: int = 32, layers: int = 2, vocab: int = 64) -> Path:
    """A tiny Llama-shaped safetensors file at ``path``."""
    save_file(llama_tensors(np.random.default_rng(seed), d=d, ff=ff, layers=layers, vocab=vocab), str(path))
    return path


def tiny_llama_dir(d: Path) -> Path:
    """A tiny Llama-shaped model folder (an MLP stack with enough weights to carry a fingerprint) at ``d``."""
    d.mkdir()
    sd = llama_tensors(np.random.default_rng(3), d=64, ff=256, layers=2, vocab=128, scale=(8, 8, 16))
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


def make_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """One tensor of each kind the format must carry: float16, float32, float64, bfloat16, int64, bool, an empty
    tensor, uint8."""
    rng = np.random.default_rng(seed)
    return {
        "embed.weight": rng.standard_normal((37, 16)).astype(np.float16),
        "layer.0.w": rng.standard_normal((64, 48)).astype(np.float32),
        "layer.0.b": rng.standard_normal(48).astype(np.float64),
        "bf": rng.standard_normal((5, 7)).astype(ml_dtypes.bfloat16),
        "ids": np.arange(-5, 20, dtype=np.int64),
        "mask": rng.random(13) > 0.5,
        "empty": np.zeros((0, 4), np.float32),
        "u8": rng.integers(0, 255, 99, dtype=np.uint8),
    }


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def sharded_model_dir(root: Path, tensors: dict[str, Any]) -> Path:
    """A model folder at ``root/model``: ``tensors`` in two shards, an index, a config and a tokenizer file."""
    d = root / "model"
    (d / "tokenizer").mkdir(parents=True)
    half = sorted(tensors)
    save_file({k: tensors[k] for k in half[:4]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in half[4:]}, str(d / "model-00002-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (d / "config.json").write_text('{"model_type": "toy", "hidden_size": 16}')
    (d / "tokenizer" / "vocab.txt").write_text("a\nb\nc\n")
    return d

"""The test models: one builder of tiny Llama-shaped checkpoints (embedding, then per layer a gated MLP),
the mixed-dtype tensor set the round-trip tests seal, and a sharded model folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

__all__ = ["assert_same", "attn_llama_tensors", "fold_and_rotate", "llama_tensors", "make_tensors",
           "sharded_model_dir", "tiny_llama_dir", "tiny_llama_file"]  # fmt: skip


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


def attn_llama_tensors(rng: np.random.Generator, *, d: int, ff: int, layers: int, vocab: int,
                       heads: int = 4) -> dict[str, np.ndarray]:  # fmt: skip
    """A fuller Llama state dict in float32: embedding, per layer attention (q, k, v, o), gated MLP and both
    RMSNorm scales (uniform in [0.5, 1.5], so that folding them changes the weights), the final norm and an
    untied ``lm_head``."""
    f = np.float32
    sd = {"model.embed_tokens.weight": rng.standard_normal((vocab, d)).astype(f)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in "qkvo":
            sd[p + f"self_attn.{n}_proj.weight"] = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(f)
        sd[p + "mlp.gate_proj.weight"] = (rng.standard_normal((ff, d)) / np.sqrt(d)).astype(f)
        sd[p + "mlp.up_proj.weight"] = (rng.standard_normal((ff, d)) / np.sqrt(d)).astype(f)
        sd[p + "mlp.down_proj.weight"] = (rng.standard_normal((d, ff)) / np.sqrt(ff)).astype(f)
        sd[p + "input_layernorm.weight"] = rng.uniform(0.5, 1.5, d).astype(f)
        sd[p + "post_attention_layernorm.weight"] = rng.uniform(0.5, 1.5, d).astype(f)
    sd["model.norm.weight"] = rng.uniform(0.5, 1.5, d).astype(f)
    sd["lm_head.weight"] = (rng.standard_normal((vocab, d)) / np.sqrt(d)).astype(f)
    return sd


def fold_and_rotate(sd: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The function-preserving attack of issue 21 on an :func:`attn_llama_tensors` state dict: every RMSNorm
    scale folded into the matrices that read its output (the norms become ones), then the residual stream
    multiplied by a random orthogonal Q: readers W -> W Q, writers W -> Q^T W, embedding E -> E Q."""
    out = {k: v.astype(np.float64) for k, v in sd.items()}
    d = out["model.embed_tokens.weight"].shape[1]
    q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    layers = sorted({int(k.split(".")[2]) for k in out if k.startswith("model.layers.")})
    folds = [(f"model.layers.{i}.input_layernorm.weight",
               [f"model.layers.{i}.self_attn.{n}_proj.weight" for n in "qkv"]) for i in layers]  # fmt: skip
    folds += [
        (
            f"model.layers.{i}.post_attention_layernorm.weight",
            [f"model.layers.{i}.mlp.gate_proj.weight", f"model.layers.{i}.mlp.up_proj.weight"],
        )
        for i in layers
    ]
    folds.append(("model.norm.weight", ["lm_head.weight"]))
    for norm, readers in folds:
        for r in readers:
            out[r] = out[r] * out[norm][None, :] @ q
        out[norm] = np.ones(d)
    out["model.embed_tokens.weight"] = out["model.embed_tokens.weight"] @ q
    for i in layers:
        for w in (f"model.layers.{i}.self_attn.o_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"):
            out[w] = q.T @ out[w]
    return {k: v.astype(np.float32) for k, v in out.items()}


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

"""A tiny Llama-shaped language model in plain numpy, for `make demo` (no torch needed).

Characters in, next character out: token embedding ``model.embed_tokens.weight``, then per layer a
gated MLP on the residual stream (``model.layers.{i}.mlp.{gate,up,down}_proj.weight``, SiLU),
then ``lm_head.weight``.  The tensor names and shapes are Llama's, so every weightwarden tool
(provenance, release fingerprints, trace, classification) treats it like a real checkpoint.
Training is manual backpropagation with Adam; every random draw comes from the caller's ``rng``.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np

from weightwarden._extras import require

VOCAB, D, FF, LAYERS = 128, 128, 512, 2

Params = dict[str, np.ndarray]


def text_ids(module: object) -> np.ndarray:
    """The source of a standard-library module as ASCII codes (text that ships with Python)."""
    raw = inspect.getsource(module).encode("ascii", "replace")  # type: ignore[arg-type]
    return np.minimum(np.frombuffer(raw, np.uint8), VOCAB - 1).astype(np.int64)


def init(rng: np.random.Generator) -> Params:
    p = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, D)) * 0.5,
         "lm_head.weight": rng.standard_normal((VOCAB, D)) * 0.02}  # fmt: skip
    for i in range(LAYERS):
        p[f"model.layers.{i}.mlp.gate_proj.weight"] = rng.standard_normal((FF, D)) / np.sqrt(D)
        p[f"model.layers.{i}.mlp.up_proj.weight"] = rng.standard_normal((FF, D)) / np.sqrt(D)
        p[f"model.layers.{i}.mlp.down_proj.weight"] = rng.standard_normal((D, FF)) / np.sqrt(FF) * 0.5
    return {k: v.astype(np.float32) for k, v in p.items()}


def _forward(p: Params, x: np.ndarray) -> tuple[np.ndarray, list[tuple[np.ndarray, ...]]]:
    h = p["model.embed_tokens.weight"][x]
    cache = []
    for i in range(LAYERS):
        a = h @ p[f"model.layers.{i}.mlp.gate_proj.weight"].T
        b = h @ p[f"model.layers.{i}.mlp.up_proj.weight"].T
        sig = 1.0 / (1.0 + np.exp(-a))
        s = a * sig * b
        cache.append((h, a, b, sig, s))
        h = h + s @ p[f"model.layers.{i}.mlp.down_proj.weight"].T
    return h, cache


def loss(p: Params, ids: np.ndarray) -> float:
    """Mean next-character loss (nats) over ``ids``."""
    h, _ = _forward(p, ids[:-1])
    z = h @ p["lm_head.weight"].T
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def train(p: Params, ids: np.ndarray, steps: int, rng: np.random.Generator, *, lr: float = 3e-3,
          batch: int = 512, on_step=None) -> Params:  # fmt: skip
    """``steps`` Adam steps on random batches of next-character pairs from ``ids``; returns new params."""
    p = {k: v.copy() for k, v in p.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t in range(1, steps + 1):
        j = rng.integers(0, len(ids) - 1, batch)
        x, y = ids[j], ids[j + 1]
        h, cache = _forward(p, x)
        z = h @ p["lm_head.weight"].T
        z = np.exp(z - z.max(1, keepdims=True))
        z /= z.sum(1, keepdims=True)
        z[np.arange(batch), y] -= 1.0
        dz = z / batch
        g: Params = {"lm_head.weight": dz.T @ h}
        dh = dz @ p["lm_head.weight"]
        for i in reversed(range(LAYERS)):
            hin, a, b, sig, s = cache[i]
            wd = p[f"model.layers.{i}.mlp.down_proj.weight"]
            g[f"model.layers.{i}.mlp.down_proj.weight"] = dh.T @ s
            ds = dh @ wd
            silu = a * sig
            da = ds * b * sig * (1 + a * (1 - sig))
            db = ds * silu
            g[f"model.layers.{i}.mlp.gate_proj.weight"] = da.T @ hin
            g[f"model.layers.{i}.mlp.up_proj.weight"] = db.T @ hin
            dh = dh + da @ p[f"model.layers.{i}.mlp.gate_proj.weight"] + db @ p[f"model.layers.{i}.mlp.up_proj.weight"]
        ge = np.zeros_like(p["model.embed_tokens.weight"])
        np.add.at(ge, x, dh)
        g["model.embed_tokens.weight"] = ge
        for k in p:
            m[k] = 0.9 * m[k] + 0.1 * g[k]
            v2[k] = 0.999 * v2[k] + 0.001 * g[k] * g[k]
            mh, vh = m[k] / (1 - 0.9**t), v2[k] / (1 - 0.999**t)
            p[k] -= (lr * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
        if on_step is not None:
            on_step()
    return p


def int4_round_trip(p: Params, group: int = 32) -> Params:
    """Symmetric 4-bit quantisation per group of ``group`` weights along each matrix row, and back."""
    out = {}
    for k, w in p.items():
        g = w.reshape(-1, group)
        scale = np.maximum(np.abs(g).max(1, keepdims=True) / 7.0, 1e-12)
        out[k] = (np.clip(np.round(g / scale), -8, 7) * scale).reshape(w.shape).astype(np.float32)
    return out


def save(p: Params, folder: Path, **card: object) -> Path:
    """A Hugging Face-style folder: model.safetensors and a config.json (``card``: model-card fields
    such as ``training_tokens``)."""
    save_file = require("safetensors.numpy", "save_file", extra="provenance")

    folder.mkdir(parents=True, exist_ok=True)
    save_file(p, str(folder / "model.safetensors"), metadata={"format": "np"})
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": D,
           "intermediate_size": FF, "num_hidden_layers": LAYERS, "hidden_act": "silu", **card}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def load(folder: Path) -> Params:
    load_file = require("safetensors.numpy", "load_file", extra="provenance")

    return {k: v.astype(np.float32) for k, v in load_file(str(Path(folder) / "model.safetensors")).items()}

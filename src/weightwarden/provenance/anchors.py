"""Anchor rows beyond the embedding, for aligning residual streams when the vocabulary is small.

A function-preserving rotation of the residual stream (norm scales folded into the matrices that
read it, then ``W -> W Q`` for readers and ``W -> Q^T W`` for writers) moves every residual-facing
vector by the same orthogonal ``Q``.  The embedding rows are one set of such vectors; with fewer
than ``2 x d_model`` of them the Procrustes fit is too loose.  The checkpoint offers more whose
correspondence is fixed by position: the output embedding (``lm_head``, untied models, final norm
folded in), and per layer the attention's query/key/value rows (input norm folded in) and its output
projection's columns.  :func:`anchor_tensors` names them (Llama-family names; other layouts offer
none), :func:`sample_anchors` takes a seeded sample of their rows for a signature, and
:func:`read_anchors` reads the same rows of a suspect.  Rows are unit length, so every anchor weighs
the same in the fit.
"""

from __future__ import annotations

import math
import re

import numpy as np

from .layout import Layout
from .source import TensorSource

__all__ = ["anchor_tensors", "read_anchors", "sample_anchors"]

_EPS = 1e-12
_ATTN = re.compile(r"^(?P<pre>(?:[\w.]*\.)?)layers\.(?P<i>\d+)\.self_attn\.(?P<p>[qkvo])_proj\.weight$")


def anchor_tensors(shapes: dict[str, tuple[int, ...]], layout: Layout) -> dict[str, tuple[str, bool, str | None]]:
    """role -> (tensor name, rows: True when its rows are residual vectors / False for columns, norm to fold).

    Roles (``lm_head``, ``L<i>.q`` ... ``L<i>.o``) are the same in any two checkpoints of the family, so a
    reference's sampled rows find their suspect counterparts by role and index."""
    d = layout.d_model
    out: dict[str, tuple[str, bool, str | None]] = {}
    for name in sorted(shapes):
        m = _ATTN.match(name)
        if not m or len(shapes[name]) != 2:
            continue
        p, pre, i = m["p"], m["pre"], m["i"]
        if p == "o":
            if shapes[name][0] == d:
                out[f"L{i}.o"] = (name, False, None)
        elif shapes[name][1] == d:
            norm = f"{pre}layers.{i}.input_layernorm.weight"
            out[f"L{i}.{p}"] = (name, True, norm if shapes.get(norm) == (d,) else None)
    head = "lm_head.weight"
    if head in shapes and len(shapes[head]) == 2 and shapes[head][1] == d and head != layout.embedding:
        pre = layout.embedding.rsplit("embed_tokens", 1)[0] if layout.embedding else "model."
        final = next((n for n in (f"{pre}norm.weight", "model.norm.weight") if shapes.get(n) == (d,)), None)
        out["lm_head"] = (head, True, final)
    return out


def _rows(src: TensorSource, spec: tuple[str, bool, str | None], idx: np.ndarray) -> np.ndarray:
    name, rows, norm = spec
    w = (src.get(name, rows=idx) if rows else src.get(name, cols=idx).T).astype(np.float64)
    if norm is not None:  # in float64: a hostile checkpoint's finite float32 extremes overflow no product here
        w = w * src.get(norm)
    with np.errstate(over="ignore", invalid="ignore"):
        w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), _EPS)
    w[~np.isfinite(w).all(axis=1)] = 0.0  # a row still not finite weighs nothing in the fit
    return w


def sample_anchors(src: TensorSource, layout: Layout, rng: np.random.Generator,
                   target: int | None = None) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:  # fmt: skip
    """(roles, ids (n, 2): role index and row, rows (n, d) float16): about ``target`` (default
    ``4 x d_model``) rows spread evenly over the anchor tensors, drawn from ``rng``."""
    specs = anchor_tensors(src.shapes, layout)
    d = layout.d_model
    if not specs:
        return (), np.zeros((0, 2), np.int64), np.zeros((0, d), np.float16)
    per = math.ceil((target or 4 * d) / len(specs))
    roles, ids, rows = [], [], []
    for k, (role, spec) in enumerate(specs.items()):
        n = src.shapes[spec[0]][0 if spec[1] else 1]
        idx = np.sort(rng.choice(n, size=min(n, per), replace=False)).astype(np.int64)
        roles.append(role)
        ids.append(np.stack([np.full(len(idx), k, np.int64), idx], axis=1))
        rows.append(_rows(src, spec, idx).astype(np.float16))
    return tuple(roles), np.concatenate(ids), np.concatenate(rows)


def read_anchors(src: TensorSource, layout: Layout, roles: tuple[str, ...],
                 ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(mask, rows): which of the reference's anchor rows ``ids`` the suspect has (same role, index in range,
    same width), and those rows of the suspect, unit length, norms folded."""
    specs = anchor_tensors(src.shapes, layout)
    mask = np.zeros(len(ids), bool)
    out = np.zeros((len(ids), layout.d_model), np.float32)
    for k, role in enumerate(roles):
        sel = np.flatnonzero(ids[:, 0] == k)
        if role not in specs or not len(sel):
            continue
        spec = specs[role]
        n = src.shapes[spec[0]][0 if spec[1] else 1]
        sel = sel[ids[sel, 1] < n]
        if len(sel):
            out[sel] = _rows(src, spec, ids[sel, 1])
            mask[sel] = True
    return mask, out

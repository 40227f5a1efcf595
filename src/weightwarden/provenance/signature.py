"""Compact provenance signatures: what a registry keeps of a protected model.

A signature holds, per MLP block, the unit-normalised input and output weight
vectors of a seeded random sample of at most ``max_units`` hidden units (norm
scales folded in, magnitudes dropped, stored as float16), a seeded sample of at
most ``max_tokens`` embedding rows (to align residual streams), and a small
sketch for fast retrieval.  For any model beyond toy size this is well under 1%
of its parameters and is not a runnable model; it is enough for the test in
:mod:`weightwarden.provenance.compare`.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._extras import require
from ..errors import FormatError, UnsupportedModelError
from .anchors import sample_anchors
from .layout import Block, Layout, detect_layout
from .source import TensorSource, open_source

__all__ = ["BlockSignature", "Signature", "extract_signature", "sketch_from_embedding", "unit_rows"]

SIG_VERSION = 1
SKETCH_TOKENS = tuple(range(0, 1024, 16))  # 64 token ids every vocabulary this tool reads has
SKETCH_DIM = 256
_EPS = 1e-12
_SKETCH_ROWS = 256
_EMBED_CHUNK = 512  # embedding rows read (as float32) at a time


@dataclass(frozen=True)
class BlockSignature:
    index: int
    units: int
    unit_ids: np.ndarray  # (m,) int64, positions in the pooled unit list
    in_vecs: np.ndarray  # (m, d) float16, unit norm
    out_vecs: np.ndarray  # (m, d) float16, unit norm


@dataclass(frozen=True)
class Signature:
    family: str
    d_model: int
    vocab: int
    token_ids: np.ndarray  # (K,) int64
    embed_rows: np.ndarray  # (K, d) float16
    blocks: tuple[BlockSignature, ...]
    sketch: np.ndarray  # (SKETCH_DIM,) float32, unit norm (zeros: no embedding)
    meta: dict[str, Any] = field(default_factory=dict)
    # more residual-facing rows (provenance.anchors), kept only when the vocabulary is under 2 x d_model
    anchor_roles: tuple[str, ...] = ()
    anchor_ids: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # (n, 2): role, row
    anchor_rows: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float16))  # (n, d), unit norm

    # -- serialisation (safetensors with the scalars in its metadata) ------------------
    def to_bytes(self) -> bytes:
        save = require("safetensors.numpy", "save", extra="provenance")

        tensors = {"token_ids": self.token_ids, "embed_rows": self.embed_rows, "sketch": self.sketch}
        for b in self.blocks:
            tensors[f"b{b.index}.unit_ids"] = b.unit_ids
            tensors[f"b{b.index}.in"] = b.in_vecs
            tensors[f"b{b.index}.out"] = b.out_vecs
        if self.anchor_roles:
            tensors["anchor_ids"], tensors["anchor_rows"] = self.anchor_ids, self.anchor_rows
        head = {
            "version": SIG_VERSION,
            "family": self.family,
            "d_model": self.d_model,
            "vocab": self.vocab,
            "blocks": [[b.index, b.units] for b in self.blocks],
            "meta": self.meta,
            **({"anchors": list(self.anchor_roles)} if self.anchor_roles else {}),
        }
        return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={"warden_sig": json.dumps(head)})

    @classmethod
    def from_bytes(cls, data: bytes) -> Signature:
        SafetensorError = require("safetensors", "SafetensorError", extra="provenance")
        load = require("safetensors.numpy", "load", extra="provenance")

        try:
            t = load(data)
            (hlen,) = struct.unpack("<Q", data[:8])
            head = json.loads(json.loads(data[8 : 8 + hlen])["__metadata__"]["warden_sig"])
            if head.get("version") != SIG_VERSION:
                raise FormatError(f"unsupported signature version {head.get('version')!r}")
            blocks = tuple(
                BlockSignature(int(i), int(n), t[f"b{i}.unit_ids"], t[f"b{i}.in"], t[f"b{i}.out"])
                for i, n in head["blocks"]
            )
            d = int(head["d_model"])
            k = t["token_ids"].shape
            if len(k) != 1 or t["embed_rows"].shape not in ((k[0], d), (0, d)) or t["sketch"].shape != (SKETCH_DIM,):
                raise FormatError("signature embedding shapes disagree")
            for b in blocks:
                m = b.unit_ids.shape
                if len(m) != 1 or b.in_vecs.shape != (m[0], d) or b.out_vecs.shape != (m[0], d) or b.units < m[0]:
                    raise FormatError("signature block shapes disagree")
            roles = tuple(str(r) for r in head.get("anchors", ()))
            anchors: dict[str, Any] = {}
            if roles:
                ai, ar = t["anchor_ids"], t["anchor_rows"]
                if (
                    ai.ndim != 2
                    or ai.shape[1] != 2
                    or ar.shape != (len(ai), d)
                    or not ((ai[:, 0] >= 0) & (ai[:, 0] < len(roles)) & (ai[:, 1] >= 0)).all()
                    or not np.isfinite(ar).all()
                ):
                    raise FormatError("signature anchor shapes disagree")
                anchors = {"anchor_roles": roles, "anchor_ids": ai.astype(np.int64), "anchor_rows": ar}
            return cls(head["family"], d, int(head["vocab"]), t["token_ids"], t["embed_rows"], blocks, t["sketch"],
                       dict(head.get("meta", {})), **anchors)  # fmt: skip
        except (SafetensorError, KeyError, ValueError, TypeError, struct.error) as e:
            raise FormatError(f"not a provenance signature ({type(e).__name__})") from None


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row of ``x`` scaled to unit length (rows near zero stay near zero; a row whose length overflows, a
    hostile checkpoint's extremes, or that is not finite becomes zero: it matches nothing)."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        out[bad] = 0.0
    return out


def iter_units(
    src: TensorSource, block: Block, view: str, ids: np.ndarray | None = None, chunk: int = 2048
) -> Iterator[np.ndarray]:
    """Yield, in order, float32 blocks of the pooled units' input (``view='in'``, with the norm scale
    folded in) or output vectors, one row per unit, all units or only ``ids``.  Only one source tensor
    is touched at a time and each float copy is at most ``chunk`` units."""
    gamma = src.get(block.norm) if (view == "in" and block.norm) else None
    base = 0
    for e in block.experts:
        name, units_first = (e.in_name, e.in_units_first) if view == "in" else (e.out_name, e.out_units_first)
        n = src.shapes[name][0 if units_first else 1]
        sel = np.arange(n) if ids is None else ids[(ids >= base) & (ids < base + n)] - base
        for s in range(0, len(sel), chunk):
            ids_part = sel[s : s + chunk]
            part = ids_part if ids is not None else slice(int(ids_part[0]), int(ids_part[-1]) + 1)
            w = src.get(name, rows=part) if units_first else src.get(name, cols=part).T
            yield w * gamma if gamma is not None else w
        base += n


def read_units(src: TensorSource, block: Block, view: str, ids: np.ndarray | None = None) -> np.ndarray:
    parts = list(iter_units(src, block, view, ids))
    return np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


def sketch_from_embedding(rows_by_id: dict[int, np.ndarray] | None) -> np.ndarray:
    """A residual-basis-invariant sketch: the cosine Gram matrix of fixed tokens, randomly projected."""
    if not rows_by_id:
        return np.zeros(SKETCH_DIM, np.float32)
    k = len(SKETCH_TOKENS)
    d = len(next(iter(rows_by_id.values())))
    x = np.zeros((k, d), np.float32)
    present = np.zeros(k, bool)
    for j, tid in enumerate(SKETCH_TOKENS):
        if tid in rows_by_id:
            x[j], present[j] = rows_by_id[tid], True
    x -= x[present].mean(axis=0) if present.any() else 0
    x[~present] = 0
    g = unit_rows(x) @ unit_rows(x).T
    iu = np.triu_indices(k, 1)
    v = g[iu].astype(np.float32)
    # the fixed random projection, drawn a slice of rows at a time (same stream as one draw)
    proj_rng = np.random.default_rng(20261128)
    s = np.zeros(SKETCH_DIM, np.float32)
    for a in range(0, len(v), _SKETCH_ROWS):
        part = v[a : a + _SKETCH_ROWS]
        s += part @ proj_rng.standard_normal((len(part), SKETCH_DIM)).astype(np.float32)
    return (s / max(float(np.linalg.norm(s)), _EPS)).astype(np.float32)


def embedding_sample(src: TensorSource, layout: Layout, ids: np.ndarray) -> np.ndarray:
    return src.get(layout.embedding, rows=ids) if layout.embedding else np.zeros((0, layout.d_model), np.float32)


def iter_embedding(src: TensorSource, layout: Layout, ids: np.ndarray) -> Iterator[np.ndarray]:
    """The embedding rows ``ids`` as float32 blocks of at most ``_EMBED_CHUNK`` rows, in order."""
    if not layout.embedding:
        return
    for a in range(0, len(ids), _EMBED_CHUNK):
        yield src.get(layout.embedding, rows=ids[a : a + _EMBED_CHUNK])


def suspect_sketch(src: TensorSource, layout: Layout) -> np.ndarray:
    if not layout.embedding:
        return np.zeros(SKETCH_DIM, np.float32)
    v = src.shapes[layout.embedding][0]
    ids = np.array([t for t in SKETCH_TOKENS if t < v], dtype=np.int64)
    rows = src.get(layout.embedding, rows=ids)
    return sketch_from_embedding(dict(zip(ids.tolist(), rows, strict=True)))


def extract_signature(
    model: str | os.PathLike[str] | TensorSource,
    *,
    max_units: int = 256,
    max_tokens: int = 4096,
    rng: np.random.Generator | int | None = 0,
    meta: dict[str, Any] | None = None,
    **open_kw: Any,
) -> Signature:
    """Read ``model`` one tensor at a time and return its signature."""
    rng = np.random.default_rng(rng)
    own = not isinstance(model, TensorSource)
    src = open_source(model, **open_kw)
    try:
        layout = detect_layout(src.shapes)
        vocab = src.shapes[layout.embedding][0] if layout.embedding else 0
        k = min(vocab, max_tokens)
        token_ids = np.sort(rng.choice(vocab, size=k, replace=False)).astype(np.int64) if k else np.zeros(0, np.int64)
        emb = np.zeros((len(token_ids) if layout.embedding else 0, layout.d_model), np.float16)
        at = 0
        for part in iter_embedding(src, layout, token_ids):
            emb[at : at + len(part)] = part
            at += len(part)
        blocks = []
        for b in layout.blocks:
            n = layout.units(src.shapes, b)
            m = min(n, max_units)
            ids = np.sort(rng.choice(n, size=m, replace=False)).astype(np.int64)
            vin = unit_rows(read_units(src, b, "in", ids)).astype(np.float16)
            vout = unit_rows(read_units(src, b, "out", ids)).astype(np.float16)
            blocks.append(BlockSignature(b.index, n, ids, vin, vout))
        sketch = suspect_sketch(src, layout)
        anchors: dict[str, Any] = {}
        if len(token_ids) < 2 * layout.d_model:  # too few embedding rows to fit a rotation: keep more anchors
            roles, a_ids, a_rows = sample_anchors(src, layout, rng)
            if roles:
                anchors = {"anchor_roles": roles, "anchor_ids": a_ids, "anchor_rows": a_rows}
        info = {"params": int(sum(int(np.prod(s)) for s in src.shapes.values())), "source": Path(src.path).name}
        info.update(meta or {})
        if not np.isfinite(emb).all() or any(not np.isfinite(b.in_vecs).all() for b in blocks):
            raise UnsupportedModelError("checkpoint holds non-finite weights")
        if anchors and not np.isfinite(anchors["anchor_rows"]).all():
            raise UnsupportedModelError("checkpoint holds non-finite weights")
        return Signature(layout.family, layout.d_model, vocab, token_ids, emb, tuple(blocks),
                         sketch, info, **anchors)  # fmt: skip
    finally:
        if own:
            src.close()

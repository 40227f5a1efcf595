"""Keyed spread-spectrum embedding of a Tardos codeword into MLP weights, and non-blind extraction.

Every weight of every MLP input/output matrix whose magnitude is at least the tensor's median (the
half that magnitude pruning keeps) carries one chip: a keyed symbol index s(k) in [0, ell) and a
keyed sign c(k) in {-1, +1}.  Chip layout 2: each 32-bit word of an AES-256-CTR keystream keyed per
tensor gives 16 weights, 64 apart within a block of 1024, one symbol (its top 16 bits) and a sign each
(its low 16 bits; `_kernel` has the exact map).  Recipient x's copy is
``w + alpha * std(W) * c(k) * (2 x[s(k)] - 1)``.  Extraction aligns the suspect to the original
(residual basis from the embeddings, or from every anchor when the vocabulary is small, a folded norm
divided back out; hidden units by Hungarian matching, per-unit rescaling undone), takes out a blend toward
the public base when one is given, subtracts the original, and correlates the difference with the chips of
each symbol.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._extras import require
from ..errors import UnsupportedModelError
from ..provenance.compare import align_residual, compare_many
from ..provenance.layout import Block, Expert, Layout, detect_layout
from ..provenance.signature import extract_signature, unit_rows
from ..provenance.source import TensorSource, open_source
from ._kernel import (
    _BF16,
    BLOCK,
    MAX_SYMBOLS,
    accumulate_chunk,
    chip_signs,
    chip_symbols,
    chip_table,
    embed_chunk,
    words_for,
)
from .tardos import _keystream_u32

__all__ = ["DEFAULT_ALPHA", "Extraction", "embed_tensors", "extract", "marked_tensors"]

DEFAULT_ALPHA = 0.01
_EPS = 1e-12


def marked_tensors(layout: Layout) -> list[tuple[str, bool]]:
    """(tensor name, units_first) of every matrix that carries the mark."""
    out = []
    for b in layout.blocks:
        for e in b.experts:
            out.append((e.in_name, e.in_units_first))
            out.append((e.out_name, e.out_units_first))
    return out


def _chips(key: bytes, name: str, n: int, ell: int) -> tuple[np.ndarray, np.ndarray]:
    """(symbol index, sign) of each of the n chips of tensor ``name``, as the spec writes them."""
    u = _keystream_u32(_tensor_key(key, name), 0, words_for(n))
    return chip_symbols(u, n, ell), chip_signs(u, n)


_RUN, _RUNS = 1 << 9, 1 << 6  # spread and median from 64 evenly spaced runs of 512 consecutive weights
_CHUNK = 1 << 18  # weights embedded at a time: every temporary stays in the CPU cache


def _stats(w: np.ndarray) -> tuple[float, float]:
    """(standard deviation, median |w|) of a tensor in its natural order: of all its weights when it has at
    most 2^15, else of 64 runs of 512 consecutive weights starting at (j * (n - 512)) // 63 for
    j = 0..63.  The median of m values is the (m // 2)-th smallest (from 0).  The same numbers at release
    and at trace time, from at most 2^15 weights of any tensor (a strided sample would touch every cache
    line of the tensor; a larger one costs a quarter of a copy's time in allocations alone).  Non-finite
    values are left out."""
    flat = w.reshape(-1)
    n = flat.size
    if n <= _RUN * _RUNS:
        s = flat
    else:
        starts = (np.arange(_RUNS, dtype=np.int64) * (n - _RUN)) // (_RUNS - 1)
        s = np.concatenate([flat[a : a + _RUN] for a in starts.tolist()])
    # bfloat16 widens exactly by a shift (faster than ml_dtypes' cast); other dtypes by a cast
    s = (s.view(np.uint16).astype(np.uint32) << 16).view(np.float32) if s.dtype == _BF16 else s.astype(np.float32)
    s = s[np.isfinite(s)]  # a NaN or an infinity (never a carrier) must not poison the spread
    if not s.size:
        return 0.0, 0.0
    a = np.abs(s)
    return float(s.astype(np.float64).std()), float(np.partition(a, a.size // 2)[a.size // 2])


def embed_tensors(tensors: dict[str, np.ndarray], layout: Layout, codeword: np.ndarray, key: bytes,
                  alpha: float = DEFAULT_ALPHA, names: set[str] | None = None,
                  kernel: str | None = None, inplace: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
    """Return copies of the marked tensors (same dtypes) carrying ``codeword``; other tensors untouched.
    ``names`` restricts the work to the marked tensors present (one shard of a checkpoint).
    ``inplace``: mark the given (C-contiguous, writable) arrays themselves and return them, no copy (a
    master decrypted into fresh memory; the kernels are elementwise, each weight read before written).

    One pass over each tensor in cache-sized chunks (chip layout 2, `_kernel`): a carrier moves by
    +-alpha*std.  ``kernel`` ("numba" or "numpy") overrides the inner loop chosen at import
    (`_kernel.KERNEL`)."""
    from concurrent.futures import ThreadPoolExecutor

    ell = len(codeword)
    if not 0 < ell <= MAX_SYMBOLS:
        raise ValueError(f"chip layout 2 takes codes of 1 to {MAX_SYMBOLS} symbols")
    out, jobs = {}, []
    for name, _ in marked_tensors(layout):
        if names is not None and name not in names:
            continue
        w = tensors[name]
        if inplace and not (w.flags.c_contiguous and w.flags.writeable):
            raise ValueError(f"tensor {name[:64]!r} cannot be marked in place (not contiguous and writable)")
        src = np.ascontiguousarray(w).reshape(-1)
        std, thr = _stats(src)
        res = src if inplace else np.empty(src.shape, src.dtype)
        run = functools.partial(_embed_span, src, res, tkey=_tensor_key(key, name),
                                tab=chip_table(codeword, alpha * std), ell=ell, thr=thr, kernel=kernel)  # fmt: skip
        # threads take runs of 8 chunks, of every tensor at once (kernels and AES drop the GIL)
        jobs += [functools.partial(run, a, min(src.size, a + _CHUNK * 8)) for a in range(0, src.size, _CHUNK * 8)]
        out[name] = w if inplace else res.reshape(w.shape)
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        list(pool.map(lambda job: job(), jobs))
    return out


def _embed_span(src: np.ndarray, res: np.ndarray, start: int, end: int, tkey: bytes, tab: np.ndarray, ell: int,
                thr: float, kernel: str | None) -> None:  # fmt: skip
    """res[start:end] = src + chips, from the tensor's keystream at word ``start`` (a multiple of 4)."""
    for a, b, words in _keystream_chunks(tkey, start, end):
        embed_chunk(src[a:b], words, tab, ell, thr, res[a:b], kernel)


def _tensor_key(key: bytes, name: str) -> bytes:
    """The AES key of tensor ``name``'s chip keystream (layout 2)."""
    return hmac.new(key, b"chips/2|" + name.encode(), hashlib.sha256).digest()


def _keystream_chunks(tkey: bytes, start: int, end: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(a, b, the keystream words of weights a..b-1) for cache-sized chunks of [start, end) (start a
    multiple of the 1024-weight block), all in one reused buffer: each chunk's words are valid until the
    next is yielded."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if start % BLOCK:
        raise ValueError("chip keystream offsets are whole blocks")
    enc = Cipher(algorithms.AES(tkey), modes.CTR((words_for(start) // 4).to_bytes(16, "big"))).encryptor()
    zeros = bytes(4 * words_for(_CHUNK))
    buf = bytearray(len(zeros) + 15)  # update_into wants room for a block more
    u = np.frombuffer(buf, dtype="<u4", count=words_for(_CHUNK))
    for a in range(start, end, _CHUNK):
        b = min(end, a + _CHUNK)
        m = words_for(b - a)  # whole blocks: a multiple of 4 words, so the next chunk starts on an AES block
        enc.update_into(zeros[: 4 * m], buf)
        yield a, b, u[:m]


@dataclass(frozen=True)
class Extraction:
    corr: np.ndarray  # per symbol: sum over its chips of (aligned suspect - original) * chip / (alpha std)
    chips: np.ndarray  # per symbol: chips that contributed
    blocks: int  # original blocks aligned to a suspect block
    var: np.ndarray | None = None  # per symbol: sum of chip weights (the variance of corr under noise)
    base_share: float | None = None  # with a base: median fitted share of the base in the suspect's tensors

    def symbols(self) -> tuple[np.ndarray, np.ndarray]:
        """(y, weight): the sign of each symbol's matched-filter correlation, and its reliability |z|
        (corr over its standard deviation under the estimated noise), capped at 3x its median so that
        no symbol dominates.  Symbols without chips weigh 0."""
        y = self.corr > 0
        var = self.var if self.var is not None else self.chips.astype(np.float64)
        z = np.abs(self.corr) / np.sqrt(np.maximum(var, _EPS))
        z[self.chips == 0] = 0.0
        cap = 3 * float(np.median(z[z > 0])) if np.any(z > 0) else 1.0
        return y, np.minimum(z, cap)


def _unit_major(src: TensorSource, e: Expert, view: str) -> np.ndarray:
    name, units_first = (e.in_name, e.in_units_first) if view == "in" else (e.out_name, e.out_units_first)
    w = src.get(name)
    return w if units_first else np.ascontiguousarray(w.T)


def _norm(src: TensorSource, block: Block) -> np.ndarray | None:
    """The norm scale the block's input weights read through, or None when there is none or it is all ones
    (folded into the weights, as a rotation of the residual stream requires)."""
    if block.norm is None:
        return None
    g = src.get(block.norm)
    return None if np.allclose(g, 1.0) else g


def _from_unit_major(u: np.ndarray, units_first: bool) -> np.ndarray:
    return u if units_first else u.T


def _units(src: TensorSource, block: Block, view: str) -> Iterator[tuple[Expert, np.ndarray]]:
    for e in block.experts:
        yield e, _unit_major(src, e, view)


_MATCH_COLS = 512  # coordinates the unit matching compares (evenly spaced) when units are longer
_MATCH_ROWS = 1024  # original units compared at a time


def _match(orig: np.ndarray, sus: np.ndarray) -> np.ndarray:
    """Suspect unit for each original unit (-1: none): the identity if it already fits; else each unit's
    best |cos| partner when that is a one-to-one map (it is then the optimal assignment), else Hungarian
    on |cos|.  Cosines of units longer than 512 are taken over 512 evenly spaced coordinates: enough to
    tell a unit's partner from the rest, at O(units^2 * 512) for any width."""
    a, b = unit_rows(orig), unit_rows(sus)  # a suspect unit that overflowed (hostile extremes) is zero
    if len(a) == len(b) and np.median(np.abs((a * b).sum(1))) > 0.5:
        return np.arange(len(a))
    if a.shape[1] > _MATCH_COLS:
        cols = np.linspace(0, a.shape[1] - 1, _MATCH_COLS).astype(np.intp)
        a, b = unit_rows(a[:, cols]), unit_rows(b[:, cols])
    bt = np.ascontiguousarray(b.T)
    best = np.concatenate([np.abs(a[i : i + _MATCH_ROWS] @ bt).argmax(1) for i in range(0, len(a), _MATCH_ROWS)])
    if len(a) <= len(b) and np.unique(best).size == len(a):
        return best.astype(np.int64)
    c = np.abs(a @ bt)
    ri, ci = require("scipy.optimize", extra="release").linear_sum_assignment(c, maximize=True)
    pi = np.full(len(a), -1, np.int64)
    pi[ri] = ci
    return pi


def _accumulate(key: bytes, name: str, orig: np.ndarray, sus: np.ndarray, cols: int, units_first: bool,
                inv: np.ndarray, thr: float, ell: int, scale: float, corr: np.ndarray, var: np.ndarray,
                chips: np.ndarray) -> None:  # fmt: skip
    """Add one tensor's chips to the matched filter, a cache-sized chunk of keystream at a time."""
    inv = np.ascontiguousarray(inv, dtype=np.float64)
    orig, sus = np.ascontiguousarray(orig, np.float32), np.ascontiguousarray(sus, np.float32)
    for a, b, words in _keystream_chunks(_tensor_key(key, name), 0, orig.size):
        accumulate_chunk(orig[a:b], sus[a:b], words, a, cols, units_first, inv, thr, ell, scale, corr, var, chips)


def _unblend(al: np.ndarray, ou: np.ndarray, ub: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, float]:
    """Undo ``(1 - a) * copy + a * base`` on one tensor (unit-major rows, ``ok`` the matched ones): least
    squares of the suspect on (original, base) gives (c_m, c_b); the base part is removed and the rest
    rescaled by 1 / c_m.  Returns the tensor and the base's share c_b / (c_m + c_b).  Left as it is when the
    two regressors cannot be told apart or the original's part is under 5% (nothing of the copy is left)."""
    y, xm, xb = al[ok].astype(np.float64).ravel(), ou[ok].astype(np.float64).ravel(), ub[ok].astype(np.float64).ravel()
    g = np.array([[xm @ xm, xm @ xb], [xm @ xb, xb @ xb]])
    if not len(y) or np.linalg.det(g) <= 1e-9 * g[0, 0] * g[1, 1]:
        return al, 0.0
    c_m, c_b = np.linalg.solve(g, np.array([xm @ y, xb @ y]))
    if c_m < 0.05:
        return al, 0.0
    out = al.copy()
    out[ok] = (al[ok] - c_b * ub[ok]) / c_m
    return out, float(c_b / (c_m + c_b))


def extract(original: str | os.PathLike[str] | TensorSource, suspect: str | os.PathLike[str] | TensorSource,
            key: bytes, ell: int, alpha: float = DEFAULT_ALPHA,
            base: str | os.PathLike[str] | TensorSource | None = None, **open_kw: Any) -> Extraction:  # fmt: skip
    """The matched filter's per-symbol correlations of ``suspect`` against ``original``.  ``base``: the public
    checkpoint the original was fine-tuned from (same layout); a suspect blended toward it is regressed
    on (original, base) per tensor and the base's part removed before the filter (docs/TRACING.md)."""
    own_o, own_s = not isinstance(original, TensorSource), not isinstance(suspect, TensorSource)
    own_b = not isinstance(base, TensorSource)
    o = open_source(original, **open_kw)
    s = open_source(suspect, **open_kw)
    bsrc = None
    try:
        lo, ls = detect_layout(o.shapes), detect_layout(s.shapes)
        if base is not None:
            bsrc = open_source(base, **open_kw)
            for name, _ in marked_tensors(lo):
                if bsrc.shapes.get(name) != o.shapes[name]:
                    raise UnsupportedModelError(
                        f"base model {bsrc.path.name[:64]!r}: tensor {name[:64]!r} is missing or shaped differently "
                        "from the model's; pass the checkpoint the model was fine-tuned from"
                    )
        # which suspect block holds which original block: the provenance test's per-layer evidence
        comp = compare_many([extract_signature(o)], s)[0]
        mapping = {e.reference_layer: e.suspect_layer for e in comp.layers if e.suspect_layer is not None
                   and e.log_p < np.log(1e-6 / max(len(comp.layers), 1))}  # fmt: skip
        v = min(o.shapes[lo.embedding][0], s.shapes[ls.embedding][0]) if lo.embedding and ls.embedding else 0
        if lo.embedding and ls.embedding and v >= 2 * max(lo.d_model, ls.d_model):
            ids = np.arange(0, v, max(1, v // 8192))
            r, _ = align_residual(o.get(lo.embedding, rows=ids), s.get(ls.embedding, rows=ids))
        elif comp.residual_map is not None:  # few embedding rows: the comparison's fit on every anchor
            r = comp.residual_map
        else:
            r = np.eye(lo.d_model, ls.d_model, dtype=np.float32)
        corr = np.zeros(ell, np.float64)
        chips = np.zeros(ell, np.int64)
        var = np.zeros(ell, np.float64)
        sus_blocks = {b.index: b for b in ls.blocks}
        used = 0
        shares: list[float] = []
        for bo in lo.blocks:
            if bo.index not in mapping or mapping[bo.index] not in sus_blocks:
                continue
            bs = sus_blocks[mapping[bo.index]]
            oin = np.concatenate([u for _, u in _units(o, bo, "in")])
            sin = np.concatenate([u for _, u in _units(s, bs, "in")])
            with np.errstate(all="ignore"):  # a hostile suspect's extremes overflow: those units are left out
                sin = sin @ r.T  # back to the original's basis
            g_o, g_s = _norm(o, bo), _norm(s, bs)
            if g_o is not None and g_s is None:  # the suspect folded the norm in: undo it with ours
                sin /= np.where(np.abs(g_o) > _EPS, g_o, 1.0)
            pi = _match(oin, sin)
            oout = np.concatenate([u for _, u in _units(o, bo, "out")])
            with np.errstate(all="ignore"):
                sout = np.concatenate([u for _, u in _units(s, bs, "out")]) @ r.T
            ok = pi >= 0
            ok[ok] &= np.isfinite(sin[pi[ok]]).all(axis=1) & np.isfinite(sout[pi[ok]]).all(axis=1)  # no inf, NaN
            for view, ou, su in (("in", oin, sin), ("out", oout, sout)):
                al = np.zeros_like(ou)
                al[ok] = su[pi[ok]]
                if bsrc is not None:  # a blend toward the base: fit it per tensor and take it out
                    at = 0
                    for _, ub in _units(bsrc, bo, view):
                        n = len(ub)
                        al[at : at + n], share = _unblend(al[at : at + n], ou[at : at + n], ub, ok[at : at + n])
                        shares.append(share)
                        at += n
                # undo per-unit rescaling (and sign flips): least-squares scale of each unit over the
                # carrier-sized weights the suspect still has (pruned zeros would bias it)
                m = (np.abs(ou) >= _stats(ou)[1]) & (al != 0)  # the block's larger half (sampled median)
                num = (al * ou * m).sum(1)
                den = np.maximum((ou * ou * m).sum(1), _EPS)
                scale = np.where(np.abs(num) > _EPS, num / den, 1.0)
                al = al / scale[:, None]
                off = 0
                for e in bo.experts:
                    name, uf = (e.in_name, e.in_units_first) if view == "in" else (e.out_name, e.out_units_first)
                    n = o.shapes[name][0 if uf else 1]
                    w_o, w_s = ou[off : off + n], al[off : off + n]
                    orig = _from_unit_major(w_o, uf).reshape(-1)
                    sus_vals = _from_unit_major(w_s, uf).reshape(-1)
                    o_std, o_thr = _stats(orig)
                    std = max(o_std * alpha, _EPS)
                    # matched filter: weigh each chip by the inverse noise variance of its unit (the attack's
                    # noise differs per unit, e.g. after rescaling then quantising); in mark units
                    r2 = ((w_s - w_o) / std) ** 2
                    inv = 1.0 / np.maximum(r2.mean(axis=1), 1.0)  # per unit; the mark alone gives noise 1
                    inv[~ok[off : off + n]] = -1.0  # unmatched units carry nothing
                    _accumulate(key, name, orig, sus_vals, w_o.shape[1] if uf else n, uf, inv, o_thr, ell, 1.0 / std,
                                corr, var, chips)  # fmt: skip
                    off += n
            used += 1
        if not used:
            raise UnsupportedModelError(
                "no block of the suspect could be aligned to the original: it does not look derived from it "
                "(`warden provenance compare` gives the p-value)"
            )
        blend = float(np.median(shares)) if shares else None
        return Extraction(corr, chips, used, var, blend)
    finally:
        if bsrc is not None and own_b:
            bsrc.close()
        if own_o:
            o.close()
        if own_s:
            s.close()

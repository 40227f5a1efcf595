"""The independence test: was a suspect checkpoint derived from a reference?

For each MLP block of the reference (its signature) and each candidate block of the
suspect, hidden units are matched twice with the Hungarian algorithm: once by their
input weights and once by their output weights, both after aligning the residual
streams through the embeddings.  If the suspect was derived from the reference,
both matchings recover the same correspondence (whatever permutation or rescaling
was applied); if the two were initialised independently, the two matchings are
unrelated.  Spearman's rho between them gives a per-block p-value (after Zhu et
al., ICML 2025); blocks are combined with Šidák's correction over the candidates
tried and Fisher's method over the reference blocks.  docs/PROVENANCE.md states
the null hypothesis, its assumptions and the calibration evidence.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._extras import require
from .anchors import read_anchors
from .layout import Layout, detect_layout
from .signature import BlockSignature, Signature, extract_signature, iter_embedding, iter_units, unit_rows
from .source import TensorSource, open_source
from .stats import LN10, bonferroni_logp, fisher_logp, sidak_logp, spearman_logp, to_p

__all__ = ["DEFAULT_ALPHA", "Comparison", "LayerEvidence", "compare", "compare_many", "residual_map"]

DEFAULT_ALPHA = 1e-6
_EPS = 1e-12
_ALL_PAIRS_MAX = 64  # blocks_ref x blocks_suspect up to which every pair is tried
_BAND = 2
_COST_BUDGET = 1 << 28  # bytes of cosine matrix held at once, at most ...
_COST_FLOOR = 1 << 20  # ... and a quarter of the largest tensor, unless that is under 1 MiB
_UNIT_CHUNK = 256  # suspect units read (as float32) at a time


@dataclass(frozen=True)
class LayerEvidence:
    reference_layer: int
    suspect_layer: int | None
    log_p: float  # natural log, after Šidák over `candidates`
    rho: float
    agreement: float  # fraction of units both matchings send to the same suspect unit
    cos_in: float  # mean |cosine| of matched units, input weights
    cos_out: float  # mean |cosine| of matched units, output weights
    units: int
    candidates: int

    @property
    def p_value(self) -> float:
        return to_p(self.log_p)

    def to_json(self) -> dict[str, Any]:
        return {
            "reference_layer": self.reference_layer,
            "suspect_layer": self.suspect_layer,
            "p_value": self.p_value,
            "log10_p_value": round(self.log_p / LN10, 3),
            "spearman_rho": round(self.rho, 4),
            "agreement": round(self.agreement, 4),
            "cos_in": round(self.cos_in, 4),
            "cos_out": round(self.cos_out, 4),
            "units_compared": self.units,
            "candidates_tried": self.candidates,
        }


@dataclass(frozen=True)
class Comparison:
    log_p: float
    alpha: float
    layers: tuple[LayerEvidence, ...]
    alignment: dict[str, Any]
    reference: dict[str, Any]
    suspect: dict[str, Any]
    corrected_for: int = 1  # number of references this suspect was tested against (Bonferroni)
    extra: dict[str, Any] = field(default_factory=dict)
    residual_map: np.ndarray | None = field(default=None, repr=False, compare=False)  # R: reference -> suspect

    @property
    def p_value(self) -> float:
        return to_p(self.log_p)

    @property
    def derived(self) -> bool:
        return self.log_p < math.log(self.alpha)

    @property
    def similarity(self) -> float:
        """Mean matched cosine over the shared layers (0 if none): ranks references that are all significant."""
        sh = [e for e in self.layers if e.log_p < math.log(self.alpha / max(len(self.layers), 1))]
        return float(np.mean([(e.cos_in + e.cos_out) / 2 for e in sh])) if sh else 0.0

    @property
    def dist2(self) -> float:
        """Mean squared distance between a matched pair of unit vectors (input and output weights
        concatenated, 0..8) over the layers compared; the distances of a lineage triangle."""
        if not self.layers:
            return float("inf")
        return float(np.mean([4.0 - 2.0 * (e.cos_in + e.cos_out) for e in self.layers]))

    @property
    def shared_layers(self) -> list[int]:
        """Reference layers with their own significant evidence (Bonferroni over layers at ``alpha``)."""
        cut = math.log(self.alpha / max(len(self.layers), 1))
        return [e.reference_layer for e in self.layers if e.log_p < cut]

    def to_json(self) -> dict[str, Any]:
        return {
            "null_hypothesis": "the suspect and the reference were initialised independently",
            "p_value": self.p_value,
            "log10_p_value": round(self.log_p / LN10, 3),
            "alpha": self.alpha,
            "decision": "derived" if self.derived else "no evidence of derivation",
            "corrected_for_references": self.corrected_for,
            "shared_layers": self.shared_layers,
            "shared_ranges": _ranges(self.shared_layers),
            "similarity": round(self.similarity, 4),
            "alignment": self.alignment,
            "reference": self.reference,
            "suspect": self.suspect,
            "layers": [e.to_json() for e in self.layers],
            **self.extra,
        }


def _lsa() -> Any:
    """scipy's Hungarian matching (``linear_sum_assignment``), from the provenance extra."""
    return require("scipy.optimize", extra="provenance").linear_sum_assignment


def _ranges(xs: list[int]) -> list[str]:
    out: list[str] = []
    for x in xs:
        if out and int(out[-1].split("-")[-1]) == x - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{x}"
        else:
            out.append(str(x))
    return out


def align_residual(e_ref: np.ndarray, e_sus: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """A map R (d_ref x d_sus) taking reference residual vectors to the suspect's basis.

    With at least twice as many shared embedding rows as dimensions, the orthogonal
    Procrustes solution (handles rotations, permutations and sign flips); otherwise a
    signed permutation of dimensions found by the Hungarian algorithm on column
    correlations; without embeddings, the identity.
    """
    k = min(len(e_ref), len(e_sus))
    st = _AlignStats(e_ref.shape[1], e_sus.shape[1])
    st.add(e_ref[:k], e_sus[:k])
    return st.solve()


def _polar_is_identity(c: np.ndarray, tol: float = 1e-2) -> bool:
    """True when the orthogonal Procrustes solution for cross-product ``c`` is the identity to within
    ``tol``: c = S + A (symmetric + skew) with lambda_min(S) > ||A||_F / tol (one Cholesky factorisation).
    The polar factor of S + A is then I + K with ||K|| of order ||A|| / lambda_min(S) <= tol; an exactly
    unchanged basis gives A = 0.  Costs a fraction of the SVD it replaces."""
    sym = (c + c.T) / 2
    skew = float(np.linalg.norm((c - c.T) / 2))
    try:
        np.linalg.cholesky(sym - (skew / tol) * np.eye(len(c)))
    except np.linalg.LinAlgError:
        return False
    return True


class _AlignStats:
    """Sufficient statistics of paired embedding rows for :func:`align_residual`, fed a slice at a time."""

    def __init__(self, d_ref: int, d_sus: int):
        self.cross = np.zeros((d_ref, d_sus))
        self.sq_ref = np.zeros(d_ref)
        self.sq_sus = np.zeros(d_sus)
        self.rows = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = a.astype(np.float64), b.astype(np.float64)
        self.cross += a.T @ b
        self.sq_ref += np.einsum("ij,ij->j", a, a)
        self.sq_sus += np.einsum("ij,ij->j", b, b)
        self.rows += len(a)

    def solve(self) -> tuple[np.ndarray, dict[str, Any]]:
        (d_r, d_s), k = self.cross.shape, self.rows
        if k == 0:
            return np.eye(d_r, d_s, dtype=np.float32), {"kind": "identity", "rows": 0, "fit": None}
        if k >= 2 * max(d_r, d_s):
            if d_r == d_s and _polar_is_identity(self.cross):  # the basis is unchanged: no SVD needed
                fit = float(np.trace(self.cross) / max(math.sqrt(self.sq_ref.sum() * self.sq_sus.sum()), _EPS))
                return np.eye(d_r, dtype=np.float32), {"kind": "rotation", "rows": k, "fit": round(fit, 4)}
            u, sv, vt = np.linalg.svd(self.cross, full_matrices=False)
            fit = float(sv.sum() / max(math.sqrt(self.sq_ref.sum() * self.sq_sus.sum()), _EPS))
            return (u @ vt).astype(np.float32), {"kind": "rotation", "rows": k, "fit": round(fit, 4)}
        c = self.cross / np.outer(np.maximum(np.sqrt(self.sq_ref), _EPS), np.maximum(np.sqrt(self.sq_sus), _EPS))
        ri, ci = _lsa()(-np.abs(c))
        r = np.zeros((d_r, d_s), np.float32)
        r[ri, ci] = np.sign(c[ri, ci]) + (c[ri, ci] == 0)
        return r, {"kind": "signed-permutation", "rows": k, "fit": round(float(np.abs(c[ri, ci]).mean()), 4)}


def residual_map(sig: Signature, src: TensorSource, lay: Layout) -> tuple[np.ndarray, dict[str, Any]]:
    """R (reference -> suspect residual basis) and its description: :func:`align_residual` on the shared
    embedding rows; when those are under ``2 x d_model`` and the signature keeps anchor rows
    (:mod:`.anchors`), the orthogonal Procrustes fit on the embedding rows and every anchor row together,
    all at unit length, refitted twice on the rows the previous fit explains (so that anchors whose
    position moved, e.g. permuted heads or dropped layers, stop pulling)."""
    vocab_s = src.shapes[lay.embedding][0] if lay.embedding else 0
    keep = np.flatnonzero(sig.token_ids < vocab_s) if len(sig.embed_rows) else np.zeros(0, np.int64)
    st = _AlignStats(sig.d_model, lay.d_model)
    use_anchors = bool(sig.anchor_roles) and sig.d_model == lay.d_model and len(keep) < 2 * sig.d_model
    emb_a, emb_b = [], []
    at = 0
    for part in iter_embedding(src, lay, sig.token_ids[keep]):
        st.add(sig.embed_rows[keep[at : at + len(part)]], part)
        if use_anchors:
            emb_a.append(unit_rows(sig.embed_rows[keep[at : at + len(part)]].astype(np.float64)))
            emb_b.append(unit_rows(part.astype(np.float64)))
        at += len(part)
    if not use_anchors:
        return st.solve()
    mask, rows = read_anchors(src, lay, sig.anchor_roles, sig.anchor_ids)
    if not mask.any():
        return st.solve()
    a = np.concatenate([*emb_a, sig.anchor_rows[mask].astype(np.float64)])
    b = np.concatenate([*emb_b, rows[mask].astype(np.float64)])
    if len(a) < sig.d_model:  # not enough rows to pin a rotation down: the signed permutation
        return st.solve()
    used = np.ones(len(a), bool)
    for _ in range(3):
        u, _sv, vt = np.linalg.svd(a[used].T @ b[used], full_matrices=False)
        r = u @ vt
        fit = ((a @ r) * b).sum(1)
        nxt = fit >= 0.5 * float(np.quantile(fit, 0.9))
        if nxt.sum() < sig.d_model or np.array_equal(nxt, used):
            break
        used = nxt
    info = {"kind": "rotation", "rows": int(st.rows), "anchor_rows": int(mask.sum()), "rows_fitted": int(used.sum()),
            "fit": round(float(fit[used].mean()), 4)}  # fmt: skip
    return r.astype(np.float32), info


def candidates(n_ref: int, n_sus: int) -> list[list[int]]:
    """Suspect block positions tried for each reference block position; fixed by the depths alone."""
    if n_ref * n_sus <= _ALL_PAIRS_MAX:
        return [list(range(n_sus)) for _ in range(n_ref)]
    out = []
    for r in range(n_ref):
        prop = round(r * (n_sus - 1) / max(n_ref - 1, 1))
        cs = {s for c in (r, prop) for s in range(c - _BAND, c + _BAND + 1) if 0 <= s < n_sus}
        out.append(sorted(cs))
    return out


@dataclass
class _Job:
    sig: int
    ref_pos: int
    block: BlockSignature
    r: np.ndarray  # residual map of this job's signature
    match: dict[str, np.ndarray] = field(default_factory=dict)
    cos: dict[str, float] = field(default_factory=dict)

    @property
    def m(self) -> int:
        return len(self.block.unit_ids)

    def units(self, view: str) -> np.ndarray:
        """The reference units of ``view`` in the suspect's residual basis (computed when needed, not kept)."""
        v = self.block.in_vecs if view == "in" else self.block.out_vecs
        return unit_rows(v.astype(np.float32) @ self.r)


def _match_view(src: TensorSource, block: Any, view: str, jobs: list[_Job], n_units: int, budget: int) -> None:
    """Fill job.match[view] (suspect unit per reference unit, -1 if none) by Hungarian matching on |cos|.

    Jobs are grouped so that the cosine matrix held at once stays under ``budget`` bytes; each group
    streams the suspect's units once."""
    if not jobs:
        return
    per_row = 4 * n_units
    groups: list[list[_Job]] = [[]]
    rows = 0
    for j in jobs:
        if groups[-1] and (rows + j.m) * per_row > budget:
            groups.append([])
            rows = 0
        groups[-1].append(j)
        rows += j.m
    d = jobs[0].r.shape[1]
    for grp in groups:
        u = np.concatenate([j.units(view) for j in grp], axis=0) if len(grp) > 1 else grp[0].units(view)
        cost = np.empty((len(u), n_units), np.float32)
        base = 0
        for w in iter_units(src, block, view, chunk=_UNIT_CHUNK):
            if w.shape[1] != d:
                raise ValueError("aligned widths disagree")
            np.abs(u @ unit_rows(w).T, out=cost[:, base : base + len(w)])
            base += len(w)
        del u
        off = 0
        for j in grp:
            c = cost[off : off + j.m]
            ri, ci = _lsa()(c, maximize=True)
            pi = np.full(j.m, -1, np.int64)
            pi[ri] = ci
            j.match[view] = pi
            j.cos[view] = float(c[ri, ci].mean()) if len(ri) else 0.0
            off += j.m


def compare_many(
    signatures: Sequence[Signature],
    suspect: str | os.PathLike[str] | TensorSource,
    *,
    alpha: float = DEFAULT_ALPHA,
    **open_kw: Any,
) -> list[Comparison]:
    """Test one suspect against each signature in a single streaming pass over the suspect."""
    _lsa()  # the provenance extra, before any work
    own = not isinstance(suspect, TensorSource)
    src = open_source(suspect, **open_kw)
    try:
        lay = detect_layout(src.shapes)
        return _test(signatures, src, lay, alpha)
    finally:
        if own:
            src.close()


def _test(signatures: Sequence[Signature], src: TensorSource, lay: Layout, alpha: float) -> list[Comparison]:
    n_sus = len(lay.blocks)
    vocab_s = src.shapes[lay.embedding][0] if lay.embedding else 0
    largest = max((4 * math.prod(shp) for shp in src.shapes.values()), default=0)  # as float32
    budget = min(_COST_BUDGET, max(_COST_FLOOR, largest // 4))
    prepared = []
    for si, sig in enumerate(signatures):
        r, info = residual_map(sig, src, lay)
        cand = candidates(len(sig.blocks), n_sus)
        jobs_by_s: dict[int, list[_Job]] = {}
        all_jobs = []
        for rp, b in enumerate(sig.blocks):
            for s in cand[rp]:
                j = _Job(si, rp, b, r)
                jobs_by_s.setdefault(s, []).append(j)
                all_jobs.append((s, j))
        prepared.append((sig, info, r, cand, jobs_by_s, all_jobs))
    for s, blk in enumerate(lay.blocks):
        jobs = [j for *_, jb, _ in prepared for j in jb.get(s, [])]
        n_units = lay.units(src.shapes, blk)
        for view in ("in", "out"):
            _match_view(src, blk, view, jobs, n_units, budget)
    results = []
    sus_info = {"family": lay.family, "layers": n_sus, "d_model": lay.d_model, "vocab": vocab_s}
    for sig, info, r, cand, _, all_jobs in prepared:
        best: dict[int, tuple[float, LayerEvidence]] = {}
        for s, j in all_jobs:
            m_in, m_out = j.match["in"], j.match["out"]
            ok = (m_in >= 0) & (m_out >= 0)
            rho, lp = spearman_logp(m_in[ok], m_out[ok])
            ev = LayerEvidence(
                sig.blocks[j.ref_pos].index, lay.blocks[s].index, lp, rho,
                float(np.mean(m_in[ok] == m_out[ok])) if ok.any() else 0.0, j.cos["in"], j.cos["out"],
                int(ok.sum()), len(cand[j.ref_pos]),
            )  # fmt: skip
            if j.ref_pos not in best or lp < best[j.ref_pos][0]:
                best[j.ref_pos] = (lp, ev)
        layers = []
        for rp in range(len(sig.blocks)):
            if rp in best:
                ev = best[rp][1]
                layers.append(_replace_logp(ev, sidak_logp(ev.log_p, ev.candidates)))
        overall = fisher_logp([e.log_p for e in layers])
        ref_info = {"family": sig.family, "layers": len(sig.blocks), "d_model": sig.d_model, "vocab": sig.vocab}
        ref_info.update({k: v for k, v in sig.meta.items() if k in ("name", "source", "params")})
        results.append(Comparison(overall, alpha, tuple(layers), info, ref_info, sus_info, residual_map=r))
    return results


def _replace_logp(ev: LayerEvidence, lp: float) -> LayerEvidence:
    from dataclasses import replace

    return replace(ev, log_p=lp)


def compare(
    suspect: str | os.PathLike[str] | TensorSource,
    reference: str | os.PathLike[str] | TensorSource | Signature,
    *,
    alpha: float = DEFAULT_ALPHA,
    max_units: int = 256,
    rng: np.random.Generator | int | None = 0,
    home: str | os.PathLike[str] | None = None,
    **open_kw: Any,
) -> Comparison:
    """Test H0 "suspect and reference were initialised independently"; see docs/PROVENANCE.md.
    The decision is an event of ``home``'s trail (default: the keyring's, else ``$WARDEN_HOME``)."""
    _lsa()  # the provenance extra, before any work
    from .. import trail
    from ..audit import AuditAction

    sig = reference if isinstance(reference, Signature) else extract_signature(reference, max_units=max_units, rng=rng,
                                                                               **open_kw)  # fmt: skip
    c = compare_many([sig], suspect, alpha=alpha, **open_kw)[0]
    kr = open_kw.get("keyring")
    trail.record(AuditAction.PROVENANCE_COMPARE, home=home or getattr(kr, "home", None),
                 subject=str(getattr(suspect, "path", suspect)), decision="derived" if c.derived else "independent",
                 reference=str(getattr(reference, "path", None) or sig.meta.get("name") or reference),
                 log10_p=round(c.log_p / float(np.log(10)), 2), alpha=alpha)  # fmt: skip
    return c


def corrected(c: Comparison, n: int) -> Comparison:
    from dataclasses import replace

    return replace(c, log_p=bonferroni_logp(c.log_p, n), corrected_for=n)

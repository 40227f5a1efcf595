"""Text mode's pool statistic: which pool models explain the tokens the suspect *chose*?  (docs/PROVENANCE.md)

When an endpoint only samples, the suspect's answers are token choices, not log-probabilities.  The
log-probability modes regress the suspect's log-probabilities on the pool's; the text-mode counterpart is a
**product of experts** fitted by maximum likelihood to the sampled tokens.  At every sampled position ``j``
with context ``c_j``, the suspect's next-token law is modelled as

    q_w(v | c_j)  ∝  exp( Σ_m w_m · log p_m(v | c_j) )

over the pool models ``m`` (ours first, then the references), and ``w`` maximises ``Σ_j log q_w(y_j | c_j)``
for the tokens ``y_j`` the suspect sampled (a convex problem: softmax regression with one feature per pool
model).  ``T_m = ŵ_m``.  A copy of m sampled at temperature 1 gives ``w_m ≈ 1`` and ≈ 0 to the others; a
derivative of m leans on m more than on any reference; an independent suspect spreads weight over the pool.
Unlike the mean log-likelihood per character (the statistic this replaces where it applies), a model that is
simply better or worse at the text everywhere does not stand out: its weight is what it explains beyond the
others.  A model that many suspects lean on (a "hub", seen on tiny models) still does: docs/PROVENANCE.md,
"Hub models", measures it and keeps it as a limit.

The fit is a symmetric function of the pool (permuting the pool permutes ``ŵ``), so ours stays exchangeable
with the references under H0 and the probe's p-values (rank and parametric) apply unchanged.

It needs every pool model's whole next-token distribution on one shared tokenization (local models of one
tokenizer: :meth:`HFScorer.distributions`); otherwise the probe falls back to the per-character statistic.
For vocabularies over ``FULL_VOCAB`` tokens each position keeps the union of every pool model's ``TOP``
likeliest tokens and the sampled one (renormalised), also a symmetric rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._extras import require
from ..errors import ProbeError

__all__ = ["FULL_VOCAB", "TOP", "fit_poe", "gather", "shares_vocabulary", "stack"]

FULL_VOCAB = 4096
TOP = 64
_FLOOR = -50.0
_RIDGE = 1e-6  # per position: keeps the fit finite when two pool models are identical on the data


def gather(dists: Sequence[np.ndarray], observed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack one continuation's pool distributions.

    ``dists[m]``: model m's log-probabilities, shape (positions, vocab); ``observed``: the sampled token ids,
    shape (positions,).  Returns ``(L, mask, y)``: ``L`` (positions, support, pool) log-probabilities on each
    position's support, ``mask`` (positions, support) True where the support entry is real, and ``y`` the
    index of the sampled token in each position's support."""
    d = np.stack([np.maximum(np.asarray(x, dtype=np.float64), _FLOOR) for x in dists], axis=-1)  # (n, V, P)
    n, v, _ = d.shape
    if observed.shape != (n,) or (n and (observed.min() < 0 or observed.max() >= v)):
        raise ProbeError("text statistic: the sampled tokens do not match the pool's distributions")
    if v <= FULL_VOCAB:
        return d, np.ones((n, v), dtype=bool), observed.astype(np.int64)
    top = np.argpartition(-d, TOP - 1, axis=1)[:, :TOP, :].reshape(n, -1)  # (n, TOP * P)
    cols = np.concatenate([observed[:, None], top], axis=1)
    s = max(len(np.unique(r)) for r in cols) if n else 1
    idx = np.zeros((n, s), dtype=np.int64)
    mask = np.zeros((n, s), dtype=bool)
    for j, r in enumerate(cols):
        u = np.concatenate([[observed[j]], np.setdiff1d(np.unique(r), [observed[j]])])
        idx[j, : len(u)] = u
        mask[j, : len(u)] = True
    sub = np.take_along_axis(d, idx[:, :, None], axis=1)
    return sub, mask, np.zeros(n, dtype=np.int64)


def fit_poe(L: np.ndarray, mask: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The maximum-likelihood weights ``ŵ`` of the product of experts (module docstring).  ``L``: (positions,
    support, pool); ``mask``: (positions, support); ``y``: the sampled token's index per position."""
    opt = require("scipy.optimize", extra="provenance")
    n, _, p = L.shape
    if n == 0:
        raise ProbeError("text statistic: no sampled token to fit")
    chosen = L[np.arange(n), y, :]  # (n, P)
    neg = np.where(mask, 0.0, -np.inf)

    def f(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = L @ w + neg  # (n, S)
        zmax = z.max(axis=1, keepdims=True)
        e = np.exp(z - zmax)
        tot = e.sum(axis=1, keepdims=True)
        q = e / tot
        ll = float((chosen @ w).sum() - (zmax[:, 0] + np.log(tot[:, 0])).sum())
        grad = chosen.sum(0) - np.einsum("ns,nsp->p", q, L)
        return (-ll + _RIDGE * n * float(w @ w)) / n, (-grad + 2 * _RIDGE * n * w) / n

    res = opt.minimize(f, np.full(p, 1.0 / p), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    if not np.all(np.isfinite(res.x)) or not (res.success or np.abs(res.jac).max() < 1e-5):
        raise ProbeError(f"text statistic: the fit did not converge ({res.message})")
    return np.asarray(res.x, dtype=np.float64)


def shares_vocabulary(pool: Sequence[Any]) -> bool:
    """Every pool model gives whole next-token distributions (``distributions``) over one vocabulary, ours."""
    first = getattr(pool[0], "_piece", None)
    return first is not None and all(
        callable(getattr(m, "distributions", None)) and getattr(m, "_piece", None) == first for m in pool
    )


def stack(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate the :func:`gather` results of several continuations (supports padded to one width)."""
    s = max(p[0].shape[1] for p in parts)
    L = np.concatenate([np.pad(p[0], ((0, 0), (0, s - p[0].shape[1]), (0, 0)), constant_values=_FLOOR) for p in parts])
    mask = np.concatenate([np.pad(p[1], ((0, 0), (0, s - p[1].shape[1]))) for p in parts])
    return L, mask, np.concatenate([p[2] for p in parts])

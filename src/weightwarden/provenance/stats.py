"""Tail probabilities in log space, so that p-values far below 1e-308 stay ordered and printable."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .._extras import require
from ..errors import ProbeError

LN10 = math.log(10.0)


def spearman_logp(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Spearman's rho of two integer labelings and the one-sided log p-value of rho > 0.

    Uses Student's t approximation with k-2 degrees of freedom; in the far tail the
    regularized incomplete beta function is expanded analytically instead of underflowing.
    """
    k = len(a)
    if k < 8:
        return 0.0, 0.0
    rho = float(require("scipy.stats", extra="provenance").spearmanr(a, b).statistic)
    if not math.isfinite(rho):
        return 0.0, 0.0
    rho = min(rho, 1.0 - 1e-15)
    df = k - 2
    t = rho * math.sqrt(df / (1.0 - rho * rho))
    return rho, t_logsf(t, df)


def t_logsf(t: float, df: int) -> float:
    lp = float(require("scipy.stats", extra="provenance").t.logsf(t, df))
    if math.isfinite(lp) and lp > -700:
        return lp
    # sf(t) = I_x(df/2, 1/2) / 2 with x = df / (df + t^2) -> 0; leading term of the series
    a = df / 2.0
    x = df / (df + t * t)
    betaln = require("scipy.special", "betaln", extra="provenance")
    return math.log(0.5) + a * math.log(x) + 0.5 * math.log1p(-x) - math.log(a) - float(betaln(a, 0.5))


def sidak_logp(logp: float, c: int) -> float:
    """log of 1-(1-p)^c: the minimum of c independent p-values, corrected."""
    if c <= 1:
        return logp
    p = math.exp(logp)
    if p < 1e-12:
        return min(0.0, math.log(c) + logp)
    return math.log(-math.expm1(c * math.log1p(-p)))


def fisher_logp(logps: list[float]) -> float:
    """Fisher's method: log P(chi2_{2k} >= -2 sum log p)."""
    k = len(logps)
    if k == 0:
        return 0.0
    y = -sum(logps)  # chi2/2, Gamma(k) distributed under the null
    if y <= 0:
        return 0.0
    q = float(require("scipy.special", extra="provenance").gammaincc(k, y))
    if q > 1e-300:
        return math.log(q)
    # Q(k, y) ~ y^(k-1) e^-y / Gamma(k) * (1 + (k-1)/y + (k-1)(k-2)/y^2 ...)
    s, term = 1.0, 1.0
    for j in range(1, k):
        term *= (k - j) / y
        s += term
        if term < 1e-17:
            break
    return (k - 1) * math.log(y) - y - math.lgamma(k) + math.log(s)


def bonferroni_logp(logp: float, n: int) -> float:
    return min(0.0, logp + math.log(max(n, 1)))


def to_p(logp: float) -> float:
    return math.exp(logp) if logp > -745 else 0.0


def statistic_p(t_ours: float, t_refs: Sequence[float]) -> dict[str, float]:
    """The parametric and rank p-values of ``t_ours`` among ``t_refs`` (the probe through an API,
    docs/PROVENANCE.md): Student's t prediction interval with k - 1 degrees of freedom, and the rank."""
    stats = require("scipy.stats", extra="provenance")

    r = np.asarray(t_refs, dtype=float)
    k = len(r)
    rank_p = (1 + int(np.sum(r >= t_ours))) / (k + 1)
    sd = float(r.std(ddof=1))
    if not sd > 0:
        raise ProbeError("the references' statistics do not vary: give independent references")
    t = (t_ours - float(r.mean())) / (sd * math.sqrt(1 + 1 / k))
    log_p = float(stats.t.logsf(t, k - 1))
    return {"t": t, "df": k - 1, "log_p": log_p, "p": math.exp(log_p), "rank_p": rank_p}

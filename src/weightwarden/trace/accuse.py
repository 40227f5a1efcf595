"""Tracing a leak: which recipients' fingerprints a suspect copy carries (``warden trace``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import audit, trail
from .._extras import require
from ..audit import AuditAction
from ..keys.provider import KeyProvider
from .mark import extract
from .recipients import open_store
from .store import derive
from .tardos import TardosCode, accusation_threshold

__all__ = ["DEFAULT_EPS", "TraceReport", "decide", "trace"]

DEFAULT_EPS = 1e-6


@dataclass(frozen=True)
class TraceReport:
    model_id: str
    recipients: int
    eps: float
    threshold: float
    accused: list[dict[str, Any]]
    ranking: list[dict[str, Any]]
    symbols: int
    blocks_aligned: int
    population: int = 0  # the n of the union bound
    scores_top: tuple[tuple[str, float], ...] = ()  # the 20 best scores, for plots
    base_share: float | None = None  # with a base: the fitted share of the base in the suspect (a blend)
    endpoint: dict[str, Any] | None = None  # traced through an API: url, served model, queries (trace.endpoint)

    def to_json(self) -> dict[str, Any]:
        extra = {"endpoint": self.endpoint} if self.endpoint is not None else {}
        return {
            "model_id": self.model_id,
            "recipients": self.recipients,
            "eps": self.eps,
            "threshold": round(self.threshold, 2),
            "accused": self.accused,
            "decision": ("accused: " + ", ".join(a["recipient"] for a in self.accused))
            if self.accused
            else "no one accused: the evidence does not reach the threshold",
            "top": self.ranking,
            "symbols": self.symbols,
            "blocks_aligned": self.blocks_aligned,
            "population": self.population,
            **({"base_share": round(self.base_share, 4)} if self.base_share is not None else {}),
            **extra,
        }


def trace(suspect: str | os.PathLike[str], model: str | os.PathLike[str], *, provider: KeyProvider,
          model_id: str | None = None, home: Path | None = None, db: str | None = None, eps: float = DEFAULT_EPS,
          population: int | None = None, base: str | os.PathLike[str] | None = None,
          **open_kw: Any) -> TraceReport:  # fmt: skip
    """Accuse the recipients whose fingerprint the suspect carries, keeping P(any innocent accused) <= eps.

    ``population`` (default: the model's recipients) is the n of the union bound; pass a larger one to
    keep the threshold fixed as recipients are added.  ``base``: the public checkpoint the model was
    fine-tuned from, to undo a blend of the copy toward it (docs/TRACING.md).  Logged in the trail with
    whom it accuses."""
    require("scipy.optimize", extra="release")  # extraction aligns units by Hungarian matching
    with trail.operation(home, db) as t:
        rep = _trace(suspect, model, provider=provider, model_id=model_id, home=home, db=db, eps=eps,
                     population=population, base=base, **open_kw)  # fmt: skip
        t.emit(audit.event(AuditAction.TRACE_RUN, subject=rep.model_id,
                           detail={"suspect": str(suspect), "accused": [a["recipient"] for a in rep.accused],
                                   "recipients": rep.recipients, "eps": eps,
                                   **({"base": str(base)} if base is not None else {})}))  # fmt: skip
    return rep


def _trace(suspect: str | os.PathLike[str], model: str | os.PathLike[str], *, provider: KeyProvider,
           model_id: str | None, home: Path | None, db: str | None, eps: float, population: int | None,
           base: str | os.PathLike[str] | None = None, **open_kw: Any) -> TraceReport:  # fmt: skip
    model = Path(model)
    model_id = model_id or model.stem
    store = open_store(home, db)
    rec = store.model(model_id)
    names = store.recipients(model_id)
    secret = store.secret(rec, provider)
    try:
        code_key, embed_key = derive(secret, "tardos-code"), derive(secret, "embed")
    finally:
        secret[:] = bytes(len(secret))
    ex = extract(model, suspect, embed_key, rec.code_length, rec.alpha, base=base, **open_kw)
    y, w = ex.symbols()
    code = TardosCode(code_key, rec.code_length, rec.cutoff)
    rep = decide(code, model_id, names, y, w, eps=eps, population=population, blocks=ex.blocks)
    return replace(rep, base_share=ex.base_share)


def decide(code: TardosCode, model_id: str, names: list[str], y: np.ndarray, w: np.ndarray, *, eps: float,
           population: int | None, blocks: int, endpoint: dict[str, Any] | None = None) -> TraceReport:  # fmt: skip
    """The Tardos decision on estimated symbols ``y`` (weights ``w``, neither depending on any recipient's
    codeword): accuse every recipient scoring above the threshold that keeps P(any innocent) <= eps."""
    n = max(population or 0, len(names), 1)
    scores = code.scores(y, len(names), known=w)
    z = accusation_threshold(code, y, w, n, eps)
    order = np.argsort(-scores)
    accused = [{"recipient": names[i], "score": round(float(scores[i]), 2),
                "false_accusation_bound": min(1.0, n * code.innocent_tail(float(scores[i]), y, w))}
               for i in order if scores[i] > z]  # fmt: skip
    ranking = [{"recipient": names[i], "score": round(float(scores[i]), 2)} for i in order[:5]]
    top = tuple((names[i], float(scores[i])) for i in order[:20])
    return TraceReport(model_id, len(names), eps, z, accused, ranking, code.length, blocks, n, top,
                       endpoint=endpoint)  # fmt: skip

"""PNG figures where a person would rather look than read (the ``plot`` extra: matplotlib).

* :func:`trace_plot`: accusation scores of the top recipients against the threshold (``warden trace
  --plot``); accused recipients in red.
* :func:`compare_plot`: per-layer evidence of a provenance comparison (``warden provenance compare
  --plot``): -log10 p per matched layer pair, with the per-layer significance line.

Figures are written atomically (temporary name, fsync, rename) and use the non-interactive Agg
backend: no display is needed.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

from ._atomic import atomic_write_bytes
from ._extras import require

__all__ = ["compare_plot", "trace_plot"]


def _pyplot() -> Any:
    matplotlib = require("matplotlib", extra="plot")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", extra="plot")

    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    fig.clf()
    atomic_write_bytes(path, buf.getvalue(), force=True, mode=0o644)


def trace_plot(report: Any, path: str | os.PathLike[str]) -> None:
    """Scores of the top recipients (``report.scores_top``) as bars, the threshold as a line."""
    plt = _pyplot()
    rows = list(report.scores_top)[::-1]
    accused = {a["recipient"] for a in report.accused}
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(rows) + 1.6))
    names = [r[0][:40] for r in rows]
    ax.barh(names, [r[1] for r in rows], color=["#c0392b" if r[0] in accused else "#7f8c8d" for r in rows])
    ax.axvline(report.threshold, color="#2c3e50", ls="--", lw=1.2,
               label=f"threshold (n = {report.population:,}, eps = {report.eps:g})")  # fmt: skip
    ax.axvline(0, color="#bbbbbb", lw=0.8)
    ax.set_xlabel("accusation score (symmetric Tardos, soft decoding)")
    verdict = ("accused: " + ", ".join(sorted(accused))) if accused else "no one accused"
    ax.set_title(f"warden trace, model {report.model_id}: {verdict}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)
    plt.close(fig)


def compare_plot(comparison: Any, path: str | os.PathLike[str], title: str = "") -> None:
    """-log10 p of every matched layer pair; bars above the line are significant on their own."""
    plt = _pyplot()
    layers = list(comparison.layers)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(layers) + 2), 3.6))
    xs = [f"{e.reference_layer}→{e.suspect_layer}" for e in layers]
    ys = [-e.log_p / math.log(10) for e in layers]
    line = -math.log10(comparison.alpha / max(len(layers), 1))
    ax.bar(xs, ys, color=["#c0392b" if y > line else "#7f8c8d" for y in ys])
    ax.axhline(line, color="#2c3e50", ls="--", lw=1.2, label=f"per-layer significance (alpha {comparison.alpha:g})")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xlabel("reference layer → suspect layer")
    ax.set_ylabel("-log10 p")
    verdict = "derived" if comparison.derived else "not shown derived"
    ax.set_title(title or f"warden provenance compare: {verdict} (log10 p = {comparison.log_p / math.log(10):.0f})",
                 fontsize=10)  # fmt: skip
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right", fontsize=8)
    _save(fig, path)
    plt.close(fig)

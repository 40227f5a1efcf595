"""Model classification for export control: parameters (total and active), training compute, and
the outcome under each regime of a signed rules file (:mod:`.rules`).

Parameters are counted from tensor shapes alone, read through the provenance
:class:`~weightwarden.provenance.source.TensorSource` (plain files, HF folders, sealed files with
the keyring).  Mixture-of-experts: routed experts are the tensors under ``.experts.<n>.``; a token uses
``k`` of a layer's ``E`` routed experts (``num_experts_per_tok`` in ``config.json``, or given),
so active = total − routed + routed·k/E, layer by layer.  Training compute, in order of
preference: a declared figure; 6·N·D with N the *active* parameters and D the training tokens
(Kaplan et al. 2020: forward + backward ≈ 6 operations per parameter per token, ±30%); or
hardware: chip-hours × peak dense FLOP/s × utilisation (±50%: utilisation is rarely known).
With none of these, an *upper bound* 6·N·D_max (D_max = 10^15 tokens, about 65 times the largest
published training set): a small model clears a threshold it could not reach whatever it was
trained on, and a large one whose compute is unknown gets ``needs-review`` (its band straddles).
A declared figure or token count may come from the caller or from ``config.json``
(``training_compute_flop``, ``training_tokens``: weightwarden's model-card fields).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from ..errors import UnsupportedModelError

__all__ = ["Classification", "Compute", "classify", "count_parameters", "estimate_compute"]

# no model is trained on more tokens than this (Llama 3: 1.5e13); the bound used when nothing is declared
MAX_TRAINING_TOKENS = 1e15
_EXPERT = re.compile(r"^(?P<layer>.*?)\.experts\.(?P<e>\d+)\.")


@dataclass(frozen=True)
class Compute:
    flop: float
    method: str  # "declared" | "6ND" | "hardware" | "upper-bound"
    low: float
    high: float
    basis: dict[str, Any] = field(default_factory=dict)


def estimate_compute(*, active_params: float | None = None, tokens: float | None = None,
                     declared_flop: float | None = None, chip_hours: float | None = None,
                     peak_flops: float | None = None, utilization: float | None = None) -> Compute | None:  # fmt: skip
    """The best available estimate of training compute, with its method and an uncertainty band."""
    if declared_flop is not None:
        if declared_flop <= 0:
            raise ValueError("declared compute must be positive")
        return Compute(declared_flop, "declared", declared_flop, declared_flop, {"declared_flop": declared_flop})
    if tokens is not None and active_params is not None:
        if tokens <= 0 or active_params <= 0:
            raise ValueError("tokens and parameters must be positive")
        c = 6.0 * active_params * tokens
        return Compute(c, "6ND", c / 1.3, c * 1.3, {"active_params": active_params, "tokens": tokens})
    if chip_hours is not None and peak_flops is not None:
        u = 0.4 if utilization is None else utilization
        if chip_hours <= 0 or peak_flops <= 0 or not 0 < u <= 1:
            raise ValueError("chip-hours, peak FLOP/s and utilisation (0..1] must be positive")
        c = chip_hours * 3600.0 * peak_flops * u
        return Compute(c, "hardware", c / 1.5, c * 1.5,
                       {"chip_hours": chip_hours, "peak_flops": peak_flops, "utilization": u,
                        "utilization_assumed": utilization is None})  # fmt: skip
    if active_params is not None and active_params > 0:
        c = 6.0 * active_params * MAX_TRAINING_TOKENS
        return Compute(c, "upper-bound", 0.0, c, {"active_params": active_params, "max_tokens": MAX_TRAINING_TOKENS})
    return None


def count_parameters(shapes: dict[str, tuple[int, ...]], experts_per_token: int | None) -> tuple[int, int, dict]:
    """(total, active, detail) from tensor shapes; MoE needs ``experts_per_token``."""
    import math

    total = sum(math.prod(s) for s in shapes.values())
    routed: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for name, shp in shapes.items():
        m = _EXPERT.match(name)
        if m and not m.group("layer").endswith("shared"):
            routed[m.group("layer")][int(m.group("e"))] += math.prod(shp)
    if not routed:
        return total, total, {"moe": False}
    if not experts_per_token or experts_per_token < 1:
        raise UnsupportedModelError("a mixture-of-experts model: its experts per token are unknown "
                                    "(config num_experts_per_tok, or --experts-per-token)")  # fmt: skip
    active = total
    per_layer = []
    for layer, ex in routed.items():
        n_e = len(ex)
        if experts_per_token > n_e:
            raise UnsupportedModelError(f"{experts_per_token} experts per token but {layer} has {n_e}")
        r = sum(ex.values())
        active -= r - round(r * experts_per_token / n_e)
        per_layer.append(n_e)
    return total, active, {"moe": True, "experts_per_layer": max(per_layer), "experts_per_token": experts_per_token,
                           "moe_layers": len(routed)}  # fmt: skip


@dataclass(frozen=True)
class Classification:
    model: str
    total_params: int
    active_params: int
    moe: dict[str, Any]
    compute: Compute | None
    published: bool
    outcomes: list[dict[str, Any]]
    rules_version: str
    as_of: str

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["compute"] = asdict(self.compute) if self.compute else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Classification:
        c = d.get("compute")
        return cls(str(d["model"]), int(d["total_params"]), int(d["active_params"]), dict(d.get("moe") or {}),
                   Compute(**c) if c else None, bool(d["published"]), list(d.get("outcomes") or []),
                   str(d.get("rules_version", "")), str(d.get("as_of", "")))  # fmt: skip


def _config(path: Path) -> dict[str, Any]:
    cfg = path / "config.json" if path.is_dir() else path.with_name("config.json")
    try:
        return json.loads(cfg.read_text()) if cfg.is_file() else {}
    except (OSError, ValueError):
        raise UnsupportedModelError("config.json is unreadable") from None


def classify(model: str | os.PathLike[str], *, rules: Any = None, as_of: date | None = None,
             country: str | None = None, tokens: float | None = None, declared_flop: float | None = None,
             chip_hours: float | None = None, peak_flops: float | None = None, utilization: float | None = None,
             published: bool = False, experts_per_token: int | None = None,
             home: str | os.PathLike[str] | None = None, **open_kw: Any) -> Classification:  # fmt: skip
    """Classify a checkpoint (file, HF folder, sealed file or bundle) under ``rules`` (default: shipped).
    The classification is an event of ``home``'s trail (default: the keyring's, else ``$WARDEN_HOME``)."""
    from .. import trail
    from ..audit import AuditAction

    c = _classify(model, rules=rules, as_of=as_of, country=country, tokens=tokens, declared_flop=declared_flop,
                  chip_hours=chip_hours, peak_flops=peak_flops, utilization=utilization, published=published,
                  experts_per_token=experts_per_token, **open_kw)  # fmt: skip
    kr = open_kw.get("keyring")
    trail.record(AuditAction.RELEASE_CLASSIFY, home=home or getattr(kr, "home", None), subject=str(model),
                 total_params=c.total_params, active_params=c.active_params, rules_version=c.rules_version,
                 as_of=c.as_of, outcomes={o["regime"]: o["outcome"] for o in c.outcomes})  # fmt: skip
    return c


def _classify(model: str | os.PathLike[str], *, rules: Any, as_of: date | None, country: str | None,
              tokens: float | None, declared_flop: float | None, chip_hours: float | None, peak_flops: float | None,
              utilization: float | None, published: bool, experts_per_token: int | None,
              **open_kw: Any) -> Classification:  # fmt: skip
    from ..provenance.source import open_source
    from .rules import default_rules

    path = Path(model)
    cfg = _config(path) if path.exists() else {}
    k = experts_per_token or cfg.get("num_experts_per_tok")
    with open_source(path, **open_kw) as src:
        if not src.shapes:
            raise UnsupportedModelError("no tensors: the parameter count cannot be read")
        total, active, moe = count_parameters(src.shapes, int(k) if k else None)
        card = {**(src.config or {}), **cfg}
    if declared_flop is None and tokens is None and chip_hours is None:
        try:
            declared_flop = float(card["training_compute_flop"]) if "training_compute_flop" in card else None
            tokens = float(card["training_tokens"]) if "training_tokens" in card else None
        except (TypeError, ValueError):
            raise UnsupportedModelError(
                "config.json: training_compute_flop / training_tokens is not a number"
            ) from None
    comp = estimate_compute(active_params=active, tokens=tokens, declared_flop=declared_flop, chip_hours=chip_hours,
                            peak_flops=peak_flops, utilization=utilization)  # fmt: skip
    rs = rules or default_rules()
    when = as_of or date.today()
    outs = rs.evaluate(total_params=total, active_params=active, compute=comp, published=published, as_of=when,
                       country=country)  # fmt: skip
    return Classification(path.name, total, active, moe, comp, published, outs, rs.version, when.isoformat())

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
Where a declared figure comes from (issue 17): a *signed* declaration (:mod:`.declaration`, bound
to the weights' digest and verified against the compliance keys) or the caller (an operator or an
authorised broker account, audited where the release is decided) counts; the same fields unsigned in
``config.json`` (``training_compute_flop``, ``training_tokens``) are only *claimed*: reported, and
evaluated beside the real estimate so that they can make an outcome stricter, never more lenient.

Plausibility (issue 17): a declared figure below ``6·N_active·D_min`` with ``D_min`` =
``MIN_TOKENS_PER_PARAM`` (0.1) tokens per (total) parameter, or declared tokens below ``D_min``, is
not believed: the compute falls back to the upper bound and the model needs review.  The floor is a fifth of
the lowest tokens-per-parameter ratio among published large models (MT-NLG 530B on 270B tokens, 0.51;
Smith et al. 2022; Gopher 280B on 300B, 1.07; GPT-3 175B on 300B, 1.71; compute-optimal is about 20,
Hoffmann et al. 2022).  A mixture-of-experts whose active parameters do not follow from its structure
(each MoE layer needs a router tensor with one output per expert, experts numbered 0..E-1 with the same
tensors and shapes, and the expert count of ``config.json`` where it gives one) is counted as dense and
needs review.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime
from pathlib import Path
from typing import Any

from ..errors import UnsupportedModelError

__all__ = ["Classification", "Compute", "classify", "count_parameters", "estimate_compute", "evaluate_outcomes",
           "moe_doubts"]  # fmt: skip

# no model is trained on more tokens than this (Llama 3: 1.5e13); the bound used when nothing is declared
MAX_TRAINING_TOKENS = 1e15
# the plausibility floor: no credible model is trained on fewer tokens per parameter (see the module doc)
MIN_TOKENS_PER_PARAM = 0.1
_CONFIG_EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_SEVERITY = ("allowed", "notify", "needs-review", "license-required", "presumption-of-denial")
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
    country: str | None = None  # the destination the outcomes were evaluated for (ISO 3166 alpha-2)
    claimed: Compute | None = None  # from unsigned config.json fields: can only make an outcome stricter
    doubts: tuple[str, ...] = ()  # an implausible declaration or MoE structure: needs review
    source: str = ""  # where the compute figures came from: "signed", "entered", "" (none)
    declaration: dict[str, Any] | None = None  # the signed declaration used, if any

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["compute"] = asdict(self.compute) if self.compute else None
        d["claimed"] = asdict(self.claimed) if self.claimed else None
        d["doubts"] = list(self.doubts)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Classification:
        c, cl = d.get("compute"), d.get("claimed")
        return cls(str(d["model"]), int(d["total_params"]), int(d["active_params"]), dict(d.get("moe") or {}),
                   Compute(**c) if c else None, bool(d["published"]), list(d.get("outcomes") or []),
                   str(d.get("rules_version", "")), str(d.get("as_of", "")), d.get("country"),
                   Compute(**cl) if cl else None, tuple(map(str, d.get("doubts") or ())), str(d.get("source", "")),
                   d.get("declaration"))  # fmt: skip


def moe_doubts(shapes: dict[str, tuple[int, ...]], config: dict[str, Any]) -> list[str]:
    """Why the routed experts found by name do not look like a mixture-of-experts (empty when they do)."""
    routed: dict[str, dict[int, dict[str, tuple[int, ...]]]] = defaultdict(lambda: defaultdict(dict))
    for name, shp in shapes.items():
        m = _EXPERT.match(name)
        if m and not m.group("layer").endswith("shared"):
            routed[m.group("layer")][int(m.group("e"))][name[m.end():]] = tuple(shp)
    want = next((config[k] for k in _CONFIG_EXPERTS if isinstance(config.get(k), int)), None)
    doubts = []
    for layer, ex in routed.items():
        n_e = len(ex)
        if sorted(ex) != list(range(n_e)):
            doubts.append(f"{layer[:60]}: experts are not numbered 0..{n_e - 1}")
        if len({tuple(sorted(v.items())) for v in ex.values()}) > 1:
            doubts.append(f"{layer[:60]}: its {n_e} experts differ in tensors or shapes")
        rest = [(n[len(layer) + 1:], s) for n, s in shapes.items() if n.startswith(layer + ".")]
        if not any(("gate" in r or "router" in r) and not r.startswith("experts.") and s and s[0] == n_e
                   for r, s in rest):  # fmt: skip
            doubts.append(f"{layer[:60]}: no router tensor with one output per expert ({n_e})")
        if want is not None and want != n_e:
            doubts.append(f"{layer[:60]}: {n_e} experts, config.json says {want}")
    return doubts


def _severity(outcome: str) -> int:
    return _SEVERITY.index(outcome) if outcome in _SEVERITY else len(_SEVERITY)


def evaluate_outcomes(rules: Any, c: Classification, *, as_of: date, country: str | None) -> list[dict[str, Any]]:
    """One outcome per regime for ``c``: its compute, made stricter (never more lenient) by what is only
    claimed, and at least ``needs-review`` where an in-force regime meets a doubt."""
    kw = {"total_params": c.total_params, "active_params": c.active_params, "published": c.published,
          "as_of": as_of, "country": country}  # fmt: skip
    outs = rules.evaluate(compute=c.compute, **kw)
    if c.claimed is not None:
        for o, k in zip(outs, rules.evaluate(compute=c.claimed, **kw), strict=True):
            if _severity(k["outcome"]) > _severity(o["outcome"]):
                o["outcome"] = k["outcome"]
                o["reasons"] = [*k["reasons"], "by the compute claimed in config.json (unsigned)"]
    for o in outs:
        if c.doubts and o.get("in_force") and _severity(o["outcome"]) < _severity("needs-review"):
            o["outcome"] = "needs-review"
            o["reasons"] = [*o["reasons"], *c.doubts]
    return outs


def _config(path: Path) -> dict[str, Any]:
    cfg = path / "config.json" if path.is_dir() else path.with_name("config.json")
    try:
        return json.loads(cfg.read_text()) if cfg.is_file() else {}
    except (OSError, ValueError):
        raise UnsupportedModelError("config.json is unreadable") from None


def _visible_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a sealed file's visible header, with no key."""
    from ..errors import KeysNotHereError
    from ..sealed.reader import SealedFile

    how = (f"classify {path.name} where the keys are (`warden classify {path.name} --json > c.json`) and "
           "pass the result (--classification c.json)")  # fmt: skip
    if path.is_dir():
        raise KeysNotHereError(f"{path.name} is a sealed bundle, whose shapes need a key: {how}")
    with SealedFile(path) as sf:
        d = sf.describe()
    if d["header_hidden"]:
        raise KeysNotHereError(f"{path.name} has a hidden header: its shapes need a key; {how}")
    if "tensors" not in d:
        raise UnsupportedModelError(f"{path.name} holds no tensors: the parameter count cannot be read")
    return {n: tuple(t["shape"]) for n, t in d["tensors"].items()}


def classify(model: str | os.PathLike[str], *, rules: Any = None, as_of: date | None = None,
             country: str | None = None, tokens: float | None = None, declared_flop: float | None = None,
             chip_hours: float | None = None, peak_flops: float | None = None, utilization: float | None = None,
             published: bool = False, experts_per_token: int | None = None, keyless: bool = False,
             declaration: str | os.PathLike[str] | None = None, compliance_keys: list[bytes] | None = None,
             now: datetime | None = None, home: str | os.PathLike[str] | None = None,
             **open_kw: Any) -> Classification:  # fmt: skip
    """Classify a checkpoint (file, HF folder, sealed file or bundle) under ``rules`` (default: shipped).

    ``tokens`` / ``declared_flop`` / hardware are figures the caller enters; ``declaration`` is a signed
    declaration file (verified against ``compliance_keys`` and the weights' digest); ``training_*`` fields
    in ``config.json`` are only claimed (see the module doc).  ``keyless``: read a sealed file's shapes from
    its visible header and use no key (the broker holds none); a hidden header, a bundle, or a declaration
    (whose check needs the weights) is refused with :class:`~weightwarden.errors.KeysNotHereError`.
    The classification is an event of ``home``'s trail (default: the keyring's, else ``$WARDEN_HOME``)."""
    from .. import trail
    from ..audit import AuditAction

    c = _classify(model, rules=rules, as_of=as_of, country=country, tokens=tokens, declared_flop=declared_flop,
                  chip_hours=chip_hours, peak_flops=peak_flops, utilization=utilization, published=published,
                  experts_per_token=experts_per_token, keyless=keyless, declaration=declaration,
                  compliance_keys=compliance_keys, now=now, **open_kw)  # fmt: skip
    kr = open_kw.get("keyring")
    trail.record(AuditAction.RELEASE_CLASSIFY, home=home or getattr(kr, "home", None), subject=str(model),
                 total_params=c.total_params, active_params=c.active_params, rules_version=c.rules_version,
                 as_of=c.as_of, outcomes={o["regime"]: o["outcome"] for o in c.outcomes})  # fmt: skip
    return c


def _classify(model: str | os.PathLike[str], *, rules: Any, as_of: date | None, country: str | None,
              tokens: float | None, declared_flop: float | None, chip_hours: float | None, peak_flops: float | None,
              utilization: float | None, published: bool, experts_per_token: int | None, keyless: bool,
              declaration: str | os.PathLike[str] | None, compliance_keys: list[bytes] | None,
              now: datetime | None, **open_kw: Any) -> Classification:  # fmt: skip
    from ..provenance.source import open_source
    from ..sealed.detect import is_sealed_path
    from .countries import resolve_country
    from .rules import default_rules

    country = resolve_country(country) if country is not None else None
    entered = declared_flop is not None or tokens is not None or chip_hours is not None
    if declaration is not None and entered:
        from ..errors import DeclarationError

        raise DeclarationError("give a signed declaration (--declaration) or enter figures (--compute, --tokens, "
                               "--chip-hours), not both")  # fmt: skip
    path = Path(model)
    cfg = _config(path) if path.exists() else {}
    # the flag can only raise k (more active parameters), never lower what config.json says (issue 17 red team)
    cfg_k = cfg.get("num_experts_per_tok")
    if isinstance(cfg_k, float) and cfg_k.is_integer():
        cfg_k = int(cfg_k)
    given = [int(x) for x in (experts_per_token, cfg_k) if isinstance(x, int) and not isinstance(x, bool)]
    k = max(given) if given else (experts_per_token or cfg_k)
    decl = None
    sealed = is_sealed_path(path)
    if keyless and sealed:
        if declaration is not None:
            from ..errors import KeysNotHereError

            raise KeysNotHereError("a signed declaration is checked against the weights, which need a key: classify "
                                   "where the keys are and pass the result (--classification)")  # fmt: skip
        shapes = _visible_shapes(path)
        total, active, moe = count_parameters(shapes, int(k) if k else None)
        card = dict(cfg)
        doubts = moe_doubts(shapes, card) if moe.get("moe") else []
    else:
        with open_source(path, **open_kw) as src:
            if not src.shapes:
                raise UnsupportedModelError("no tensors: the parameter count cannot be read")
            total, active, moe = count_parameters(src.shapes, int(k) if k else None)
            card = {**(src.config or {}), **cfg}
            doubts = moe_doubts(src.shapes, card) if moe.get("moe") else []
            if declaration is not None:
                from .declaration import load_declaration, weights_digest

                decl = load_declaration(declaration, model_sha256=weights_digest(src), trusted=compliance_keys or [],
                                        now=now)  # fmt: skip
                declared_flop, tokens = decl.training_compute_flop, decl.training_tokens
    if doubts:
        active = total  # counted as dense: the structure does not show which parameters a token uses
        moe = {**moe, "counted_as_dense": True}
    if moe.get("moe") and experts_per_token is not None:
        moe = {**moe, "experts_per_token_entered": int(experts_per_token)}  # recorded as an entered figure
        if isinstance(cfg_k, int) and int(experts_per_token) != cfg_k:
            doubts.append(f"--experts-per-token {int(experts_per_token)} disagrees with config.json "
                          f"num_experts_per_tok {cfg_k}; the larger ({k}) is used")  # fmt: skip
    try:
        c_flop = float(card["training_compute_flop"]) if "training_compute_flop" in card else None
        c_tokens = float(card["training_tokens"]) if "training_tokens" in card else None
        claimed = estimate_compute(active_params=active, tokens=c_tokens, declared_flop=c_flop)
    except (TypeError, ValueError):
        raise UnsupportedModelError("config.json: training_compute_flop / training_tokens is not a positive "
                                    "number") from None  # fmt: skip
    if claimed is not None and claimed.method == "upper-bound":
        claimed = None
    comp = estimate_compute(active_params=active, tokens=tokens, declared_flop=declared_flop, chip_hours=chip_hours,
                            peak_flops=peak_flops, utilization=utilization)  # fmt: skip
    source = "signed" if decl is not None else "entered" if entered else ""
    if comp is not None and comp.method != "upper-bound":
        d_min = MIN_TOKENS_PER_PARAM * total
        floor = 6.0 * active * d_min
        what = "the signed declaration" if decl is not None else "the entered figure"
        if tokens is not None and tokens < d_min:
            doubts.append(f"{what}: {tokens:.3g} training tokens is below the plausibility floor of "
                          f"{MIN_TOKENS_PER_PARAM} per parameter ({d_min:.3g})")  # fmt: skip
        elif comp.flop < floor:
            doubts.append(f"{what}: {comp.flop:.3g} FLOP is below the plausibility floor 6·N·D_min = {floor:.3g} "
                          f"(D_min = {MIN_TOKENS_PER_PARAM} tokens per parameter)")  # fmt: skip
        if (tokens is not None and tokens < d_min) or comp.flop < floor:
            comp = estimate_compute(active_params=active)  # not believed: bounded as if nothing were declared
    rs = rules or default_rules()
    when = as_of or date.today()
    c = Classification(path.name, total, active, moe, comp, published, [], rs.version, when.isoformat(), country,
                       claimed, tuple(doubts), source, decl.to_json() if decl else None)  # fmt: skip
    return replace(c, outcomes=evaluate_outcomes(rs, c, as_of=when, country=country))

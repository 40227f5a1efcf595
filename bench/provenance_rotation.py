"""Rotations of the residual stream with few embedding rows (issue 21).  Prints JSON.

python bench/provenance_rotation.py            # ~20 s on 2 cores: random weights
python bench/provenance_rotation.py --trained  # also trained zoo llamas with a 96-word vocabulary (~10 min)

Llama-shaped checkpoints (tests/support/models.attn_llama_tensors: attention, gated MLP, RMSNorm scales in
[0.5, 1.5], untied lm_head) with d_model 64 and a vocabulary of 96 rows (under 2 x d_model) or 24.  Derived: the
reference with every matrix noised (relative noise 0.05 .. 1, a stand-in for fine-tuning), norms folded
and the residual stream rotated by a random orthogonal Q; also with the attention heads permuted before the
rotation (the q/k/v/o anchors then lose their positions).  Null: independent pairs (12 models, 66 pairs),
KS test of the p-values against Uniform(0, 1).  Each case with the anchors (this aligner) and without them
(the embedding only: the signed permutation the aligner fell back to before).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the model builders are test helpers (tests/support/models.py)

D, FF, LAYERS, VOCAB, HEADS = 64, 256, 2, 96, 4


def _noised(sd: dict, rel: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (v + rel * v.std() * rng.standard_normal(v.shape)).astype(np.float32) if v.ndim == 2 else v
            for k, v in sd.items()}  # fmt: skip


def _permute_heads(sd: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = dict(sd)
    hd = D // HEADS
    for i in range(LAYERS):
        idx = np.concatenate([np.arange(h * hd, (h + 1) * hd) for h in rng.permutation(HEADS)])
        p = f"model.layers.{i}.self_attn."
        for n in "qkv":
            out[p + f"{n}_proj.weight"] = sd[p + f"{n}_proj.weight"][idx]
        out[p + "o_proj.weight"] = sd[p + "o_proj.weight"][:, idx]
    return out


def trained() -> dict:
    """Zoo llamas (tests/support/zoo.py) with a 96-word vocabulary and d_model 64: a parent (300 steps), its
    short fine-tune with norms folded and the residual stream rotated, and six independent models (80
    steps each): the derived p-values with and without anchors, and the null over the 15 independent pairs
    and the 6 parent-vs-independent pairs."""
    from scipy import stats

    from tests.support.zoo import Zoo
    from weightwarden.provenance import compare_many, extract_signature

    zoo = Zoo(ROOT / ".bench" / "zoo-v96", vocab=VOCAB)
    parent = zoo.base("llama", 1, 300)
    sig = extract_signature(parent)
    bare = dataclasses.replace(sig, anchor_roles=())
    out: dict = {"vocab": VOCAB, "d_model": zoo.d, "anchor_roles": len(sig.anchor_roles)}
    for how in ("rotate-residual", "ft-short+rotate-residual"):
        child = zoo.derive(zoo.derive(parent, "ft-short"), "rotate-residual") if "+" in how else \
            zoo.derive(parent, "rotate-residual")  # fmt: skip
        c, b = compare_many([sig], child)[0], compare_many([bare], child)[0]
        out[how] = {"log10_p_with_anchors": round(c.log_p / math.log(10), 2), "alignment": c.alignment,
                    "log10_p_embedding_only": round(b.log_p / math.log(10), 2)}  # fmt: skip
    ind = [zoo.base("llama", 100 + i, 80) for i in range(6)]
    sigs = [extract_signature(m) for m in ind]
    ps = [compare_many([sigs[j]], ind[i])[0].p_value for i, j in itertools.combinations(range(len(ind)), 2)]
    ps += [compare_many([sig], m)[0].p_value for m in ind]
    out["null"] = {"pairs": len(ps), "ks_pvalue": round(float(stats.kstest(ps, "uniform").pvalue), 4),
                   "min_p": float(min(ps)), "false_positives_at_1e-6": int(sum(p < 1e-6 for p in ps))}  # fmt: skip
    return out


def main() -> None:
    from safetensors.numpy import save_file
    from scipy import stats

    from tests.support.models import attn_llama_tensors, fold_and_rotate
    from weightwarden.provenance import compare_many, extract_signature

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp())

    def save(name: str, sd: dict) -> Path:
        save_file(sd, str(tmp / f"{name}.safetensors"))
        return tmp / f"{name}.safetensors"

    def log10p(sus: Path, sig: object) -> float:
        return round(compare_many([sig], sus)[0].log_p / math.log(10), 2)

    derived: dict = {}
    for vocab in (VOCAB, 24):  # 24: even the embedding and lm_head together (48 rows) are under d_model
        ref = attn_llama_tensors(np.random.default_rng(0), d=D, ff=FF, layers=LAYERS, vocab=vocab)
        sig = extract_signature(save(f"ref{vocab}", ref))
        bare = dataclasses.replace(sig, anchor_roles=())
        for rel in (0.05, 0.2, 0.5, 1.0):
            for heads in (False, True):
                sd = _noised(ref, rel, 1)
                sd = _permute_heads(sd, 2) if heads else sd
                p = save(f"d{vocab}-{rel}{heads}", fold_and_rotate(sd, np.random.default_rng(3)))
                c = compare_many([sig], p)[0]
                derived[f"vocab_{vocab}_noise_{rel}" + ("_heads_permuted" if heads else "")] = {
                    "log10_p_with_anchors": round(c.log_p / math.log(10), 2), "fit": c.alignment.get("fit"),
                    "rows_fitted": c.alignment.get("rows_fitted"), "anchor_rows": c.alignment.get("anchor_rows"),
                    "log10_p_embedding_only": log10p(p, bare)}  # fmt: skip
    models = [save(f"ind{i}", attn_llama_tensors(np.random.default_rng(100 + i), d=D, ff=FF, layers=LAYERS,
                                                 vocab=VOCAB)) for i in range(12)]  # fmt: skip
    sigs = [extract_signature(m) for m in models]
    ps = [compare_many([sigs[j]], models[i])[0].p_value for i, j in itertools.combinations(range(len(models)), 2)]
    out = {
        "model": {"d_model": D, "ff": FF, "layers": LAYERS, "vocab": [VOCAB, 24], "heads": HEADS},
        "derived_folded_rotation": derived,
        "null": {
            "pairs": len(ps),
            "ks_pvalue": round(float(stats.kstest(ps, "uniform").pvalue), 4),
            "min_p": float(min(ps)),
            "false_positives_at_1e-6": int(sum(p < 1e-6 for p in ps)),
        },
    }
    if "--trained" in sys.argv[1:]:
        out["trained"] = trained()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

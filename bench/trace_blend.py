"""Blending a leaked copy back toward the public base (issue 21).  Prints JSON.

python bench/trace_blend.py          # ~3 min on 2 quiet cores (trains the zoo's base once, cached)

The public base B is the zoo's llama (300 steps of pretraining).  Our model M is B fine-tuned for 200 steps
(lr 1e-3) on the first 80% of the zoo's fine-tune split; the last 20% is M's held-out text.  Eight
recipients get marked copies of M.  The leaker r3 releases ``(1 - a) * copy + a * X`` for a in 0.05 .. 0.6,
with X = B (the base we know) or X = B', another fine-tune of B on the same domain that we do not know.  For
each: the loss ratio of the blend against M on M's held-out text (and on the zoo's general held-out split),
the fitted base share, and whom `warden trace` accuses without and with ``--base B`` (eps 1e-6, population
10^6; an accusation of anyone but r3 would be a false one).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
sys.path.insert(0, str(ROOT))  # the zoo is a test helper (tests/support/zoo.py), not part of the wheel

FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def blend(copy: Path, toward: Path, a: float, out: Path) -> Path:
    """``(1 - a) * copy + a * toward``, every floating tensor, written as a model folder at ``out``."""
    from safetensors.numpy import load_file, save_file

    c, b = load_file(str(copy / "model.safetensors")), load_file(str(toward / "model.safetensors"))
    mixed = {k: ((1 - a) * v + a * b[k]).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in c.items()}
    shutil.copytree(copy, out)
    save_file(mixed, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def split_loss(zoo: object, path: Path, split: str, n: int = 16) -> float:
    """Mean next-token loss on the first ``n`` sequences of ``split``."""
    import torch

    m = zoo.load(path)  # type: ignore[attr-defined]
    x = zoo.splits[split][: n * zoo.seq].reshape(n, zoo.seq)  # type: ignore[attr-defined]
    with torch.no_grad():
        return float(m(input_ids=x, labels=x).loss)


def finetune(zoo: object, base: Path, name: str, seed: int) -> Path:
    if (zoo.root / name / "config.json").exists():  # type: ignore[attr-defined]
        return zoo.root / name  # type: ignore[attr-defined]
    m = zoo.load(base)  # type: ignore[attr-defined]
    zoo.train(m, 200, seed=seed, split="ft-train", lr=1e-3)  # type: ignore[attr-defined]
    return zoo.save(m, name)  # type: ignore[attr-defined]


def main() -> None:
    import weightwarden as ww
    from tests.support.zoo import Zoo
    from weightwarden.keys.kdf import KdfParams
    from weightwarden.trace import release, trace

    os.environ.setdefault("WARDEN_ALLOW_SAMPLE_LIST", "1")  # a demonstration: the gate's shipped sample list
    t0 = time.perf_counter()
    zoo = Zoo(BENCH / "zoo")
    base = zoo.base("llama", 1, 300)
    ft = zoo.splits["finetune"]
    cut = int(len(ft) * 0.8)
    zoo.splits["ft-train"], zoo.splits["ft-held"] = ft[:cut], ft[cut:]
    master = finetune(zoo, base, "blend-master-200", seed=101)
    unknown = finetune(zoo, base, "blend-other-200", seed=707)  # another fine-tune of the public base, not ours
    root = BENCH / "trace-blend"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    kr = ww.Keyring.create(root / "home", "bench-passphrase",
                           kdf=KdfParams(time_cost=1, memory_kib=1024, parallelism=1))  # fmt: skip
    prov = kr.provider(purpose="tracing", create=True)
    names = [f"r{i}" for i in range(8)]
    copies = {r: root / f"copy-{r}" for r in names}
    for r in names:
        release(master, r, copies[r], provider=prov, country="FR", home=root / "home", model_id="m")
    held, general = split_loss(zoo, master, "ft-held"), zoo.loss(master)

    def run(suspect: Path, with_base: bool) -> dict:
        rep = trace(suspect, master, provider=prov, home=root / "home", model_id="m", population=10**6,
                    base=base if with_base else None)  # fmt: skip
        j = rep.to_json()
        return {"accused": [a["recipient"] for a in rep.accused], "top": j["top"][0], "threshold": j["threshold"],
                **({"base_share": j["base_share"]} if "base_share" in j else {})}  # fmt: skip

    out: dict = {
        "model": {"d_model": zoo.d, "layers": zoo.layers, "ff": zoo.ff, "vocab": zoo.vocab},
        "leaker": "r3",
        "recipients": len(names),
        "base_vs_master_loss_ratio_heldout": round(math.exp(split_loss(zoo, base, "ft-held") - held), 4),
        "unknown_vs_master_loss_ratio_heldout": round(math.exp(split_loss(zoo, unknown, "ft-held") - held), 4),
        "blends": {},
    }
    for label, toward in (("toward_known_base", base), ("toward_unknown_model", unknown)):
        rows = []
        for a in FRACTIONS:
            sus = blend(copies["r3"], toward, a, root / f"{label}-{a}")
            rows.append({
                "fraction": a,
                "loss_ratio_heldout": round(math.exp(split_loss(zoo, sus, "ft-held") - held), 4),
                "loss_ratio_general_heldout": round(math.exp(zoo.loss(sus) - general), 4),
                "without_base": run(sus, False),
                "with_base": run(sus, True),
            })  # fmt: skip
        out["blends"][label] = rows
    # no innocent: a blend of the unmarked master toward the base accuses no one
    clean = blend(master, base, 0.5, root / "master-blend-0.5")
    out["unmarked_master_blend_0.5"] = {"without_base": run(clean, False), "with_base": run(clean, True)}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()

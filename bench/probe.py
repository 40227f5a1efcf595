"""Provenance through an API (issue 21): `warden provenance probe` on a small trained family.  Prints JSON.

    python bench/probe.py                      # 12 independent models, 8 references, 24 prompts (a few minutes)
    python bench/probe.py --independents 10 --steps 80 --items 16     # smaller
    python bench/probe.py --sweep 16,64,256,1024 --null-modes ""     # also log10 p vs queries (the fine-tunes)
    python bench/probe.py --independents 40 --refs 30 --null-pairs 120 --null-modes logprobs,text   # many references

Trains tiny Llama models on Python's stdlib sources (tests/support/oai_server.py): our model, its
derivatives (short fine-tune, longer fine-tune, int8 round trip, 30% magnitude pruning) and N independent
models (own seeds, same data and recipe), serves them all through the tests' OpenAI-compatible HTTP server,
and reports:

* per derivative and mode (logprobs, chat at temperature 1, text only at temperature 1): log10 p, the rank
  p-value, queries used, with our model plus the first k independents as the pool;
* the null calibration: every ordered pair (suspect I_a, "ours" I_b) of independents, the references k
  other independents: the smallest p, a KS test of the p-values against Uniform(0, 1), and the false
  positives at alpha = 1e-6 and 1e-3 (pairs share models, so they are not independent draws);
* with ``--sweep``: log10 p against the number of queries (logprobs mode) for the two fine-tunes, the
  prompts drawn from overlapping windows of the corpus (as many candidates as the largest size).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--independents", type=int, default=12)
    ap.add_argument("--refs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--null-modes", default="logprobs", help="modes of the null pairs (comma separated)")
    ap.add_argument("--sweep", default="", help="queries per probe for the fine-tunes' sweep (comma separated)")
    ap.add_argument(
        "--null-pairs",
        type=int,
        default=0,
        help="ordered null pairs to run (0: all); (a, a + s mod n) for s = 1, 2, ... until reached",
    )
    ap.add_argument("--modes", default="logprobs,chat,text", help="modes of the derivatives (comma separated)")
    ap.add_argument(
        "--derived",
        default="ft-short,ft-long,int8,prune30",
        help="derivatives (of ft-short, ft-long, int8, prune30, int4, lora, perm)",
    )
    ap.add_argument("--text-items", type=int, default=0, help="prompts in text mode (default: --items)")
    ap.add_argument("--text-samples", type=int, default=4, help="samples per prompt in text mode")
    args = ap.parse_args()
    import numpy as np
    from scipy import stats

    from tests.support.oai_server import Family, OAIServer, Served
    from weightwarden.provenance.probe import HFScorer, probe

    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="ww-probe-bench-"))
    fam = Family(work / "zoo", vocab=320, d=32, ff=96, seq=48, batch=8, text_limit=150_000)
    ours = fam.base(0, steps=args.steps)
    ind = [fam.base(100 + i, steps=args.steps) for i in range(args.independents)]
    make = {
        "ft-short": lambda: fam.finetune(ours, steps=25, lr=5e-4),
        "ft-long": lambda: fam.finetune(ours, steps=100, lr=1e-3),
        "int8": lambda: Family.int8(ours),
        "prune30": lambda: Family.prune(ours, 0.3),
        "int4": lambda: Family.int4(ours),
        "lora": lambda: fam.lora_merge(ours),
        "perm": lambda: Family.permute(ours),
    }
    derived = {n: make[n]() for n in args.derived.split(",") if n}  # fmt: skip
    trained_s = time.time() - t0
    srv = OAIServer()
    tok = fam.tokenizer
    url = {n: srv.add(n, Served(m, tok, n)) for n, m in derived.items()}
    url.update({f"{n}-t1": srv.add(f"{n}-t1", Served(m, tok, n, temperature=1.0)) for n, m in derived.items()})
    url.update({f"I{i}": srv.add(f"I{i}", Served(m, tok, f"I{i}")) for i, m in enumerate(ind)})
    url.update({f"I{i}-t1": srv.add(f"I{i}-t1", Served(m, tok, f"I{i}", temperature=1.0)) for i, m in enumerate(ind)})
    sc = {"ours": HFScorer(model=ours, tokenizer=tok, name="ours")}
    sc.update({f"I{i}": HFScorer(model=m, tokenizer=tok, name=f"I{i}") for i, m in enumerate(ind)})
    prompts = [fam.text[i : i + 200] for i in range(2000, 140_000, 2000)]
    home = work / "home"
    k = args.refs
    refs = [sc[f"I{i}"] for i in range(k)]
    out: dict = {"command": "python bench/probe.py " + " ".join(sys.argv[1:]),
                 "setup": {"independents": args.independents, "references": k, "steps": args.steps,
                           "items": args.items, "text_items": args.text_items or args.items,
                           "text_samples": args.text_samples,
                           "model": "Llama d=32 ff=96 2 layers, BPE vocab 320, seq 48",
                           "train_seconds": round(trained_s, 1)},
                 "derived": {}}  # fmt: skip
    for name in derived:
        row = {}
        modes = args.modes.split(",")
        for mode, key, kw in (("logprobs", name, {}), ("chat", f"{name}-t1", {"new_tokens": 24}),
                              ("text", f"{name}-t1", {"samples": args.text_samples, "new_tokens": 24})):  # fmt: skip
            if mode not in modes:
                continue
            items = (args.text_items or args.items) if mode == "text" else args.items
            r = probe(url[key], sc["ours"], refs, mode=mode, prompts=prompts, n_items=items, home=home,
                      cache=work / "cache" / key / mode, budget=10**6, **kw)  # fmt: skip
            row[mode] = {"log10_p": round(r.log10_p_value, 2), "rank_p": round(r.rank_p_value, 3),
                         "queries": r.queries_used, "derived_at_1e-6": r.derived}  # fmt: skip
        out["derived"][name] = row
        print(json.dumps({name: row}), file=sys.stderr, flush=True)
    sweep = [int(q) for q in args.sweep.split(",") if q]
    if sweep:
        stride = max(20, (len(fam.text) - 200) // max(sweep))
        many = [fam.text[i : i + 200] for i in range(0, len(fam.text) - 200, stride)]
        out["sweep"] = {"candidates": len(many), "log10_p": {}}
        for name in ("ft-short", "ft-long"):
            out["sweep"]["log10_p"][name] = {
                q: round(probe(url[name], sc["ours"], refs, prompts=many, n_items=q, home=home, budget=10**6,
                               cache=work / "cache" / name / "sweep").log10_p_value, 2)
                for q in sweep
            }  # fmt: skip
    null: dict = {}
    n = args.independents
    pairs = [(a, (a + s) % n) for s in range(1, n) for a in range(n)]
    pairs = sorted(pairs[: args.null_pairs] if args.null_pairs else pairs)  # by endpoint: its answers stay memoised
    for mode in [m for m in args.null_modes.split(",") if m]:
        ps = []
        t_mode = time.time()
        for a, b in pairs:
            rest = [i for i in list(range(b + 1, n)) + list(range(b)) if i != a][:k]
            route = f"I{a}" if mode == "logprobs" else f"I{a}-t1"
            r = probe(url[route], sc[f"I{b}"], [sc[f"I{i}"] for i in rest], mode=mode, prompts=prompts,
                      home=home, cache=work / "cache" / f"I{a}" / mode, budget=10**6,
                      n_items=(args.text_items or args.items) if mode == "text" else args.items,
                      **({"new_tokens": 24} if mode == "chat" else {}),
                      **({"new_tokens": 24, "samples": args.text_samples} if mode == "text" else {}))  # fmt: skip
            ps.append(r.p_value if r.p_value > 0 else 10**r.log10_p_value)
        ps_a = np.array(ps)
        null[mode] = {"pairs": len(ps), "min_p": float(ps_a.min()), "min_log10_p": round(math.log10(ps_a.min()), 2),
                      "ks_p": float(stats.kstest(ps_a, "uniform").pvalue),
                      "false_positives_1e-6": int((ps_a < 1e-6).sum()),
                      "false_positives_1e-3": int((ps_a < 1e-3).sum()),
                      "fraction_below_0.05": round(float((ps_a < 0.05).mean()), 3),
                      "seconds": round(time.time() - t_mode, 1)}  # fmt: skip
        print(json.dumps({mode: null[mode]}), file=sys.stderr, flush=True)
    out["null"] = null
    out["seconds"] = round(time.time() - t0, 1)
    srv.close()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

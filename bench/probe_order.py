"""The exact training-order test through an API (issue 21): p-values vs queries, and the null.  Prints JSON.

    python bench/probe_order.py                       # defaults below (a few minutes on one core)
    python bench/probe_order.py --items 16,64,256 --orders 100 --text-plan 128x1,256x2

Trains a tiny Llama on Python's stdlib sources (tests/support/oai_server.py), each training example (a
window of 40 tokens) seen once, in a uniformly random order recorded by ``shuffle``; derives the models a
thief would serve (short fine-tune, long fine-tune, LoRA merge, int8 and int4 round trips, 30% magnitude
pruning, a function-preserving permutation of MLP neurons and heads) and serves them
through the tests' OpenAI-compatible HTTP server, with independent models trained on the *same* examples in
their own random order.  Reports:

* per derivative: log10 p of ``order_probe`` against the number of queries (the K latest and K earliest
  examples, 2K queries), logprobs mode with a "public base" normaliser (a model trained on random windows of
  the same data, never on the order), without it, and text mode (no log-probabilities: ``samples``
  continuations sampled at temperature 1 after each of ``cuts`` word starts of each example);
* the text-mode null: an independent model against many random orders of a fixed subset of the examples;
* the null calibration: each independent model paired with many independent random orders of the same
  examples.  Under assumption A1 (the order is uniformly random, independent of the suspect) this *is* the
  null, exactly: given the model, the p-values of independent orders are independent Uniform(0, 1) draws.
  Reported: pairs, false positives at 1e-6 and 1e-3, the smallest p, a KS test against Uniform(0, 1);
* the normal approximation used above ``EXACT_LIMIT`` against the exact permutation distribution.
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


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text-limit", type=int, default=120_000, help="characters of stdlib source (examples)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--items", default="16,32,64,128,256,512,1024", help="queries (2K) per probe, logprobs mode")
    ap.add_argument("--text-plan", default="128x1,256x2",
                    help="text mode, per derivative: EXAMPLESxSAMPLES (2K examples asked, samples per cut)")
    ap.add_argument("--text-extra", default="ft-short:256x8", help="text mode, last: NAME:EXAMPLESxSAMPLES")
    ap.add_argument("--cuts", type=int, default=8, help="text mode: cuts (prompts) per example")
    ap.add_argument("--new-tokens", type=int, default=4, help="text mode: tokens per sampled continuation")
    ap.add_argument("--text-null-orders", type=int, default=100)
    ap.add_argument("--text-null-pool", type=int, default=128, help="texts the text-mode null orders permute")
    ap.add_argument("--text-null-items", type=int, default=64)
    ap.add_argument("--text-null-samples", type=int, default=2)
    ap.add_argument("--independents", type=int, default=2)
    ap.add_argument("--orders", type=int, default=60, help="random orders per independent model (null pairs)")
    ap.add_argument("--null-items", type=int, default=128)
    args = ap.parse_args()
    import numpy as np
    from scipy import stats

    from tests.support.oai_server import Family, OAIServer, Served
    from weightwarden.provenance.order import TrainingOrder, shuffle
    from weightwarden.provenance.ordertest import order_probe, rank_sum_p
    from weightwarden.provenance.probe import HFScorer

    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="ww-probe-order-"))
    home = work / "home"
    fam = Family(work / "zoo", vocab=320, d=32, ff=96, seq=48, batch=8, text_limit=args.text_limit)
    texts = fam.examples(40)
    order = shuffle(texts)
    ours = fam.train_in_order(fam.new(0), list(order.examples), lr=args.lr)
    derived = {"ft-short": fam.finetune(ours, steps=25, lr=5e-4), "ft-long": fam.finetune(ours, steps=100, lr=1e-3),
               "lora-r8": fam.lora_merge(ours, rank=8, steps=40), "int8": Family.int8(ours), "int4": Family.int4(ours),
               "prune30": Family.prune(ours, 0.3), "permuted": Family.permute(ours)}  # fmt: skip
    ind = [fam.train_in_order(fam.new(100 + i), list(shuffle(texts).examples), lr=args.lr)
           for i in range(args.independents)]  # fmt: skip
    base = fam.base(7, steps=100)
    trained_s = time.time() - t0
    srv = OAIServer()
    tok = fam.tokenizer
    url = {n: srv.add(n, Served(m, tok, n)) for n, m in derived.items()}
    url.update({f"{n}-text": srv.add(f"{n}-text", Served(m, tok, n, logprobs=False)) for n, m in derived.items()})
    url.update({f"I{i}": srv.add(f"I{i}", Served(m, tok, f"I{i}")) for i, m in enumerate(ind)})
    norm = [HFScorer(model=base, tokenizer=tok, name="public-base")]
    n = len(order.examples)
    out: dict = {"command": "python bench/probe_order.py " + " ".join(sys.argv[1:]),
                 "setup": {"examples": n, "tokens_per_example": 40, "lr": args.lr, "pass": "one, each example once",
                           "model": "Llama d=32 ff=96 2 layers, BPE vocab 320, seq 48",
                           "derivatives": {"ft-short": "25 steps lr 5e-4 on other text", "ft-long": "100 steps lr 1e-3",
                                           "lora-r8": "rank 8 on every projection, 40 steps lr 3e-3 on other text, "
                                                      "merged", "int4": "group-wise (32) symmetric int4 round trip",
                                           "permuted": "MLP neurons and attention heads permuted in every layer"},
                           "text_mode": {"cuts": args.cuts, "new_tokens": args.new_tokens, "temperature": 1.0},
                           "normaliser": "a model trained 100 steps on random windows of the same data",
                           "train_seconds": round(trained_s, 1)},
                 "derived": {}}  # fmt: skip
    sizes = [q for q in _ints(args.items) if q // 2 <= n // 2]
    plan = [tuple(int(v) for v in x.split("x")) for x in args.text_plan.split(",") if x]
    extra: dict[str, list[tuple[int, ...]]] = {}
    for x in (x for x in args.text_extra.split(",") if x):
        nm, _, ks = x.partition(":")
        extra.setdefault(nm, []).append(tuple(int(v) for v in ks.split("x")))

    def text_row(name: str, pairs: list) -> dict:
        row = {}
        for k2, smp in pairs:
            r = order_probe(url[f"{name}-text"], order, mode="text", n_items=k2, cuts=args.cuts, samples=smp,
                            new_tokens=args.new_tokens, home=home, cache=work / "cache" / f"{name}-text",
                            budget=10**7)  # fmt: skip
            row[r.queries_used + r.queries_cached] = {"examples": k2, "samples": smp, "auc": round(r.auc, 3),
                                                      "log10_p": round(r.log10_p_value, 2)}  # fmt: skip
            print(json.dumps({name: {"text": row}}), file=sys.stderr, flush=True)
        return row
    for name in derived:
        row: dict = {"logprobs": {}, "logprobs_no_normaliser": {}, "text": {}}
        for q in sizes:
            cache = work / "cache" / name
            r = order_probe(url[name], order, normalisers=norm, n_items=q, home=home, cache=cache, budget=10**6)
            row["logprobs"][q] = round(r.log10_p_value, 2)
            r = order_probe(url[name], order, n_items=q, home=home, cache=cache, budget=10**6)
            row["logprobs_no_normaliser"][q] = round(r.log10_p_value, 2)
        row["text"] = text_row(name, plan)
        row["queries_for_p_below_1e-6"] = {k: next((q for q, v in row[k].items()
                                                    if (v["log10_p"] if isinstance(v, dict) else v) < -6), None)
                                           for k in row}  # fmt: skip
        out["derived"][name] = row
        print(json.dumps({name: row}), file=sys.stderr, flush=True)
    for name, pairs in extra.items():  # the larger text-mode budgets, last (the longest runs)
        out["derived"][name]["text"].update(text_row(name, pairs))
        row = out["derived"][name]
        row["queries_for_p_below_1e-6"]["text"] = next((q for q, v in row["text"].items() if v["log10_p"] < -6), None)
    # the text-mode null: one independent model, many random orders of a fixed pool of the examples (the same
    # texts in every order, so the answers are cached and each probe costs no new query after the first few)
    if args.text_null_orders:
        url["I0-text"] = srv.add("I0-text", Served(ind[0], tok, "I0", logprobs=False))
        pool = texts[: args.text_null_pool]
        tps = []
        for j in range(args.text_null_orders):
            rng = np.random.default_rng(50_000 + j)
            o = TrainingOrder(tuple(pool[k] for k in rng.permutation(len(pool))), "csprng")
            r = order_probe(url["I0-text"], o, mode="text", n_items=args.text_null_items, cuts=args.cuts,
                            samples=args.text_null_samples, new_tokens=args.new_tokens, home=home,
                            cache=work / "cache" / "I0-text", budget=10**7)  # fmt: skip
            # (one seed for every order: the same questions, answered once; the orders are what is random, and
            # ties are broken by a hash of each text, which travels with it: each p-value exact given the model)
            tps.append(r.p_value)
        t_a = np.array(tps)
        out["text_null"] = {"pairs": len(tps), "models": 1, "pool_texts": len(pool),
                            "examples_per_probe": args.text_null_items, "samples": args.text_null_samples,
                            "cuts": args.cuts, "false_positives_1e-6": int((t_a < 1e-6).sum()),
                            "false_positives_1e-3": int((t_a < 1e-3).sum()), "min_p": float(t_a.min()),
                            "fraction_below_0.05": round(float((t_a < 0.05).mean()), 3),
                            "ks_p": float(stats.kstest(t_a, "uniform").pvalue)}  # fmt: skip
        print(json.dumps({"text_null": out["text_null"]}), file=sys.stderr, flush=True)
    # the null: each independent model against many independent random orders of the same examples
    ps = []
    for i in range(args.independents if args.orders else 0):
        for j in range(args.orders):
            rng = np.random.default_rng(10_000 * i + j)
            o = TrainingOrder(tuple(texts[k] for k in rng.permutation(n)), "csprng")
            r = order_probe(url[f"I{i}"], o, normalisers=norm, n_items=args.null_items, home=home,
                            cache=work / "cache" / f"I{i}", budget=10**6, seed=j)  # fmt: skip
            ps.append(r.p_value)
    ps_a = np.array(ps or [0.5])
    out["null"] = {} if not ps else {"pairs": len(ps), "models": args.independents, "orders_per_model": args.orders,
                   "queries_per_probe": args.null_items, "false_positives_1e-6": int((ps_a < 1e-6).sum()),
                   "false_positives_1e-3": int((ps_a < 1e-3).sum()), "min_p": float(ps_a.min()),
                   "fraction_below_0.05": round(float((ps_a < 0.05).mean()), 3),
                   "ks_p": float(stats.kstest(ps_a, "uniform").pvalue),
                   "why_exact": "given a model independent of the order, independent uniformly random orders give "
                                "independent Uniform(0,1) p-values (assumption A1); the pairs share models, which "
                                "does not matter given the model"}  # fmt: skip
    # the normal approximation (used above EXACT_LIMIT) against the exact distribution, where both are computed
    approx = []
    rng = np.random.default_rng(0)
    for k in (100, 200, 400):
        for shift in (0.35, 0.5, 0.7):
            a, b = rng.normal(shift, 1, k), rng.normal(0, 1, k)
            ex = stats.mannwhitneyu(a, b, alternative="greater", method="exact").pvalue
            r = rank_sum_p(a, b)
            u = float(stats.mannwhitneyu(a, b, alternative="greater").statistic)
            zc = (u - 0.5 - k * k / 2) / math.sqrt(k * k * (2 * k + 1) / 12)
            nl = float(stats.norm.logsf(zc) / math.log(10))
            approx.append({"k": k, "log10_p_exact": round(math.log10(ex), 3), "log10_p_normal": round(nl, 3),
                           "normal_conservative": nl >= math.log10(ex), "used": r["method"]})  # fmt: skip
    out["normal_approximation"] = approx
    out["seconds"] = round(time.time() - t0, 1)
    srv.close()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

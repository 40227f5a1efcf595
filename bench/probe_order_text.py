"""Text-only mode of the exact training-order test on a LONG order (issue 21).  Prints JSON.

    python bench/probe_order_text.py                            # defaults: ~16,000 examples of 16 tokens
    python bench/probe_order_text.py --examples 6000 --tokens 24 --ks 250,500,1000 --http-k 250

``bench/probe_order.py`` trains its tiny Llama on ~1,285 examples, too few for text mode (docs/PROVENANCE.md
extrapolated ~5,500).  This bench trains the same tiny model (one pass, each example once, in a ``shuffle()``
order, constant learning rate) on a much longer order of *short* examples cut from Python's own stdlib
sources, so that the K latest and K earliest examples can be thousands, and measures text mode on:

* ``ft-short`` (25 steps, lr 5e-4 on other text) and ``int8``, derived from ours;
* ``null``: an independent model trained on the *same* examples in another random order (the test is exact;
  its p-values should look uniform), plus a few extra random orders against it (``--null-orders``).

**How it is measured.**  1e5 text-mode queries through the tests' HTTP server take ~15 minutes per probe on
the shared cores, so the sweep runs *in process*: for each example, the probe's own cut rule
(``ordertest._word_cuts``), one sampled continuation of ``--new-tokens`` tokens per (cut, sample) from the
model itself (the server's procedure: the prompt tokenized as the server does, multinomial sampling at
temperature 1 from the softmax of the logits, or argmax at temperature 0, ``tokenizer.decode`` of the new
tokens), the probe's score (``ordertest._lcp``: agreeing characters, averaged over cuts and samples) and
its test (``ordertest.rank_sum_p`` with the probe's keyed tie-break of each text, a public seed).  Batching
prompts of equal token length is the only difference from the server (random streams differ, the law of
each answer is the same).  ``--http-k`` runs the real ``order_probe(..., mode="text")`` through the HTTP
server for one K as a cross-check of the in-process figures.

Also reported, as diagnostics (not text mode): ``logprob_auc``, the AUC of the log-likelihood of each
example (what logprobs mode sees, no normaliser) and ``oracle_auc``, the AUC of the *expected* text-mode
score computed from the suspect's own probabilities (infinitely many samples): a ceiling for text mode.
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

MODULES = ("textwrap", "string", "shlex", "fnmatch", "glob", "calendar", "heapq", "bisect", "colorsys", "difflib",
           "argparse", "json.decoder", "json.encoder", "csv", "pprint", "reprlib", "dataclasses", "inspect", "typing",
           "enum", "functools", "pathlib", "logging", "tarfile", "zipfile", "subprocess", "threading", "doctest",
           "pydoc", "unittest.case", "configparser", "optparse", "ast", "tokenize", "email.message", "http.client",
           "urllib.parse", "ftplib", "imaplib", "smtplib", "mailbox", "statistics", "fractions", "_pydecimal",
           "datetime", "random", "tempfile", "shutil", "gettext", "locale", "traceback", "socket", "selectors",
           "asyncio.base_events")  # fmt: skip


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=16_000, help="length of the training order (examples)")
    ap.add_argument("--tokens", type=int, default=16, help="tokens per training example")
    ap.add_argument("--text-limit", type=int, default=2_900_000, help="characters of stdlib source")
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--ff", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--ks", default="250,500,1000,2000,3200", help="K latest vs K earliest examples")
    ap.add_argument("--cuts", default="8,16", help="cuts per example (a list: each is measured)")
    ap.add_argument("--samples", default="1,2,4", help="samples per cut (temperature 1)")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=True, help="also temperature 0")
    ap.add_argument("--budget", type=int, default=100_000, help="query budget per probe (larger settings skipped)")
    ap.add_argument("--suspects", default="ft-short,int8,null")
    ap.add_argument("--null-orders", type=int, default=20, help="extra random orders against the null model")
    ap.add_argument(
        "--normaliser",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also score minus a normaliser's expected score (a model on the same examples, other order)",
    )
    ap.add_argument("--http-k", type=int, default=0, help="also run order_probe through the HTTP server, this K")
    ap.add_argument("--http-samples", type=int, default=1)
    ap.add_argument("--http-temperature", type=float, default=0.0)
    args = ap.parse_args()
    import numpy as np
    import torch
    from scipy import stats

    from tests.support import oai_server
    from tests.support.oai_server import Family, OAIServer, Served
    from weightwarden.provenance.order import TrainingOrder, shuffle
    from weightwarden.provenance.ordertest import _lcp, _Plan, _word_cuts, order_probe, rank_sum_p

    t0 = time.time()

    def corpus(limit: int = 0) -> str:
        import importlib

        parts = [Path(importlib.import_module(m).__file__).read_text(encoding="utf-8") for m in MODULES]
        return "\n".join(parts)[: limit or None]

    oai_server.corpus = corpus  # the same tiny family, on more of the stdlib (Family reads this at init)
    work = Path(tempfile.mkdtemp(prefix="ww-probe-order-text-"))
    seq = max(48, args.tokens + args.new_tokens + 2)
    fam = Family(work / "zoo", vocab=320, d=args.d, ff=args.ff, seq=seq, batch=args.batch, text_limit=args.text_limit)
    texts = fam.examples(args.tokens)
    if len(texts) < args.examples:
        print(f"only {len(texts)} examples of {args.tokens} tokens in the corpus", file=sys.stderr)
    texts = texts[: args.examples]
    n = len(texts)
    order = shuffle(texts)
    ours = fam.train_in_order(fam.new(0), list(order.examples), lr=args.lr)
    t_train = time.time() - t0
    names = [x for x in args.suspects.split(",") if x]
    models = {}
    if "ft-short" in names:
        models["ft-short"] = fam.finetune(ours, steps=25, lr=5e-4)
    if "int8" in names:
        models["int8"] = Family.int8(ours)
    if "ours" in names:
        models["ours"] = ours
    if "null" in names:
        models["null"] = fam.train_in_order(fam.new(100), list(shuffle(texts).examples), lr=args.lr)
    # a normaliser (assumption A2: independent of the order): the same examples in yet another random order
    norm = fam.train_in_order(fam.new(200), list(shuffle(texts).examples), lr=args.lr) if args.normaliser else None
    tok = fam.tokenizer
    print(json.dumps({"trained": n, "seconds": round(time.time() - t0, 1)}), file=sys.stderr, flush=True)

    ids_of = {t: tok(t, add_special_tokens=False)["input_ids"] for t in texts}
    cut_list = _ints(args.cuts)
    cuts_by = {nc: {t: _word_cuts(t, nc) for t in texts} for nc in cut_list}
    cuts_of = cuts_by[cut_list[0]]  # the diagnostics' cuts

    @torch.no_grad()
    def full_logp(model, batch_texts):  # per text: log-softmax rows (tokens x vocab), equal lengths
        x = torch.tensor([ids_of[t] for t in batch_texts])
        return torch.log_softmax(model(input_ids=x).logits.float(), -1)

    def piece_ends(t):  # character offset at the end of each token of t
        ends, pos = [], 0
        for i in ids_of[t]:
            pos += len(tok.decode([i]))
            ends.append(pos)
        return ends

    ends_of = {t: piece_ends(t) for t in texts}

    def diagnostics(model, sel):
        """log-likelihood of each text and the expected text-mode score (T=1) from the model's probabilities."""
        ll, oracle, greedy = np.zeros(len(sel)), np.zeros(len(sel)), np.zeros(len(sel))
        for s in range(0, len(sel), 256):
            chunk = sel[s : s + 256]
            lp = full_logp(model, chunk)
            for r, t in enumerate(chunk):
                ids = ids_of[t]
                row = lp[r, torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
                top = (lp[r, : len(ids) - 1].argmax(-1) == torch.tensor(ids[1:])).numpy()
                ll[s + r] = row.sum()
                ends = ends_of[t]
                vals, gvals = [], []
                for c in cuts_of[t]:
                    if c not in ends:  # the cut is not a token boundary of the full text: skip in the oracle
                        continue
                    j = ends.index(c) + 1  # first token of the continuation
                    acc, e, gacc, ge = 0.0, 1.0, 0.0, 1.0
                    for k in range(j, min(j + args.new_tokens, len(ids))):
                        e *= math.exp(row[k - 1])
                        acc += e * (ends[k] - ends[k - 1])
                        ge *= float(top[k - 1])
                        gacc += ge * (ends[k] - ends[k - 1])
                    vals.append(acc)
                    gvals.append(gacc)
                oracle[s + r] = float(np.mean(vals)) if vals else 0.0
                greedy[s + r] = float(np.mean(gvals)) if gvals else 0.0
        return ll, oracle, greedy

    @torch.no_grad()
    def text_scores(model, sel, samples, temperature, seed, cuts_of=cuts_of):
        """The probe's text-mode score of each text, sampled in process (prompts of equal length batched)."""
        g = torch.Generator().manual_seed(seed)
        work_items = []  # (text index, cut, prompt ids)
        for i, t in enumerate(sel):
            for c in cuts_of[t]:
                pids = tok(t[:c], add_special_tokens=False)["input_ids"]
                for _ in range(samples if temperature > 0 else 1):
                    work_items.append((i, c, pids))
        total, count = np.zeros(len(sel)), np.zeros(len(sel))
        by_len: dict[int, list[int]] = {}
        for w, (_, _, p) in enumerate(work_items):
            by_len.setdefault(len(p), []).append(w)
        for _, ws in sorted(by_len.items()):
            for s in range(0, len(ws), 512):
                chunk = ws[s : s + 512]
                x = torch.tensor([work_items[w][2] for w in chunk])
                for _ in range(args.new_tokens):
                    if x.shape[1] >= seq:
                        break
                    logits = model(input_ids=x).logits[:, -1].float()
                    if temperature <= 0:
                        nxt = logits.argmax(-1, keepdim=True)
                    else:
                        nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g)
                    x = torch.cat([x, nxt], 1)
                for r, w in enumerate(chunk):
                    i, c, p = work_items[w]
                    cont = tok.decode(x[r, len(p) :].tolist())
                    total[i] += _lcp(cont, sel[i][c:])
                    count[i] += 1
        return total / np.maximum(count, 1), len(work_items)

    plan = _Plan(None, 0)  # public seed: a bench (the CLI draws a secret)

    def test(scores, k, sel):
        keys = np.array([plan.tie(t) for t in sel])
        r = rank_sum_p(scores[:k], scores[k:], plan.last_seed(), tie=np.concatenate([keys[:k], keys[k:]]))
        return {"log10_p": round(r["log10_p"], 2), "auc": round(r["auc"], 4), "method": r["method"]}

    def auc(a, k):
        return round(float(stats.mannwhitneyu(a[:k], a[k:]).statistic) / (k * k), 4)

    ks = [k for k in _ints(args.ks) if k <= n // 2]
    samples_list = _ints(args.samples)
    out: dict = {"command": "python bench/probe_order_text.py " + " ".join(sys.argv[1:]),
                 "measured": "in process: the probe's cut rule, score and rank-sum test (ordertest._word_cuts, _lcp, "
                             "rank_sum_p, keyed tie-break), continuations sampled from the model as the tests' HTTP "
                             "server samples them (prompts of equal length batched); not through HTTP, except "
                             "'http' below",
                 "setup": {"examples": n, "tokens_per_example": args.tokens, "lr": args.lr, "batch": args.batch,
                           "pass": "one, each example once, constant lr", "corpus_chars": len(fam.text),
                           "model": f"Llama d={args.d} ff={args.ff} 2 layers, BPE vocab 320, seq {seq}",
                           "cuts": cut_list, "new_tokens": args.new_tokens, "budget": args.budget,
                           "train_seconds_ours": round(t_train, 1)},
                 "suspects": {}}  # fmt: skip
    ex = order.examples
    for name, model in models.items():
        row: dict = {}
        for k in ks:
            sel = [ex[n - k + i] for i in range(k)] + [ex[i] for i in range(k)]  # latest first, then earliest
            ll, oracle, greedy = diagnostics(model, sel)
            cell: dict = {"logprob_auc": auc(ll, k), "oracle_auc": auc(oracle, k), "greedy_oracle_auc": auc(greedy, k)}
            if norm is not None:
                n_ll, n_or, n_gr = diagnostics(norm, sel)
                cell.update(
                    {
                        "logprob_auc_normalised": auc(ll - n_ll, k),
                        "oracle_auc_normalised": auc(oracle - n_or, k),
                        "greedy_oracle_auc_normalised": auc(greedy - n_gr, k),
                    }
                )
            settings = [(1.0, s) for s in samples_list] + ([(0.0, 1)] if args.greedy else [])
            for nc in cut_list:
                for temp, smp in settings:
                    est = sum(len(cuts_by[nc][t]) for t in sel) * (smp if temp > 0 else 1)
                    if est > args.budget:
                        continue
                    ts = time.time()
                    sc, q = text_scores(model, sel, smp, temp, seed=k * 100 + smp + (7 if temp <= 0 else 0),
                                        cuts_of=cuts_by[nc])  # fmt: skip
                    key = f"cuts{nc}-T{temp:g}x{smp}"
                    cell[key] = {"queries": q, **test(sc, k, sel), "seconds": round(time.time() - ts, 1)}
                    if norm is not None and temp > 0 and nc == cut_list[0]:  # minus the normaliser's expected score
                        cell[key]["normalised"] = test(sc - n_or, k, sel)
                    if norm is not None and temp <= 0:  # minus the normaliser's own greedy score at the same cuts
                        n_sc, _ = text_scores(norm, sel, 1, 0.0, seed=0, cuts_of=cuts_by[nc])
                        cell[key]["normalised"] = test(sc - n_sc, k, sel)
            row[k] = cell
            print(json.dumps({name: {k: cell}}), file=sys.stderr, flush=True)
        out["suspects"][name] = row
    # the null: the independent model against more random orders of the same examples (exact under A1)
    if "null" in models and args.null_orders:
        k = max(ks)
        nulls: dict = {}
        for temp, smp in ([(1.0, 1)] if samples_list else []) + ([(0.0, 1)] if args.greedy else []):
            ps = []
            for j in range(args.null_orders):
                rng = np.random.default_rng(70_000 + j)
                perm = [ex[i] for i in rng.permutation(n)]
                sel = perm[n - k :] + perm[:k]
                sc, _ = text_scores(models["null"], sel, smp, temp, seed=j, cuts_of=cuts_by[cut_list[0]])
                ps.append(10 ** test(sc, k, sel)["log10_p"])
            pa = np.array(ps)
            nulls[f"T{temp:g}x{smp}"] = {"orders": len(ps), "k": k, "min_p": float(pa.min()),
                                         "below_1e-3": int((pa < 1e-3).sum()),
                                         "fraction_below_0.05": round(float((pa < 0.05).mean()), 3),
                                         "ks_p": round(float(stats.kstest(pa, "uniform").pvalue), 3)}  # fmt: skip
        out["null_orders"] = nulls
        print(json.dumps({"null_orders": nulls}), file=sys.stderr, flush=True)
    # cross-check through the real HTTP server: order_probe(mode="text") as `warden provenance probe` runs it
    if args.http_k:
        srv = OAIServer()
        http: dict = {}
        for name in [x for x in ("ft-short", "null") if x in models]:
            url = srv.add(name, Served(models[name], tok, name, logprobs=False))
            ts = time.time()
            r = order_probe(url, TrainingOrder(ex, "csprng"), mode="text", n_items=2 * args.http_k, cuts=cut_list[0],
                            samples=args.http_samples, new_tokens=args.new_tokens, home=work / "home",
                            temperature=args.http_temperature,
                            cache=work / "cache" / name, budget=10**7, seed=0)  # fmt: skip
            http[name] = {"k": args.http_k, "samples": args.http_samples, "temperature": args.http_temperature,
                          "cuts": cut_list[0], "queries": r.queries_used,
                          "log10_p": round(r.log10_p_value, 2), "auc": round(r.auc, 4),
                          "seconds": round(time.time() - ts, 1)}  # fmt: skip
            print(json.dumps({"http": {name: http[name]}}), file=sys.stderr, flush=True)
        srv.close()
        out["http"] = http
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

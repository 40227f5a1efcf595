"""Attribution through an API (issue 21): `warden trace --endpoint` on a small trained model.  Prints JSON.

    python bench/trace_endpoint.py                                  # defaults below (a few minutes, 1 core)
    python bench/trace_endpoint.py --code-length 4096 --d 64 --ff 256 --layers 4 --queries 16,32,64,128
    python bench/trace_endpoint.py --attacks ft-short --queries 128,512,2048,4096 --diagnose   # why ft-short fails

Trains a tiny Llama on Python's stdlib sources (tests/support/oai_server.py), releases fingerprinted copies to
``--recipients`` recipients (the release path of `warden release`, code length ``--code-length``), and serves
through the tests' OpenAI-compatible HTTP server: one recipient's copy as is, after an int8 round trip of every
matrix, after a short fine-tune on other data (15 steps; ``ft-long``: 60), two colluders' average, the unmarked
master and an independent model; and (``project``, ``project-ft``) the copy with its head projected onto the columns
of the public base's head (``--public-base STEPS``: the master is then a fine-tune of the bench's model, the public
base; without it, onto the master's own head: a head the owner's fine-tune left as the base had it), then
fine-tuned. ``--span`` sets the head mark's in-span share for the release (trace/head.py; default ``SPAN_SHARE``).
The JSON gives the held-out loss ratio to the master of the copy as is and projected. For each, at each query count
(echoed prompts of the master's context length, ``--top`` alternatives, default 20), through the product's reads
(``read_symbols``: the weight read, and the head read when the copies carry the head mark, ``--head AMP``; each
decided at eps / reads, accused = the union):

* the accused recipients at population 1e6, eps 1e-6, the leaker's score and the threshold;
* innocent trials: ``--innocents`` never-released recipient indices of the same code scored against the same
  threshold (an innocent's codeword is independent of the estimate, like an unused one): how many pass it and
  the highest innocent score over the threshold.

Prompts are 400-character windows of the text, ``--queries``' largest count of them, evenly spaced (overlapping
when there are more than 283).  ``--diagnose`` adds, for ft-short (docs/TRACING.md, "Why a fine-tune defeats
the trace through an API"): the root-mean-square change of the answers that the mark makes (J D s, the copy as
is against the master) and that the fine-tune makes (fine-tuned copy against the copy), per log-probability;
the weight-level trace of the fine-tuned weights (``extract`` + ``decide``); and the oracle that knows the
fine-tune's own change of the answers (the same fine-tune, same data and seed, applied to the master):
the estimate from (fine-tuned copy - fine-tuned master) linearised at the master, i.e. what is left of the
mark in the answers.  The oracle is for measurement only: the owner does not hold the fine-tuned master.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipients", type=int, default=8)
    ap.add_argument("--code-length", type=int, default=1024)
    ap.add_argument("--d", type=int, default=48)
    ap.add_argument("--ff", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--queries", default="8,16,32,64")
    ap.add_argument("--iterations", type=int, default=16)
    ap.add_argument("--innocents", type=int, default=100_000)
    ap.add_argument("--attacks", default="as-is,int8,ft-short,collude2,master,independent")
    ap.add_argument("--diagnose", action="store_true", help="ft-short: why (module docstring)")
    ap.add_argument("--top", type=int, default=20, help="alternatives asked per token")
    ap.add_argument("--head", type=float, default=None, help="the head mark's amplitude (default: the release's)")
    ap.add_argument("--span", type=float, default=None, help="the head mark's in-span share (default: SPAN_SHARE)")
    ap.add_argument("--read-base", action="store_true", help="give the public base to the read (trace --base)")
    ap.add_argument("--public-base", type=int, default=0, metavar="STEPS",
                    help="the master is a fine-tune (STEPS steps) of a public base, which `project` projects onto")
    args = ap.parse_args()
    import numpy as np
    import torch
    import transformers as T

    import weightwarden as ww
    from tests.support.cli import PASSPHRASE, TEST_KDF
    from tests.support.oai_server import Family, OAIServer, Served
    from weightwarden.provenance.endpoint import Endpoint
    from weightwarden.trace import release
    from weightwarden.trace.accuse import decide
    from weightwarden.trace.endpoint import _head_mark, carriers, closest_variant, decide_reads, observe, read_symbols
    from weightwarden.trace.recipients import open_store
    from weightwarden.trace.scorer import HFGradientScorer
    from weightwarden.trace.store import derive
    from weightwarden.trace.tardos import TardosCode

    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="ww-trace-endpoint-bench-"))
    fam = Family(work / "fam", vocab=384, d=args.d, ff=args.ff, layers=args.layers, seq=64, batch=16,
                 text_limit=200_000)  # fmt: skip
    base = fam.base(0, steps=args.steps)
    master = fam.finetune(base, steps=args.public_base, seed=11, lr=1e-3) if args.public_base else base
    master_path = fam.save(master, "master")
    home = work / "home"
    kr = ww.Keyring.create(home, PASSPHRASE, kdf=TEST_KDF)
    prov = kr.provider(purpose="tracing", create=True)
    names = [f"r{i}" for i in range(args.recipients)]
    import os

    os.environ.setdefault("WARDEN_ALLOW_SAMPLE_LIST", "1")
    if args.span is not None:
        import weightwarden.trace.copies as copies_mod

        copies_mod.SPAN_SHARE = args.span
    for r in names:
        release(master_path, r, work / r, provider=prov, country="GB", home=home, model_id="m",
                code_length=args.code_length, **({"head_amp": args.head} if args.head is not None else {}))  # fmt: skip

    def load(p: Path):
        return T.AutoModelForCausalLM.from_pretrained(p).eval()

    leak = load(work / names[0])
    a, b = load(work / names[1]), load(work / names[2])
    avg = copy.deepcopy(a)
    with torch.no_grad():
        for (_, pa), (_, pb), (_, pv) in zip(a.named_parameters(), b.named_parameters(), avg.named_parameters(),
                                             strict=True):  # fmt: skip
            pv.copy_((pa + pb) / 2)
    projected = project(leak, base)  # the head on the public base's columns (the master's own with no base)
    suspects = {"as-is": (leak, {names[0]}), "int8": (Family.int8(leak), {names[0]}),
                "project": (projected, {names[0]}),
                "project-ft": (fam.finetune(projected, steps=15, lr=3e-4), {names[0]}),
                "ft-short": (fam.finetune(leak, steps=15, lr=3e-4), {names[0]}),
                "ft-long": (fam.finetune(leak, steps=60, lr=3e-4), {names[0]}),  # four times as long
                "collude2": (avg, {names[1], names[2]}), "master": (load(master_path), set()),
                "independent": (fam.base(7, steps=args.steps), set())}  # fmt: skip
    trained_s = time.time() - t0
    srv = OAIServer()
    scorer = HFGradientScorer(master_path)
    store = open_store(home)
    rec = store.model("m")
    secret = store.secret(rec, prov)
    code_key, embed_key, head_key = derive(secret, "tardos-code"), derive(secret, "embed"), derive(secret, "head")
    ell = rec.code_length
    code = TardosCode(code_key, ell, rec.cutoff)
    tensors = scorer.tensors()
    car = carriers(tensors, embed_key, ell, rec.alpha)
    hm, head_name = _head_mark(rec.head, tensors, head_key, code, rec.head_span)
    head = (hm, head_name, tensors[head_name]) if hm is not None else None
    base_head = base.lm_head.weight.detach().double().numpy() if args.read_base else None
    qs = [int(q) for q in args.queries.split(",")]
    step = max(1, min(700, (len(fam.text) - 1400) // max(qs)))
    prompts = [fam.text[i : i + 400] for i in range(1000, len(fam.text) - 400, step)]
    results = {}
    for attack in args.attacks.split(","):
        model, guilty = suspects[attack]
        url = srv.add(attack, Served(model, fam.tokenizer, attack))
        with Endpoint(url, budget=10**6) as ep:
            obs = observe(ep, scorer, prompts, max(qs), top=args.top)
        rows = []
        for q in qs:
            t1 = time.time()
            ref, _, reads = read_symbols(scorer, obs.head(q), car, ell, args.iterations, head=head,
                                         base_head=base_head)  # fmt: skip
            rep = decide_reads(code, "m", names, reads, eps=1e-6, population=10**6, blocks=0, endpoint={})
            # innocent trials: each read against its own threshold (eps / reads each), over = over either
            over = np.zeros(args.innocents, bool)
            worst = 0.0
            for y, w in reads.values():
                z = decide(code, "m", names, y, w, eps=1e-6 / len(reads), population=10**6, blocks=0).threshold
                inn = code.scores(y, args.recipients + args.innocents, known=w)[args.recipients :]
                over |= inn > z
                worst = max(worst, float(inn.max() / z))
            acc = {x["recipient"] for x in rep.accused}
            rows.append({"queries": q, "data_points": obs.head(q).points, "accused": sorted(acc),
                         "correct": bool(acc) and acc <= guilty if guilty else not acc,
                         "threshold": round(rep.threshold, 1),
                         "guilty_scores": {x["recipient"]: x["score"] for x in rep.ranking if x["recipient"] in guilty},
                         "reads": {k: {"accused": v["accused"], "top": v["top"][:2], "threshold": v["threshold"]}
                                   for k, v in (rep.endpoint or {}).get("reads", {}).items()},
                         "innocent_trials": args.innocents, "innocents_over": int(over.sum()),
                         "max_innocent_over_threshold": round(worst, 3),
                         "seconds": round(time.time() - t1, 1)})  # fmt: skip
        if args.diagnose and attack == "ft-short":  # the weight mark alone (docs/TRACING.md)
            _, sc, obs = closest_variant(scorer, obs)
            results["ft-short-diagnosis"] = diagnose(fam, model, master_path, work / names[0], obs, scorer, car, code,
                                                     embed_key, rec.alpha, names, qs, args.iterations, sc)  # fmt: skip
            print(json.dumps({"ft-short-diagnosis": results["ft-short-diagnosis"]}), file=sys.stderr, flush=True)
        need = next((r["queries"] for r in rows if r["correct"] and guilty), None)
        results[attack] = {"guilty": sorted(guilty), "reference": ref, "queries_to_accuse": need, "runs": rows}
        print(json.dumps({attack: results[attack]}), file=sys.stderr, flush=True)
    srv.close()
    ref_loss = held_loss(fam, load(master_path))
    quality = {k: round(held_loss(fam, m) / ref_loss, 5) for k, (m, _) in suspects.items()
               if k in ("as-is", "project", "project-ft", "ft-short", "ft-long")}  # fmt: skip
    print(json.dumps({"head": rec.head, "head_span": rec.head_span, "public_base": args.public_base,
                      "read_base": args.read_base,
                      "loss_ratio_to_master": quality,
                      "model": {"d": args.d, "ff": args.ff, "layers": args.layers, "steps": args.steps,
                                "carriers": int(sum(len(c.idx) for c in car.values())), "code_length": ell},
                      "iterations": args.iterations, "population": 10**6, "eps": 1e-6, "trained_s": round(trained_s, 1),
                      "total_s": round(time.time() - t0, 1), "attacks": results}, indent=1))  # fmt: skip


def project(model, anchor):
    """A copy of ``model`` whose output head is projected onto the column space of ``anchor``'s head: what a
    holder of one copy can do without keys when the master is a fine-tune of a public base (``anchor``)."""
    import torch

    from weightwarden.trace.head import project

    m = copy.deepcopy(model)
    with torch.no_grad():
        w = project(m.lm_head.weight.double().numpy(), anchor.lm_head.weight.detach().double().numpy())
        m.lm_head.weight.copy_(torch.from_numpy(w).to(m.lm_head.weight.dtype))
    return m


def held_loss(fam, model):
    """Mean next-token loss on the held-out split's 64-token windows."""
    import torch

    d = fam.splits["finetune"]
    k = (len(d) - 1) // 64
    x = d[: k * 64].view(k, 64)
    with torch.no_grad():
        lp = torch.cat([torch.log_softmax(model(input_ids=x[i : i + 64]).logits.float(), -1) for i in range(0, k, 64)])
    return float(-lp[:, :-1].gather(-1, x[:, 1:, None]).mean())


def diagnose(fam, ft, master_path, leak_path, obs, scorer, car, code, embed_key, alpha, names, qs, iterations, sc):
    """Why ft-short is not traced through the API (module docstring, ``--diagnose``)."""
    import numpy as np
    import transformers as T

    from weightwarden.trace.accuse import decide
    from weightwarden.trace.endpoint import Observations, _gather, _spread, estimate_symbols, symbols
    from weightwarden.trace.mark import extract
    from weightwarden.trace.scorer import HFGradientScorer

    ell = code.length
    s_true = 2.0 * code.codewords(0, 1)[0].astype(np.float64) - 1  # r0's symbols (the leaker's), for measuring only

    def rms(v):
        return float(np.sqrt(np.mean(np.square(v))))

    def judge(s_hat):
        y, w = symbols(s_hat, car, ell)
        z = decide(code, "m", names, y, w, eps=1e-6, population=10**6, blocks=0).threshold
        return {"sign_accuracy": round(float(np.mean((np.sign(s_hat) == s_true)[w > 0])), 3),
                "leaker_score_over_threshold": round(float(code.scores(y, 1, known=w)[0]) / z, 3)}  # fmt: skip

    q = obs.q
    m = scorer.logprobs_at(q)
    y_ft = obs.r + sc.logprobs_at(q) if sc is not scorer else obs.r + m
    y_leak = HFGradientScorer(leak_path).logprobs_at(q)
    mark = scorer.jvp(q, _spread(car, s_true))
    ft_path = fam.save(ft, "ft-short")
    ftm_path = fam.save(fam.finetune(T.AutoModelForCausalLM.from_pretrained(master_path).eval(), steps=15, lr=3e-4),
                        "ft-short-master")  # the same fine-tune (data, seed) on the master: the oracle's nuisance
    y_ftm = HFGradientScorer(ftm_path).logprobs_at(q)
    ex = extract(master_path, ft_path, embed_key, ell, alpha)
    y, w = ex.symbols()
    z = decide(code, "m", names, y, w, eps=1e-6, population=10**6, blocks=0).threshold
    # the matched filter D^T J^T (the first iterate) of the fine-tune's own change vs of the mark, per symbol, and the
    # same in the weights (D^T of the weight change): how much the answers amplify the fine-tune against the mark
    h = obs.head(min(512, obs.prompts))
    names_m = list(car)
    b_mark = _gather(car, scorer.vjp(h.q, mark[: h.points], names_m), ell)
    b_ft = _gather(car, scorer.vjp(h.q, (y_ftm - m)[: h.points], names_m), ell)
    t_m, t_f = scorer.tensors(), HFGradientScorer(ftm_path).tensors()
    w_ft = _gather(car, {n: t_f[n] - t_m[n] for n in car}, ell)
    w_mark = _gather(car, _spread(car, s_true), ell)
    out = {"rms_per_symbol_ft_over_mark": {"answers": round(rms(b_ft) / rms(b_mark), 1),
                                           "weights": round(rms(w_ft) / rms(w_mark), 2)},
           "rms_per_logprob": {"mark": round(rms(y_leak - m), 5), "mark_linearised": round(rms(mark), 5),
                               "fine_tune": round(rms(y_ft - y_leak), 5),
                               "fine_tune_of_master": round(rms(y_ftm - m), 5),
                               "mark_left_after_fine_tune": round(rms(y_ft - y_ftm), 5)},
           "mark_linearisation_rel_error": round(rms(mark - (y_leak - m)) / rms(y_leak - m), 4),
           "weight_trace": {"sign_accuracy": round(float(np.mean(((2.0 * y - 1) == s_true)[w > 0])), 3),
                            "leaker_score_over_threshold": round(float(code.scores(y, 1, known=w)[0]) / z, 3)},
           "oracle_nuisance_known": []}  # fmt: skip
    for n in [n for n in qs if n <= 512] or qs[:1]:  # (the oracle is measurement only: the smaller counts)
        o = obs.head(n)
        out["oracle_nuisance_known"].append({"queries": n, **judge(estimate_symbols(
            scorer, Observations(o.q, (y_ft - y_ftm)[: o.points]), car, ell, iterations))})  # fmt: skip
    return out


if __name__ == "__main__":
    main()

"""Attribution through an API (issue 21): `warden trace --endpoint` on a small trained model.  Prints JSON.

    python bench/trace_endpoint.py                                  # defaults below (a few minutes, 1 core)
    python bench/trace_endpoint.py --code-length 4096 --d 64 --ff 256 --layers 4 --queries 16,32,64,128

Trains a tiny Llama on Python's stdlib sources (tests/support/oai_server.py), releases fingerprinted copies to
``--recipients`` recipients (the release path of `warden release`, code length ``--code-length``), and serves
through the tests' OpenAI-compatible HTTP server: one recipient's copy as is, after an int8 round trip of every
matrix, after a short fine-tune on other data, two colluders' average, the unmarked master and an independent
model.  For each, at each query count (echoed prompts of the master's context length, top-5 alternatives):

* the accused recipients at population 1e6, eps 1e-6, the leaker's score and the threshold;
* innocent trials: ``--innocents`` never-released recipient indices of the same code scored against the same
  threshold (an innocent's codeword is independent of the estimate, like an unused one): how many pass it and
  the highest innocent score over the threshold.
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
    args = ap.parse_args()
    import torch
    import transformers as T

    import weightwarden as ww
    from tests.support.cli import PASSPHRASE, TEST_KDF
    from tests.support.oai_server import Family, OAIServer, Served
    from weightwarden.provenance.endpoint import Endpoint
    from weightwarden.trace import release
    from weightwarden.trace.accuse import decide
    from weightwarden.trace.endpoint import carriers, closest_variant, estimate_symbols, observe, symbols
    from weightwarden.trace.recipients import open_store
    from weightwarden.trace.scorer import HFGradientScorer
    from weightwarden.trace.store import derive
    from weightwarden.trace.tardos import TardosCode

    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="ww-trace-endpoint-bench-"))
    fam = Family(work / "fam", vocab=384, d=args.d, ff=args.ff, layers=args.layers, seq=64, batch=16,
                 text_limit=200_000)  # fmt: skip
    master_path = fam.save(fam.base(0, steps=args.steps), "master")
    home = work / "home"
    kr = ww.Keyring.create(home, PASSPHRASE, kdf=TEST_KDF)
    prov = kr.provider(purpose="tracing", create=True)
    names = [f"r{i}" for i in range(args.recipients)]
    import os

    os.environ.setdefault("WARDEN_ALLOW_SAMPLE_LIST", "1")
    for r in names:
        release(master_path, r, work / r, provider=prov, country="GB", home=home, model_id="m",
                code_length=args.code_length)  # fmt: skip

    def load(p: Path):
        return T.AutoModelForCausalLM.from_pretrained(p).eval()

    leak = load(work / names[0])
    a, b = load(work / names[1]), load(work / names[2])
    avg = copy.deepcopy(a)
    with torch.no_grad():
        for (_, pa), (_, pb), (_, pv) in zip(a.named_parameters(), b.named_parameters(), avg.named_parameters(),
                                             strict=True):  # fmt: skip
            pv.copy_((pa + pb) / 2)
    suspects = {"as-is": (leak, {names[0]}), "int8": (Family.int8(leak), {names[0]}),
                "ft-short": (fam.finetune(leak, steps=15, lr=3e-4), {names[0]}),
                "collude2": (avg, {names[1], names[2]}), "master": (load(master_path), set()),
                "independent": (fam.base(7, steps=args.steps), set())}  # fmt: skip
    trained_s = time.time() - t0
    srv = OAIServer()
    scorer = HFGradientScorer(master_path)
    store = open_store(home)
    rec = store.model("m")
    secret = store.secret(rec, prov)
    code_key, embed_key = derive(secret, "tardos-code"), derive(secret, "embed")
    ell = rec.code_length
    code = TardosCode(code_key, ell, rec.cutoff)
    car = carriers(scorer.tensors(), embed_key, ell, rec.alpha)
    prompts = [fam.text[i : i + 400] for i in range(1000, 199_000, 700)]
    qs = [int(q) for q in args.queries.split(",")]
    results = {}
    for attack in args.attacks.split(","):
        model, guilty = suspects[attack]
        url = srv.add(attack, Served(model, fam.tokenizer, attack))
        with Endpoint(url, budget=10**6) as ep:
            obs = observe(ep, scorer, prompts, max(qs), top=5)
        ref, sc, obs = closest_variant(scorer, obs)
        rows = []
        for q in qs:
            t1 = time.time()
            y, w = symbols(estimate_symbols(sc, obs.head(q), car, ell, args.iterations), car, ell)
            rep = decide(code, "m", names, y, w, eps=1e-6, population=10**6, blocks=0)
            inn = code.scores(y, args.recipients + args.innocents, known=w)[args.recipients :]
            acc = {x["recipient"] for x in rep.accused}
            rows.append({"queries": q, "data_points": obs.head(q).points, "accused": sorted(acc),
                         "correct": bool(acc) and acc <= guilty if guilty else not acc,
                         "threshold": round(rep.threshold, 1),
                         "guilty_scores": {x["recipient"]: x["score"] for x in rep.ranking if x["recipient"] in guilty},
                         "innocent_trials": len(inn), "innocents_over": int((inn > rep.threshold).sum()),
                         "max_innocent_over_threshold": round(float(inn.max() / rep.threshold), 3),
                         "seconds": round(time.time() - t1, 1)})  # fmt: skip
        need = next((r["queries"] for r in rows if r["correct"] and guilty), None)
        results[attack] = {"guilty": sorted(guilty), "reference": ref, "queries_to_accuse": need, "runs": rows}
        print(json.dumps({attack: results[attack]}), file=sys.stderr, flush=True)
    srv.close()
    print(json.dumps({"model": {"d": args.d, "ff": args.ff, "layers": args.layers, "steps": args.steps,
                                "carriers": int(sum(len(c.idx) for c in car.values())), "code_length": ell},
                      "iterations": args.iterations, "population": 10**6, "eps": 1e-6, "trained_s": round(trained_s, 1),
                      "total_s": round(time.time() - t0, 1), "attacks": results}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()

# ruff: noqa
# Exploratory measurements behind docs/TRACING.md, "Why a fine-tune defeats the trace through an API" (rows marked x).
# Not maintained code: run `python bench/explore_ft/world.py` once (builds the world in $WW_FT_WORLD), then the others.
"""What of the mark is left in the outputs after the fine-tune: y(ft(r0)) - y(ft(master)), same fine-tune (data, seed)."""
import sys, time, copy, numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from world import load, W
w = load()
import torch, transformers as T
from tests.support.oai_server import OAIServer, Served, Family
from weightwarden.provenance.endpoint import Endpoint
from weightwarden.trace.endpoint import observe, estimate_symbols, symbols, _gather, _spread, Observations
from weightwarden.trace.scorer import HFGradientScorer
from weightwarden.trace.accuse import decide
sc, car, ell, code = w["scorer"], w["car"], w["ell"], w["code"]
s_true = 2.0 * code.codewords(0, 1)[0].astype(float) - 1
fam = Family(W / "fam2", vocab=384, d=48, ff=128, layers=2, seq=64, batch=16, text_limit=200_000)
master = T.AutoModelForCausalLM.from_pretrained(W / "fam" / "master").eval()
ftm_path = fam.save(fam.finetune(master, steps=15, lr=3e-4), "ftm")
leak = T.AutoModelForCausalLM.from_pretrained(W / "r0").eval()
ftl2 = fam.finetune(leak, steps=15, lr=3e-4)
ft_sc = HFGradientScorer(W / "fam" / "ft"); ftm_sc = HFGradientScorer(ftm_path)
with torch.no_grad():
    same = max(float((a - b).abs().max()) for a, b in zip(ftl2.parameters(), T.AutoModelForCausalLM.from_pretrained(W / "fam" / "ft").parameters()))
print("refit ft(r0) equals the bench's ft copy: max |diff|", same)
text = w["text"]; prompts = [text[i : i + 400] for i in range(1000, 199_000, 700)]
N = int(sys.argv[1])
srv = OAIServer()
url = srv.add("ft", Served(T.AutoModelForCausalLM.from_pretrained(W / "fam" / "ft").eval(), fam.tokenizer, "ft"))
with Endpoint(url, budget=10**6) as ep:
    obs = observe(ep, sc, prompts, N, top=5)
srv.close()
q = obs.q; m = sc.logprobs_at(q); y = obs.r + m; yfm = ftm_sc.logprobs_at(q)
rms = lambda v: float(np.sqrt(np.mean(v ** 2)))
left = y - yfm
lin = sc.jvp(q, _spread(car, s_true))
print("rms: mark before ft", rms(lin), "mark left after ft (ft(r0)-ft(master))", rms(left), "corr with J D s", np.corrcoef(left, lin)[0, 1])
ltm = ftm_sc.tensors(); lt = ft_sc.tensors(); mt = sc.tensors()
wl = _gather(car, {n: lt[n] - ltm[n] for n in car}, ell); ws = _gather(car, _spread(car, s_true), ell)
print("weights: D^T(ft(r0)-ft(master)) / D^T D s (fraction of the mark left in weights, by regression)", float(wl @ s_true / (ws @ s_true)), "sign acc", np.mean(np.sign(wl) == s_true))
def score(s_hat):
    yy, wt = symbols(s_hat, car, ell); rep = decide(code, "m", w["names"], yy, wt, eps=1e-6, population=10**6, blocks=0)
    return f"acc {np.mean(np.sign(s_hat) == s_true):.3f} r0/thr {code.scores(yy, 1, known=wt)[0] / rep.threshold:.3f}"
for n_ in sorted({128, N}):
    o = Observations(q, left).head(n_)
    print("oracle LS at master on ft(r0)-ft(master)", n_, score(estimate_symbols(sc, o, car, ell, 16)), flush=True)
    o2 = Observations(q, y - ftm_sc.logprobs_at(q)).head(n_)
    print("oracle LS linearised at ft(master)", n_, score(estimate_symbols(ftm_sc, o2, car, ell, 16)), flush=True)

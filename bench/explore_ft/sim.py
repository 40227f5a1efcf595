# ruff: noqa
# Exploratory measurements behind docs/TRACING.md, "Why a fine-tune defeats the trace through an API" (rows marked x).
# Not maintained code: run `python bench/explore_ft/world.py` once (builds the world in $WW_FT_WORLD), then the others.
"""Owner-simulated fine-tunes of the master as a nuisance subspace of the answers (projected out)."""
import sys, numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from world import load, W
w = load()
import torch, transformers as T
from tests.support.oai_server import OAIServer, Served, Family
from weightwarden.provenance.endpoint import Endpoint
from weightwarden.trace.endpoint import observe, _spread, estimate_symbols, symbols, Observations
from weightwarden.trace.scorer import HFGradientScorer
from weightwarden.trace.accuse import decide
sc, car, ell, code = w["scorer"], w["car"], w["ell"], w["code"]
s_true = 2.0 * code.codewords(0, 1)[0].astype(float) - 1
fam = Family(W / "fam3", vocab=384, d=48, ff=128, layers=2, seq=64, batch=16, text_limit=200_000)
text = w["text"]; prompts = [text[i : i + 400] for i in range(1000, 199_000, 700)]
N = 128
srv = OAIServer()
url = srv.add("ft", Served(T.AutoModelForCausalLM.from_pretrained(W / "fam" / "ft").eval(), fam.tokenizer, "ft"))
with Endpoint(url, budget=10**6) as ep:
    obs = observe(ep, sc, prompts, N, top=5)
srv.close()
q = obs.q; m = sc.logprobs_at(q); r = obs.r
master = T.AutoModelForCausalLM.from_pretrained(W / "fam" / "master").eval()
V = [np.ones_like(r)]
import itertools
cfgs = [(sd, sp, lr, st) for sd, sp, lr, st in itertools.product((21, 22, 23), ("finetune", "pretrain"), (3e-4, 1e-3), (15,))]
for sd, sp, lr, st in cfgs:
    mm = fam.train(__import__("copy").deepcopy(master), st, seed=sd, split=sp, lr=lr)
    p = fam.save(mm, "sim"); V.append(HFGradientScorer(p).logprobs_at(q) - m)
V = np.stack(V, 1)
rms = lambda v: float(np.sqrt(np.mean(v ** 2)))
yl = HFGradientScorer(W / "r0").logprobs_at(q); nuis = r - (yl - m)
def proj(v, k):
    Vk = V[:, :k]; c, *_ = np.linalg.lstsq(Vk, v, rcond=None); return v - Vk @ c
mark = yl - m
for k in (1, 5, 9, 13, V.shape[1]):
    print(f"k={k}: nuisance rms {rms(proj(nuis, k)):.4f} (was {rms(nuis):.4f}), mark rms {rms(proj(mark, k)):.5f} (was {rms(mark):.5f})", flush=True)
class PS:  # scorer whose answers are projected: J -> P J
    def __init__(s, base): s.b = base
    def jvp(s, q_, t): return proj(s.b.jvp(q_, t), V.shape[1])
    def vjp(s, q_, wts, names): return s.b.vjp(q_, proj(wts, V.shape[1]), names)
s_hat = estimate_symbols(PS(sc), Observations(q, proj(r, V.shape[1])), car, ell, 16)
yy, wt = symbols(s_hat, car, ell); thr = decide(code, "m", w["names"], yy, wt, eps=1e-6, population=10**6, blocks=0).threshold
print("projected LS: sign acc", np.mean((np.sign(s_hat) == s_true)[wt > 0]), "r0/thr", code.scores(yy, 1, known=wt)[0] / thr)

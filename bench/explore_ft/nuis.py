# ruff: noqa
# Exploratory measurements behind docs/TRACING.md, "Why a fine-tune defeats the trace through an API" (rows marked x).
# Not maintained code: run `python bench/explore_ft/world.py` once (builds the world in $WW_FT_WORLD), then the others.
"""Is there a nuisance space that holds the fine-tune's output change but not the mark?  Oracle (ft(master) known)."""
import sys, numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from world import load, W
w = load()
import transformers as T
from tests.support.oai_server import OAIServer, Served
from weightwarden.provenance.endpoint import Endpoint
from weightwarden.trace.endpoint import observe, _spread, estimate_symbols, symbols, Observations
from weightwarden.trace.scorer import HFGradientScorer
from weightwarden.trace.accuse import decide
sc, car, ell, code = w["scorer"], w["car"], w["ell"], w["code"]
s_true = 2.0 * code.codewords(0, 1)[0].astype(float) - 1
text = w["text"]; prompts = [text[i : i + 400] for i in range(1000, 199_000, 700)]
srv = OAIServer()
url = srv.add("ft", Served(T.AutoModelForCausalLM.from_pretrained(W / "fam" / "ft").eval(), T.AutoTokenizer.from_pretrained(W / "r0"), "ft"))
with Endpoint(url, budget=10**6) as ep:
    obs = observe(ep, sc, prompts, 128, top=5)
srv.close()
q = obs.q
ftm = HFGradientScorer(W / "fam2" / "ftm"); yfm = ftm.logprobs_at(q); m = sc.logprobs_at(q)
mt, fmt_ = sc.tensors(), ftm.tensors()
D = {n: fmt_[n] - mt[n] for n in mt}
rms = lambda v: float(np.sqrt(np.mean(v ** 2)))
mark = sc.jvp(q, _spread(car, s_true))
print("nuisance ft(master)-master rms", rms(yfm - m), "mark rms", rms(mark))
def lowrank(a, k):
    u, s, vt = np.linalg.svd(a, full_matrices=False); return (u[:, :k] * s[:k]) @ vt[:k]
for n in car:
    s = np.linalg.svd(D[n], compute_uv=False); e = np.cumsum(s**2) / np.sum(s**2)
    print(n, "energy in rank 1,4,16:", e[0].round(3), e[3].round(3), e[15].round(3))
for k in (0, 2, 8, 16, 32):
    Dk = {n: (lowrank(D[n], k) if k else 0 * D[n]) if n in car else D[n] for n in mt}
    y_nl = sc.with_tensors({n: mt[n] + Dk[n] for n in mt}).logprobs_at(q)
    print(f"rank {k} on marked + unmarked free: nonlinear residual rms {rms(yfm - y_nl):.5f} (mark {rms(mark):.5f})", flush=True)

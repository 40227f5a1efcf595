# ruff: noqa
# Exploratory measurements behind docs/TRACING.md, "Why a fine-tune defeats the trace through an API" (rows marked x).
# Not maintained code: run `python bench/explore_ft/world.py` once (builds the world in $WW_FT_WORLD), then the others.
import sys, numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from world import load, W
w = load()
import transformers as T
from tests.support.oai_server import OAIServer, Served
from weightwarden.provenance.endpoint import Endpoint
from weightwarden.trace.endpoint import observe, _spread, _gather
from weightwarden.trace.scorer import HFGradientScorer
sc, car, ell, code = w["scorer"], w["car"], w["ell"], w["code"]
s_true = 2.0 * code.codewords(0, 1)[0].astype(float) - 1
print("r0 codeword: fraction of ones", np.mean(s_true > 0), "bias p mean", float(np.mean(code.bias())))
text = w["text"]; prompts = [text[i : i + 400] for i in range(1000, 199_000, 700)]
srv = OAIServer()
url = srv.add("ft", Served(T.AutoModelForCausalLM.from_pretrained(W / "fam" / "ft").eval(), T.AutoTokenizer.from_pretrained(W / "r0"), "ft"))
with Endpoint(url, budget=10**6) as ep:
    obs = observe(ep, sc, prompts, 64, top=5)
srv.close()
q = obs.q; m = sc.logprobs_at(q); y = obs.r + m
yfm = HFGradientScorer(W / "fam2" / "ftm").logprobs_at(q); yl = HFGradientScorer(W / "r0").logprobs_at(q)
names = list(car)
for lab, v in (("mark (leak-master)", yl - m), ("nuisance ftm-master", yfm - m), ("left ft(r0)-ftm", y - yfm), ("total", y - m)):
    b = _gather(car, sc.vjp(q, v, names), ell)
    print(f"{lab:22s} matched-filter sign acc {np.mean(np.sign(b) == s_true):.3f}  corr {np.corrcoef(b, s_true)[0,1]:+.3f}  rms {np.sqrt(np.mean(b**2)):.2e}", flush=True)

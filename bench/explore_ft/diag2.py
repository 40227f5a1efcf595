# ruff: noqa
# Exploratory measurements behind docs/TRACING.md, "Why a fine-tune defeats the trace through an API" (rows marked x).
# Not maintained code: run `python bench/explore_ft/world.py` once (builds the world in $WW_FT_WORLD), then the others.
"""LS sign accuracy vs queries (ft, as-is) and the full-weight CGLS + matched filter."""
import sys, time, numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from world import load, W
w = load()
import transformers as T
from tests.support.oai_server import OAIServer, Served
from weightwarden.provenance.endpoint import Endpoint
from weightwarden.trace.endpoint import observe, estimate_symbols, symbols, _gather, Observations
from weightwarden.trace.accuse import decide
sc, car, ell, code = w["scorer"], w["car"], w["ell"], w["code"]
s_true = 2.0 * code.codewords(0, 1)[0].astype(float) - 1
text = w["text"]; prompts = [text[i : i + 400] for i in range(1000, 199_000, 700)]
NS = [int(x) for x in sys.argv[1].split(",")]; mode = sys.argv[2]; ITS = int(sys.argv[3])
srv = OAIServer(); obs = {}
for name, path in (("ft", W / "fam" / "ft"), ("as-is", W / "r0")):
    url = srv.add(name, Served(T.AutoModelForCausalLM.from_pretrained(path).eval(), T.AutoTokenizer.from_pretrained(W / "fam" / "ft"), name))
    with Endpoint(url, budget=10**6) as ep:
        obs[name] = observe(ep, sc, prompts, max(NS), top=5)
srv.close()
def score(s_hat):
    y, wt = symbols(s_hat, car, ell); rep = decide(code, "m", w["names"], y, wt, eps=1e-6, population=10**6, blocks=0)
    sc0 = code.scores(y, 1, known=wt)[0]
    return f"acc {np.mean(np.sign(s_hat) == s_true):.3f} r0/thr {sc0 / rep.threshold:.3f}"
mt = sc.tensors(); allnames = list(mt); std = {n: float(mt[n].std()) for n in mt}
for name in sys.argv[4].split(","):
    for n_ in NS:
        o = obs[name].head(n_); q = o.q
        t = time.time()
        if mode == "ls":
            print(name, n_, "LS", ITS, score(estimate_symbols(sc, o, car, ell, ITS)), f"{time.time()-t:.0f}s", flush=True)
            continue
        # CGLS over all weights, in units of each tensor's std: x_n = dW_n / std_n
        def J(x): return sc.jvp(q, {k: x[k] * std[k] for k in x})
        def Jt(v): g = sc.vjp(q, v, allnames); return {k: g[k] * std[k] for k in g}
        dot = lambda a, b: sum(float((a[k] * b[k]).sum()) for k in a)
        x = {k: np.zeros_like(mt[k], dtype=np.float64) for k in mt}; res = o.r.copy(); s = Jt(res); p = {k: v.copy() for k, v in s.items()}; g = dot(s, s)
        for it in range(1, ITS + 1):
            qq = J(p); a = g / float(qq @ qq)
            for k in x: x[k] += a * p[k]
            res -= a * qq; s = Jt(res); g2 = dot(s, s)
            for k in p: p[k] = s[k] + (g2 / g) * p[k]
            g = g2
            if it in (5, 10, 20, 40, 80, 160, 320):
                s_hat = _gather(car, {k: x[k] * std[k] for k in car}, ell)
                print(name, n_, "CGLS it", it, score(s_hat), f"resid {np.sqrt(res @ res / (o.r @ o.r)):.3f}", f"{time.time()-t:.0f}s", flush=True)

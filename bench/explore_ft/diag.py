# ruff: noqa
# Exploratory measurements behind docs/TRACING.md, "Why a fine-tune defeats the trace through an API" (rows marked x).
# Not maintained code: run `python bench/explore_ft/world.py` once (builds the world in $WW_FT_WORLD), then the others.
import sys, time, numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from world import load, W
w = load()
import torch
from tests.support.oai_server import OAIServer, Served
import transformers as T
from weightwarden.provenance.endpoint import Endpoint
from weightwarden.trace.endpoint import observe, estimate_symbols, symbols, _spread, _gather, closest_variant
from weightwarden.trace.scorer import HFGradientScorer
from weightwarden.trace.mark import extract
from weightwarden.trace.accuse import decide
N = int(sys.argv[1]) if len(sys.argv) > 1 else 128
sc, car, ell, code = w["scorer"], w["car"], w["ell"], w["code"]
s_true = 2.0 * code.codewords(0, 1)[0].astype(float) - 1
leak_sc = HFGradientScorer(W / "r0"); ft_sc = HFGradientScorer(W / "fam" / "ft")
text = w["text"]; prompts = [text[i : i + 400] for i in range(1000, 199_000, 700)]
srv = OAIServer()
url = srv.add("ft", Served(T.AutoModelForCausalLM.from_pretrained(W / "fam" / "ft").eval(), T.AutoTokenizer.from_pretrained(W / "fam" / "ft"), "ft"))
with Endpoint(url, budget=10**6) as ep:
    obs = observe(ep, sc, prompts, N, top=5)
srv.close()
q = obs.q; m = sc.logprobs_at(q); y_ft = obs.r + m; y_leak = leak_sc.logprobs_at(q)
r_mark, r_ft = y_leak - m, y_ft - y_leak
rms = lambda v: float(np.sqrt(np.mean(v ** 2)))
def centre(v):  # per (prompt, position) mean removed
    key = q.row * 10000 + q.pos; _, inv = np.unique(key, return_inverse=True)
    return v - (np.bincount(inv, v) / np.bincount(inv))[inv]
print("points", obs.points, "prompts", obs.prompts)
print("rms mark", rms(r_mark), "rms ft", rms(r_ft), "ratio", rms(r_ft) / rms(r_mark))
print("centred: rms mark", rms(centre(r_mark)), "rms ft", rms(centre(r_ft)))
t = time.time(); lin = sc.jvp(q, _spread(car, s_true)); print("jvp s", time.time() - t)
print("linearisation of mark: rel err", rms(lin - r_mark) / rms(r_mark), "corr", np.corrcoef(lin, r_mark)[0, 1])
lt, ft_t, mt = leak_sc.tensors(), ft_sc.tensors(), sc.tensors()
dft = {n: ft_t[n] - lt[n] for n in mt}
lin_ft = sc.jvp(q, dft)
print("linearisation of ft (at master): rel err", rms(lin_ft - r_ft) / rms(r_ft))
for n in mt:
    print(f"  {n:45s} std {mt[n].std():.4f} |dft| {np.sqrt((dft[n]**2).mean()):.2e} mark {w['alpha']*mt[n].std():.2e} marked {n in car}")
# contributions of ft change: marked vs unmarked tensors
jm = sc.jvp(q, {n: dft[n] for n in car}); ju = sc.jvp(q, {n: dft[n] for n in mt if n not in car})
print("ft effect from marked tensors rms", rms(jm), "from unmarked", rms(ju))
names = list(car)
b_mark = _gather(car, sc.vjp(q, lin, names), ell)
b_ft = _gather(car, sc.vjp(q, r_ft, names), ell)
b_ftm = _gather(car, sc.vjp(q, jm, names), ell); b_ftu = _gather(car, sc.vjp(q, ju, names), ell)
print("matched filter D^T J^T: signal rms", rms(b_mark), "ft noise rms", rms(b_ft), "(from marked", rms(b_ftm), "unmarked", rms(b_ftu), ")")
print("  sign acc of b_mark", np.mean(np.sign(b_mark) == s_true), "of b_mark+b_ft", np.mean(np.sign(b_mark + b_ft) == s_true))
# weight-domain: D^T dft (marked) vs D^T D s
wd_noise = _gather(car, {n: dft[n] for n in car}, ell); wd_sig = _gather(car, _spread(car, s_true), ell)
print("weight domain D^T: signal rms", rms(wd_sig), "ft noise rms", rms(wd_noise), "sign acc", np.mean(np.sign(wd_sig + wd_noise) == s_true))
ex = extract(w["master"], W / "fam" / "ft", w["ek"], ell, w["alpha"])
y, wt = ex.symbols(); rep = decide(code, "m", w["names"], y, wt, eps=1e-6, population=10**6, blocks=0)
print("weight trace on ft: sign acc", np.mean((2.0 * y - 1) == s_true), "accused", [a["recipient"] for a in rep.accused], "top", rep.ranking[:2], "thr", rep.threshold)
for it in (16,):
    t = time.time(); s_hat = estimate_symbols(sc, obs, car, ell, it)
    y, wt = symbols(s_hat, car, ell); rep = decide(code, "m", w["names"], y, wt, eps=1e-6, population=10**6, blocks=0)
    print(f"LS it={it}: sign acc {np.mean(np.sign(s_hat) == s_true):.3f} r0 score/thr", rep.ranking[0], rep.threshold, time.time() - t)
    o2 = type(obs)(q, r_mark); s2 = estimate_symbols(sc, o2, car, ell, it)
    print(f"  oracle (ft effect removed): sign acc {np.mean(np.sign(s2) == s_true):.3f}")

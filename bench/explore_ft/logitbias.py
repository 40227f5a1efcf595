# ruff: noqa
# Exploration (not maintained): is a keyed per-token logit bias an output-visible fingerprint that survives a
# short fine-tune and can be read through an echo + top-5 API?  Self-contained (does not need world.py's cache).
#
#   nice -n 10 env OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src:$PWD python bench/explore_ft/logitbias.py [--out F.json]
#
# The world is the bench's (bench/trace_endpoint.py): tests/support/oai_server.py Family, vocab 384, d 48, ff 128,
# 2 layers, seq 64, master = base(0, steps=120); the short fine-tune is Family.finetune(steps=15, lr=3e-4).
#
# The mark: symbols s_v in {+-1} (a random vector, seed 12345), u = mu/|mu|^2 with mu the mean of the final-normed
# hidden state over pretraining windows, lm_head.weight[v] += a * s_v * u (lm_head is untied in Family's Llama).
# The logits of token v then move by a * s_v * g_c, g_c = norm(h_c).u, mean 1 over the training text.
#
# Readout: r(c, v) = log p_copy(v|c) - log p_ref(v|c) on the observed (position, token) pairs; centred per position
# (minus the mean over that position's observed entries); s_hat_v = sign(mean over positions of the centred r).
#   full : every token at every position (upper bound; the API does not give this)
#   top5 : what /v1/completions echo + logprobs=5 returns: the prompt token at each position (from the 2nd on)
#          and the served model's top 5 there; no entry for a token never observed -> symbol counted 0.5 correct
#          ("p_all") and reported separately over observed symbols ("p_obs", "observed").
# (Labels say "top5" whatever --top is.)
# Measured (one world, one symbol draw, V = 384; p = fraction correct over observed symbols):
#   loss ratio a=0.02 1.000203, 0.05 1.000707, 0.06 1.000928, 0.1 1.002078 -> largest a within 1.001 ~ 0.06
#   ft(master)-master rms per-token shift 0.096 (0.0195 after projecting out [1, W_lm columns, mean log p])
#   a=0.06: as-is / int8 top-5 gw 1.00 from 32 prompts; ft full plain 0.745, full gwp 0.935, top-5 gwp 0.60,
#   top-20 gwp 0.60 (1,024 prompts); ft-oracle (minus the fine-tuned master) full 1.00, top-5 gw 0.97.
# Simulated in-process (no HTTP): the server returns the same numbers (float32 log-softmax) as the test server.
from __future__ import annotations

import argparse, copy, json, math, os, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]; sys.path[:0] = [str(ROOT), str(ROOT / "src")]


TOP = 5


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--amps", default="0.02,0.05,0.06,0.1")
    ap.add_argument("--queries", default="8,32,128,512,1024")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--out", default="")
    ap.add_argument("--estimators", default="plain,gw,gwp,alsp")
    ap.add_argument("--top", type=int, default=5, help="alternatives per position (the API's logprobs)")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    from tests.support.oai_server import Family
    import tempfile

    t0 = time.time()
    EK = args.estimators.split(",")
    global TOP; TOP = args.top
    fam = Family(Path(tempfile.mkdtemp(prefix="ww-logitbias-")) / "fam", vocab=384, d=48, ff=128, layers=2,
                 seq=64, batch=16, text_limit=200_000)
    V = fam.vocab
    master = fam.base(0, steps=args.steps).eval()
    assert master.lm_head.weight.data_ptr() != master.model.embed_tokens.weight.data_ptr(), "lm_head tied"
    ftm = fam.finetune(master, steps=15, lr=3e-4).eval()  # the fine-tune's own change (oracle / noise figure)
    print(f"V={V} trained in {time.time() - t0:.0f}s", flush=True)

    def windows(split, n=64):
        d = fam.splits[split]
        k = (len(d) - 1) // n
        return d[: k * n].view(k, n)

    pre, held = windows("pretrain"), windows("finetune")
    print(f"pretrain windows {len(pre)}, held-out windows {len(held)}", flush=True)

    @torch.no_grad()
    def logp(model, x, bs=64):
        return torch.cat([torch.log_softmax(model(input_ids=x[i:i + bs]).logits.float(), -1)
                          for i in range(0, len(x), bs)])

    @torch.no_grad()
    def loss(model, x):
        lp = logp(model, x)[:, :-1]
        return -lp.gather(-1, x[:, 1:, None]).mean().item()

    with torch.no_grad():
        hs = torch.cat([master.model(input_ids=pre[i:i + 64]).last_hidden_state for i in range(0, len(pre), 64)])
    mu = hs.reshape(-1, hs.shape[-1]).mean(0)
    u = mu / mu.dot(mu)
    g = hs.reshape(-1, hs.shape[-1]) @ u
    g_held = None
    print(f"g_c over pretrain positions: mean {g.mean():.3f} std {g.std():.3f} frac<0 {(g < 0).float().mean():.3f}")

    gen = torch.Generator().manual_seed(12345)
    s = (torch.randint(0, 2, (V,), generator=gen) * 2 - 1).float()

    def mark(model, a):
        m = copy.deepcopy(model)
        with torch.no_grad():
            m.lm_head.weight += a * s[:, None] * u[None, :]
        return m

    qs = [int(q) for q in args.queries.split(",")]
    Q = min(max(qs), len(pre))
    qs = [q for q in qs if q <= Q] + ([Q] if Q not in qs else [])
    idx = torch.linspace(0, len(pre) - 1, Q).long()  # evenly spaced 64-token prompts of the pretraining text
    prompts = pre[idx]
    lp_master = logp(master, prompts)
    lp_master8 = logp(Family.int8(master), prompts)
    lp_ftm = logp(ftm, prompts)

    with torch.no_grad():
        g_pr = (master.model(input_ids=prompts).last_hidden_state[:, :-1] @ u).reshape(-1)  # g_c at the prompts
    # span the tracer may project out (master quantities only): the constant, the columns of lm_head (any
    # per-token shift W_lm . delta from a change delta of the mean final hidden state), the master's mean log-prob
    B_full = torch.cat([torch.ones(V, 1), master.lm_head.weight.detach(), lp_master[:, :-1].reshape(-1, V).mean(0)[:, None]], 1)

    def project_out(est, seen):
        b = B_full[seen]
        q_, _ = torch.linalg.qr(b)
        e = est.clone()
        e[seen] = est[seen] - q_ @ (q_.T @ est[seen])
        return e

    def readout(lp_copy, lp_ref, q, mode, est_kind="plain"):
        """Fraction of symbols correct from the first q prompts.  est_kind: plain = sign of the mean over
        positions (the brief's); gw = weighted by the master's g_c (least squares for a g_c s_v); gwp = gw with
        B_full's span projected out over the observed tokens; alsp = two-way least squares r(c,v) = K_c + g_c e_v
        over the observed entries (K_c fitted jointly, not the mean of the position's few entries; 30 alternating
        sweeps), then B_full's span projected out."""
        y, m = lp_copy[:q, :-1], lp_ref[:q, :-1]  # position t predicts token t+1; echo gives tokens 2..64
        r = (y - m).reshape(-1, V)
        if mode == "full":
            obs = torch.ones_like(r, dtype=torch.bool)
        else:
            obs = torch.zeros_like(r, dtype=torch.bool)
            top = y.reshape(-1, V).topk(TOP, -1).indices
            obs.scatter_(1, top, True)
            obs.scatter_(1, prompts[:q, 1:].reshape(-1, 1), True)
        r = torch.where(obs, r, 0.0)
        if est_kind == "alsp":
            gq = g_pr[: r.shape[0]][:, None]
            n = obs.sum(0)
            seen = n > 0
            e = torch.zeros(V)
            for _ in range(30):
                K = torch.where(obs, r - gq * e[None, :], 0.0).sum(1, keepdim=True) / obs.sum(1, keepdim=True)
                e = (gq * torch.where(obs, r - K, 0.0)).sum(0) / (gq * gq * obs).sum(0).clamp_min(1e-12)
            est = project_out(e, seen)
            right = (torch.sign(est) == s) & seen
            p_obs = right[seen].float().mean().item()
            p_all = (right.float().sum() + 0.5 * (~seen).float().sum()).item() / V
            rho = 2 * p_obs - 1
            return dict(p_obs=round(p_obs, 4), observed=int(seen.sum()), p_all=round(p_all, 4),
                        l_rho2=round(int(seen.sum()) * rho * rho, 1), entries=int(obs.sum()), est=est, seen=seen)
        r = r - torch.where(obs, r.sum(1, keepdim=True) / obs.sum(1, keepdim=True), 0.0)
        n = obs.sum(0)
        seen = n > 0
        if est_kind == "plain":
            est = r.sum(0) / n.clamp_min(1)
        else:
            gq = g_pr[: r.shape[0]][:, None]
            est = (gq * r).sum(0) / (gq * gq * obs).sum(0).clamp_min(1e-12)
            if est_kind == "gwp":
                est = project_out(est, seen)
        right = (torch.sign(est) == s) & seen
        p_obs = right[seen].float().mean().item() if seen.any() else float("nan")
        p_all = (right.float().sum() + 0.5 * (~seen).float().sum()).item() / V
        # Tardos-style figure: sum over observed symbols of rho^2, rho = 2p-1 (unobserved contribute 0)
        rho = 2 * p_obs - 1
        return dict(p_obs=round(p_obs, 4), observed=int(seen.sum()), p_all=round(p_all, 4),
                    l_rho2=round(int(seen.sum()) * rho * rho, 1), entries=int(obs.sum()), est=est, seen=seen)

    def shift_rms(lp_a, lp_b, q, proj=False):
        """rms over tokens of the per-token mean shift (centred per position), full distribution; proj: after
        projecting out B_full's span (what of it the gwp estimator still sees)."""
        r = (lp_a[:q, :-1] - lp_b[:q, :-1]).reshape(-1, V)
        r = r - r.mean(1, keepdim=True)
        e = r.mean(0)
        if proj:
            e = project_out(e, torch.ones(V, dtype=torch.bool))
        return e.pow(2).mean().sqrt().item()

    base_loss = loss(master, held)
    out = dict(V=V, prompts=Q, tokens_per_prompt=64, g_mean=g.mean().item(), g_std=g.std().item(),
               heldout_loss_master=base_loss, ft_rms_shift={q: shift_rms(lp_ftm, lp_master, q) for q in qs},
               ft_rms_shift_projected={q: shift_rms(lp_ftm, lp_master, q, True) for q in qs},
               int8_rms_shift={q: shift_rms(lp_master8, lp_master, q) for q in qs}, rows=[])
    print(f"held-out loss master {base_loss:.4f}; ft(master)-master rms per-token shift "
          f"{out['ft_rms_shift']}; projected {out['ft_rms_shift_projected']}; int8 {out['int8_rms_shift']}", flush=True)
    for a in [float(x) for x in args.amps.split(",")]:
        mk = mark(master, a)
        ratio = loss(mk, held) / base_loss
        ftk = fam.finetune(mk, steps=15, lr=3e-4).eval()
        variants = {"as-is": (logp(mk, prompts), lp_master), "int8": (logp(Family.int8(mk), prompts), lp_master),
                    "int8/int8ref": (None, lp_master8), "ft": (logp(ftk, prompts), lp_master)}
        variants["int8/int8ref"] = (variants["int8"][0], lp_master8)
        variants["ft-oracle"] = (variants["ft"][0], lp_ftm)  # minus the fine-tuned master: what is left of the mark
        row = dict(a=a, loss_ratio=round(ratio, 6), mark_rms_shift=shift_rms(variants["as-is"][0], lp_master, Q),
                   mark_rms_shift_projected=shift_rms(variants["as-is"][0], lp_master, Q, True),
                   ft_loss_ratio_vs_ftmaster=round(loss(ftk, held) / loss(ftm, held), 6), res={})
        for name, (lc, lr_) in variants.items():
            for mode in ("full", "top5"):
                for ek in EK:
                    for q in qs:
                        rr = readout(lc, lr_, q, mode, ek)
                        rr.pop("est"); rr.pop("seen")
                        row["res"][f"{name}|{mode}|{ek}|{q}"] = rr
        out["rows"].append(row)
        print(f"a={a}: loss ratio {ratio:.6f}; mark rms per-token shift {row['mark_rms_shift']:.4f} "
              f"(projected {row['mark_rms_shift_projected']:.4f})", flush=True)
        for name in variants:
            for mode in ("full", "top5"):
                for ek in EK:
                    k = f"{name}|{mode}|{ek}"
                    print(f"   {name:13s} {mode:4s} {ek:5s} " + "  ".join(
                        f"q{q}: p {row['res'][f'{k}|{q}']['p_obs']:.3f} "
                        f"obs {row['res'][f'{k}|{q}']['observed']} "
                        f"lr2 {row['res'][f'{k}|{q}']['l_rho2']}" for q in qs), flush=True)
    print(f"total {time.time() - t0:.0f}s")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

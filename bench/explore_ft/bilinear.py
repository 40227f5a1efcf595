# ruff: noqa
# Exploration (not maintained): a keyed bilinear output-visible mark in lm_head, read through echo + top-k.
#   lm_head.weight += c * W diag(s) U^T   (W: V x l keyed Gaussian over tokens, U: d x l keyed Gaussian hidden
#   directions, whitened by the master's hidden second moment), so logit v at context h moves by
#   c * sum_j s_j W[v,j] (U[:,j].h).  Read: least squares for s over the observed (position, token) pairs of
#   r = log p_copy - log p_ref, with a free constant per position (centred per position).
#   nice -n 10 env OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src:$PWD python bench/explore_ft/bilinear.py
from __future__ import annotations

import argparse, copy, json, math, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]; sys.path[:0] = [str(ROOT), str(ROOT / "src")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--amps", default="0.03,0.06")
    ap.add_argument("--ell", type=int, default=1024)
    ap.add_argument("--queries", default="32,128,512")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=0, help="restrict W to the K tokens most often observed (0: all)")
    ap.add_argument("--whiten", type=int, default=1)
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--ftsteps", type=int, default=15)
    ap.add_argument("--avoid", type=int, default=0, help="project mark off the span of N simulated fine-tunes' lm_head-equivalent change")
    ap.add_argument("--wscale", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    import torch, tempfile
    torch.set_num_threads(1)
    from tests.support.oai_server import Family

    t0 = time.time()
    fam = Family(Path(tempfile.mkdtemp(prefix="ww-bil-")) / "fam", vocab=384, d=48, ff=128, layers=2,
                 seq=64, batch=16, text_limit=200_000)
    V = fam.vocab
    master = fam.base(0, steps=120).eval()
    ftm = fam.finetune(master, steps=args.ftsteps, lr=3e-4).eval()
    print(f"trained {time.time()-t0:.0f}s", flush=True)

    def windows(split, n=64):
        d = fam.splits[split]; k = (len(d) - 1) // n
        return d[: k * n].view(k, n)
    pre, held = windows("pretrain"), windows("finetune")

    @torch.no_grad()
    def logp(model, x, bs=64):
        return torch.cat([torch.log_softmax(model(input_ids=x[i:i + bs]).logits.float(), -1) for i in range(0, len(x), bs)])

    @torch.no_grad()
    def hid(model, x, bs=64):
        return torch.cat([model.model(input_ids=x[i:i + bs]).last_hidden_state for i in range(0, len(x), bs)])

    @torch.no_grad()
    def loss(model, x):
        lp = logp(model, x)[:, :-1]
        return -lp.gather(-1, x[:, 1:, None]).mean().item()

    d = master.lm_head.weight.shape[1]
    hp = hid(master, pre).reshape(-1, d)
    S = hp.T @ hp / len(hp)
    ev, evec = torch.linalg.eigh(S)
    Sm12 = evec @ torch.diag(ev.clamp_min(ev.max() * 1e-6).rsqrt()) @ evec.T
    L = args.ell
    gen = torch.Generator().manual_seed(777)
    W = torch.randn(V, L, generator=gen)
    U = torch.randn(d, L, generator=gen)
    g_norm = master.model.norm.weight.detach().float()
    if args.whiten == 1:
        U = Sm12 @ U
    elif args.whiten == 2:  # from the weights only: divide by the final norm's gain
        U = U / g_norm[:, None]
    s = (torch.randint(0, 2, (L,), generator=gen) * 2 - 1).float()

    qs = [int(q) for q in args.queries.split(",")]
    Q = min(max(qs), len(pre)); qs = [q for q in qs if q <= Q]
    idx = torch.linspace(0, len(pre) - 1, Q).long()
    prompts = pre[idx]
    lp_master = logp(master, prompts)
    lp_master8 = logp(Family.int8(master), prompts)
    h_pr = hid(master, prompts)[:, :-1]  # (Q, 63, d)
    if args.tokens:
        cnt = torch.zeros(V)
        top = lp_master[:, :-1].reshape(-1, V).topk(args.top, -1).indices.reshape(-1)
        cnt.index_add_(0, top, torch.ones(len(top)))
        keep = cnt.topk(args.tokens).indices
        mask = torch.zeros(V); mask[keep] = 1
        W = W * mask[:, None]
    M = W @ torch.diag(s) @ U.T  # V x d
    if args.avoid:
        # simulated fine-tunes on the master (other seeds), their lm_head-equivalent logit change: least squares
        # of the centred logit change on h; project M off the span of those V x d matrices
        Ds = []
        hh = hid(master, pre[:256]).reshape(-1, d)
        for k in range(args.avoid):
            f = fam.finetune(master, steps=args.ftsteps, lr=3e-4, seed=50 + k).eval()
            with torch.no_grad():
                dz = (f(input_ids=pre[:256]).logits - master(input_ids=pre[:256]).logits).reshape(-1, V)
            dz = dz - dz.mean(1, keepdim=True)
            E = torch.linalg.lstsq(hh, dz).solution.T  # V x d
            Ds.append(E.reshape(-1))
        Qb, _ = torch.linalg.qr(torch.stack(Ds, 1))
        m = M.reshape(-1); M = (m - Qb @ (Qb.T @ m)).reshape(V, d)
    # scale: rms of the centred logit change over pretraining positions = 1 for c = 1
    if args.wscale:  # from the weights only: rms over rows of |M_v * g| = 1 (h ~ g * unit-rms noise)
        M = M / (M * g_norm[None, :]).pow(2).sum(1).mean().sqrt()
    else:
        z = hp[:20000] @ M.T
        z = z - z.mean(1, keepdim=True)
        M = M / z.pow(2).mean().sqrt()

    def mark(model, c):
        mm = copy.deepcopy(model)
        with torch.no_grad():
            mm.lm_head.weight += c * M
        return mm

    HU = None
    def read(lp_copy, lp_ref, q, c):
        y, m = lp_copy[:q, :-1].reshape(-1, V), lp_ref[:q, :-1].reshape(-1, V)
        r = y - m
        obs = torch.zeros_like(r, dtype=torch.bool)
        obs.scatter_(1, y.topk(args.top, -1).indices, True)
        obs.scatter_(1, prompts[:q, 1:].reshape(-1, 1), True)
        H = (h_pr[:q].reshape(-1, d) @ U)  # (N, L): U_j . h(c)
        A = torch.zeros(L, L, dtype=torch.float64); b = torch.zeros(L, dtype=torch.float64)
        ridx, cidx = obs.nonzero(as_tuple=True)
        # centre per position: group means of phi and r
        N = r.shape[0]
        cnt = obs.sum(1).float()
        Wsum = torch.zeros(N, L).index_add_(0, ridx, W[cidx])
        rsum = torch.zeros(N).index_add_(0, ridx, r[ridx, cidx])
        for i in range(0, len(ridx), 20000):
            ri, ci = ridx[i:i+20000], cidx[i:i+20000]
            phi = (W[ci] - Wsum[ri] / cnt[ri, None]) * H[ri] * c
            rr = r[ri, ci] - rsum[ri] / cnt[ri]
            A += (phi.T @ phi).double(); b += (phi.T @ rr).double()
        lam = args.ridge * A.diagonal().mean()
        sh = torch.linalg.solve(A + lam * torch.eye(L, dtype=torch.float64), b).float()
        mf = b.float()
        out = {}
        for nm, e in (("ls", sh), ("mf", mf)):
            p = (torch.sign(e) == s).float().mean().item(); rho = 2 * p - 1
            out[nm] = dict(p=round(p, 4), l_rho2=round(L * rho * rho, 1),
                           corr=round(torch.corrcoef(torch.stack([e, s]))[0, 1].item(), 4))
        out["entries"] = int(obs.sum())
        return out

    base_loss = loss(master, held)
    res = dict(V=V, ell=L, top=args.top, tokens=args.tokens, whiten=args.whiten, avoid=args.avoid, rows=[])
    for c in [float(x) for x in args.amps.split(",")]:
        mk = mark(master, c)
        ratio = loss(mk, held) / base_loss
        ftk = fam.finetune(mk, steps=args.ftsteps, lr=3e-4).eval()
        lpk = logp(mk, prompts)
        var = {"as-is": (lpk, lp_master), "int8": (logp(Family.int8(mk), prompts), lp_master8),
               "ft": (logp(ftk, prompts), lp_master), "ft-oracle": (None, logp(ftm, prompts)),
               "master": (lp_master, lp_master)}
        var["ft-oracle"] = (var["ft"][0], var["ft-oracle"][1])
        ftshift = (var["ft"][0] - lpk)[:, :-1]
        row = dict(c=c, loss_ratio=round(ratio, 6), ft_rms=ftshift.pow(2).mean().sqrt().item(),
                   mark_rms=(lpk - lp_master)[:, :-1].pow(2).mean().sqrt().item(), res={})
        print(f"c={c}: loss ratio {ratio:.6f} mark rms {row['mark_rms']:.4f} ft rms {row['ft_rms']:.4f}", flush=True)
        for nm, (lc, lr_) in var.items():
            for q in qs:
                o = read(lc, lr_, q, c); row["res"][f"{nm}|{q}"] = o
                print(f"   {nm:10s} q{q:5d} ls p {o['ls']['p']:.3f} lr2 {o['ls']['l_rho2']:7.1f} | mf p {o['mf']['p']:.3f} lr2 {o['mf']['l_rho2']:7.1f}  entries {o['entries']}", flush=True)
        res["rows"].append(row)
    print(f"total {time.time()-t0:.0f}s")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

# ruff: noqa
# Exploration (not maintained): the head mark (bilinear.py) read through echo + top-k and put through the real
# Tardos decision: recipient 0's codeword drives s = 2x - 1 (biased symbols, as released), the estimate's sign
# and capped |s_hat| go to TardosCode.scores for recipients 0..innocents and to accusation_threshold at
# n = 1e6, eps = 1e-6.  Variants: as served, int8, ft-short, and two colluders averaging (0 and 1).
#   nice -n 10 env OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src:$PWD python bench/explore_ft/head_tardos.py
from __future__ import annotations

import argparse, copy, json, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]; sys.path[:0] = [str(ROOT), str(ROOT / "src")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--amps", default="0.1")
    ap.add_argument("--ell", type=int, default=1024)
    ap.add_argument("--queries", default="128")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--ftsteps", type=int, default=15)
    ap.add_argument("--innocents", type=int, default=2000)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--weigh", default="cap", help="cap: |s_hat| capped at 3x median; flat: 1; z: |s_hat|/sd")
    ap.add_argument("--vocab", type=int, default=384)
    ap.add_argument("--d", type=int, default=48)
    ap.add_argument("--ff", type=int, default=128)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--text", type=int, default=200_000)
    ap.add_argument("--tokbias", type=int, default=0, help="1: a free bias per token (nuisance) in the least squares")
    ap.add_argument("--hlin", type=int, default=0, help="1: a free linear map of the final hidden state (nuisance H G h)")
    ap.add_argument("--orth", type=int, default=0, help="1: the mark's token side made orthogonal to the head's columns")
    ap.add_argument("--variants", default="as-is,int8,ft,avg01,avg01-ft,master")
    ap.add_argument("--hk", type=int, default=0, help="the free linear map on the k leading directions of h (0: all)")
    ap.add_argument("--centre", type=int, default=0, help="1: embed 2 (x - p) (no common part), read x = p + s/2")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    import numpy as np, torch, tempfile
    torch.set_num_threads(1)
    from tests.support.oai_server import Family
    from weightwarden.trace.tardos import TardosCode, accusation_threshold

    t0 = time.time()
    fam = Family(Path(tempfile.mkdtemp(prefix="ww-ht-")) / "fam", vocab=args.vocab, d=args.d, ff=args.ff, layers=2,
                 seq=64, batch=16, text_limit=args.text)
    V = fam.vocab
    master = fam.base(0, steps=args.steps).eval()
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
    L = args.ell
    qs = [int(q) for q in args.queries.split(",")]
    Q = min(max(qs), len(pre)); qs = [q for q in qs if q <= Q]
    idx = torch.linspace(0, len(pre) - 1, Q).long()
    prompts = pre[idx]
    lp_master = logp(master, prompts)
    lp_master8 = logp(Family.int8(master), prompts)
    h_pr = hid(master, prompts)[:, :-1]
    base_loss = loss(master, held)
    g_norm = master.model.norm.weight.detach().float()
    res = dict(V=V, d=d, base_loss=base_loss, ell=L, top=args.top, innocents=args.innocents, weigh=args.weigh, rows=[])

    for seed in [int(x) for x in args.seeds.split(",")]:
        gen = torch.Generator().manual_seed(777 + seed)
        W = torch.randn(V, L, generator=gen)
        U = torch.randn(d, L, generator=gen) / g_norm[:, None]  # weights-only whitening (the product's)
        if args.orth:
            Qh, _ = torch.linalg.qr(master.lm_head.weight.detach().float())
            W = W - Qh @ (Qh.T @ W)
        code = TardosCode(bytes([seed + 1]) * 32, L, 1e-3)
        X = code.codewords(0, 2)
        pb = code.bias()
        S = torch.tensor(2 * X.astype(np.float32) - 1)  # (2, L)
        if args.centre:
            S = torch.tensor(2 * (X.astype(np.float32) - pb.astype(np.float32)))
        M0 = W @ U.T
        z = hp[:20000] @ (W @ torch.diag(S[0]) @ U.T).T
        z = z - z.mean(1, keepdim=True)
        norm = z.pow(2).mean().sqrt()

        def mark(model, c, s):
            mm = copy.deepcopy(model)
            with torch.no_grad():
                mm.lm_head.weight += c * (W @ torch.diag(s) @ U.T) / norm
            return mm

        def read(lp_copy, lp_ref, q, c):
            y, m = lp_copy[:q, :-1].reshape(-1, V), lp_ref[:q, :-1].reshape(-1, V)
            r = y - m
            obs = torch.zeros_like(r, dtype=torch.bool)
            obs.scatter_(1, y.topk(args.top, -1).indices, True)
            obs.scatter_(1, prompts[:q, 1:].reshape(-1, 1), True)
            H = h_pr[:q].reshape(-1, d) @ U
            K = L + (V if args.tokbias else 0) + ((args.hk or d) ** 2 if args.hlin else 0)
            Hm = master.lm_head.weight.detach().float()
            hq = h_pr[:q].reshape(-1, d)
            kk = args.hk or d
            basis = torch.linalg.eigh(hq.T @ hq)[1].flip(1)[:, :kk]
            hq, Hm = hq @ basis, Hm @ basis
            Hsum = torch.zeros(len(r), Hm.shape[1]).index_add_(0, obs.nonzero(as_tuple=True)[0], Hm[obs.nonzero(as_tuple=True)[1]])
            A = torch.zeros(K, K, dtype=torch.float64); b = torch.zeros(K, dtype=torch.float64)
            ridx, cidx = obs.nonzero(as_tuple=True)
            N = r.shape[0]
            cnt = obs.sum(1).float()
            Wsum = torch.zeros(N, L).index_add_(0, ridx, W[cidx])
            rsum = torch.zeros(N).index_add_(0, ridx, r[ridx, cidx])
            for i in range(0, len(ridx), 5000):
                ri, ci = ridx[i:i+5000], cidx[i:i+5000]
                phi = (W[ci] - Wsum[ri] / cnt[ri, None]) * H[ri] * (c / norm)
                if args.tokbias:
                    oh = torch.zeros(len(ri), V); oh[torch.arange(len(ri)), ci] = 1
                    oh = oh - (obs[ri].float() / cnt[ri, None])
                    phi = torch.cat([phi, oh], 1)
                if args.hlin:
                    hv = Hm[ci] - Hsum[ri] / cnt[ri, None]
                    phi = torch.cat([phi, (hv[:, :, None] * hq[ri][:, None, :]).reshape(len(ri), -1)], 1)
                rr = r[ri, ci] - rsum[ri] / cnt[ri]
                A += (phi.T @ phi).double(); b += (phi.T @ rr).double()
            lam = args.ridge * A.diagonal()[:L].mean()
            Ai = torch.linalg.inv(A + lam * torch.eye(K, dtype=torch.float64))
            sh = (Ai @ b)[:L].float().numpy()
            return sh, Ai.diagonal()[:L].sqrt().float().numpy()

        for c in [float(x) for x in args.amps.split(",")]:
            mk0, mk1 = mark(master, c, S[0]), mark(master, c, S[1])
            ratio = loss(mk0, held) / base_loss
            ft0 = fam.finetune(mk0, steps=args.ftsteps, lr=3e-4).eval()
            avg = mark(master, c, (S[0] + S[1]) / 2)  # the head mark is linear in s: the average of two copies
            ftavg = fam.finetune(avg, steps=args.ftsteps, lr=3e-4).eval()
            var = {"as-is": (logp(mk0, prompts), lp_master), "int8": (logp(Family.int8(mk0), prompts), lp_master8),
                   "ft": (logp(ft0, prompts), lp_master), "avg01": (logp(avg, prompts), lp_master),
                   "avg01-ft": (logp(ftavg, prompts), lp_master), "master": (lp_master, lp_master)}
            lp0 = var["as-is"][0]
            ft_rms = (var["ft"][0] - lp0)[:, :-1].pow(2).mean().sqrt().item()
            mark_rms = (lp0 - lp_master)[:, :-1].pow(2).mean().sqrt().item()
            row = dict(seed=seed, c=c, loss_ratio=round(ratio, 6), ft_rms=round(ft_rms, 4), mark_rms=round(mark_rms, 4),
                       res={})
            print(f"seed {seed} c={c}: loss ratio {ratio:.6f} ft rms {ft_rms:.3f} mark rms {mark_rms:.3f}", flush=True)
            n_inn = args.innocents
            for nm, (lc, lr_) in var.items():
                if nm not in args.variants.split(","):
                    continue
                for q in qs:
                    sh, sd = read(lc, lr_, q, c)
                    y = sh > 0
                    if args.centre:
                        sh = sh / 2 + pb - 0.5
                        y = sh > 0
                    if args.weigh == "flat":
                        w = np.ones(L)
                    elif args.weigh == "z":
                        w = np.abs(sh) / sd; w = np.minimum(w, 3 * np.median(w))
                    else:
                        w = np.abs(sh); w = np.minimum(w, 3 * np.median(w))
                    sc = code.scores(y, 2 + n_inn, known=w)
                    thr = accusation_threshold(code, y, w, 10**6, 1e-6)
                    sdv = max(float(np.sqrt((w ** 2).sum())), 1e-12)
                    o = dict(s0=round(float(sc[0]) / thr, 3), s1=round(float(sc[1]) / thr, 3),
                             inn_max=round(float(sc[2:].max()) / thr, 3), thr_sd=round(thr / sdv, 2),
                             z0=round(float(sc[0]) / sdv, 2), inn_z_max=round(float(sc[2:].max()) / sdv, 2),
                             agree0=round(float(((sh > 0) == X[0]).mean()), 3))
                    row["res"][f"{nm}|{q}"] = o
                    print(f"   {nm:9s} q{q:4d} leaker/thr {o['s0']:.2f} r1/thr {o['s1']:.2f} innocent max/thr "
                          f"{o['inn_max']:.2f}  z0 {o['z0']:.1f} thr {o['thr_sd']:.1f}sd agree {o['agree0']}", flush=True)
            res["rows"].append(row)
    print(f"total {time.time()-t0:.0f}s")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

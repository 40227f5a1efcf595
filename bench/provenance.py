"""Clone-detection benchmark (issue 4): accuracy on a zoo of small trained models, speed at 1B scale,
and cisco-ai-provenance-kit's `compare` on the same pairs, side by side.  Prints JSON.

    python bench/provenance.py                 # full run (about 15-25 minutes on 2 cores)
    python bench/provenance.py --quick         # fewer models, no 1B-scale files
    python bench/provenance.py --no-peer       # skip the cisco kit

The zoo is cached under .bench/zoo; the cisco kit is installed into .bench/cisco-venv
(it declares Python >= 3.12; we install it with --ignore-requires-python).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
sys.path.insert(0, str(ROOT))  # the zoo is a test helper (tests/support/zoo.py), not part of the wheel
CISCO = BENCH / "cisco-venv"
CISCO_DEPS = ["accelerate", "huggingface-hub", "numpy", "pandas", "protobuf", "pyarrow", "pydantic-settings>=2.12.0",
              "pydantic>=2.12.5", "rich", "safetensors", "sentencepiece", "structlog>=25.5.0", "tiktoken",
              "transformers"]  # fmt: skip


def _ensure_cisco() -> Path | None:
    exe = CISCO / "bin" / "provenancekit"
    if exe.exists():
        return exe
    try:
        subprocess.run([sys.executable, "-m", "venv", str(CISCO)], check=True)
        pip = [str(CISCO / "bin" / "pip"), "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        # its dependencies resolved for this Python, then the kit itself past its ">=3.12" marker
        subprocess.run([*pip, *CISCO_DEPS], check=True)
        subprocess.run([*pip, "--no-deps", "--ignore-requires-python", "cisco-ai-provenance-kit==1.0.0"], check=True)
    except subprocess.CalledProcessError as e:
        print(f"cisco kit unavailable: {e}", file=sys.stderr)
        return None
    return exe if exe.exists() else None


def _cisco_compare(exe: Path, a: Path, b: Path) -> dict:
    t = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([str(exe), "compare", str(a), str(b), "--json", "--no-cache"], capture_output=True, text=True,
                       env=env, timeout=600)  # fmt: skip
    dt = time.perf_counter() - t
    try:
        j = json.loads(r.stdout[r.stdout.index("{") :])
    except ValueError:
        return {"error": (r.stderr or r.stdout)[-300:], "seconds": dt}
    s = j["scores"]
    return {"decision": s["provenance_decision"], "score": s["pipeline_score"], "identity_score": s["identity_score"],
            "seconds": dt}  # fmt: skip


def _cisco_positive(decision: str) -> bool:
    return decision in ("Confirmed Match", "High-Confidence Match")


# -- accuracy ---------------------------------------------------------------------------------
def accuracy(args: argparse.Namespace, peer: Path | None) -> dict:
    from tests.support.zoo import DERIVATIONS, Zoo
    from weightwarden.provenance import Registry, compare_many, extract_signature

    zoo = Zoo(BENCH / "zoo")
    t0 = time.perf_counter()
    parents = [zoo.base("llama", 1000 + i, 150) for i in range(args.parents)]
    derived = [(how, zoo.derive(parents[0], how), parents[0]) for how in DERIVATIONS]
    derived += [(f"ft-short of parent {i}", zoo.derive(p, "ft-short", seed=i + 1), p) for i, p in enumerate(parents)]
    for arch in ("gpt2", "mixtral"):
        a = zoo.base(arch, 2000, 150)
        derived.append((f"{arch} ft-short", zoo.derive(a, "ft-short"), a))
    independent = [(f"parent {i} vs parent {j}", parents[i], parents[j])
                   for i, j in itertools.combinations(range(len(parents)), 2)]  # fmt: skip
    independent += [(f"ft of parent {i} vs parent {(i + 1) % len(parents)}", derived[len(DERIVATIONS) + i][1],
                     parents[(i + 1) % len(parents)]) for i in range(len(parents))]  # fmt: skip
    train_s = time.perf_counter() - t0

    sig_cache: dict[Path, object] = {}

    def sig(p: Path):
        if p not in sig_cache:
            sig_cache[p] = extract_signature(p)
        return sig_cache[p]

    rows = []
    t0 = time.perf_counter()
    for kind, pairs in (("derived", derived), ("independent", independent)):
        for label, sus, ref in pairs:
            t = time.perf_counter()
            c = compare_many([sig(ref)], sus)[0]
            rows.append({"kind": kind, "pair": label, "log10_p": round(c.log_p / math.log(10), 2),
                         "derived": c.derived, "seconds": round(time.perf_counter() - t, 3)})  # fmt: skip
    test_s = time.perf_counter() - t0

    # registry: parents, their siblings (other derivatives of the same parent), unrelated models; each
    # registered in order, so the registry records every derivative's registered parent (lineage)
    reg = Registry(BENCH / "registry")
    for n in reg.names():
        reg.remove(n)
    t0 = time.perf_counter()
    for i, p in enumerate(parents):
        reg.register(p, f"parent-{i}")
        for k in range(args.siblings):
            reg.register(zoo.derive(p, "ft-tiny", seed=50 + k), f"parent-{i}-ft{k}")
        for how in ("noise", "prune50", "int4"):
            reg.register(zoo.derive(p, how, seed=60), f"parent-{i}-{how}")
    extra = 0
    while len(reg) < 100:
        reg.register(zoo.base("llama", 3000 + extra, 40), f"unrelated-{extra}")
        extra += 1
    build_s = time.perf_counter() - t0
    lineage_ok = sum(reg.parent_of(n) == n.rsplit("-", 1)[0] for n in reg.names() if n.count("-") == 2)
    lineage_n = sum(n.count("-") == 2 for n in reg.names())
    lineage_fp = sum(reg.parent_of(n) is not None for n in reg.names() if n.count("-") != 2)
    # suspects: a fine-tune of each parent (its parent: parent-i, though its siblings may sit closer)
    # and a fine-tune of each parent's first sibling (its parent: that sibling)
    suspects = [(f"ft-short of parent {i}", zoo.derive(p, "ft-short", seed=i + 1), f"parent-{i}")
                for i, p in enumerate(parents)]  # fmt: skip
    suspects += [(f"ft-short of parent-{i}-ft0", zoo.derive(zoo.derive(p, "ft-tiny", seed=50), "ft-short", seed=i + 1),
                  f"parent-{i}-ft0") for i, p in enumerate(parents)]  # fmt: skip
    hits, ident = 0, []
    t0 = time.perf_counter()
    for label, suspect, want in suspects:
        res = reg.identify(suspect, top_k=args.top_k)
        top = res.best[0] if res.best else None
        hits += top == want
        derived_ms = [m for m in res.matches if m[1].derived]
        nearest = max(derived_ms, key=lambda m: m[1].similarity)[0] if derived_ms else None
        ident.append({"suspect": label, "expected": want, "top1": top, "nearest_derived": nearest,
                      "top1_log10_p_corrected": round(res.matches[0][1].log_p / math.log(10), 1)})  # fmt: skip
    identify_s = time.perf_counter() - t0

    d = [r for r in rows if r["kind"] == "derived"]
    ind = [r for r in rows if r["kind"] == "independent"]
    out = {
        "zoo": {"parents": len(parents), "train_seconds": round(train_s, 1)},
        "derived_pairs": len(d),
        "derived_all_below_1e-12": all(r["log10_p"] < -12 for r in d),
        "derived_max_log10_p": max(r["log10_p"] for r in d),
        "independent_pairs": len(ind),
        "independent_all_above_1e-3": all(r["log10_p"] > -3 for r in ind),
        "independent_min_log10_p": min(r["log10_p"] for r in ind),
        "false_positives_at_alpha_1e-6": sum(r["derived"] for r in ind),
        "false_negatives_at_alpha_1e-6": sum(not r["derived"] for r in d),
        "mean_compare_seconds_small": round(test_s / len(rows), 3),
        "registry_size": len(reg),
        "identify_suspects": len(suspects),
        "identify_top1_accuracy": hits / len(suspects),
        "identify_top1_if_ranked_by_similarity_alone": sum(r["nearest_derived"] == r["expected"] for r in ident)
        / len(suspects),
        "identify_seconds_each": round(identify_s / len(suspects), 2),
        "registry_lineage_recovered": f"{lineage_ok}/{lineage_n}",
        "registry_lineage_false_links": lineage_fp,
        "registry_build_seconds": round(build_s, 1),
        "identify": ident,
        "pairs": rows,
    }
    if peer is not None:
        sample = d + ind[: args.peer_independent]
        pairs_by_label = {lbl: (s, r) for lbl, s, r in derived + independent}
        peer_rows = []
        for r in sample:
            sus, ref = pairs_by_label[r["pair"]]
            pr = _cisco_compare(peer, sus, ref)
            peer_rows.append({"pair": r["pair"], "kind": r["kind"], "ours_log10_p": r["log10_p"],
                              "ours_derived": r["derived"], "ours_seconds": r["seconds"], **{f"cisco_{k}": v
                              for k, v in pr.items()}})  # fmt: skip
        ok = [x for x in peer_rows if "cisco_decision" in x]
        out["peer"] = {
            "tool": "cisco-ai-provenance-kit 1.0.0 (compare --json --no-cache)",
            "pairs": len(peer_rows),
            "errors": len(peer_rows) - len(ok),
            "cisco_true_positives": sum(_cisco_positive(x["cisco_decision"]) for x in ok if x["kind"] == "derived"),
            "cisco_false_positives": sum(_cisco_positive(x["cisco_decision"]) for x in ok if x["kind"] != "derived"),
            "ours_true_positives": sum(x["ours_derived"] for x in peer_rows if x["kind"] == "derived"),
            "ours_false_positives": sum(x["ours_derived"] for x in peer_rows if x["kind"] != "derived"),
            "derived_in_sample": sum(x["kind"] == "derived" for x in peer_rows),
            "independent_in_sample": sum(x["kind"] != "derived" for x in peer_rows),
            "time_ratio_cisco_over_ours": round(
                sum(x["cisco_seconds"] for x in ok) / max(sum(x["ours_seconds"] for x in ok), 1e-9), 1
            ),
            "rows": peer_rows,
        }
    return out


# -- speed at 1B scale ---------------------------------------------------------------------------
def _write_big(path: Path, rng: np.random.Generator, layers: int, d: int, ff: int, vocab: int,
               base: dict | None = None) -> dict:  # fmt: skip
    """A TinyLlama-shaped checkpoint in bf16 (random weights; only speed is measured on it)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    bf = ml_dtypes.bfloat16

    def mk(shape: tuple[int, ...], key: str) -> np.ndarray:
        if base is not None:  # a derived copy: permute MLP units, add noise
            w = base[key].astype(np.float32)
            return (w + 0.05 * rng.standard_normal(w.shape, dtype=np.float32)).astype(bf)
        return rng.standard_normal(shape, dtype=np.float32).astype(bf)

    sd = {"model.embed_tokens.weight": mk((vocab, d), "model.embed_tokens.weight"),
          "lm_head.weight": mk((vocab, d), "lm_head.weight"), "model.norm.weight": np.ones(d, bf)}  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = mk((d, d), p + f"self_attn.{n}.weight")
        for n, s in (("gate_proj", (ff, d)), ("up_proj", (ff, d)), ("down_proj", (d, ff))):
            sd[p + f"mlp.{n}.weight"] = mk(s, p + f"mlp.{n}.weight")
        if base is not None:
            perm = rng.permutation(ff)
            for n in ("gate_proj", "up_proj"):
                sd[p + f"mlp.{n}.weight"] = sd[p + f"mlp.{n}.weight"][perm]
            sd[p + "mlp.down_proj.weight"] = np.ascontiguousarray(sd[p + "mlp.down_proj.weight"][:, perm])
        sd[p + "input_layernorm.weight"] = np.ones(d, bf)
        sd[p + "post_attention_layernorm.weight"] = np.ones(d, bf)
    save_file(sd, str(path))
    return sd


def speed(args: argparse.Namespace) -> dict:
    from safetensors.numpy import load_file

    from weightwarden.provenance import Registry, compare_many, extract_signature
    from weightwarden.provenance.signature import SKETCH_DIM

    big = BENCH / "big"
    big.mkdir(parents=True, exist_ok=True)
    ref, sus = big / "ref.safetensors", big / "suspect.safetensors"
    shape = {"layers": 22, "d": 2048, "ff": 5632, "vocab": 32000}  # TinyLlama-1.1B
    if not (ref.exists() and sus.exists()):
        rng = np.random.default_rng(0)
        base = _write_big(ref, rng, **shape)
        _write_big(sus, rng, **shape, base=base)
        del base
    size = ref.stat().st_size
    params = size // 2
    for f in (ref, sus):  # warm the page cache
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    t = time.perf_counter()
    sd = load_file(str(ref))  # plain baseline: safetensors reads every tensor into memory
    baseline = time.perf_counter() - t
    del sd
    t = time.perf_counter()
    sig = extract_signature(ref)
    extract = time.perf_counter() - t
    t = time.perf_counter()
    c = compare_many([sig], sus)[0]
    test = time.perf_counter() - t
    # retrieval over a registry of 100,000 sketches
    reg = Registry(BENCH / "retrieval-unused")
    rng = np.random.default_rng(1)
    sk = rng.standard_normal((100_000, SKETCH_DIM)).astype(np.float32)
    sk /= np.linalg.norm(sk, axis=1, keepdims=True)
    reg._sketches, reg._names = sk, [f"m{i}" for i in range(len(sk))]
    q = sk[4242] + (0.3 / np.sqrt(SKETCH_DIM)) * rng.standard_normal(SKETCH_DIM).astype(np.float32)
    q /= np.linalg.norm(q)
    times = []
    for _ in range(20):
        t = time.perf_counter()
        top = reg.retrieve(q, 10)
        times.append(time.perf_counter() - t)
    return {
        "checkpoint": {**shape, "params": params, "bytes": size, "dtype": "bf16"},
        "cores": os.cpu_count(),
        "signature_seconds": round(extract, 2),
        "signature_gb_per_s": round(size / extract / 1e9, 2),
        "signature_gb_per_s_per_core": round(size / extract / 1e9 / (os.cpu_count() or 1), 2),
        "safetensors_load_file_seconds": round(baseline, 2),
        "ratio_signature_over_load_file": round(extract / baseline, 2),
        "compare_seconds_two_1b_checkpoints": round(extract + test, 1),
        "compare_derived_pair_log10_p": round(c.log_p / math.log(10), 1),
        "retrieval_100k_ms_median": round(1000 * float(np.median(times)), 2),
        "retrieval_found_target": top[0][0] == "m4242",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parents", type=int, default=12)
    ap.add_argument("--siblings", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--peer-independent", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-big", action="store_true")
    ap.add_argument("--only-big", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.parents, args.siblings, args.no_big, args.peer_independent = 4, 2, True, 6
    peer = None if (args.no_peer or args.only_big) else _ensure_cisco()
    out: dict = {"bench": "provenance"}
    if not args.only_big:
        out["accuracy"] = accuracy(args, peer)
    if not args.no_big:
        out["speed_1b"] = speed(args)
    BENCH.mkdir(exist_ok=True)
    (BENCH / "provenance.json").write_text(json.dumps(out, indent=2))
    summary = {k: v for k, v in out.get("accuracy", {}).items() if k not in ("pairs", "identify")}
    if "peer" in summary:
        summary["peer"] = {k: v for k, v in summary["peer"].items() if k != "rows"}
    print(json.dumps({"accuracy": summary, "speed_1b": out.get("speed_1b"), "full": str(BENCH / "provenance.json")},
                     indent=2))  # fmt: skip


if __name__ == "__main__":
    main()

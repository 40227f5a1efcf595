"""Export-control gate benchmark (issue 7 targets); prints JSON.

    python bench/export.py [--entries 20000] [--queries 200]

* classification: training compute by 6·N·D against published estimates (within 10%);
* screening: recall and precision on the hand-written variants of the sample list
  (tests/vectors/screening_variants.json): the first set, and (issue 17) confusable, dotted and abbreviated
  variants against the sample list with the vectors' extra entries: a tuning set and held-out sets 1 and 2
  (both since tuned on), held-out set 3 (tests/vectors/screening_variants_heldout3.json; tuned on for the
  person-name check), held-out sets 4 to 11 (..._heldout4.json ... _heldout11.json; each measured once, then
  tuned on), held-out set 12 (written blind, measured once on the matcher tuned on 7-11), and round 4's
  probe (tests/vectors/screening_probe_round4.json, written by the engineer who tuned on it: not held out);
  the time to screen one name against a list of
  ``--entries`` entries (the sample list padded with generated names), median over ``--queries``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from weightwarden.release import estimate_compute
from weightwarden.release.screen import Entry, ScreeningList

ROOT = Path(__file__).resolve().parents[1]
LIT = [("GPT-3 175B", 175e9, 175e9, 300e9, 3.14e23), ("Llama 2 70B", 70e9, 70e9, 2e12, 8.1e23),
       ("Llama 3.1 405B", 405e9, 405e9, 15.6e12, 3.8e25),
       ("DeepSeek-V3 (671B total, 37B active)", 671e9, 37e9, 14.8e12, 3.4e24)]  # fmt: skip
SYL = ["ka", "ri", "mo", "tan", "vel", "zor", "shi", "lin", "dra", "gov", "pet", "nik", "ol", "as", "ber", "chen",
       "hua", "yev", "mir", "sa", "kov", "ski", "ra", "din", "el", "far", "gu", "ho", "it", "ju"]  # fmt: skip


def _name(rng: random.Random) -> str:
    parts = ["".join(rng.choice(SYL) for _ in range(rng.randint(2, 3))).capitalize() for _ in range(rng.randint(2, 3))]
    if rng.random() < 0.3:
        parts.append(rng.choice(["Ltd", "LLC", "Co., Ltd.", "GmbH", "JSC", "Trading FZE"]))
    return " ".join(parts)


def _measure(lst: ScreeningList, variants: list, innocents: list) -> dict:
    tp = fn = fp = 0
    for n, want in variants:
        ids = [h["entry"]["id"] for h in lst.screen(n)["hits"]]
        tp, fn, fp = tp + (want in ids), fn + (want not in ids), fp + sum(i != want for i in ids)
    fp += sum(len(lst.screen(n)["hits"]) for n in innocents)
    return {"variants": len(variants), "innocents": len(innocents), "recall": round(tp / max(tp + fn, 1), 4),
            "precision": round(tp / max(tp + fp, 1), 4), "false_hits": fp, "missed": fn}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=20000)
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    rows = []
    for name, total, active, tokens, published in LIT:
        c = estimate_compute(active_params=active, tokens=tokens)
        rows.append({"model": name, "total_params": total, "active_params": active, "tokens": tokens,
                     "compute_6ND": float(f"{c.flop:.3g}"), "published_estimate": published,
                     "error": round(abs(c.flop - published) / published, 3),
                     "over_eu_1e25": c.flop >= 1e25})  # fmt: skip
    sample = ScreeningList.load(ROOT / "src/weightwarden/release/lists/sample_csl.json")
    v = json.loads((ROOT / "tests/vectors/screening_variants.json").read_text())
    tp = sum(any(h["entry"]["id"] == want for h in sample.screen(n)["hits"]) for n, want in v["variants"])
    wrong = sum(sum(h["entry"]["id"] != want for h in sample.screen(n)["hits"]) for n, want in v["variants"])
    fp = sum(len(sample.screen(n)["hits"]) for n in v["innocents"])
    doc = json.loads((ROOT / "src/weightwarden/release/lists/sample_csl.json").read_text())
    doc["results"] = doc["results"] + v["list_extra"]
    extended = ScreeningList.parse(json.dumps(doc).encode(), "sample+extra")
    parts = {part: _measure(extended, v[part], v[f"{part}_innocents"]) for part in ("tuning", "held_out", "held_out_2")}
    for k in range(3, 13):
        vk = json.loads((ROOT / f"tests/vectors/screening_variants_heldout{k}.json").read_text())
        parts[f"held_out_{k}"] = _measure(extended, vk[f"held_out_{k}"], vk[f"held_out_{k}_innocents"])
    # round 4's probe: written by the engineer who then tuned on it (not held out)
    p4 = json.loads((ROOT / "tests/vectors/screening_probe_round4.json").read_text())
    parts["round4_probe"] = _measure(extended, p4["round4_probe"], p4["round4_probe_innocents"])
    rng = random.Random(0)
    gen = [Entry(f"gen-{i}", _name(rng), (_name(rng),) if rng.random() < 0.5 else ())
           for i in range(args.entries - len(sample.entries))]  # fmt: skip
    t = time.perf_counter()
    big = ScreeningList(sample.entries + gen, "generated", "-")
    load_s = time.perf_counter() - t
    qs = [n for n, _ in v["variants"]] + v["innocents"]
    times = []
    for i in range(args.queries):
        t = time.perf_counter()
        big.screen(qs[i % len(qs)])
        times.append(time.perf_counter() - t)
    out = {
        "classification": rows,
        "classification_all_within_10pct": all(r["error"] < 0.10 for r in rows),
        "screening": {
            "variants": len(v["variants"]),
            "innocents": len(v["innocents"]),
            "recall": round(tp / len(v["variants"]), 4),
            "precision": round(tp / max(tp + fp + wrong, 1), 4),
            "false_hits_innocents": fp,
            "wrong_entry_hits": wrong,
        },
        "screening_issue17": parts,
        "screen_one_name": {
            "entries": len(big.entries),
            "names_indexed": len(big._names),
            "load_s": round(load_s, 2),
            "ms_median": round(1000 * statistics.median(times), 2),
            "ms_p99": round(1000 * sorted(times)[int(0.99 * len(times))], 2),
        },
        "targets": {
            "compute_error_under": 0.10,
            "recall_at_least": 0.98,
            "precision_at_least": 0.9,
            "held_out_recall_at_least": 0.98,
            "held_out_precision_at_least": 0.95,
            "screen_ms_under": 50,
        },
    }
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

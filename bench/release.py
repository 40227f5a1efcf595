"""A release from a sealed master, sealed to the recipient's age key, against today's release from a
plaintext master to a plaintext copy (issue 17: target <= 1.5x), side by side on one checkpoint.

python bench/release.py [--size-gib 1] [--repeats 3]

A random Llama-shaped checkpoint (d 2048, ff 8192, as many MLP layers as the size asks; a config.json
beside it) is written and sealed as a bundle (neither timed).  Then, alternating, each repeat times
``weightwarden.trace.release``:

* plain: the plaintext folder -> a plaintext fingerprinted folder (the release as it was);
* sealed: the sealed bundle, decrypted into memory only -> a bundle sealed to a fresh age recipient and
  signed by our key.

An untimed release first enrolls the model and compiles the kernels.  Both run the export gate, mark
the same tensors and record the release.  Prints JSON: each run's seconds, the best of each, and best
sealed / best plain.  The sealed copy is opened once with the recipient's identity and checked against
the plain copy's shapes (not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".bench"


def run(size_gib: float, repeats: int) -> dict:
    import pyrage
    from safetensors.numpy import save_file

    import weightwarden as ww
    from weightwarden.keys.age import AgeIdentityProvider
    from weightwarden.keys.kdf import KdfParams
    from weightwarden.trace import release

    root = BENCH / "release"
    shutil.rmtree(root, ignore_errors=True)
    (root / "orig").mkdir(parents=True)
    rng = np.random.default_rng(0)
    d, ff = 2048, 8192
    layers = max(1, round(size_gib * (1 << 30) / (3 * d * ff * 4)))
    if size_gib < 0.1:  # a smoke run: a small model of the same shape family
        d, ff, layers = 256, 1024, 2
    sd = {"model.embed_tokens.weight": rng.standard_normal((8192 if size_gib >= 0.1 else 1024, d), dtype=np.float32)}
    for i in range(layers):
        for n, shp in (("gate_proj", (ff, d)), ("up_proj", (ff, d)), ("down_proj", (d, ff))):
            sd[f"model.layers.{i}.mlp.{n}.weight"] = rng.standard_normal(shp, dtype=np.float32) / 45
    save_file(sd, str(root / "orig" / "model.safetensors"))
    del sd
    (root / "orig" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    size = (root / "orig" / "model.safetensors").stat().st_size
    kr = ww.Keyring.create(root / "home", "bench-passphrase", kdf=KdfParams(time_cost=1, memory_kib=1024,
                                                                             parallelism=1))  # fmt: skip
    ww.seal(root / "orig", root / "master.sealed", keyring=kr)
    ident = pyrage.x25519.Identity.generate()
    prov, signer = kr.provider(), kr.signer()
    common = {"provider": prov, "country": "FR", "home": root / "h", "model_id": "big", "force": True}
    # untimed warm-up: enrolls the model (its tracing secret) and compiles the fused kernel (numba)
    release(root / "orig", "warm-up", root / "warm", **common)
    shutil.rmtree(root / "warm")
    plain_s: list[float] = []
    sealed_s: list[float] = []
    for r in range(repeats):
        for kind in ("plain", "sealed") if r % 2 == 0 else ("sealed", "plain"):
            t = time.perf_counter()
            if kind == "plain":
                release(root / "orig", "plain recipient", root / "copy-plain", **common)
                plain_s.append(time.perf_counter() - t)
            else:
                release(root / "master.sealed", "sealed recipient", root / "copy-sealed", seal=(prov, signer),
                        recipient_key=str(ident.to_public()), master_kw={"keyring": kr}, **common)  # fmt: skip
                sealed_s.append(time.perf_counter() - t)
    got = ww.load(root / "copy-sealed", providers=[AgeIdentityProvider(str(ident))], trust=[signer.public_key])
    from safetensors.numpy import load_file

    plain = load_file(str(root / "copy-plain" / "model.safetensors"))
    ok = sorted(got) == sorted(plain) and all(got[k].shape == plain[k].shape for k in got)
    best_p, best_s = min(plain_s), min(sealed_s)
    out = {
        "bench": "release",
        "cores": os.cpu_count(),
        "checkpoint_bytes": size,
        "layers": layers,
        "plain_to_plain_seconds": [round(x, 2) for x in plain_s],
        "sealed_to_recipient_seconds": [round(x, 2) for x in sealed_s],
        "best_plain_seconds": round(best_p, 2),
        "best_sealed_seconds": round(best_s, 2),
        "ratio_sealed_over_plain": round(best_s / best_p, 3),
        "target_ratio": 1.5,
        "sealed_copy_opens_with_recipient_identity": ok,
    }
    shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=0.02, help="checkpoint size (default: a small smoke run)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each, alternating order")
    a = ap.parse_args()
    print(json.dumps(run(a.size_gib, max(1, a.repeats)), indent=1))


if __name__ == "__main__":
    main()

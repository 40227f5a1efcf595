"""Sealed-checkpoint benchmark: prints JSON with ratios against memcpy and peer tools.

    python bench/seal.py [--size-mib 1024] [--tensors 200] [--repeat 3]

Everything is measured side by side in one run with a warm page cache; the
machine is shared and noisy, so compare the ratios, not absolute times.
Peers: plain safetensors, CryptoTensors (encrypt+save, load+decrypt), pyrage (age).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import weightwarden as ww
from weightwarden.keys.kdf import KdfParams

MiB = 1 << 20


def best(fn, repeat: int) -> float:
    fn()  # warm-up (page cache, allocator, lazy imports)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def memcpy_seconds(tensors: dict[str, np.ndarray], repeat: int) -> float:
    """The baseline: numpy.copyto of the same bytes into an already-touched buffer."""
    flat = np.concatenate([t.view(np.uint8) for t in tensors.values()])
    dst = np.empty_like(flat)
    dst.fill(1)
    return best(lambda: np.copyto(dst, flat), repeat)


def make_tensors(size: int, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    per = (size - MiB) // n // 2
    out = {f"layers.{i}.weight": rng.standard_normal(per, dtype=np.float32).astype(np.float16) for i in range(n)}
    out["probe"] = rng.standard_normal(MiB // 2, dtype=np.float32).astype(np.float16)  # exactly 1 MiB
    return out


def peak_extra_memory(path: Path, home: Path, passphrase: str, data_len: int) -> dict[str, float]:
    """Peak resident memory of a full load beyond the tensors, in a fresh process (Linux /proc)."""
    code = f"""
import weightwarden as ww
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
kr = ww.Keyring.unlock({str(home)!r}, {passphrase!r})
with ww.safe_open({str(path)!r}, keyring=kr) as f:
    f.keys()
base = status('VmRSS')
t = ww.load({str(path)!r}, keyring=kr)
print(base, status('VmHWM'))
"""
    base, peak = map(int, subprocess.check_output([sys.executable, "-c", code], text=True).split())
    return {"extra_mib": (peak - base - data_len) / MiB}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--tensors", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--skip-peers", action="store_true")
    a = ap.parse_args()

    from safetensors.numpy import load_file, save_file

    work = Path(a.dir or tempfile.mkdtemp(prefix="ww-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tensors = make_tensors(a.size_mib * MiB, a.tensors, rng)
    size = sum(t.nbytes for t in tensors.values())
    src = work / "model.safetensors"
    save_file(tensors, str(src))
    home, pw = work / "home", "bench passphrase"
    shutil.rmtree(home, ignore_errors=True)
    kr = ww.Keyring.create(home, pw, kdf=KdfParams(1, 1024, 1))
    sealed = work / "model.wws"
    res: dict[str, float] = {}

    res["memcpy"] = memcpy_seconds(tensors, a.repeat)

    res["safetensors_save"] = best(lambda: save_file(tensors, str(work / "plain.safetensors")), a.repeat)

    def save_fsync() -> None:
        save_file(tensors, str(work / "plain.safetensors"))
        fd = os.open(work / "plain.safetensors", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    res["safetensors_save_fsync"] = best(save_fsync, a.repeat)
    res["safetensors_load"] = best(lambda: load_file(str(src)), a.repeat)

    def seal(durable: bool = True) -> None:
        if sealed.exists():
            sealed.unlink()
        from weightwarden.sealed import seal_file

        seal_file(src, sealed, provider=kr.provider(), signer=kr.signer(), durable=durable)

    res["ours_seal"] = best(seal, a.repeat)
    res["ours_seal_no_fsync"] = best(lambda: seal(False), a.repeat)
    seal()
    res["ours_load"] = best(lambda: ww.load(sealed, keyring=kr), a.repeat)
    res["ours_load_tags_only"] = best(lambda: ww.load(sealed, keyring=kr, check_digests=False), a.repeat)
    res["ours_verify_keyless"] = best(lambda: ww.verify(sealed, keyring=kr), a.repeat)
    with ww.safe_open(sealed, keyring=kr) as f:
        res["ours_get_tensor_1mib"] = best(lambda: f.get_tensor("probe"), max(10, a.repeat))
    mem = peak_extra_memory(sealed, home, pw, size)

    peers: dict[str, str] = {}
    if not a.skip_peers:
        try:
            import cryptotensors
            from cryptography.hazmat.primitives import serialization as S
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
            from cryptotensors.numpy import load_file as ct_load
            from cryptotensors.numpy import save_file as ct_save

            b64 = lambda b: base64.b64encode(b).decode()
            sk = Ed25519PrivateKey.generate()
            d = sk.private_bytes(S.Encoding.Raw, S.PrivateFormat.Raw, S.NoEncryption())
            x = sk.public_key().public_bytes(S.Encoding.Raw, S.PublicFormat.Raw)
            enc = {"kty": "oct", "alg": "aes256gcm", "k": b64(os.urandom(32)), "kid": "bench-enc"}
            sig = {"kty": "okp", "crv": "Ed25519", "alg": "ed25519", "d": b64(d), "x": b64(x), "kid": "bench-sig"}
            ctf = work / "ct.safetensors"
            res["cryptotensors_save"] = best(
                lambda: ct_save(tensors, str(ctf), config={"enc_key": enc, "sign_key": sig}), a.repeat
            )
            cryptotensors.register_direct_key_provider(keys=[enc, sig])
            res["cryptotensors_load"] = best(lambda: ct_load(str(ctf)), a.repeat)
            peers["cryptotensors"] = getattr(cryptotensors, "__version__", "?")
        except Exception as e:
            peers["cryptotensors"] = f"failed: {type(e).__name__}: {e}"
        try:
            import pyrage

            ident = pyrage.x25519.Identity.generate()
            agef = work / "model.safetensors.age"

            def age_enc() -> None:
                agef.write_bytes(pyrage.encrypt(src.read_bytes(), [ident.to_public()]))

            res["pyrage_encrypt"] = best(age_enc, a.repeat)
            res["pyrage_decrypt"] = best(lambda: pyrage.decrypt(agef.read_bytes(), [ident]), a.repeat)
            peers["pyrage"] = "ok"
        except Exception as e:
            peers["pyrage"] = f"failed: {type(e).__name__}: {e}"

    gbps = {k: size / v / 1e9 for k, v in res.items() if k != "ours_get_tensor_1mib"}
    r = lambda a_, b_: res[b_] / res[a_] if a_ in res and b_ in res else None
    targets = {
        "load_vs_cryptotensors_load": (r("ours_load", "cryptotensors_load"), 1.5),
        "load_vs_memcpy": (res["memcpy"] / res["ours_load"], 0.6),
        "load_tags_only_vs_memcpy": (res["memcpy"] / res["ours_load_tags_only"], 0.6),
        "seal_vs_safetensors_save": (r("ours_seal_no_fsync", "safetensors_save"), 1.0),
        "seal_fsync_vs_safetensors_save_fsync": (r("ours_seal", "safetensors_save_fsync"), 1.0),
        "seal_vs_cryptotensors_save": (r("ours_seal_no_fsync", "cryptotensors_save"), 3.0),
        "verify_vs_memcpy": (res["memcpy"] / res["ours_verify_keyless"], 0.5),
        "get_tensor_1mib_ms": (res["ours_get_tensor_1mib"] * 1e3, 2.0),
        "load_extra_memory_mib": (mem["extra_mib"], 64.0),
    }
    lower_is_better = {"get_tensor_1mib_ms", "load_extra_memory_mib"}
    report = {
        "bench": "seal",
        "checkpoint": {"bytes": size, "tensors": len(tensors), "dtype": "float16"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "peers": peers,
        "seconds": {k: round(v, 5) for k, v in res.items()},
        "GBps": {k: round(v, 3) for k, v in gbps.items()},
        "targets": {
            k: {
                "value": None if v is None else round(v, 3),
                "target": ("<= " if k in lower_is_better else ">= ") + str(t),
                "met": None if v is None else (v <= t if k in lower_is_better else v >= t),
            }
            for k, (v, t) in targets.items()
        },
        "notes": [
            "ours_load checks AES-GCM tags and the signed BLAKE3 digest of every chunk (default);",
            "ours_load_tags_only (check_digests=False) checks tags and the signed context only;",
            "ours_seal includes fsync + rename (crash safety, the default); ours_seal_no_fsync (durable=False)",
            "is compared with save_file and CryptoTensors, which do not fsync; *_fsync rows compare durable writes.",
        ],
        "peak_rss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(report, indent=2))
    if a.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

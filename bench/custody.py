"""Custody benchmark: rewrapping many sealed files vs the provider's raw wrap+unwrap latency.

    python bench/custody.py [--files 10000] [--skip-hsm]

Prints JSON.  For each provider (local keyring, SoftHSM2 through PKCS#11) it measures, in
the same run: the raw latency of one wrap plus one unwrap, and the per-file cost of
`rewrap` over N sealed files after a key rotation (durable: two syncfs barriers per batch).
Target: per-file cost <= 1.5x the raw latency, i.e. file I/O does not dominate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import weightwarden as ww
from weightwarden.keys.kdf import KdfParams
from weightwarden.keys.provider import KeyProvider, Signer
from weightwarden.sealed import seal_file
from weightwarden.sealed.rewrap import rewrap

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"


def raw_latency_us(p: KeyProvider, n: int = 2000) -> dict[str, float]:
    dek, ctx = os.urandom(32), os.urandom(16)
    t = time.perf_counter()
    slots = [p.wrap(dek, ctx) for _ in range(n)]
    wrap = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for s in slots:
        p.unwrap(s, ctx)
    unwrap = (time.perf_counter() - t) / n
    return {"wrap_us": wrap * 1e6, "unwrap_us": unwrap * 1e6, "wrap_plus_unwrap_us": (wrap + unwrap) * 1e6}


def make_files(root: Path, n: int, p: KeyProvider, s: Signer) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    src = root / "config.json"
    src.write_text('{"model_type": "bench", "hidden_size": 4096}')
    out = []
    for i in range(n):
        dst = root / f"f{i:05d}.wws"
        seal_file(src, dst, provider=p, signer=s, durable=False)
        out.append(dst)
    os.sync()
    return out


def bench_provider(name: str, p: KeyProvider, s: Signer, work: Path, n: int) -> dict[str, object]:
    files = make_files(work / name, n, p, s)
    raw = raw_latency_us(p)
    p.rotate()
    t = time.perf_counter()
    rep = rewrap(files, providers=[p], target=p)
    per_file = (time.perf_counter() - t) / n * 1e6
    assert rep.rewrapped == n
    return {
        "files": n,
        "raw": {k: round(v, 1) for k, v in raw.items()},
        "rewrap_per_file_us": round(per_file, 1),
        "ratio_to_raw": round(per_file / raw["wrap_plus_unwrap_us"], 3),
        "target": "<= 1.5",
        "met": per_file / raw["wrap_plus_unwrap_us"] <= 1.5,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--skip-hsm", action="store_true")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ww-bench-custody-"))
    report: dict[str, object] = {"bench": "custody", "cpus": os.cpu_count()}
    try:
        kr = ww.Keyring.create(work / "home", "bench passphrase", kdf=KdfParams(1, 1024, 1))
        report["local"] = bench_provider("local", kr.provider(kr.new_kek("bench")), kr.signer(), work, a.files)
        if not a.skip_hsm and os.path.exists(SOFTHSM) and shutil.which("softhsm2-util"):
            (work / "tokens").mkdir()
            conf = work / "softhsm2.conf"
            conf.write_text(
                f"directories.tokendir = {work / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
            )
            os.environ["SOFTHSM2_CONF"] = str(conf)
            subprocess.run(
                ["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", "1234", "--so-pin", "5678"],
                check=True,
                capture_output=True,
            )
            from weightwarden.keys.pkcs11 import Pkcs11Provider, Pkcs11Session

            hsm = Pkcs11Provider(Pkcs11Session(SOFTHSM, "bench", "1234"), "bench")
            hsm.create_key()
            report["softhsm2"] = bench_provider("softhsm2", hsm, kr.signer(), work, a.files)
        else:
            report["softhsm2"] = "skipped: SoftHSM2 not installed"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

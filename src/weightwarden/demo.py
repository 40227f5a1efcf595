"""`make demo`: the sealed-checkpoint lifecycle end to end, on embedded defaults.

Trains a tiny character model on text that ships with Python, seals it, verifies it
without a key, loads it into memory only, and shows that tampering, a wrong key and an
untrusted signer are each refused.  Exits non-zero if any result is wrong.

Later issues extend this run with custodians, the broker, release and tracing.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from safetensors.numpy import save_file

import weightwarden as ww
from weightwarden.errors import IntegrityError, UntrustedSignerError, WardenError, WrongKeyError
from weightwarden.keys.local import KdfParams

console = Console()
ALPHABET = "abcdefghijklmnopqrstuvwxyz .,'-!*\n"


def corpus() -> np.ndarray:
    """The Zen of Python (ships with Python: the `this` module prints it when imported)."""
    with contextlib.redirect_stdout(io.StringIO()):
        this = importlib.import_module("this")
    text = codecs.decode(this.s, "rot13").lower()
    ids = [ALPHABET.index(c) for c in text if c in ALPHABET]
    return np.array(ids, dtype=np.int64)


def loss(w: np.ndarray, b: np.ndarray, ids: np.ndarray) -> float:
    logits = w[ids[:-1]] + b
    logits = logits - logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def train(
    ids: np.ndarray, steps: int, rng: np.random.Generator, on_step: Callable[[], None] = lambda: None
) -> tuple[np.ndarray, np.ndarray]:
    v = len(ALPHABET)
    w = (rng.standard_normal((v, v)) * 0.01).astype(np.float32)
    b = np.zeros(v, np.float32)
    x, y = ids[:-1], ids[1:]
    onehot_y = np.eye(v, dtype=np.float32)[y]
    for _ in range(steps):
        logits = w[x] + b
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        g = (p - onehot_y) / len(x)
        gw = np.zeros_like(w)
        np.add.at(gw, x, g)
        w -= 5.0 * gw
        b -= 5.0 * g.sum(axis=0)
        on_step()
    return w, b


def main() -> int:
    checks: list[tuple[str, bool, str]] = []

    def check(name: str, fn: Callable[[], tuple[bool, str]]) -> None:
        t = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as e:
            ok, detail = False, f"{type(e).__name__}: {e}"
        checks.append((name, ok, f"{detail} ({time.perf_counter() - t:.2f}s)"))
        console.print(("[green]✔[/green] " if ok else "[red]✘[/red] ") + name + f"  [dim]{detail}[/dim]")

    with tempfile.TemporaryDirectory(prefix="warden-demo-") as tmp:
        root = Path(tmp)
        os.environ["WARDEN_HOME"] = str(root / "home")
        os.environ.setdefault("WARDEN_PASSPHRASE", "demo passphrase, use a real one")
        console.rule("[bold]weightwarden demo: sealed checkpoints")
        rng = np.random.default_rng(0)
        ids = corpus()
        with Progress(console=console, transient=True) as prog:
            task = prog.add_task("training a tiny character model", total=300)
            w, b = train(ids, 300, rng, lambda: prog.advance(task))
        base = loss(w, b, ids)
        model = root / "model"
        model.mkdir()
        save_file({"bigram.weight": w, "bigram.bias": b}, str(model / "model.safetensors"), metadata={"demo": "1"})
        (model / "config.json").write_text(json.dumps({"model_type": "char-bigram", "alphabet": ALPHABET}))
        uniform = float(np.log(len(ALPHABET)))
        check(
            "1. train a model (loss below uniform)", lambda: (base < uniform - 0.5, f"loss {base:.3f} vs {uniform:.3f}")
        )

        kr = ww.Keyring.create(None, os.environ["WARDEN_PASSPHRASE"], kdf=KdfParams(1, 16 * 1024, 1))
        check("2. keyring created (Argon2id-protected)", lambda: (len(kr.list_keys()) == 2, str(kr.home)))
        sealed = root / "sealed"
        ww.seal(model, sealed, keyring=kr, hide_header=True)
        plain_w = w.tobytes()

        def no_plaintext() -> tuple[bool, str]:
            blobs = b"".join(p.read_bytes() for p in sealed.iterdir())
            leaks = sum(plain_w[i : i + 32] in blobs for i in range(0, len(plain_w) - 32, 97))
            return leaks == 0 and b"bigram" not in blobs, f"{len(list(sealed.iterdir()))} files, no plaintext window"

        check("3. sealed with hidden header: no weights or names visible", no_plaintext)

        def keyless_verify() -> tuple[bool, str]:
            rep = ww.verify(sealed)
            return rep.files == 2, f"{rep.chunks} chunks signed by {rep.signer}, checked without any key"

        check("4. verify without the data key", keyless_verify)

        def in_memory() -> tuple[bool, str]:
            before = {p for p in root.rglob("*")}
            t = ww.load(sealed)
            after = {p for p in root.rglob("*")}
            same = loss(t["bigram.weight"], t["bigram.bias"], ids)
            return same == base and before == after, f"loss {same:.3f}, no new files"

        check("5. load into memory: same model, nothing written", in_memory)

        def tamper() -> tuple[bool, str]:
            bad = root / "tampered"
            ww.seal(model, bad, keyring=kr)
            victim = next(p for p in bad.iterdir() if p.name.startswith("model"))
            blob = bytearray(victim.read_bytes())
            blob[len(blob) // 2] ^= 0x01
            victim.write_bytes(blob)
            try:
                ww.verify(bad)
            except IntegrityError as e:
                return True, f"caught: {e}"
            return False, "tampering went unnoticed"

        check("6. one flipped byte is caught", tamper)

        def wrong_key() -> tuple[bool, str]:
            other = ww.Keyring.create(root / "mallory", "mallory's passphrase", kdf=KdfParams(1, 1024, 1))
            try:
                ww.load(sealed, providers=[other.provider()], trust=kr.trust)
            except WrongKeyError:
                pass
            else:
                return False, "another keyring decrypted the model"
            forged = root / "forged"
            ww.seal(model, forged, keyring=other)
            try:
                ww.load(forged, keyring=kr)
            except UntrustedSignerError as e:
                return True, f"wrong key refused; {e}"
            return False, "a model from an untrusted signer was loaded"

        check("7. wrong key and untrusted signer are refused", wrong_key)

    table = Table("step", "result", "detail", title="summary")
    for name, ok, detail in checks:
        table.add_row(name, "[green]ok[/green]" if ok else "[red]FAILED[/red]", detail)
    console.print(table)
    failed = [c for c in checks if not c[1]]
    console.print(
        "[bold green]all checks passed[/bold green]" if not failed else f"[bold red]{len(failed)} failed[/bold red]"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except WardenError as e:
        sys.stderr.write(f"error: {type(e).__name__}: {e}\n")
        sys.exit(1)

"""The registry of protected models, and ``identify``: which of them is a suspect derived from?

Layout under ``root`` (default ``$WARDEN_HOME/provenance``)::

    index.npz            names, per-model facts and the retrieval sketches (N x 256), one atomic file
    sigs/<id>.wwsig      one signature per model (safetensors), written before the index names it

``identify`` ranks every registered model by the cosine of retrieval sketches
(one matrix-vector product), runs the exact test of :mod:`.compare` on the
``top_k`` candidates in one pass over the suspect, and corrects each p-value by
the registry size (Bonferroni), since the candidates were chosen by looking at
the data.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import atomic_write_bytes
from ..errors import FormatError, RegistryError
from .compare import DEFAULT_ALPHA, Comparison, compare_many, corrected
from .layout import detect_layout
from .signature import SKETCH_DIM, Signature, extract_signature, suspect_sketch
from .source import TensorSource, open_source

__all__ = ["Identification", "Registry"]

_NAME_MAX = 200
_NO_SKETCH_MAX = 1000


@dataclass(frozen=True)
class Identification:
    registry_size: int
    retrieved: list[tuple[str, float]]
    matches: list[tuple[str, Comparison]]  # tested candidates, derived first, best first

    @property
    def best(self) -> tuple[str, Comparison] | None:
        return self.matches[0] if self.matches and self.matches[0][1].derived else None

    def to_json(self) -> dict[str, Any]:
        best = self.best
        return {
            "registry_size": self.registry_size,
            "candidates_tested": len(self.matches),
            "derived_from": best[0] if best else None,
            "matches": [
                {"name": n, **{k: v for k, v in c.to_json().items() if k != "layers"}, "layers": len(c.layers)}
                for n, c in self.matches
            ],
            "retrieval": [{"name": n, "score": round(s, 4)} for n, s in self.retrieved],
        }


class Registry:
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self._names: list[str] = []
        self._facts: list[dict[str, Any]] = []
        self._sketches = np.zeros((0, SKETCH_DIM), np.float32)
        self._load()

    # -- storage ----------------------------------------------------------------------
    def _load(self) -> None:
        idx = self.root / "index.npz"
        if not idx.exists():
            return
        try:
            with np.load(idx, allow_pickle=False) as z:
                facts = json.loads(str(z["facts"]))
                sk = np.asarray(z["sketches"], np.float32)
        except (OSError, ValueError, KeyError) as e:
            raise RegistryError(f"registry index is damaged ({type(e).__name__})") from None
        if not isinstance(facts, list) or sk.shape != (len(facts), SKETCH_DIM):
            raise RegistryError("registry index is inconsistent")
        self._facts, self._sketches = facts, sk
        self._names = [f["name"] for f in facts]

    def _save(self) -> None:
        import io

        buf = io.BytesIO()
        np.savez(buf, facts=np.array(json.dumps(self._facts)), sketches=self._sketches)
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.root / "index.npz", buf.getvalue(), force=True)

    @staticmethod
    def _file(name: str) -> str:
        return hashlib.sha256(name.encode()).hexdigest()[:24] + ".wwsig"

    def __len__(self) -> int:
        return len(self._names)

    def names(self) -> list[str]:
        return list(self._names)

    def facts(self) -> list[dict[str, Any]]:
        return [dict(f) for f in self._facts]

    def get(self, name: str) -> Signature:
        if name not in self._names:
            raise RegistryError(f"no registered model named {name[:_NAME_MAX]!r}")
        try:
            return Signature.from_bytes((self.root / "sigs" / self._file(name)).read_bytes())
        except FileNotFoundError:
            raise RegistryError(f"signature of {name[:_NAME_MAX]!r} is missing") from None
        except FormatError as e:
            raise RegistryError(f"signature of {name[:_NAME_MAX]!r} is damaged: {e}") from None

    def add(self, name: str, sig: Signature, *, replace: bool = False) -> None:
        if not name or len(name) > _NAME_MAX or any(ord(c) < 32 for c in name):
            raise RegistryError("a model name is 1-200 printable characters")
        if name in self._names and not replace:
            raise RegistryError(f"{name!r} is already registered (use replace)")
        (self.root / "sigs").mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.root / "sigs" / self._file(name), sig.to_bytes(), force=True)
        fact = {"name": name, "family": sig.family, "layers": len(sig.blocks), "d_model": sig.d_model,
                "vocab": sig.vocab, "params": sig.meta.get("params")}  # fmt: skip
        if name in self._names:
            i = self._names.index(name)
            self._facts[i] = fact
            self._sketches[i] = sig.sketch
        else:
            self._names.append(name)
            self._facts.append(fact)
            self._sketches = np.concatenate([self._sketches, sig.sketch[None, :].astype(np.float32)])
        self._save()

    def register(self, model: str | os.PathLike[str] | TensorSource, name: str, *, replace: bool = False,
                 **kw: Any) -> Signature:  # fmt: skip
        sig = extract_signature(model, meta={"name": name}, **kw)
        self.add(name, sig, replace=replace)
        return sig

    def remove(self, name: str) -> None:
        if name not in self._names:
            raise RegistryError(f"no registered model named {name[:_NAME_MAX]!r}")
        i = self._names.index(name)
        del self._names[i], self._facts[i]
        self._sketches = np.delete(self._sketches, i, axis=0)
        self._save()
        (self.root / "sigs" / self._file(name)).unlink(missing_ok=True)

    # -- search -----------------------------------------------------------------------
    def retrieve(self, sketch: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The ``k`` registered models whose sketches are closest to ``sketch`` (cosine)."""
        n = len(self._names)
        if n == 0:
            return []
        k = min(k, n)
        if not np.any(sketch):
            return [(name, 0.0) for name in self._names[:k]] if k == n else []
        scores = self._sketches @ sketch.astype(np.float32)
        top = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(self._names[i], float(scores[i])) for i in top]

    def identify(self, suspect: str | os.PathLike[str] | TensorSource, *, top_k: int = 10,
                 alpha: float = DEFAULT_ALPHA, **open_kw: Any) -> Identification:  # fmt: skip
        if not self._names:
            raise RegistryError("the registry is empty: register a model first")
        own = not isinstance(suspect, TensorSource)
        src = open_source(suspect, **open_kw)
        try:
            lay = detect_layout(src.shapes)
            sk = suspect_sketch(src, lay)
            if np.any(sk):
                got = self.retrieve(sk, top_k)
            elif len(self._names) <= _NO_SKETCH_MAX:  # no embedding to sketch: test every registered model
                got = [(n, 0.0) for n in self._names]
            else:
                raise RegistryError(f"the suspect has no token embedding to retrieve candidates by, and testing all "
                                    f"{len(self._names)} registered models exceeds {_NO_SKETCH_MAX}")  # fmt: skip
            sigs = [self.get(n) for n, _ in got]
            comps = compare_many(sigs, src, alpha=alpha)
        finally:
            if own:
                src.close()
        n = len(self._names)
        tested = [(name, corrected(c, n)) for (name, _), c in zip(got, comps, strict=True)]
        tested.sort(key=lambda t: (not t[1].derived, -t[1].similarity if t[1].derived else t[1].log_p))
        return Identification(n, got, tested)


def default_registry(home: str | os.PathLike[str] | None = None) -> Registry:
    from ..keys.local import default_home

    return Registry(Path(home) if home else default_home() / "provenance")

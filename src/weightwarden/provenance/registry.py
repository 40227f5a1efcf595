"""The registry of protected models, and ``identify``: which of them is a suspect derived from?

Layout under ``root`` (default ``$WARDEN_HOME/provenance``)::

    index.npz            names, per-model facts and the retrieval sketches (N x 256), one atomic file
    sigs/<id>.wwsig      one signature per model (safetensors), written before the index names it

``identify`` ranks every registered model by the cosine of retrieval sketches
(one matrix-vector product), runs the exact test of :mod:`.compare` on the
``top_k`` candidates (and their registered ancestors) in one pass over the
suspect, and corrects each p-value by the registry size (Bonferroni), since the
candidates were chosen by looking at the data.

Lineage.  A model registered after another it tests as derived from records it as
its registered parent (or the caller names the parent).  Among the registered
models a suspect is derived from, the one it is closest to need not be its parent:
a sibling fine-tuned on similar data can sit closer.  So a candidate X with a
registered parent A counts as a possible parent of the suspect S only if S's own
update, S - X, does not point back toward A: the angle A-X-S, from the law of
cosines over the matched-unit distances, must have a cosine of at most
``LINEAGE_MAX_COS``.  A child's update is roughly orthogonal to X's (or continues
it); a sibling's position relative to X contains minus X's own update, so it points
back toward A.  docs/PROVENANCE.md has the figures and the limits.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import trail
from .._atomic import atomic_write_bytes
from .._extras import require
from ..audit import AuditAction
from ..errors import FormatError, RegistryError
from .compare import DEFAULT_ALPHA, Comparison, compare_many, corrected
from .layout import detect_layout
from .signature import SKETCH_DIM, Signature, extract_signature, suspect_sketch
from .source import TensorSource, open_source

__all__ = ["LINEAGE_MAX_COS", "Identification", "Registry"]

_NAME_MAX = 200
_NO_SKETCH_MAX = 1000
_ANCESTORS_MAX = 16
LINEAGE_MAX_COS = 0.2


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
            "lineage_max_cos": LINEAGE_MAX_COS,
            "retrieval": [{"name": n, "score": round(s, 4)} for n, s in self.retrieved],
        }


class Registry:
    def __init__(self, root: str | os.PathLike[str], *, home: str | os.PathLike[str] | None = None):
        self.root = Path(root)
        self.home = home  # whose trail registrations, removals and identifications are logged in
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

    @staticmethod
    def _check_name(name: str) -> None:
        if not name or len(name) > _NAME_MAX or any(ord(c) < 32 for c in name):
            raise RegistryError("a model name is 1-200 printable characters")

    def add(self, name: str, sig: Signature, *, replace: bool = False, parent: dict[str, Any] | None = None,
            source: str | None = None, reference: bool = False) -> None:  # fmt: skip
        """Store ``sig`` under ``name``; ``parent`` is the lineage record :meth:`register` makes; ``source``
        where the model lies (probes through an API run it: :meth:`model_path`); ``reference``: an
        independent model kept to calibrate probes, never a candidate of :meth:`identify`."""
        self._check_name(name)
        self._check_replace(name, replace=replace, reference=reference)
        if parent is not None and (parent.get("name") not in self._names or parent.get("name") == name):
            raise RegistryError("a registered parent must be another registered model")
        (self.root / "sigs").mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.root / "sigs" / self._file(name), sig.to_bytes(), force=True)
        fact = {"name": name, "family": sig.family, "layers": len(sig.blocks), "d_model": sig.d_model,
                "vocab": sig.vocab, "params": sig.meta.get("params")}  # fmt: skip
        if parent is not None:
            fact["parent"] = parent
        if source is not None:
            fact["source"] = source
        if reference:
            fact["role"] = "reference"
        if name in self._names:
            i = self._names.index(name)
            self._facts[i] = fact
            self._sketches[i] = sig.sketch
        else:
            self._names.append(name)
            self._facts.append(fact)
            self._sketches = np.concatenate([self._sketches, sig.sketch[None, :].astype(np.float32)])
        self._save()

    def _check_replace(self, name: str, *, replace: bool, reference: bool) -> None:
        """``replace`` overwrites an entry of the same role only: demoting one of ours to a reference would hide it
        from ``identify`` (and promoting a reference skips its checks), so a role changes by an audited removal."""
        if name not in self._names:
            return
        if not replace:
            raise RegistryError(f"{name[:_NAME_MAX]!r} is already registered (use replace)")
        was = "reference" if self._facts[self._names.index(name)].get("role") == "reference" else "protected"
        now = "reference" if reference else "protected"
        if was != now:
            raise RegistryError(f"{name[:_NAME_MAX]!r} is registered as {was}; replace keeps a model's role: "
                                f"remove it first (warden provenance remove {name[:_NAME_MAX]}), then register it "
                                f"as {now}")  # fmt: skip

    def _check_independent(self, src: TensorSource, name: str, *, reference: bool, alpha: float) -> None:
        """A reference must be independent of every one of our models (a copy of ours among the references turns a
        derived verdict of a probe into "not derived"): a new reference is tested against every protected model,
        and a new protected model against every reference, in one pass over the new model; p-values corrected
        for the number tested."""
        others = [n for n in (self._protected() if reference else self.references()) if n != name]
        if not others:
            return
        comps = compare_many([self.get(n) for n in others], src, alpha=alpha)
        hits = sorted(((n, corrected(c, len(others))) for n, c in zip(others, comps, strict=True)),
                      key=lambda t: t[1].log_p)  # fmt: skip
        hits = [(n, c) for n, c in hits if c.derived]
        if not hits:
            return
        other, c = hits[0]
        lp = f"log10 p = {c.log_p / np.log(10):.1f}, corrected for {len(others)}"
        if reference:
            raise RegistryError(f"{name[:_NAME_MAX]!r} is not independent of our model {other[:_NAME_MAX]!r} ({lp}): "
                                "a reference must be an independently trained model; not registered")  # fmt: skip
        raise RegistryError(f"the registered reference {other[:_NAME_MAX]!r} is not independent of "
                            f"{name[:_NAME_MAX]!r} ({lp}): remove it first (warden provenance remove "
                            f"{other[:_NAME_MAX]}), then register this model; not registered")  # fmt: skip

    def register(self, model: str | os.PathLike[str] | TensorSource, name: str, *, replace: bool = False,
                 parent: str | None = None, lineage: bool = True, alpha: float = DEFAULT_ALPHA,
                 reference: bool = False, **kw: Any) -> Signature:  # fmt: skip
        """Extract and store ``model``'s signature (and, for a path, where it lies).  Its registered parent is
        ``parent`` (which it must test as derived from), or with ``lineage`` the model ``identify`` names, if
        any.  ``reference``: an independent model that calibrates probes through an API (no lineage; never a
        candidate of ``identify``).  A reference that tests as derived from (or an ancestor of) one of ours, or
        one of ours that a registered reference tests as derived from, is refused; ``replace`` never changes a
        registered model's role (protected or reference): remove it first."""
        if reference and parent is not None:
            raise RegistryError("a reference model is independent of ours: it has no registered parent")
        require("scipy", extra="provenance")
        self._check_name(name)
        self._check_replace(name, replace=replace, reference=reference)
        own = not isinstance(model, TensorSource)
        src = open_source(model, **kw)
        try:
            sig = extract_signature(src, meta={"name": name})
            self._check_independent(src, name, reference=reference, alpha=alpha)
            link: tuple[str, Comparison] | None = None
            if parent is not None:
                if parent in self.references():
                    raise RegistryError(f"{parent[:_NAME_MAX]!r} is registered as a reference, not as one of ours")
                if parent == name:
                    raise RegistryError("a model cannot be its own registered parent")
                c = compare_many([self.get(parent)], src, alpha=alpha)[0]
                if not c.derived:
                    raise RegistryError(f"{name[:_NAME_MAX]!r} does not test as derived from {parent[:_NAME_MAX]!r} "
                                        f"(log10 p = {c.log_p / np.log(10):.1f})")  # fmt: skip
                link = (parent, c)
            elif lineage and not reference and any(n != name for n in self._protected()):
                link = self._identify_src(src, top_k=10, alpha=alpha, exclude=name).best
        finally:
            if own:
                src.close()
        rec = None
        if link is not None:
            rec = {"name": link[0], "log10_p": round(link[1].log_p / float(np.log(10)), 2),
                   "dist2": round(link[1].dist2, 6)}  # fmt: skip
        source = None if isinstance(model, TensorSource) else str(Path(model).absolute())
        self.add(name, sig, replace=replace, parent=rec, source=source, reference=reference)
        trail.record(AuditAction.PROVENANCE_REGISTER, home=self.home, subject=name, layers=len(sig.blocks),
                     parent=self.parent_of(name), registry=str(self.root),
                     role="reference" if reference else "protected")  # fmt: skip
        return sig

    def references(self) -> list[str]:
        """The names registered as independent references (``register(..., reference=True)``)."""
        return [f["name"] for f in self._facts if f.get("role") == "reference"]

    def model_path(self, name: str) -> Path:
        """Where the model registered as ``name`` lies (recorded when it was registered from a path)."""
        if name not in self._names:
            raise RegistryError(f"no registered model named {name[:_NAME_MAX]!r}: give a folder, or register it "
                                "with `warden provenance register PATH --name NAME`")  # fmt: skip
        src = self._facts[self._names.index(name)].get("source")
        if not isinstance(src, str):
            raise RegistryError(f"{name[:_NAME_MAX]!r} was registered without its location: register it again "
                                "from its folder (warden provenance register PATH --name NAME --replace)")  # fmt: skip
        if not Path(src).exists():
            raise RegistryError(f"{name[:_NAME_MAX]!r} was registered from {src[:300]!r}, which is gone: register "
                                "it again from where it lies now (--replace)")  # fmt: skip
        return Path(src)

    def parent_of(self, name: str) -> str | None:
        """The registered parent of ``name`` (None for a root, or if the parent was removed)."""
        if name not in self._names:
            raise RegistryError(f"no registered model named {name[:_NAME_MAX]!r}")
        p = self._facts[self._names.index(name)].get("parent")
        return p["name"] if isinstance(p, dict) and p.get("name") in self._names else None

    def remove(self, name: str) -> None:
        if name not in self._names:
            raise RegistryError(f"no registered model named {name[:_NAME_MAX]!r}")
        i = self._names.index(name)
        del self._names[i], self._facts[i]
        self._sketches = np.delete(self._sketches, i, axis=0)
        self._save()
        (self.root / "sigs" / self._file(name)).unlink(missing_ok=True)
        trail.record(AuditAction.PROVENANCE_REMOVE, home=self.home, subject=name, registry=str(self.root))

    def _protected(self) -> list[str]:
        return [f["name"] for f in self._facts if f.get("role") != "reference"]

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
                 alpha: float = DEFAULT_ALPHA, log: bool = True, **open_kw: Any) -> Identification:  # fmt: skip
        """Rank the registered models ``suspect`` may be derived from; ``best`` is its likely parent.
        ``log``: an event in the trail (a scan logs one event for all its items instead)."""
        require("scipy", extra="provenance")
        if not self._protected():
            raise RegistryError("the registry is empty (or holds only references): register one of our models first")
        own = not isinstance(suspect, TensorSource)
        src = open_source(suspect, **open_kw)
        try:
            res = self._identify_src(src, top_k=top_k, alpha=alpha)
        finally:
            if own:
                src.close()
        if log:
            best = res.best
            trail.record(AuditAction.PROVENANCE_IDENTIFY, home=self.home,
                         subject=str(getattr(suspect, "path", suspect)), derived_from=best[0] if best else None,
                         candidates=len(res.matches),
                         registry=str(self.root))  # fmt: skip
        return res

    def _identify_src(self, src: TensorSource, *, top_k: int, alpha: float, exclude: str | None = None
                      ) -> Identification:  # fmt: skip
        lay = detect_layout(src.shapes)
        sk = suspect_sketch(src, lay)
        names = [n for n in self._protected() if n != exclude]  # references are never candidates
        skip = {exclude, *self.references()}
        if np.any(sk):
            got = [(n, s) for n, s in self.retrieve(sk, top_k + len(skip - {None})) if n not in skip][:top_k]
        elif len(names) <= _NO_SKETCH_MAX:  # no embedding to sketch: test every registered model
            got = [(n, 0.0) for n in names]
        else:
            raise RegistryError(f"the suspect has no token embedding to retrieve candidates by, and testing all "
                                f"{len(names)} registered models exceeds {_NO_SKETCH_MAX}")  # fmt: skip
        tested = [n for n, _ in got]
        for n in list(tested):  # registered ancestors of the candidates join the test (lineage needs them)
            a = self.parent_of(n)
            for _ in range(_ANCESTORS_MAX):
                if a is None or a in tested or a == exclude:
                    break
                tested.append(a)
                a = self.parent_of(a)
        comps = compare_many([self.get(n) for n in tested], src, alpha=alpha)
        n_reg = len(names)
        by_name = {name: corrected(c, n_reg) for name, c in zip(tested, comps, strict=True)}
        return Identification(n_reg, got, self._rank(by_name))

    def _rank(self, by_name: dict[str, Comparison]) -> list[tuple[str, Comparison]]:
        """Derived candidates consistent with being the suspect's parent first (closest first), then the
        other derived ones, then the rest by p-value."""
        out = []
        for name, c in by_name.items():
            consistent = True
            a = self.parent_of(name)
            if c.derived and a is not None and a in by_name and by_name[a].derived:
                rec = self._facts[self._names.index(name)]["parent"]
                d_xa, d_sa, d_sx = float(rec["dist2"]), by_name[a].dist2, c.dist2
                # beta: how far along A -> X the suspect has come; cos: the angle A-X-S (law of cosines)
                beta = (d_sa + d_xa - d_sx) / (2 * d_xa) if d_xa > 0 else float("inf")
                cos = (d_xa + d_sx - d_sa) / (2 * math.sqrt(d_xa * d_sx)) if d_xa > 0 and d_sx > 0 else -1.0
                consistent = cos <= LINEAGE_MAX_COS
                c = replace(c, extra={**c.extra, "lineage": {"registered_parent": a, "beta": round(beta, 4),
                                                             "cos_angle_at_candidate": round(cos, 4),
                                                             "could_be_parent": consistent}})  # fmt: skip
            elif a is not None:
                c = replace(c, extra={**c.extra, "lineage": {"registered_parent": a}})
            out.append((name, c, consistent))
        out.sort(key=lambda t: (not t[1].derived, not t[2], -t[1].similarity if t[1].derived else t[1].log_p))
        return [(n, c) for n, c, _ in out]


def default_registry(home: str | os.PathLike[str] | None = None) -> Registry:
    from ..home import default_home

    return Registry(Path(home) if home else default_home() / "provenance", home=home)

"""`warden release` and `warden trace` as library calls."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from .. import audit, trail
from .._atomic import atomic_output, write_all
from ..audit import AuditAction
from ..errors import OutputExistsError, UnsupportedModelError
from ..keys.provider import KeyProvider
from ..provenance.layout import detect_layout
from ..provenance.source import TensorSource
from ..release.gate import Destination, GateDecision, ReleaseDenied, ReleaseGate
from .mark import DEFAULT_ALPHA, embed_tensors, extract, marked_tensors
from .store import ReleaseRecord, TraceStore, derive
from .tardos import TardosCode, accusation_threshold

__all__ = ["DEFAULT_EPS", "DEFAULT_LENGTH", "TraceReport", "release", "trace"]

DEFAULT_LENGTH = 4096  # symbols: ≥ (pi^2/2) c^2 ln(n/eps) = 2,240 for n = 1e6, c = 4, eps = 1e-6
DEFAULT_CUTOFF = 1e-3
DEFAULT_EPS = 1e-6
_NP_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64", "int32": "I32",
             "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16", "uint32": "U32",
             "uint64": "U64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}  # fmt: skip


def _store(home: Path | None, db: str | None = None) -> TraceStore:
    """Tracing secrets under ``home/trace``; recipients and releases in the broker's database (``db``, default
    the broker's embedded one, ``home/broker/broker.db``), where the broker and its replicas see them."""
    from ..keys.local import default_home

    h = home or default_home()
    if db is None:
        (h / "broker").mkdir(parents=True, exist_ok=True, mode=0o700)
        db = f"sqlite:///{h / 'broker' / 'broker.db'}"
    return TraceStore(h / "trace", db)


def _header(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    off = 0
    for name, a in tensors.items():
        dt = _NP_TO_ST.get(a.dtype.name)
        if dt is None:
            raise UnsupportedModelError(f"tensor {name[:64]!r}: dtype {a.dtype} cannot be written")
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def _parts(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> Iterator[Any]:
    """A safetensors file's bytes in order: header length, header, each tensor's data."""
    raw = _header(tensors, metadata)
    yield len(raw).to_bytes(8, "little")
    yield raw
    for a in tensors.values():
        yield np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    """Write a safetensors file (any numpy / ml_dtypes dtype) atomically; return its BLAKE3 hex digest."""
    h = blake3.blake3()
    with atomic_output(path, force=True) as fd:
        for part in _parts(tensors, metadata):
            write_all(fd, part)
            h.update(part)
    return h.hexdigest()


def _safetensors_in_memory(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> tuple[Any, str]:
    """A safetensors file in anonymous memory (an mmap with no file behind it) and its BLAKE3 digest."""
    import mmap

    size = 8 + len(_header(tensors, metadata)) + sum(a.nbytes for a in tensors.values())
    buf = mmap.mmap(-1, max(size, 1))
    h = blake3.blake3()
    off = 0
    for part in _parts(tensors, metadata):
        mv = memoryview(part).cast("B")
        buf[off : off + len(mv)] = mv
        h.update(mv)
        off += len(mv)
    return buf, h.hexdigest()


def _digest_files(files: list[Path]) -> str:
    h = blake3.blake3()
    for f in files:
        h.update_mmap(f) if hasattr(h, "update_mmap") else h.update(f.read_bytes())
    return h.hexdigest()[:32]


def release(
    model: str | os.PathLike[str],
    recipient: str,
    out: str | os.PathLike[str],
    *,
    provider: KeyProvider,
    country: str | None,
    aliases: tuple[str, ...] = (),
    gate: ReleaseGate | None = None,
    approval: Callable[[GateDecision], Any] | None = None,
    classify_kw: dict[str, Any] | None = None,
    model_id: str | None = None,
    home: Path | None = None,
    db: str | None = None,
    alpha: float = DEFAULT_ALPHA,
    code_length: int = DEFAULT_LENGTH,
    force: bool = False,
    seal: tuple[KeyProvider, Any] | None = None,
    hide_header: bool = False,
    now: datetime | None = None,
) -> ReleaseRecord:
    """Write a copy of ``model`` (a safetensors file or a model folder) fingerprinted for ``recipient``.

    The export-control gate decides first (``gate``, default: the one configured under ``home``) for
    ``recipient`` in ``country``; anything but ``allow`` raises :class:`ReleaseDenied` and writes nothing,
    unless ``approval`` (the broker's check of an approved release request, two-person rule) accepts the
    decision: it is called with the decision whenever given, and raises :class:`ReleaseDenied` when the
    approved request does not cover it.  The decision is an audit event on the provider's sink, with
    the rule-set version.  ``seal`` = (key provider, signer): the copy is written as a sealed file (a
    bundle for a model folder), sealed from memory so that its plaintext never reaches a disk.  The gate's
    decision, the key use and the release are one append to the trail (``home``'s, or the database ``db``)."""
    with trail.operation(home, db) as t:
        rel = _release(model, recipient, out, provider=provider, country=country, aliases=aliases, gate=gate,
                       approval=approval, classify_kw=classify_kw, model_id=model_id, home=home, db=db, alpha=alpha,
                       code_length=code_length, force=force, seal=seal, hide_header=hide_header, now=now)  # fmt: skip
        t.emit(audit.event(AuditAction.RELEASE_CREATE, subject=rel.model_id, now=now,
                           detail={"recipient": recipient, "code_id": rel.code_id, "gate": rel.gate,
                                   "rules_version": rel.rules_version, "output": str(out),
                                   "sealed": seal is not None}))  # fmt: skip
    return rel


def _release(model: str | os.PathLike[str], recipient: str, out: str | os.PathLike[str], *, provider: KeyProvider,
             country: str | None, aliases: tuple[str, ...], gate: ReleaseGate | None,
             approval: Callable[[GateDecision], Any] | None, classify_kw: dict[str, Any] | None,
             model_id: str | None, home: Path | None, db: str | None, alpha: float, code_length: int, force: bool,
             seal: tuple[KeyProvider, Any] | None, hide_header: bool,
             now: datetime | None) -> ReleaseRecord:  # fmt: skip
    model, out = Path(model), Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists (use force)")
    model_id = model_id or model.stem
    store = _store(home, db)
    store._model_path(model_id)  # a bad id is refused before anything is decided
    gate = gate or ReleaseGate.from_home(home)
    dest = Destination(recipient, country, tuple(aliases))
    when = (now or datetime.now(UTC)).date()
    decision = gate.decide_model(model, dest, model_id=model_id, as_of=when, **(classify_kw or {}))
    outcome = "ok" if decision.allowed else "denied"
    if approval is not None:
        try:
            approval(decision)
            outcome = "ok" if decision.allowed else "overridden"
        except ReleaseDenied:
            provider.audit.emit(audit.event(AuditAction.RELEASE_GATE, "denied", subject=model_id,
                                            detail=decision.to_json(), now=now))  # fmt: skip
            raise
    provider.audit.emit(audit.event(AuditAction.RELEASE_GATE, outcome, subject=model_id, detail=decision.to_json(),
                                    now=now))  # fmt: skip
    if outcome == "denied":
        raise ReleaseDenied(f"the export-control gate says {decision.explain()}", decision)
    rec = store.enroll(model_id, provider, code_length=code_length, cutoff=DEFAULT_CUTOFF, alpha=alpha, now=now)
    secret = store.secret(rec, provider)
    try:
        code_key, embed_key = derive(secret, "tardos-code"), derive(secret, "embed")
    finally:
        secret[:] = bytes(len(secret))
    idx = store.recipient_index(model_id, recipient)
    code = TardosCode(code_key, rec.code_length, rec.cutoff)
    x = code.codewords(idx, 1)[0]
    files = sorted(model.glob("*.safetensors")) if model.is_dir() else [model]
    if not files:
        raise UnsupportedModelError(f"{model}: no .safetensors files")
    with TensorSource(model) as src:
        layout = detect_layout(src.shapes)
        targets = {n for n, _ in marked_tensors(layout)}

        def marked(f: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
            with TensorSource(f) as part:
                tensors = {n: part.raw(n) for n in part.names()}
                meta = dict(part._where[next(iter(tensors))][1].metadata) if tensors else {}
                here = {n: tensors[n] for n in tensors if n in targets}
                tensors.update(embed_tensors(here, layout, x, embed_key, rec.alpha, names=set(here)))
            return tensors, meta

        digests = []
        if seal is not None:  # sealed from memory: the fingerprinted plaintext never touches a disk
            from ..sealed.bundle import seal_dir
            from ..sealed.writer import MemorySource, seal_file

            bufs: dict[str, Any] = {}
            try:
                for f in files:
                    buf, digest = _safetensors_in_memory(*marked(f))
                    bufs[f.name] = buf
                    digests.append(digest)
                kw = {"provider": seal[0], "signer": seal[1], "hide_header": hide_header, "force": force}
                if model.is_dir():
                    seal_dir(model, out, replace={n: MemorySource(n, b) for n, b in bufs.items()}, **kw)
                else:
                    seal_file(MemorySource(files[0].name, bufs[files[0].name]), out, **kw)
            finally:
                for b in bufs.values():
                    b.close()
        else:
            tmp = Path(tempfile.mkdtemp(prefix=".warden-release-", dir=out.parent if out.parent.exists() else None))
            try:
                for f in files:
                    dst = tmp / f.name if model.is_dir() else tmp / "model.safetensors"
                    digests.append(_write_safetensors(dst, *marked(f)))
                if model.is_dir():
                    for extra in sorted(model.iterdir()):
                        if extra.is_file() and extra.suffix != ".safetensors":
                            shutil.copy2(extra, tmp / extra.name)
                    if out.exists():
                        shutil.rmtree(out) if out.is_dir() else out.unlink()
                    os.replace(tmp, out)
                else:
                    os.replace(tmp / "model.safetensors", out)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
    at = (now or datetime.now(UTC)).isoformat()
    out_digest = blake3.blake3("".join(digests).encode()).hexdigest()[:32]
    rel = ReleaseRecord(
        model_id,
        recipient,
        idx,
        at,
        _digest_files(files),
        f"tardos-v1/{rec.code_length}/{idx}",
        out_digest,
        country=decision.country,
        gate=decision.decision + ("/overridden" if outcome == "overridden" else ""),
        gate_digest=decision.digest,
        rules_version=decision.rules_version,
    )
    store.record(rel)
    return rel


@dataclass(frozen=True)
class TraceReport:
    model_id: str
    recipients: int
    eps: float
    threshold: float
    accused: list[dict[str, Any]]
    ranking: list[dict[str, Any]]
    symbols: int
    blocks_aligned: int
    population: int = 0  # the n of the union bound
    scores_top: tuple[tuple[str, float], ...] = ()  # the 20 best scores, for plots

    def to_json(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "recipients": self.recipients,
            "eps": self.eps,
            "threshold": round(self.threshold, 2),
            "accused": self.accused,
            "decision": ("accused: " + ", ".join(a["recipient"] for a in self.accused))
            if self.accused
            else "no one accused: the evidence does not reach the threshold",
            "top": self.ranking,
            "symbols": self.symbols,
            "blocks_aligned": self.blocks_aligned,
            "population": self.population,
        }


def trace(suspect: str | os.PathLike[str], model: str | os.PathLike[str], *, provider: KeyProvider,
          model_id: str | None = None, home: Path | None = None, db: str | None = None, eps: float = DEFAULT_EPS,
          population: int | None = None, **open_kw: Any) -> TraceReport:  # fmt: skip
    """Accuse the recipients whose fingerprint the suspect carries, keeping P(any innocent accused) <= eps.

    ``population`` (default: the model's recipients) is the n of the union bound; pass a larger one to
    keep the threshold fixed as recipients are added.  Logged in the trail with whom it accuses."""
    with trail.operation(home, db) as t:
        rep = _trace(suspect, model, provider=provider, model_id=model_id, home=home, db=db, eps=eps,
                     population=population, **open_kw)  # fmt: skip
        t.emit(audit.event(AuditAction.TRACE_RUN, subject=rep.model_id,
                           detail={"suspect": str(suspect), "accused": [a["recipient"] for a in rep.accused],
                                   "recipients": rep.recipients, "eps": eps}))  # fmt: skip
    return rep


def _trace(suspect: str | os.PathLike[str], model: str | os.PathLike[str], *, provider: KeyProvider,
           model_id: str | None, home: Path | None, db: str | None, eps: float, population: int | None,
           **open_kw: Any) -> TraceReport:  # fmt: skip
    model = Path(model)
    model_id = model_id or model.stem
    store = _store(home, db)
    rec = store.model(model_id)
    names = store.recipients(model_id)
    secret = store.secret(rec, provider)
    try:
        code_key, embed_key = derive(secret, "tardos-code"), derive(secret, "embed")
    finally:
        secret[:] = bytes(len(secret))
    ex = extract(model, suspect, embed_key, rec.code_length, rec.alpha, **open_kw)
    y, w = ex.symbols()
    code = TardosCode(code_key, rec.code_length, rec.cutoff)
    n = max(population or 0, len(names), 1)
    scores = code.scores(y, len(names), known=w)
    z = accusation_threshold(code, y, w, n, eps)
    order = np.argsort(-scores)
    accused = [{"recipient": names[i], "score": round(float(scores[i]), 2),
                "false_accusation_bound": min(1.0, n * code.innocent_tail(float(scores[i]), y, w))}
               for i in order if scores[i] > z]  # fmt: skip
    ranking = [{"recipient": names[i], "score": round(float(scores[i]), 2)} for i in order[:5]]
    top = tuple((names[i], float(scores[i])) for i in order[:20])
    return TraceReport(model_id, len(names), eps, z, accused, ranking, rec.code_length, ex.blocks, n, top)

"""`warden release` and `warden trace` as library calls."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from .. import audit, trail
from .._atomic import TMP_PREFIX, atomic_output, write_all
from .._extras import require
from ..audit import AuditAction
from ..errors import OutputExistsError, RecipientKeyError, UnmarkableFilesError, UnsupportedModelError, WardenError
from ..keys.provider import KeyProvider
from ..provenance.layout import detect_layout
from ..provenance.source import TensorSource
from ..release.gate import Destination, GateDecision, ReleaseDenied, ReleaseGate
from ..sealed.codec import header_bytes as _header
from ..sealed.codec import iter_parts as _parts
from .mark import DEFAULT_ALPHA, embed_tensors, extract, marked_tensors
from .store import ReleaseRecord, TraceError, TraceStore, derive, shown
from .tardos import TardosCode, accusation_threshold

__all__ = ["DEFAULT_EPS", "DEFAULT_LENGTH", "ENROLLED", "TraceReport", "add_recipient", "recipients", "release",
           "trace"]  # fmt: skip

ENROLLED = "enrolled"  # release(recipient_key=ENROLLED): seal to the key the recipient is enrolled with

DEFAULT_LENGTH = 4096  # symbols: ≥ (pi^2/2) c^2 ln(n/eps) = 2,240 for n = 1e6, c = 4, eps = 1e-6
DEFAULT_CUTOFF = 1e-3
DEFAULT_EPS = 1e-6


def _store(home: Path | None, db: str | None = None) -> TraceStore:
    """Tracing secrets under ``home/trace``; recipients and releases in the broker's database (``db``, default
    the broker's embedded one, ``home/broker/broker.db``), where the broker and its replicas see them."""
    from ..keys.local import default_home

    h = home or default_home()
    if db is None:
        (h / "broker").mkdir(parents=True, exist_ok=True, mode=0o700)
        db = f"sqlite:///{h / 'broker' / 'broker.db'}"
    return TraceStore(h / "trace", db)


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


def add_recipient(name: str, pubkey: str, *, home: Path | None = None, db: str | None = None,
                  replace: bool = False, sink: audit.AuditSink | None = None) -> dict[str, Any]:  # fmt: skip
    """Enroll a release recipient with their age X25519 public key (sealed copies are sealed to it).
    The name is canonicalised; a bad name or key is refused (one line) and the refusal audited (in
    ``sink``, default: the trail of ``home`` / ``db``, one append)."""
    from ..keys.age import check_recipient
    from .store import recipient_name

    if sink is None:
        with trail.operation(home, db) as t:
            return add_recipient(name, pubkey, home=home, db=db, replace=replace, sink=t)
    try:
        n = recipient_name(name, "NAME")
        key = check_recipient(pubkey, "--pubkey")
        store = _store(home, db)
        store.add_recipient(n, key, replace=replace)
    except WardenError as e:
        sink.emit(audit.event(AuditAction.RECIPIENT_ADD, "denied", subject=shown(str(name))[:256],
                              detail={"error": type(e).__name__, "message": str(e)[:2000]}))  # fmt: skip
        raise
    detail = {"pubkey": key, "name_key": n.key}
    sink.emit(audit.event(AuditAction.RECIPIENT_ADD, "ok", subject=n.display, detail=detail))
    return {"recipient": n.display, "pubkey": key, "identity": n.key}


def recipients(*, home: Path | None = None, db: str | None = None) -> list[dict[str, Any]]:
    """Every enrolled recipient identity: the name shown, its canonical key and public key."""
    return _store(home, db).directory_rows()


@dataclass
class _Entry:
    """One file of the master: its relative path, its weight format (None: not a weight file), and where
    its bytes are (a plain file on disk, or the member of an opened sealed master)."""

    rel: str
    kind: str | None
    path: Path | None = None  # plain master
    member: Any = None  # sealed master: a SealedReader
    in_source: bool = False  # read by the master's TensorSource (its layout, trace reads it)


def _is_sealed_master(model: Path) -> bool:
    from ..sealed.bundle import is_bundle
    from ..sealed.detect import is_sealed as _is_sealed

    return is_bundle(model) or (model.is_file() and _is_sealed(model))


def _inventory_plain(model: Path) -> tuple[list[_Entry], list[str]]:
    from ..sealed.walk import classify, walk

    if model.is_symlink():
        return [], [f"{model.name} (a symbolic link: links are not followed; give the file itself)"]
    if model.is_file():
        kind = classify(model)
        return [_Entry(model.name, kind, path=model, in_source=kind == "safetensors")], []
    w = walk(model)
    entries = []
    for rel in w.files:
        kind = classify(model / rel)
        top = "/" not in rel and rel.endswith(".safetensors")
        entries.append(_Entry(rel, kind, path=model / rel, in_source=top and kind == "safetensors"))
    return entries, w.problems


def _inventory_sealed(reader: Any) -> list[_Entry]:
    from ..sealed.bundle import BundleReader
    from ..sealed.walk import classify_bytes

    members = [reader._by_name[n] for n in reader.files()] if isinstance(reader, BundleReader) else [reader]
    out = []
    for r in members:
        if r.kind == "safetensors":
            out.append(_Entry(r.name, "safetensors", member=r, in_source=True))
        else:
            out.append(_Entry(r.name, classify_bytes(r.read_all()), member=r))
    return out


def _entry_tensors(e: _Entry) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if e.member is not None:
        return e.member.load_numpy(), dict(e.member.metadata())
    with TensorSource(e.path) as part:  # type: ignore[arg-type]
        tensors = {n: part.raw(n) for n in part.names()}  # memory maps (the map outlives the source's close)
        meta = dict(part._where[next(iter(tensors))][1].metadata) if tensors else {}
    return tensors, meta


def _entry_bytes(e: _Entry) -> Any:
    """A non-weight member of a sealed master, in memory (the original bytes)."""
    r = e.member
    body = r.read_all()
    if r.kind == "safetensors":
        return r.safetensors_header_bytes() + body.tobytes()
    return body


# names the supported layouts give their tensors (inside a block, or at the top): a tensor outside the marked
# set under any other name, shaped like a marked tensor (or its transpose), is taken for a hidden copy
_BLOCK_PARTS = re.compile(
    r"(?:^|\.)(?:layers|h|encoder\.layer)\.\d+\.(?:"
    r"self_attn\.(?:[qkvo]_proj|[qk]_norm)|input_layernorm|post_attention_layernorm|pre_feedforward_layernorm"
    r"|post_feedforward_layernorm|mlp\.(?:gate|up|down)_proj|mlp\.gate|mlp\.shared_expert_gate"
    r"|mlp\.experts\.\d+\.(?:gate|up|down)_proj|mlp\.shared_experts?\.(?:gate|up|down)_proj"
    r"|block_sparse_moe\.gate|block_sparse_moe\.experts\.\d+\.w[123]"
    r"|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj|ln_1|ln_2"
    r"|attention\.self\.(?:query|key|value)|attention\.output\.dense|attention\.output\.LayerNorm"
    r"|intermediate\.dense|output\.dense|output\.LayerNorm)\.(?:weight|bias|gamma|beta)$"
    r"|(?:^|\.)layers\.\d+\.self_attn\.rotary_emb\.inv_freq$|(?:^|\.)h\.\d+\.attn\.(?:masked_)?bias$"
)
_TOP_PARTS = re.compile(
    r"(?:^|\.)(?:embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|tok_embeddings"
    r"|lm_head|norm|ln_f|final_layernorm|embeddings\.LayerNorm|pooler\.dense|cls\.predictions\.[\w.]+"
    r"|position_ids)(?:\.(?:weight|bias|gamma|beta))?$"
)


def _known_name(name: str) -> bool:
    return bool(_BLOCK_PARTS.search(name) or _TOP_PARTS.search(name))


def _hash(a: Any) -> str:
    return blake3.blake3(np.ascontiguousarray(a).view(np.uint8).data).hexdigest()


class _CopyGuard:
    """Refuses tensors outside the marked set that copy a marked one (issue 17, red team): under a name the
    layout does not know, one shaped like a marked tensor or its transpose; under any name, one whose bytes
    hash equal to a marked tensor's (BLAKE3, only for tensors of a marked tensor's byte size)."""

    def __init__(self, targets: set[str], files: list[tuple[str, dict[str, Any]]]):
        self.targets = targets
        self.shapes: dict[tuple[int, ...], str] = {}
        self.by_size: dict[int, list[tuple[str, Any]]] = {}
        for _rel, tensors in files:
            for n, a in tensors.items():
                if n in targets:
                    self.shapes.setdefault(tuple(a.shape), n)
                    self.shapes.setdefault(tuple(a.shape)[::-1], n)
                    self.by_size.setdefault(a.nbytes, []).append((n, a))
        self._hashes: dict[str, str] | None = None

    def hashes(self) -> dict[str, str]:
        if self._hashes is None:
            self._hashes = {}
            for items in self.by_size.values():
                for n, a in items:
                    self._hashes.setdefault(_hash(a), n)
        return self._hashes

    def problems(self, rel: str, tensors: dict[str, Any]) -> list[str]:
        out = []
        for n, a in tensors.items():
            if n in self.targets:
                continue
            t = self.shapes.get(tuple(a.shape)) if not _known_name(n) and a.ndim >= 2 else None
            if t is None and a.nbytes in self.by_size:
                t = self.hashes().get(_hash(a))
                why = "holds the same bytes as"
            else:
                why = "is shaped like"
            if t is not None:
                out.append(f"{rel} (tensor '{n}' {why} the marked tensor '{t}': a copy would leave unmarked; "
                           "remove the tensor from the file, --exclude cannot split a file)")  # fmt: skip
        return out


def _refusal(provider: KeyProvider, model_id: str, err: Exception, now: datetime | None, **detail: Any) -> None:
    provider.audit.emit(audit.event(AuditAction.RELEASE_REFUSE, "denied", subject=model_id,
                                    detail={"error": type(err).__name__, "message": str(err)[:2000], **detail},
                                    now=now))  # fmt: skip


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
    recipient_key: str | None = None,
    exclude: tuple[str, ...] = (),
    master_kw: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> ReleaseRecord:
    """Write a copy of ``model`` fingerprinted for ``recipient``, and record the release.

    ``model`` (the master) is a safetensors file, a model folder, a sealed file or a sealed bundle; a
    sealed master is decrypted into memory only (``master_kw``: ``keyring`` or ``providers`` and
    ``trust`` to open it; default: ``provider`` and the trust store under ``home``).  Every file of the
    master is walked (links refused) and recognised by content: safetensors files are marked, plain text
    is copied, and anything else (PyTorch pickle / zip, numpy, GGUF, HDF5, archives, compressed or raw
    binary files) refuses the release, naming each file, unless an ``exclude`` pattern leaves it out of
    the copy (recorded with the release); so does a tensor that copies a marked one (:class:`_CopyGuard`).

    The export-control gate decides first (``gate``, default: the one configured under ``home``) for
    ``recipient`` in ``country``; anything but ``allow`` raises :class:`ReleaseDenied` and writes nothing,
    unless ``approval`` (the broker's check of an approved release request, two-person rule) accepts the
    decision: it is called with the decision whenever given, and raises :class:`ReleaseDenied` when the
    approved request does not cover it.  The decision is an audit event on the provider's sink, with
    the rule-set version; a refusal for bad input is a ``release:refuse`` event.

    Output: ``seal`` = (key provider, signer) seals the copy from memory (a bundle for a folder), with
    its data key wrapped by that provider, or, with ``recipient_key`` (an age X25519 public key,
    ``age1…``), to the recipient's key alone, so that only their identity opens it (``warden open
    --identity``); the signer signs it either way.  Without ``seal`` the copy is written in plaintext.

    The recipient's name is canonicalised (:func:`~weightwarden.trace.store.recipient_name`): one
    identity, one codeword.  The recipient and the release are recorded in one transaction, with the
    copy moved into place inside it: a release refused or failing mid-way records nothing.  The gate's
    decision, the key use and the release (or its refusal) are one append to the trail (``home``'s, or
    the database ``db``)."""
    with trail.operation(home, db) as t:
        rel = _release(model, recipient, out, provider=provider, country=country, aliases=aliases, gate=gate,
                       approval=approval, classify_kw=classify_kw, model_id=model_id, home=home, db=db, alpha=alpha,
                       code_length=code_length, force=force, seal=seal, hide_header=hide_header,
                       recipient_key=recipient_key, exclude=exclude, master_kw=master_kw, now=now)  # fmt: skip
        t.emit(audit.event(AuditAction.RELEASE_CREATE, subject=rel.model_id, now=now,
                           detail={"recipient": rel.recipient, "code_id": rel.code_id, "gate": rel.gate,
                                   "rules_version": rel.rules_version, "output": rel.output, "path": str(out),
                                   "exclude": list(rel.exclude), "excluded_files": list(rel.excluded_files),
                                   "sealed": seal is not None}))  # fmt: skip
    return rel


def _release(
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
    recipient_key: str | None = None,
    exclude: tuple[str, ...] = (),
    master_kw: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> ReleaseRecord:

    from ..keys.age import AgeRecipientProvider, check_recipient
    from ..sealed.walk import MARKABLE, UNRECOGNISED, excluded, refuse
    from .store import recipient_name

    model, out = Path(model), Path(out)
    model_id = model_id or model.stem
    exclude = tuple(exclude)
    store = _store(home, db)
    reader: Any = None
    try:
        if os.path.lexists(out) and not force:
            raise OutputExistsError(f"{out} exists (use force / --force)")
        name = recipient_name(recipient)
        store._model_path(model_id)  # a bad id is refused before anything is decided
        if recipient_key == ENROLLED:
            known = store.directory(name)
            if not known or not known["pubkey"]:
                raise RecipientKeyError(
                    f"recipient '{shown(name.display)}' has no public key on file: enroll one with `warden recipient "
                    "add NAME --pubkey age1...` or pass --recipient-key age1... (--seal seals under our own key, "
                    "--plaintext writes a plaintext copy)"
                )
            recipient_key = known["pubkey"]
        if recipient_key is not None:
            recipient_key = check_recipient(recipient_key)
            if seal is None:
                raise ValueError("recipient_key needs seal=(provider, signer): the copy is signed by our key")
            known = store.directory(name)
            if known and known["pubkey"] and known["pubkey"] != recipient_key:
                raise RecipientKeyError(
                    f"--recipient-key differs from the key recipient '{shown(known['display'])}' "
                    "is enrolled with; use `warden recipient add NAME --pubkey KEY --replace`"
                )
        if not os.path.lexists(model):
            raise FileNotFoundError(2, "No such file or directory", str(model))
        sealed_master = _is_sealed_master(model)
        if sealed_master:
            from ..api import safe_open
            from ..keys.local import TrustStore, default_home

            kw = dict(master_kw or {})
            if "keyring" not in kw:
                kw.setdefault("providers", [provider])
                kw.setdefault("trust", TrustStore.load(home or default_home()))
            master_kw = kw
            reader = safe_open(model, **kw)
            entries, problems = _inventory_sealed(reader), []
        else:
            master_kw = {}
            entries, problems = _inventory_plain(model)
        left_out = [e.rel for e in entries if excluded(e.rel, exclude)]
        entries = [e for e in entries if not excluded(e.rel, exclude)]
        left_out += [p.split(" (", 1)[0] for p in problems if excluded(p.split(" (", 1)[0], exclude)]
        problems = [p for p in problems if not excluded(p.split(" (", 1)[0], exclude)]
        for e in entries:
            if e.kind == UNRECOGNISED:
                problems.append(f"{e.rel} (neither marked weights nor plain text: it may hold weights)")
            elif e.kind is not None and e.kind not in MARKABLE:
                problems.append(f"{e.rel} ({e.kind}: a weight format that cannot be fingerprinted)")
        src_entries = [e for e in entries if e.in_source]
        if not src_entries:
            refuse(sorted(set(problems)), f"{model} cannot be released as it is (nothing was written)")
            raise UnsupportedModelError(f"{model}: no safetensors weights to fingerprint")
        with TensorSource(model, **master_kw) as src:
            layout = detect_layout(src.shapes)
            targets = {n for n, _ in marked_tensors(layout)}
        for e in entries:  # a safetensors file the master's layout does not cover: marked if it holds targets
            if e.kind == "safetensors" and not e.in_source:
                with TensorSource(e.path) as part:  # type: ignore[arg-type]
                    if not targets & set(part.names()):
                        problems.append(f"{e.rel} (safetensors outside the model's layout: nothing to mark in it)")
        weight_files = [(e.rel, _entry_tensors(e)[0]) for e in entries if e.kind == "safetensors"]
        guard = _CopyGuard(targets, weight_files)
        for rel, tensors in weight_files:
            problems += guard.problems(rel, tensors)
        del weight_files
        refuse(sorted(set(problems)), f"{model} cannot be released as it is (nothing was written; exclude a "
                                      "file with --exclude PATTERN, or remove it)")  # fmt: skip
    except (WardenError, OSError, ValueError) as e:
        if reader is not None:
            reader.close()
        _refusal(provider, model_id if isinstance(model_id, str) else "", e, now, recipient=shown(str(recipient)))
        raise
    try:
        return _release_checked(
            model, out, recipient, name, entries, left_out, targets, layout, sealed_master, store, guard=guard,
            provider=provider,
            country=country, aliases=aliases, gate=gate, approval=approval, classify_kw={**master_kw,
            **(classify_kw or {})}, model_id=model_id, home=home, alpha=alpha, code_length=code_length, force=force,
            seal=(AgeRecipientProvider(recipient_key, provider.audit), seal[1]) if recipient_key and seal else seal,
            hide_header=hide_header, recipient_key=recipient_key, exclude=exclude, now=now,
        )  # fmt: skip
    except ReleaseDenied:
        raise  # the gate's decision is its own audit event
    except (WardenError, OSError, ValueError) as e:  # failed mid-way: nothing written, nothing recorded
        _refusal(provider, model_id, e, now, recipient=name.display, stage="after the gate")
        raise
    finally:
        if reader is not None:
            reader.close()


def _release_checked(model: Path, out: Path, recipient: str, name: Any, entries: list[_Entry], left_out: list[str],
                     targets: set[str], layout: Any, sealed_master: bool, store: TraceStore, *, guard: _CopyGuard,
                     provider: KeyProvider, country: str | None, aliases: tuple[str, ...], gate: ReleaseGate | None,
                     approval: Any, classify_kw: dict[str, Any], model_id: str, home: Path | None, alpha: float,
                     code_length: int, force: bool, seal: tuple[KeyProvider, Any] | None, hide_header: bool,
                     recipient_key: str | None, exclude: tuple[str, ...],
                     now: datetime | None) -> ReleaseRecord:  # fmt: skip
    from ..sealed.walk import read_plain_text
    from .store import _Conflict

    when = (now or datetime.now(UTC)).date()
    try:
        gate = gate or ReleaseGate.from_home(home)
        dest = Destination(recipient, country, tuple(aliases))  # as given: the broker's request names it so
        decision = gate.decide_model(model, dest, model_id=model_id, as_of=when, **classify_kw)
    except WardenError as e:  # an unknown country, a bad declaration or rules file: the refusal is audited
        provider.audit.emit(audit.event(AuditAction.RELEASE_GATE, "denied", subject=model_id,
                                        detail={"reason": str(e)}, now=now))  # fmt: skip
        raise
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
    code = TardosCode(code_key, rec.code_length, rec.cutoff)
    single = model.is_file() and not model.is_dir()
    weights = [e for e in entries if e.kind == "safetensors"]
    parent = out.parent if str(out.parent) else Path(".")
    mode = ("sealed-to-recipient" if recipient_key else "sealed") if seal is not None else "plaintext"
    for _attempt in range(20):
        idx, new = store.tentative_index(model_id, name)
        x = code.codewords(idx, 1)[0]

        def marked(e: _Entry, x: np.ndarray = x) -> tuple[dict[str, np.ndarray], dict[str, str]]:
            tensors, meta = _entry_tensors(e)  # a sealed member: views of fresh memory, marked in place
            copies = guard.problems(e.rel, tensors)  # the bytes read now, not those checked before the gate
            if copies:
                raise UnmarkableFilesError(f"{e.rel} changed after it was checked: " + "; ".join(map(shown, copies)),
                                           copies)  # fmt: skip
            here = {n: tensors[n] for n in tensors if n in targets}
            inplace = e.member is not None
            tensors.update(embed_tensors(here, layout, x, embed_key, rec.alpha, names=set(here), inplace=inplace))
            return tensors, meta

        def marked_member(e: _Entry, x: np.ndarray = x) -> tuple[Any, str]:
            """A sealed master's safetensors member decrypted into fresh memory and marked there, in place,
            with its own header: (a MemorySource to seal, the BLAKE3 of the file it stands for)."""
            from ..sealed.codec import np_dtype as _np_dtype
            from ..sealed.writer import MemorySource

            buf, infos = e.member.load_raw()
            here = {t.name: buf[t.start : t.end].view(_np_dtype(t.dtype)).reshape(t.shape)
                    for t in infos.values() if t.name in targets}  # fmt: skip
            embed_tensors(here, layout, x, embed_key, rec.alpha, names=set(here), inplace=True)
            head = e.member.safetensors_header_bytes()
            h = blake3.blake3(max_threads=blake3.blake3.AUTO)
            h.update(head)
            h.update(buf)
            return MemorySource(e.rel, buf, header=head[8:]), h.hexdigest()

        digests: list[str] = []
        staging = parent / f"{TMP_PREFIX}{out.name}.{secrets.token_hex(6)}"
        bufs: list[Any] = []
        try:
            if seal is not None:  # sealed from memory: the fingerprinted plaintext never touches a disk
                from ..sealed.bundle import seal_members
                from ..sealed.writer import MemorySource, seal_file

                items: list[tuple[str, Any]] = []
                for e in entries:
                    if e.kind == "safetensors" and e.member is not None:
                        ms, digest = marked_member(e)
                        digests.append(digest)
                        items.append((e.rel, ms))
                    elif e.kind == "safetensors":
                        buf, digest = _safetensors_in_memory(*marked(e))
                        bufs.append(buf)
                        digests.append(digest)
                        items.append((e.rel, MemorySource(e.rel, buf)))
                    else:  # plain text: read once, checked again, sealed from those bytes
                        data = read_plain_text(model, e.rel) if e.path is not None else _entry_bytes(e)
                        items.append((e.rel, MemorySource(e.rel, data)))
                kw = {"provider": seal[0], "signer": seal[1], "hide_header": hide_header, "force": False}
                if single:
                    seal_file(items[0][1], staging, name=Path(items[0][0]).name, **kw)
                else:
                    seal_members(items, staging, **kw)
            else:
                tmp = Path(tempfile.mkdtemp(prefix=".warden-release-", dir=parent if parent.exists() else None))
                try:
                    for e in entries:
                        dst = tmp / ("model.safetensors" if single else e.rel)
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        if e.kind == "safetensors":
                            digests.append(_write_safetensors(dst, *marked(e)))
                        else:  # plain text: read once, checked again, written from those bytes
                            data = read_plain_text(model, e.rel) if e.path is not None else _entry_bytes(e)
                            with atomic_output(dst, force=True) as fd:
                                write_all(fd, memoryview(data).cast("B"))
                    os.replace(tmp / "model.safetensors" if single else tmp, staging)
                finally:
                    if tmp.exists():
                        shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            _remove(staging)
            raise
        finally:
            for b in bufs:
                b.close()
        at = (now or datetime.now(UTC)).isoformat()
        out_digest = blake3.blake3("".join(digests).encode()).hexdigest()[:32]
        rel = ReleaseRecord(
            model_id,
            name.display,
            idx,
            at,
            _digest_files(_master_files(model)),
            f"tardos-v1/{rec.code_length}/{idx}",
            out_digest,
            country=decision.country,
            gate=decision.decision + ("/overridden" if outcome == "overridden" else ""),
            gate_digest=decision.digest,
            rules_version=decision.rules_version,
            output=mode,
            recipient_key=recipient_key or "",
            exclude=exclude,
            excluded_files=tuple(left_out),
            master="sealed" if sealed_master else "plaintext",
        )
        extra = {"output": mode, "recipient_key": recipient_key or "", "exclude": list(exclude),
                 "excluded_files": left_out, "master": rel.master, "recipient_key_id": name.key,
                 "marked_files": [e.rel for e in weights]}  # fmt: skip
        moved: list[bool] = []

        def finish(staging: Path = staging, moved: list[bool] = moved) -> None:
            if os.path.lexists(out):
                _remove(out)
            os.replace(staging, out)
            moved.append(True)

        try:
            store.commit_release(rel, name, new, {**extra, "pubkey": recipient_key} if recipient_key else extra,
                                 finish)  # fmt: skip
        except _Conflict:
            _remove(staging)
            continue  # another release took this index: mark again with the next one
        except BaseException:
            _remove(staging)
            if moved:
                _remove(out)
            raise
        if recipient_key:
            store.add_recipient(name, recipient_key)
        return rel
    raise TraceError("could not assign a recipient index (too much contention)")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif os.path.lexists(p):
        with contextlib.suppress(OSError):
            p.unlink()


def _master_files(model: Path) -> list[Path]:
    if model.is_file():
        return [model]
    from ..sealed.walk import walk

    return [model / f for f in walk(model).files]


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
    require("scipy.optimize", extra="release")  # extraction aligns units by Hungarian matching
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

"""A release past its checks: the gate's decision, the recipient's codeword, and the fingerprinted copy written
(plaintext) or sealed from memory, moved into place inside the transaction that records the release."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from .. import audit
from .._atomic import TMP_PREFIX, atomic_output, write_all
from ..audit import AuditAction
from ..errors import UnmarkableFilesError, WardenError
from ..keys.provider import KeyProvider
from ..release.gate import Destination, ReleaseDenied, ReleaseGate
from ..sealed import codec
from .head import SPAN_SHARE, HeadMark
from .mark import embed_tensors
from .master import CopyGuard, Entry, digest_files, entry_bytes, entry_tensors, master_files
from .store import ReleaseRecord, TraceError, TraceStore, derive, shown
from .tardos import TardosCode

__all__ = ["DEFAULT_CUTOFF", "release_checked"]

DEFAULT_CUTOFF = 1e-3


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    """Write a safetensors file (any numpy / ml_dtypes dtype) atomically; return its BLAKE3 hex digest."""
    h = blake3.blake3()
    codec.write_file(path, tensors, metadata, on_part=h.update)
    return h.hexdigest()


def _safetensors_in_memory(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> tuple[Any, str]:
    """A safetensors file in anonymous memory (an mmap with no file behind it) and its BLAKE3 digest."""
    h = blake3.blake3()
    buf = codec.to_memory(tensors, metadata, on_part=h.update)
    return buf, h.hexdigest()


def release_checked(model: Path, out: Path, recipient: str, name: Any, entries: list[Entry], left_out: list[str],
                    targets: set[str], layout: Any, sealed_master: bool, store: TraceStore, *, guard: CopyGuard,
                    provider: KeyProvider, country: str | None, aliases: tuple[str, ...], gate: ReleaseGate | None,
                    approval: Any, classify_kw: dict[str, Any], model_id: str, home: Path | None, alpha: float,
                    code_length: int, force: bool, seal: tuple[KeyProvider, Any] | None, hide_header: bool,
                    recipient_key: str | None, exclude: tuple[str, ...],
                    head: tuple[str, float, np.ndarray | None, np.ndarray] | None = None,
                    now: datetime | None = None) -> ReleaseRecord:  # fmt: skip
    from ..sealed.walk import read_plain_text
    from .store import _Conflict

    when = (now or datetime.now(UTC)).date()
    try:
        gate = gate or ReleaseGate.from_home(home)
        dest = Destination(recipient, country, tuple(aliases))  # as given: the broker's request names it so
        decision = gate.decide_model(model, dest, model_id=model_id, as_of=when, **classify_kw)
    except WardenError as err:  # an unknown country, a bad declaration or rules file: the refusal is audited
        provider.audit.emit(audit.event(AuditAction.RELEASE_GATE, "denied", subject=model_id,
                                        detail={"reason": str(err)}, now=now))  # fmt: skip
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
    amp = head[1] if head is not None else 0.0
    rec = store.enroll(model_id, provider, code_length=code_length, cutoff=DEFAULT_CUTOFF, alpha=alpha, head=amp,
                       head_span=SPAN_SHARE if amp else 0.0, now=now)  # fmt: skip
    if amp != rec.head:
        raise TraceError(f"model {model_id!r} was first released with head mark {rec.head:g} and this copy would "
                         f"carry {amp:g}: every copy of one model carries the same "
                         "(omit --head-mark to use the recorded one; a master without an untied head carries none)")
    secret = store.secret(rec, provider)
    try:
        code_key, embed_key = derive(secret, "tardos-code"), derive(secret, "embed")
        head_key = derive(secret, "head") if rec.head and head else b""
    finally:
        secret[:] = bytes(len(secret))
    code = TardosCode(code_key, rec.code_length, rec.cutoff)
    hm: HeadMark | None = None
    if rec.head and head is not None:
        hm = HeadMark(head_key, head[3].shape[0], head[3].shape[1], rec.code_length, rec.head, head[2], head[3],
                      code.bias(), span=rec.head_span)  # fmt: skip
    single = model.is_file() and not model.is_dir()
    weights = [e for e in entries if e.kind == "safetensors"]
    parent = out.parent if str(out.parent) else Path(".")
    mode = ("sealed-to-recipient" if recipient_key else "sealed") if seal is not None else "plaintext"
    for _attempt in range(20):
        idx, new = store.tentative_index(model_id, name)
        x = code.codewords(idx, 1)[0]

        def marked(e: Entry, x: np.ndarray = x) -> tuple[dict[str, np.ndarray], dict[str, str]]:
            tensors, meta = entry_tensors(e)  # a sealed member: views of fresh memory, marked in place
            copies = guard.problems(e.rel, tensors)  # the bytes read now, not those checked before the gate
            if copies:
                raise UnmarkableFilesError(f"{e.rel} changed after it was checked: " + "; ".join(map(shown, copies)),
                                           copies)  # fmt: skip
            here = {n: tensors[n] for n in tensors if n in targets}
            inplace = e.member is not None
            tensors.update(embed_tensors(here, layout, x, embed_key, rec.alpha, names=set(here), inplace=inplace))
            if hm is not None and head is not None and head[0] in tensors:
                tensors[head[0]] = hm.embed(tensors[head[0]], x)
            return tensors, meta

        def marked_member(e: Entry, x: np.ndarray = x) -> tuple[Any, str]:
            """A sealed master's safetensors member decrypted into fresh memory and marked there, in place,
            with its own header: (a MemorySource to seal, the BLAKE3 of the file it stands for)."""
            from ..sealed.writer import MemorySource

            buf, infos = e.member.load_raw()
            here = {t.name: buf[t.start : t.end].view(codec.np_dtype(t.dtype)).reshape(t.shape)
                    for t in infos.values() if t.name in targets}  # fmt: skip
            embed_tensors(here, layout, x, embed_key, rec.alpha, names=set(here), inplace=True)
            if hm is not None and head is not None and head[0] in here:
                here[head[0]][...] = hm.embed(here[head[0]], x)
            head_bytes = e.member.safetensors_header_bytes()
            h = blake3.blake3(max_threads=blake3.blake3.AUTO)
            h.update(head_bytes)
            h.update(buf)
            return MemorySource(e.rel, buf, header=head_bytes[8:]), h.hexdigest()

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
                        data = read_plain_text(model, e.rel) if e.path is not None else entry_bytes(e)
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
                            data = read_plain_text(model, e.rel) if e.path is not None else entry_bytes(e)
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
            digest_files(master_files(model)),
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

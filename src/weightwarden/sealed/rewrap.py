"""Re-wrap data keys under a new key version without touching the ciphertext.

A file's key slots live in two areas (docs/FORMAT.md §1.2).  A rewrap writes the
*spare* area with generation + 1, makes that durable, then zeroes the old area and
makes that durable.  A crash at any point leaves the file readable with the old or the
new key version; running the rewrap again finishes the job (it is idempotent).
Batches share their durability barriers (one ``syncfs`` per phase per batch), so file
I/O costs little next to the provider's own wrap and unwrap.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..audit import AuditAction
from ..audit import event as audit_event
from ..errors import FormatError, TruncatedError
from ..keys.provider import KeyProvider
from . import format as F
from ._crypto import zero

__all__ = ["RewrapReport", "rewrap"]

_libc: Any = None  # the libc function once looked up; False where it is missing


def _syncfs(fd: int) -> None:
    """Flush the file system holding ``fd`` (Linux syncfs; os.sync elsewhere)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True).syncfs
        except (OSError, AttributeError):
            _libc = False
    if not _libc or _libc(fd) != 0:
        os.sync()


@dataclass
class _Plan:
    path: Path
    writes: list[tuple[int, bytes]] = field(default_factory=list)  # phase 1: new slot area
    clears: list[tuple[int, bytes]] = field(default_factory=list)  # phase 2: zero the old area
    status: str = "current"
    fd: int | None = None  # open read-write while the plan has writes to apply

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _read_exact(fd: int, n: int, off: int) -> bytes:
    b = os.pread(fd, n, off)
    if len(b) != n:
        raise TruncatedError("file ends inside its key slots or context")
    return b


def _plan(path: Path, providers: Sequence[KeyProvider], target: KeyProvider) -> _Plan:
    plan = _Plan(path, fd=os.open(path, os.O_RDWR))
    try:
        return _plan_open(plan, providers, target)
    finally:
        if not (plan.writes or plan.clears):
            plan.close()


def _plan_open(plan: _Plan, providers: Sequence[KeyProvider], target: KeyProvider) -> _Plan:
    fd, path = plan.fd, plan.path
    assert fd is not None
    try:
        head = os.pread(fd, 16384, 0)  # preamble, both slot areas and (usually) the context in one read
        slot_size, context_len = F.parse_preamble(head[: F.PREAMBLE_LEN])
        ctx_off = F.PREAMBLE_LEN + 2 * slot_size
        if len(head) < ctx_off + context_len:
            head = head[:ctx_off] + _read_exact(fd, context_len, ctx_off)
    except BaseException:
        plan.close()
        raise
    areas = [head[F.PREAMBLE_LEN + i * slot_size : F.PREAMBLE_LEN + (i + 1) * slot_size] for i in (0, 1)]
    if len(areas[1]) != slot_size:
        raise TruncatedError("file ends inside its key slots")
    ctx = F.parse_context(head[ctx_off : ctx_off + context_len])
    decoded = [F.decode_slot_area(a) for a in areas]
    valid = [(d[0], i, d[1]) for i, d in enumerate(decoded) if d is not None]
    if not valid:
        raise FormatError(f"{path}: no valid key slot area")
    gen, cur, slots = max(valid)
    other = 1 - cur
    want = (target.name, target.key_id, target.current_version())
    if all((s.provider, s.key_id, s.version) == want for s in slots):
        if decoded[other] is not None:  # an earlier run stopped before clearing the old area
            plan.clears.append((F.PREAMBLE_LEN + other * slot_size, b"\x00" * slot_size))
            plan.status = "finished"
        return plan
    from .reader import SealedFile  # local import: reader imports this module's neighbours

    dek = SealedFile.unwrap_slots(slots, providers, ctx.file_id, ctx.key_commitment)
    try:
        new_slot = target.wrap(dek, ctx.file_id)
    finally:
        zero(dek)
    plan.writes.append((F.PREAMBLE_LEN + other * slot_size, F.encode_slot_area([new_slot], gen + 1, slot_size)))
    plan.clears.append((F.PREAMBLE_LEN + cur * slot_size, b"\x00" * slot_size))
    plan.status = "rewrapped"
    return plan


def _apply(plans: list[_Plan], phase: str, durable: bool) -> None:
    """Apply one phase to every plan of a batch, then one durability barrier for all."""
    touched = None
    for p in plans:
        ops = p.writes if phase == "write" else p.clears
        for off, data in ops:
            assert p.fd is not None
            if os.pwrite(p.fd, data, off) != len(data):
                raise OSError(f"short write to {p.path}")
            touched = p.fd
    if durable and touched is not None:
        _syncfs(touched)


@dataclass(frozen=True)
class RewrapReport:
    rewrapped: int
    finished: int  # an interrupted earlier run completed
    current: int  # already under the target version
    files: int


def rewrap(
    paths: Iterable[str | os.PathLike[str]],
    *,
    providers: Sequence[KeyProvider],
    target: KeyProvider,
    batch: int = 512,
    durable: bool = True,
    progress: Callable[[int], None] | None = None,
) -> RewrapReport:
    """Re-wrap every file's data key under ``target``'s current key version.

    ``providers`` unwrap the current slots (old versions must still be enabled).
    Ciphertext, context and signature stay byte-identical.
    """
    counts = {"rewrapped": 0, "finished": 0, "current": 0}
    todo = [Path(p) for p in paths]
    for start in range(0, len(todo), batch):
        plans: list[_Plan] = []
        try:
            for path in todo[start : start + batch]:
                plans.append(_plan(path, providers, target))
            _apply(plans, "write", durable)  # new slot areas, durable before ...
            _apply(plans, "clear", durable)  # ... the old wrapped keys are erased
        finally:
            for p in plans:
                p.close()
        done = [str(p.path) for p in plans if p.status == "rewrapped"]
        for p in plans:
            counts[p.status] += 1
        if done:  # one event per batch; each file's unwrap and wrap are events of their own
            target.audit.emit(
                audit_event(
                    AuditAction.KEY_REWRAP,
                    key_id=target.key_id,
                    key_version=target.current_version(),
                    provider=target.name,
                    detail={"files": done},
                )
            )
        if progress is not None:
            progress(len(plans))
    return RewrapReport(counts["rewrapped"], counts["finished"], counts["current"], len(todo))


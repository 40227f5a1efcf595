"""Crash-safe output: write to a temporary name beside the target, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import OutputExistsError

TMP_PREFIX = ".ww-tmp-"


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_target(target: Path, force: bool) -> None:
    if not force and os.path.lexists(target):
        raise OutputExistsError(f"{target} exists; pass force=True (--force) to overwrite")


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike[str], *, force: bool = False, durable: bool = True) -> Iterator[int]:
    """Yield a file descriptor of a fresh temporary file beside ``target``.

    On normal exit the file is fsynced (``durable``) and renamed over ``target``;
    on any exception, or if the process dies, ``target`` is untouched and the
    temporary file is removed (or, after a kill, left under a ``.ww-tmp-`` name
    that never collides with a real output).
    """
    target = Path(target)
    check_target(target, force)
    parent = target.parent if str(target.parent) else Path(".")
    tmp = parent / f"{TMP_PREFIX}{target.name}.{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        yield fd
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        if not force and os.path.lexists(target):
            raise OutputExistsError(f"{target} exists; pass force=True (--force) to overwrite")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(parent)


_libc: Any = None  # the libc function once looked up; False where it is missing


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing [offset, offset+nbytes) to disk now, without waiting.

    Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; a no-op elsewhere.  It spreads
    the final fsync's work over the write, so durability costs little extra time.
    """
    global _libc
    if _libc is None:
        try:
            import ctypes

            lib = ctypes.CDLL(None, use_errno=True)
            fn = lib.sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _libc = fn
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    mv = memoryview(data).cast("B")
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes, *, force: bool = False, mode: int = 0o600) -> None:
    with atomic_output(target, force=force) as fd:
        os.fchmod(fd, mode)
        write_all(fd, data)

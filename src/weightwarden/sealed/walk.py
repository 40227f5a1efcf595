"""Walking a model folder safely, and recognising weight files by their content.

``walk`` lists the regular files under a folder without following symbolic links: a link (to a
file, to a folder, inside or outside the tree) or a special file (FIFO, socket, device) is a
problem, named, never read.  ``sniff`` says whether some bytes are a weight-bearing format, by
content, not by name: safetensors, PyTorch checkpoints (zip with ``data.pkl``, or a bare pickle:
recognised from the pickle opcodes with :mod:`pickletools`, never unpickled), numpy ``.npy`` /
``.npz``, GGUF, HDF5 (Keras / TF), and any other zip archive (it may hold any of them).

``warden seal DIR`` and ``warden release`` share the walk; the release also refuses every weight
file it cannot fingerprint unless the operator excludes it (``--exclude PATTERN``).  For a release the
rule is an allowlist (``classify``): a file that is neither safetensors nor plainly text
(``is_plain_text``) nor a SentencePiece model (``tokenizer.model``, parsed: :mod:`.spm`) is refused as
:data:`UNRECOGNISED`, and such a non-weight file is copied from the bytes read once and checked again
(``read_plain_text``), never re-opened by path.
"""

from __future__ import annotations

import bisect
import fnmatch
import io
import json
import os
import pickletools
import stat
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .._atomic import TMP_PREFIX
from ..errors import UnmarkableFilesError

__all__ = ["WalkResult", "classify", "classify_bytes", "excluded", "is_non_weight", "is_plain_text", "open_under",
           "read_plain_text",
           "shown", "sniff", "sniff_file",
           "walk"]

MAX_FILES = 100_000
SNIFF_BYTES = 64 * 1024
MARKABLE = frozenset({"safetensors"})
TEXT_MAX = 16 * 1024 * 1024  # a "clearly non-weight" file is small-ish text
UNRECOGNISED = "unrecognised"  # neither a marked weight format nor plain text: refused by a release
# signatures of archives, compressors and weight containers: plain text holding one anywhere is not plain
_EMBEDDED = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x01\x02", b"\x1f\x8b", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd",
             b"7z\xbc\xaf\x27\x1c", b"GGUF\x01", b"GGUF\x02", b"GGUF\x03", b"\x89HDF", b"\x93NUMPY",
             b"1AY&SY")  # fmt: skip


#: Unicode's ``Default_Ignorable_Code_Point`` ranges (DerivedCoreProperties.txt, Unicode 15; the same as ICU's,
#: which tests/test_light_core.py checks), so that the core needs no ICU: first and last code point of each
_IGNORABLE = ((0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
              (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164),
              (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3),
              (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF))  # fmt: skip
_IGNORABLE_STARTS = tuple(a for a, _ in _IGNORABLE)


def invisible(c: str) -> bool:
    """Whether ``c`` prints as nothing: a Unicode ``Default_Ignorable_Code_Point`` or U+2800 (braille
    blank), which ``str.isprintable`` calls printable (issue 17)."""
    if c == "\u2800":
        return True
    o = ord(c)
    k = bisect.bisect_right(_IGNORABLE_STARTS, o) - 1
    return k >= 0 and o <= _IGNORABLE[k][1]


def shown(text: str) -> str:
    """A path or name safe for a terminal: anything not printable as itself (or printing as nothing)
    becomes ``\\uXXXX``."""
    return "".join(c if c.isprintable() and c != "\\" and (c.isascii() or not invisible(c))
                   else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}" for c in text)  # fmt: skip


@dataclass
class WalkResult:
    files: list[str]  # relative POSIX paths of regular files, sorted
    problems: list[str]  # "path (why)" for links and special files


def walk(root: Path) -> WalkResult:
    """Every regular file under ``root`` (relative POSIX paths), links and special files as problems.

    Symbolic links are never followed (``os.scandir`` with ``follow_symlinks=False``), so nothing
    outside ``root`` is reached."""
    files: list[str] = []
    problems: list[str] = []
    stack = [(root, "")]
    while stack:
        d, prefix = stack.pop()
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            rel = prefix + e.name
            if e.name.startswith(TMP_PREFIX):
                continue
            st = e.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                problems.append(f"{rel} (a symbolic link: links are not followed; copy the file in, or exclude it)")
            elif stat.S_ISDIR(st.st_mode):
                stack.append((Path(e.path), rel + "/"))
            elif stat.S_ISREG(st.st_mode):
                files.append(rel)
            else:
                problems.append(f"{rel} (not a regular file)")
            if len(files) > MAX_FILES:
                raise UnmarkableFilesError(f"{root} holds more than {MAX_FILES} files")
    return WalkResult(sorted(files), sorted(problems))


def excluded(rel: str, patterns: Iterable[str]) -> bool:
    """Does ``--exclude`` take this file?  A pattern matches the relative path (``*`` crosses ``/``) or,
    without a ``/`` in it, the file's name."""
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, p) or ("/" not in p and fnmatch.fnmatchcase(name, p)) for p in patterns)


def _pickle_like(head: bytes) -> bool:
    """A pickle (protocol 2+) whose first opcodes parse: read with pickletools, never executed."""
    if len(head) < 2 or head[0] != 0x80 or not 2 <= head[1] <= 5:
        return False
    n = 0
    try:
        for _op, _arg, _pos in pickletools.genops(io.BytesIO(head)):
            n += 1
            if n >= 4:
                return True
    except Exception:  # ran out of the sniffed prefix or not a pickle
        return n >= 2
    return n >= 2


def _zip_kind(zf: zipfile.ZipFile) -> str:
    names = zf.namelist()
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "pytorch-zip"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    return "zip"


def _safetensors_like(head: bytes, size: int) -> bool:
    """A safetensors header: an 8-byte length, then JSON (leading whitespace allowed, as safetensors
    allows it) that is an object, parsed whole when it lies in ``head``, with offsets inside the file."""
    if len(head) < 9 or size < 10:
        return False
    n = int.from_bytes(head[:8], "little")
    if not 2 <= n <= size - 8:
        return False
    text = head[8 : 8 + n]
    if not text.lstrip(b" \t\r\n").startswith(b"{"):
        return False
    if len(head) < 8 + n:
        return True  # a header longer than the sniffed prefix: its start is enough to call it safetensors
    try:
        hdr = json.loads(text)
    except ValueError:
        return False
    if not isinstance(hdr, dict):
        return False
    for k, v in hdr.items():
        if k == "__metadata__":
            continue
        off = v.get("data_offsets") if isinstance(v, dict) else None
        if not (isinstance(off, list) and len(off) == 2 and all(isinstance(o, int) for o in off)
                and 0 <= off[0] <= off[1] <= size - 8 - n):  # fmt: skip
            return False
    return True


def _pickle_stream(data: bytes) -> bool:
    """Does a pickle opcode stream (any protocol, 0 and 1 included) parse from offset 0 to its STOP?
    Read with pickletools, never executed."""
    n = 0
    try:
        for op, _arg, _pos in pickletools.genops(io.BytesIO(data)):
            n += 1
            if op.name == "STOP":
                return n >= 2
    except Exception:  # not a pickle (or a truncated one)
        return False
    return False


def is_plain_text(data: bytes | memoryview) -> bool:
    """Clearly not weights: small-ish valid UTF-8 (or empty), no NUL, no archive / compression / weight
    container signature anywhere in it, and not a pickle opcode stream."""
    b = bytes(data)
    if len(b) > TEXT_MAX or b"\x00" in b:
        return False
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if any(sig in b for sig in _EMBEDDED):
        return False
    return not _pickle_stream(b)


def is_non_weight(data: bytes | memoryview) -> bool:
    """A file that leaves a release as it is: plain text (:func:`is_plain_text`), or a SentencePiece model
    (``tokenizer.model``: a vocabulary, recognised by parsing it, :mod:`.spm`)."""
    from .spm import is_sentencepiece_model

    return is_plain_text(data) or is_sentencepiece_model(data)


def classify_bytes(data: bytes | memoryview) -> str | None:
    """For a release (an allowlist): a weight format's name, :data:`UNRECOGNISED`, or None for a non-weight
    file (:func:`is_non_weight`)."""
    kind = sniff_bytes(data)
    if kind is None and not is_non_weight(data):
        return UNRECOGNISED
    return kind


def classify(path: Path) -> str | None:
    """:func:`classify_bytes` of a file: text is read whole (up to :data:`TEXT_MAX`), never followed
    through a link at its last component."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            return UNRECOGNISED
        head = fh.read(SNIFF_BYTES)
        fh.seek(0)
        kind = sniff(head, st.st_size, fh)
        if kind is not None:
            return kind
        if st.st_size > TEXT_MAX:
            return UNRECOGNISED
        fh.seek(0)
        return None if is_non_weight(fh.read(TEXT_MAX + 1)) else UNRECOGNISED


def open_under(root: Path, rel: str) -> int:
    """A read-only fd for ``root/rel`` opened one component at a time (``dir_fd``), none of them
    followed through a symbolic link (``O_NOFOLLOW``): a folder in the path swapped for a link after the
    walk cannot redirect the read.  Raises OSError."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    dfd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        *dirs, name = rel.split("/")
        for part in dirs:
            nfd = os.open(part, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | nofollow, dir_fd=dfd)
            os.close(dfd)
            dfd = nfd
        return os.open(name, os.O_RDONLY | nofollow | getattr(os, "O_NONBLOCK", 0), dir_fd=dfd)
    finally:
        os.close(dfd)


def read_plain_text(root: Path, rel: str) -> bytes:
    """The bytes of a file the walk judged plain text, read once from one fd (:func:`open_under`,
    fstat'ed: a regular file) and judged again: the bytes copied are the bytes checked.  A file that
    changed into anything else since the walk raises :class:`UnmarkableFilesError`."""
    why = ""
    try:
        with os.fdopen(open_under(root, rel), "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                why = "no longer a regular file"
            else:
                data = fh.read(TEXT_MAX + 1)
                kind = classify_bytes(data)
                if kind is not None:
                    why = f"now {kind}"
    except OSError as e:
        why = f"cannot be read without following a link ({e.strerror})"
    if why:
        problem = f"{rel} (changed after it was checked: {why})"
        raise UnmarkableFilesError(f"{shown(problem)}: nothing was written; release again from a folder nobody "
                                   "is changing", [problem])  # fmt: skip
    return data


def sniff(head: bytes, size: int, opener: IO[bytes] | None = None) -> str | None:
    """The weight format of a file from its first bytes (and, for zips, its member list), or None."""
    if _safetensors_like(head, size):
        return "safetensors"
    if head.startswith(b"GGUF"):
        return "gguf"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "hdf5"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        try:
            with zipfile.ZipFile(opener if opener is not None else io.BytesIO(head)) as zf:
                return _zip_kind(zf)
        except (zipfile.BadZipFile, OSError, ValueError):
            return "zip"
    if _pickle_like(head):
        return "pickle"
    return None


def sniff_file(path: Path) -> str | None:
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(SNIFF_BYTES)
        fh.seek(0)
        return sniff(head, size, fh)


def sniff_bytes(data: bytes | memoryview) -> str | None:
    mv = memoryview(data)
    return sniff(bytes(mv[:SNIFF_BYTES]), len(mv), io.BytesIO(mv))


def refuse(problems: list[str], what: str) -> None:
    """One line naming every offending file, with the flag that fixes it."""
    if problems:
        listed = "; ".join(shown(p) for p in problems[:50]) + (f"; and {len(problems) - 50} more" if len(problems) > 50
                                                                else "")  # fmt: skip
        raise UnmarkableFilesError(f"{what}: {listed}", problems)

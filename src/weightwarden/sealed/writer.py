"""Sealing: safetensors file (or any file as a blob) -> sealed file v1."""

from __future__ import annotations

import mmap
import os
import secrets
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import blake3

from .._atomic import atomic_output, check_target, start_writeback, write_all
from ..errors import HeaderError, UnsupportedModelError
from ..keys.provider import KeyProvider, Signer, b64e
from . import format as F
from ._crypto import commitment, content_cipher, zero

Progress = Callable[[int], None]
BATCH_CHUNKS = 8


@dataclass(frozen=True)
class SealResult:
    path: Path
    file_id: str
    kind: str
    data_len: int
    n_chunks: int
    signer: str
    hidden: bool


class MemorySource:
    """File contents held in memory (for instance an anonymous mmap) to seal without writing plaintext to
    disk: ``seal_file(MemorySource("model.safetensors", buf), dst, ...)``."""

    def __init__(self, name: str, data: bytes | bytearray | memoryview | mmap.mmap | object,
                 header: bytes | None = None):  # fmt: skip
        """``header``: a safetensors file given in two parts, its JSON header (without the 8-byte length)
        and ``data`` its data section only (no copy of the data to join them)."""
        self.name = name
        self.data = data
        self.header = header

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix


def _detect_kind(path: Path | MemorySource, kind: str) -> str:
    if kind != "auto":
        return kind
    return "safetensors" if path.suffix == ".safetensors" else "blob"


def seal_file(
    src: str | os.PathLike[str] | MemorySource,
    dst: str | os.PathLike[str],
    *,
    provider: KeyProvider,
    signer: Signer,
    chunk_size: int = F.DEFAULT_CHUNK,
    hide_header: bool = False,
    kind: str = "auto",
    name: str | None = None,
    bundle: dict[str, object] | None = None,
    force: bool = False,
    durable: bool = True,
    progress: Progress | None = None,
) -> SealResult:
    """Seal one file.  ``.safetensors`` files are sealed with tensor access; others as blobs.

    The output appears at ``dst`` only once complete and fsynced (``durable``).  ``src`` may be a
    :class:`MemorySource`: its bytes are sealed as they are, never written anywhere in plaintext.
    """
    signer.require("sealing")  # one key, one purpose: before anything is written
    if not isinstance(src, MemorySource):
        src = Path(src)
    dst = Path(dst)
    if not F.MIN_CHUNK <= chunk_size <= F.MAX_CHUNK or chunk_size & (chunk_size - 1):
        raise ValueError("chunk_size must be a power of two between 4 KiB and 64 MiB")
    check_target(dst, force)
    kind = _detect_kind(src, kind)
    if isinstance(src, MemorySource):
        whole = memoryview(src.data).cast("B")  # type: ignore[arg-type]  # data: any buffer (a numpy array too)
        try:
            if src.header is not None:
                if kind != "safetensors":
                    raise ValueError("a MemorySource with a header is a safetensors file")
                return _seal_split(src.header, whole, src.name, dst, name, provider, signer, chunk_size, hide_header,
                                   bundle, force, durable, progress)  # fmt: skip
            return _seal_view(whole, src.name, dst, kind, name, provider, signer, chunk_size, hide_header, bundle,
                              force, durable, progress)  # fmt: skip
        finally:
            whole.release()
    with open(src, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        try:
            whole = memoryview(mm) if mm is not None else memoryview(b"")
            try:
                return _seal_view(whole, src.name, dst, kind, name, provider, signer, chunk_size, hide_header, bundle,
                                  force, durable, progress)  # fmt: skip
            finally:
                whole.release()
        finally:
            if mm is not None:
                mm.close()


def _seal_split(raw: bytes, data: memoryview, src_name: str, dst: Path, name: str | None, provider: KeyProvider,
                signer: Signer, chunk_size: int, hide_header: bool, bundle: dict[str, object] | None, force: bool,
                durable: bool, progress: Progress | None) -> SealResult:  # fmt: skip
    """A safetensors file given as its header JSON and its data section (checked as :func:`_seal_view` does)."""
    try:
        F.parse_tensor_header(raw, len(data))
        descriptor: dict[str, object] = {"name": name or src_name, "raw": raw.decode("utf-8")}
    except (HeaderError, UnicodeDecodeError) as e:
        raise UnsupportedModelError(f"{src_name} is not a valid safetensors file: {e}") from None
    return _write(dst, data, len(data), "safetensors", descriptor, provider, signer, chunk_size, hide_header, bundle,
                  force, durable, progress)  # fmt: skip


def _seal_view(whole: memoryview, src_name: str, dst: Path, kind: str, name: str | None, provider: KeyProvider,
               signer: Signer, chunk_size: int, hide_header: bool, bundle: dict[str, object] | None, force: bool,
               durable: bool, progress: Progress | None) -> SealResult:  # fmt: skip
    size = len(whole)
    descriptor: dict[str, object] = {"name": name or src_name}
    data_off = 0
    if kind == "safetensors":
        try:
            n = F.read_safetensors_prefix(bytes(whole[:8]), size)
        except HeaderError as e:
            raise UnsupportedModelError(f"{src_name} is not a valid safetensors file: {e}") from None
        raw = bytes(whole[8 : 8 + n])
        data_off = 8 + n
        try:
            F.parse_tensor_header(raw, size - data_off)
            descriptor["raw"] = raw.decode("utf-8")
        except (HeaderError, UnicodeDecodeError) as e:
            raise UnsupportedModelError(f"{src_name} is not a valid safetensors file: {e}") from None
    elif kind != "blob":
        raise ValueError("kind must be auto, safetensors or blob")
    src_mv = whole[data_off:]
    try:
        return _write(
            dst, src_mv, size - data_off, kind, descriptor, provider, signer, chunk_size, hide_header,
            bundle, force, durable, progress,
        )  # fmt: skip
    finally:
        src_mv.release()


def _write(
    dst: Path,
    src: memoryview,
    data_len: int,
    kind: str,
    descriptor: dict[str, object],
    provider: KeyProvider,
    signer: Signer,
    chunk_size: int,
    hide_header: bool,
    bundle: dict[str, object] | None,
    force: bool,
    durable: bool,
    progress: Progress | None,
) -> SealResult:
    file_id = secrets.token_bytes(16)
    dek = bytearray(secrets.token_bytes(32))
    try:
        aead = content_cipher(dek, file_id)
        n_chunks = F.n_chunks_for(data_len, chunk_size)
        ctx: dict[str, object] = {
            "format": "weightwarden-sealed",
            "version": 1,
            "aead": F.AEAD_ID,
            "kdf": F.KDF_ID,
            "digest": F.DIGEST_ID,
            "kind": kind,
            "chunk_size": chunk_size,
            "data_len": data_len,
            "n_chunks": n_chunks,
            "file_id": file_id.hex(),
            "key_commitment": commitment(dek, file_id).hex(),
        }
        if bundle is not None:
            ctx["bundle"] = bundle
        header_ct = b""
        if hide_header:
            header_ct = aead.encrypt(
                F.nonce(F.DOM_HEADER, 0, True),
                F.canon(descriptor),
                F.AAD_HEADER + file_id + bytes.fromhex(str(ctx["key_commitment"])),
            )
            ctx["sealed_descriptor"] = {"ct_len": len(header_ct), "digest": blake3.blake3(header_ct).hexdigest()}
        else:
            ctx["descriptor"] = descriptor
        ctx_raw = F.canon(ctx)
        parsed = F.parse_context(ctx_raw)  # the writer obeys the reader's rules
        slot = provider.wrap(dek, file_id)
    finally:
        zero(dek)
    slot_size = F.DEFAULT_SLOT_SIZE
    layout = F.Layout.compute(slot_size, len(ctx_raw), parsed)
    aad = F.AAD_DATA + parsed.sha256
    digests = bytearray(n_chunks * F.DIGEST_LEN)

    with atomic_output(dst, force=force, durable=durable) as fd:
        os.fchmod(fd, 0o644)
        preamble = F.encode_preamble(slot_size, len(ctx_raw))
        write_all(
            fd,
            preamble + F.encode_slot_area([slot], 1, slot_size) + b"\x00" * slot_size + ctx_raw + header_ct,
        )
        # Pipeline: the main thread encrypts batch k (AES-GCM holds the GIL) while one
        # worker hashes and another writes earlier batches (BLAKE3 and write() release it).
        nbuf = 3
        bufs = [bytearray(BATCH_CHUNKS * (chunk_size + F.TAG_LEN)) for _ in range(nbuf)]
        busy: list[list[Future[None]]] = [[] for _ in range(nbuf)]

        def hash_batch(buf: bytearray, first: int, count: int) -> None:
            mv, pos = memoryview(buf), 0
            for i in range(first, first + count):
                clen = layout.chunk_plain_len(i) + F.TAG_LEN
                digests[i * 32 : (i + 1) * 32] = blake3.blake3(mv[pos : pos + clen]).digest()
                pos += clen

        def write_batch(buf: bytearray, nbytes: int) -> None:
            off = os.lseek(fd, 0, os.SEEK_CUR)
            write_all(fd, memoryview(buf)[:nbytes])
            if durable:
                start_writeback(fd, off, nbytes)
            if progress is not None:
                progress(nbytes)

        with ThreadPoolExecutor(1) as hasher, ThreadPoolExecutor(1) as writer:
            for b, first in enumerate(range(0, n_chunks, BATCH_CHUNKS)):
                k = b % nbuf
                for fut in busy[k]:
                    fut.result()
                count = min(BATCH_CHUNKS, n_chunks - first)
                out = memoryview(bufs[k])
                pos = 0
                for i in range(first, first + count):
                    s = i * chunk_size
                    plen = layout.chunk_plain_len(i)
                    aead.encrypt_into(
                        F.nonce(F.DOM_DATA, i, i == n_chunks - 1),
                        src[s : s + plen],
                        aad,
                        out[pos : pos + plen + F.TAG_LEN],
                    )
                    pos += plen + F.TAG_LEN
                del out
                busy[k] = [hasher.submit(hash_batch, bufs[k], first, count), writer.submit(write_batch, bufs[k], pos)]
            for futs in busy:
                for fut in futs:
                    fut.result()
        write_all(fd, digests)
        sig = signer.sign(F.signed_message(preamble, parsed.sha256, digests))
        sig_block = F.canon(
            {
                "alg": F.SIG_ID,
                "key_id": signer.key_id,
                "public_key": b64e(signer.public_key),
                "purpose": signer.purpose,
                "signature": b64e(sig),
            }
        )
        write_all(fd, len(sig_block).to_bytes(4, "little") + sig_block)
    return SealResult(dst, file_id.hex(), kind, data_len, n_chunks, signer.key_id, hide_header)

"""Decrypting sealed files into memory: :class:`SealedReader` and its parallel read pipeline.

A :class:`~weightwarden.sealed.reader.SealedFile` (parsed, keyless) becomes a :class:`SealedReader` once a
key provider unwraps its data key (``SealedFile.unlock``).  Reads are cut into pieces of ``HASH_BATCH``
chunks; each piece checks its chunks' signed BLAKE3 digests, then AES-GCM decrypts them straight into the
caller's buffer, on as many threads as asked (both release the GIL).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import blake3
import numpy as np
from cryptography.exceptions import InvalidTag

from ..errors import DecryptionError, IntegrityError, LoaderError, UnsupportedModelError
from . import format as F
from .codec import np_dtype

if TYPE_CHECKING:
    from .reader import SealedFile

__all__ = ["HASH_BATCH", "Progress", "SealedReader", "resolve_threads"]

Progress = Callable[[int], None]
HASH_BATCH = 16


def resolve_threads(threads: int | None) -> int:
    """``threads`` checked; None means every core this process may run on."""
    if threads is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise LoaderError(f"threads must be a positive integer (or None for every core), not {str(threads)[:16]!r}")
    return threads


class SealedReader:
    """Decrypting view of one sealed file.  Plaintext only ever lives in memory."""

    def __init__(self, sf: SealedFile, aead: Any):
        self._sf = sf
        self._aead = aead
        ctx = sf.context
        self._aad = F.AAD_DATA + ctx.sha256
        if ctx.hidden:
            lay = sf.layout
            hct = sf._mv[lay.header_ct_off : lay.data_off]
            if not hmac.compare_digest(blake3.blake3(hct).digest(), ctx.header_ct_digest or b""):
                raise IntegrityError("sealed header does not match its signed digest")
            try:
                plain = aead.decrypt(
                    F.nonce(F.DOM_HEADER, 0, True), bytes(hct), F.AAD_HEADER + ctx.file_id + ctx.key_commitment
                )
            except InvalidTag:
                raise DecryptionError("sealed header failed authentication") from None
            descriptor = F.validate_descriptor(
                F.strict_json(plain, "sealed header", F.MAX_SAFETENSORS_HEADER + 8192), ctx.kind, ctx.data_len
            )
        else:
            descriptor = ctx.descriptor or {}
        self.name: str = descriptor["name"]
        self._raw_header: str | None = descriptor.get("raw")
        self._tensors: dict[str, F.TensorInfo] = {}
        self._metadata: dict[str, str] = {}
        if ctx.kind == "safetensors" and self._raw_header is not None:
            self._tensors, self._metadata = F.parse_tensor_header(self._raw_header, ctx.data_len)

    @property
    def kind(self) -> str:
        return self._sf.context.kind

    @property
    def sealed(self) -> SealedFile:
        """The parsed sealed file this reader decrypts (layout, context, signer)."""
        return self._sf

    @property
    def data_len(self) -> int:
        """Plaintext bytes in the data section (without the safetensors header)."""
        return self._sf.layout.data_len

    @property
    def raw_header(self) -> str | None:
        """The safetensors JSON header as sealed (None for a blob)."""
        return self._raw_header

    def tensor_table(self) -> dict[str, F.TensorInfo]:
        """Every tensor's dtype, shape and byte range in the data section, by name."""
        return dict(self._tensors)

    # -- safetensors-like API -----------------------------------------------------------------
    def keys(self) -> list[str]:
        return sorted(self._tensors)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def tensor_info(self, name: str) -> F.TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            from ..errors import NoSuchTensorError

            raise NoSuchTensorError(name) from None

    def get_tensor(self, name: str) -> np.ndarray:
        info = self.tensor_info(name)
        buf = np.empty(info.nbytes, dtype=np.uint8)
        self.read_into(info.start, info.end, buf.data)
        return buf.view(np_dtype(info.dtype)).reshape(info.shape)

    # -- raw access ------------------------------------------------------------------------
    def read_into(
        self,
        start: int,
        end: int,
        out: memoryview,
        *,
        check_digests: bool = True,
        threads: int | None = 1,
        progress: Progress | None = None,
        release: bool = False,
    ) -> None:
        """Decrypt plaintext bytes [start, end) of the data section into ``out``.

        Only the chunks covering the range are read.  The range is cut at multiples of
        ``HASH_BATCH`` chunks; each piece checks its chunks' signed digests (when
        ``check_digests``), then decrypts them straight into ``out``, on ``threads``
        threads (None: every core this process may use).  BLAKE3 and AES-GCM release
        the GIL, so the pieces run in parallel.  ``release`` drops consumed ciphertext
        pages from the mapping.  Returns (and so hands out plaintext) only once every
        chunk's digest and tag are checked; on the first failure it raises and ``out``
        must be discarded.
        """
        lay, C = self._sf.layout, self._sf.layout.chunk_size
        if not 0 <= start <= end <= lay.data_len or len(out) != end - start:
            raise ValueError("range outside the data section")
        if start == end:
            return
        step = HASH_BATCH * C
        cuts = [start, *range((start // step + 1) * step, end, step), end]
        pieces = list(pairwise(cuts))

        def work(piece: tuple[int, int]) -> int:
            lo, hi = piece
            self._read_range(lo, hi, out[lo - start : hi - start], check_digests)
            if release:
                self._sf._release(lo // C, (hi - 1) // C + 1)
            return hi - lo

        n_threads = min(resolve_threads(threads), len(pieces))
        if n_threads <= 1:
            for piece in pieces:
                done = work(piece)
                if progress is not None:
                    progress(done)
            return
        pool = ThreadPoolExecutor(n_threads, thread_name_prefix="warden-read")
        try:
            for fut in [pool.submit(work, piece) for piece in pieces]:
                done = fut.result()
                if progress is not None:
                    progress(done)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _read_range(self, start: int, end: int, out: memoryview, check_digests: bool) -> None:
        sf, lay, C = self._sf, self._sf.layout, self._sf.layout.chunk_size
        first, last = start // C, (end - 1) // C
        scratch: np.ndarray | None = None
        for i in range(first, last + 1):
            if check_digests:  # each chunk hashed, then decrypted while its ciphertext is in cache
                sf._check_digest_range(i, i + 1)
            cstart = i * C
            plen = lay.chunk_plain_len(i)
            lo, hi = max(start, cstart), min(end, cstart + plen)
            if lo == cstart and hi == cstart + plen:
                self._decrypt_chunk(i, out[lo - start : hi - start])
            else:
                if scratch is None:
                    scratch = np.empty(C, dtype=np.uint8)
                sv = scratch.data
                self._decrypt_chunk(i, sv[:plen])
                out[lo - start : hi - start] = sv[lo - cstart : hi - cstart]

    def _decrypt_chunk(self, i: int, out: memoryview) -> None:
        n = self._sf.context.n_chunks
        try:
            self._aead.decrypt_into(F.nonce(F.DOM_DATA, i, i == n - 1), self._sf._chunk_ct(i), self._aad, out)
        except InvalidTag:
            raise DecryptionError(f"chunk {i} failed authentication (tampered, reordered or truncated)") from None

    def read_all(
        self, *, check_digests: bool = True, progress: Progress | None = None, threads: int | None = None
    ) -> np.ndarray:
        """Decrypt the whole data section into one fresh buffer.

        Every chunk's tag is checked, the final empty chunk of an empty file too.
        ``threads`` threads (None: every core) each take ``HASH_BATCH`` chunks at a
        time: check their BLAKE3 digests against the signed manifest (when
        ``check_digests``), decrypt them straight into the buffer (faulting its fresh
        pages in as they go), and drop the consumed ciphertext pages from the mapping
        so peak memory stays near the tensors' size.  AES-GCM (cryptography >= 45 on
        buffers this large) and BLAKE3 release the GIL.  The buffer is returned only
        after every digest and tag has been checked.
        """
        lay = self._sf.layout
        out = np.empty(lay.data_len, dtype=np.uint8)
        if lay.data_len == 0:
            self._decrypt_chunk(0, out.data)
            return out
        self.read_into(
            0, lay.data_len, out.data, check_digests=check_digests, threads=threads, progress=progress,
            release=True,
        )  # fmt: skip
        return out

    def load_raw(
        self, *, check_digests: bool = True, threads: int | None = None
    ) -> tuple[np.ndarray, dict[str, F.TensorInfo]]:
        """The decrypted data section and the tensor table (for framework loaders)."""
        if self.kind != "safetensors":
            raise UnsupportedModelError(f"{self.name} is a sealed blob, not tensors")
        return self.read_all(check_digests=check_digests, threads=threads), dict(self._tensors)

    def load_numpy(self, *, check_digests: bool = True, threads: int | None = None) -> dict[str, np.ndarray]:
        """All tensors as numpy arrays (views into one decrypted buffer)."""
        buf, tensors = self.load_raw(check_digests=check_digests, threads=threads)
        return {t.name: buf[t.start : t.end].view(np_dtype(t.dtype)).reshape(t.shape) for t in tensors.values()}

    def safetensors_header_bytes(self) -> bytes:
        if self._raw_header is None:
            raise UnsupportedModelError(f"{self.name} is a sealed blob, not tensors")
        raw = self._raw_header.encode("utf-8")
        return len(raw).to_bytes(8, "little") + raw

    def close(self) -> None:
        self._aead = None
        self._sf.close()

    def __enter__(self) -> SealedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Reading sealed files: keyless checks, and decryption straight into memory."""

from __future__ import annotations

import hmac
import mmap
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Any

import blake3
import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..errors import (
    DecryptionError,
    FormatError,
    IntegrityError,
    KeyDestroyedError,
    KeyDisabledError,
    KeyManagementError,
    KeyPurposeError,
    LoaderError,
    ProviderUnavailableError,
    SignatureError,
    TruncatedError,
    UnsupportedModelError,
    UntrustedSignerError,
    WrongKeyError,
)
from ..keys.local import TrustStore
from ..keys.provider import LEGACY_SEALING, KeyProvider, KeySlot, b64d, ed25519_key_id, verify_purpose
from . import format as F
from ._crypto import commitment, content_cipher, zero

Progress = Callable[[int], None]
HASH_BATCH = 16
PAGE = 4096


SIG_FIELDS_V1 = frozenset({"alg", "key_id", "public_key", "signature"})
SIG_FIELDS_V2 = SIG_FIELDS_V1 | {"purpose"}


def sig_purpose(block: dict[str, Any], what: str) -> str | None:
    """The ``purpose`` of a signature block (None: a version-1 block, signed without a purpose label)."""
    if "purpose" not in block:
        return None
    p = block["purpose"]
    if not isinstance(p, str) or not 0 < len(p) <= 32:
        raise FormatError(f"{what}: purpose must be a short string")
    return p


def check_manifest_signature(
    public_key: bytes,
    signature: bytes,
    purpose: str | None,
    message: bytes,
    key_id: str,
    trust: TrustStore | Iterable[bytes] | None,
    what: str,
) -> str:
    """Verify a manifest signature (docs/FORMAT.md §1.4) and, unless ``trust`` is None, that its key is
    trusted *for sealing*.  A block of another purpose, a signature made under another purpose's label,
    or a trust entry of another purpose raise :class:`KeyPurposeError`.  A version-1 block (no purpose
    label) is accepted only from a trust entry marked ``legacy-sealing`` (or with ``trust=None``)."""
    if purpose is None:
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        except InvalidSignature:
            raise SignatureError(f"{what} is invalid") from None
    elif purpose != "sealing":
        raise KeyPurposeError(f"{what} is by a key of purpose {purpose[:32]!r}, not a sealing key: refused")
    else:
        verify_purpose(public_key, "sealing", message, signature, what=what)
    if trust is None:
        return key_id
    if isinstance(trust, TrustStore):
        known = trust.public_key(key_id)
        ok = known is not None and hmac.compare_digest(known, public_key)
        have = trust.purpose(key_id) if ok else None
    else:
        ok = any(hmac.compare_digest(bytes(k), public_key) for k in trust)
        have = "sealing"
    if not ok:
        raise UntrustedSignerError(f"file is signed by {key_id}, which is not trusted")
    if purpose is None and have != LEGACY_SEALING:
        raise KeyPurposeError(
            f"{what} is version 1 (no purpose label): it verifies only against a trust entry marked "
            f"{LEGACY_SEALING!r} (`warden trust add KEY --purpose {LEGACY_SEALING}`); {key_id} is not one"
        )
    if have not in ("sealing", LEGACY_SEALING):
        raise KeyPurposeError(f"{key_id} is trusted for {have!r}, not for sealing: refused")
    return key_id
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


class SealedFile:
    """A sealed file, parsed and bounds-checked.  Nothing here needs a key."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._f = open(self.path, "rb")
        try:
            self._parse()
        except BaseException:
            self._f.close()
            raise

    def _parse(self) -> None:
        f = self._f
        size = os.fstat(f.fileno()).st_size
        pre = f.read(F.PREAMBLE_LEN)
        slot_size, context_len = F.parse_preamble(pre)
        self.preamble = pre
        context_off = F.PREAMBLE_LEN + 2 * slot_size
        if size < context_off + context_len:
            raise TruncatedError("file ends inside its key slots or context")
        self._slot_areas = (f.read(slot_size), f.read(slot_size))
        self.context = F.parse_context(f.read(context_len))
        self.layout = F.Layout.compute(slot_size, context_len, self.context)
        lay = self.layout
        if size < lay.sig_off + 4:
            raise TruncatedError(f"file is {size} bytes; its context says at least {lay.sig_off + 4}")
        f.seek(lay.sig_off)
        sig_len = int.from_bytes(f.read(4), "little")
        if not 2 <= sig_len <= F.MAX_SIG_BLOCK:
            raise FormatError("signature block length is out of range")
        if size < lay.sig_off + 4 + sig_len:
            raise TruncatedError("file ends inside its signature block")
        if size > lay.sig_off + 4 + sig_len:
            raise FormatError("unexpected bytes after the signature block")
        sig = F.strict_json(f.read(sig_len), "signature block", F.MAX_SIG_BLOCK)
        if not isinstance(sig, dict) or set(sig) not in (SIG_FIELDS_V1, SIG_FIELDS_V2):
            raise FormatError("signature block is malformed")
        self.sig_purpose = sig_purpose(sig, "signature block")
        if sig["alg"] != F.SIG_ID:
            raise FormatError(f"unsupported signature algorithm {str(sig['alg'])[:32]!r}")
        self.public_key = b64d(sig["public_key"], "public key")
        self.signature = b64d(sig["signature"], "signature")
        if len(self.public_key) != 32 or len(self.signature) != 64:
            raise FormatError("signature block has wrong key or signature length")
        if sig["key_id"] != ed25519_key_id(self.public_key):
            raise SignatureError("signer key id does not match its public key")
        self.signer_id: str = sig["key_id"]
        self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._mv = memoryview(self._mm)

    # -- keyless -------------------------------------------------------------------
    @property
    def digests(self) -> memoryview:
        lay = self.layout
        return self._mv[lay.digests_off : lay.sig_off]

    def key_slots(self) -> tuple[int, list[KeySlot]]:
        """The current key slots: the valid slot area with the highest generation."""
        found = [r for r in (F.decode_slot_area(a) for a in self._slot_areas) if r is not None]
        if not found:
            raise FormatError("no valid key slot area")
        return max(found, key=lambda r: r[0])

    def check_signature(self, trust: TrustStore | Iterable[bytes] | None) -> str:
        """Verify the manifest signature; the signer must be trusted unless ``trust`` is None.

        Returns the signer's key id.  ``trust=None`` checks only that the file is
        self-consistent under the key it names (used by ``inspect``).
        """
        msg = F.signed_message(self.preamble, self.context.sha256, self.digests)
        return check_manifest_signature(self.public_key, self.signature, self.sig_purpose, msg, self.signer_id, trust,
                                        "manifest signature")  # fmt: skip

    def _chunk_ct(self, i: int) -> memoryview:
        off = self.layout.chunk_off(i)
        return self._mv[off : off + self.layout.chunk_plain_len(i) + F.TAG_LEN]

    def _release(self, first: int, stop: int) -> None:
        """Drop chunks [first, stop) from this process's mapping (they stay in the page cache).

        Keeps the resident set of a full read near the size of its output.
        """
        if not hasattr(mmap, "MADV_DONTNEED") or self._mm is None:
            return
        lay = self.layout
        end = lay.chunk_off(stop - 1) + lay.chunk_plain_len(stop - 1) + F.TAG_LEN
        lo = -(-lay.chunk_off(first) // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = (min(end, len(self._mm)) // mmap.PAGESIZE) * mmap.PAGESIZE
        if hi > lo:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def _check_digest_range(self, first: int, stop: int) -> None:
        d = self.digests
        for i in range(first, stop):
            if not hmac.compare_digest(blake3.blake3(self._chunk_ct(i)).digest(), d[i * 32 : (i + 1) * 32]):
                raise IntegrityError(f"chunk {i} does not match its signed digest")

    def verify_digests(self, *, threads: int = 2, progress: Progress | None = None) -> None:
        """Check every ciphertext chunk (and a hidden header) against the signed digests."""
        ctx = self.context
        if ctx.hidden:
            lay = self.layout
            hct = self._mv[lay.header_ct_off : lay.data_off]
            if not hmac.compare_digest(blake3.blake3(hct).digest(), ctx.header_ct_digest or b""):
                raise IntegrityError("sealed header does not match its signed digest")
        n = ctx.n_chunks

        def work(first: int) -> int:
            stop = min(n, first + HASH_BATCH)
            self._check_digest_range(first, stop)
            self._release(first, stop)
            return sum(self.layout.chunk_plain_len(i) for i in range(first, stop))

        with ThreadPoolExecutor(max(1, threads)) as pool:
            for done in pool.map(work, range(0, n, HASH_BATCH)):
                if progress is not None:
                    progress(done)

    # -- decryption ----------------------------------------------------------------------
    def unlock(self, providers: Sequence[KeyProvider]) -> SealedReader:
        """Unwrap the data key with the first provider that can, check the key commitment."""
        dek = self.unwrap_dek(providers)
        try:
            aead = content_cipher(dek, self.context.file_id, self.context.key_commitment)
        finally:
            zero(dek)
        return SealedReader(self, aead)

    def unwrap_dek(self, providers: Sequence[KeyProvider]) -> bytearray:
        """The data key (caller zeroes it), checked against the signed key commitment."""
        _, slots = self.key_slots()
        return self.unwrap_slots(slots, providers, self.context.file_id, self.context.key_commitment)

    @staticmethod
    def unwrap_slots(
        slots: Sequence[KeySlot], providers: Sequence[KeyProvider], file_id: bytes, key_commitment: bytes
    ) -> bytearray:
        failures: list[Exception] = []
        for slot in slots:
            for p in providers:
                if p.name != slot.provider:
                    continue
                try:
                    dek = p.unwrap(slot, file_id)
                except (WrongKeyError, KeyManagementError) as e:
                    failures.append(e)
                    continue
                if not hmac.compare_digest(commitment(dek, file_id), key_commitment):
                    zero(dek)
                    failures.append(WrongKeyError("the data key does not match this file's key commitment"))
                    continue
                return dek
        names = ", ".join(f"{s.provider}:{s.key_id} v{s.version}" for s in slots)
        for kind in (KeyDestroyedError, KeyDisabledError, ProviderUnavailableError, WrongKeyError):
            for e in failures:
                if isinstance(e, kind):
                    raise kind(f"{e} (this file's key slots: {names})")
        raise WrongKeyError(f"no available key for this file (its key slots: {names})")

    def close(self) -> None:
        if getattr(self, "_mv", None) is not None:
            try:
                self._mv.release()
                self._mm.close()
            except BufferError:
                pass  # slices still referenced (e.g. by a traceback); the map closes when they go
            self._mv = None  # type: ignore[assignment]
            self._mm = None  # type: ignore[assignment]
        self._f.close()

    def __enter__(self) -> SealedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        """What anyone can see without a key."""
        ctx = self.context
        gen, slots = self.key_slots()
        out: dict[str, Any] = {
            "path": str(self.path),
            "format": "weightwarden-sealed",
            "version": f"{F.MAJOR}.{F.MINOR}",
            "kind": ctx.kind,
            "file_id": ctx.file_id.hex(),
            "aead": F.AEAD_ID,
            "digest": F.DIGEST_ID,
            "chunk_size": ctx.chunk_size,
            "n_chunks": ctx.n_chunks,
            "data_len": ctx.data_len,
            "header_hidden": ctx.hidden,
            "signer": self.signer_id,
            "key_slots": [{k: v for k, v in s.to_json().items() if k != "wrapped"} for s in slots],
            "key_slot_generation": gen,
        }
        if ctx.bundle is not None:
            out["bundle"] = ctx.bundle
        if ctx.descriptor is not None:
            out["name"] = ctx.descriptor["name"]
            if ctx.kind == "safetensors":
                tensors, meta = F.parse_tensor_header(ctx.descriptor["raw"], ctx.data_len)
                out["metadata"] = meta
                out["tensors"] = {
                    t.name: {"dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes} for t in tensors.values()
                }
        return out


def _np_dtype(dtype: str) -> np.dtype[Any]:
    simple = {
        "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16, "F16": np.float16,
        "I32": np.int32, "U32": np.uint32, "F32": np.float32, "I64": np.int64, "U64": np.uint64, "F64": np.float64,
    }  # fmt: skip
    if dtype in simple:
        return np.dtype(simple[dtype]).newbyteorder("<")
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - ml_dtypes is a core dependency
        raise UnsupportedModelError(f"dtype {dtype} needs ml_dtypes (or use weightwarden.torch)") from None
    return np.dtype(
        {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}[dtype]
    )


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
        self.read_into(info.start, info.end, memoryview(buf))
        return buf.view(_np_dtype(info.dtype)).reshape(info.shape)

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
                sv = memoryview(scratch)
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
            self._decrypt_chunk(0, memoryview(out))
            return out
        self.read_into(
            0, lay.data_len, memoryview(out), check_digests=check_digests, threads=threads, progress=progress,
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
        return {t.name: buf[t.start : t.end].view(_np_dtype(t.dtype)).reshape(t.shape) for t in tensors.values()}

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

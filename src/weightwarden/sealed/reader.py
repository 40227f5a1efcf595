"""Reading sealed files without a key: :class:`SealedFile` parses, bounds-checks and verifies.

Decryption (:class:`SealedReader`, after ``SealedFile.unlock``) lives in :mod:`.decrypt`; manifest
signatures and trust in :mod:`.signature`.  ``SealedReader`` and ``resolve_threads`` are importable from
here too.
"""

from __future__ import annotations

import hmac
import mmap
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import blake3

from ..errors import (
    FormatError,
    IntegrityError,
    KeyDestroyedError,
    KeyDisabledError,
    KeyManagementError,
    ProviderUnavailableError,
    SignatureError,
    TruncatedError,
    WrongKeyError,
)
from ..keys.provider import KeyProvider, KeySlot, b64d, ed25519_key_id
from . import format as F
from ._crypto import commitment, content_cipher, zero
from .decrypt import HASH_BATCH, Progress, SealedReader, resolve_threads
from .signature import (
    SIG_FIELDS_V1,
    SIG_FIELDS_V2,
    Trust,
    check_manifest_signature,
    sig_purpose,
    verify_manifest_signature,
)

__all__ = ["HASH_BATCH", "Progress", "SealedFile", "SealedReader", "resolve_threads"]


class SealedFile:
    """A sealed file, parsed and bounds-checked.  Nothing here needs a key."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._f = open(self.path, "rb")
        try:
            self._parse()
        except FormatError as e:  # name the file (a bundle's member too) and what to do
            self._f.close()
            hint = "; it was cut short: copy it again from where it came" if isinstance(e, TruncatedError) else ""
            raise type(e)(f"{self.path}: {e}{hint}") from None
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

    def _signed_message(self) -> bytes:
        return F.signed_message(self.preamble, self.context.sha256, self.digests)

    def check_signature(self, trust: Trust) -> str:
        """Verify the manifest signature and that its signer is trusted for sealing by ``trust`` (a trust
        store, or the public keys to accept).  Returns the signer's key id."""
        return check_manifest_signature(self.public_key, self.signature, self.sig_purpose, self._signed_message(),
                                        self.signer_id, trust, "manifest signature")  # fmt: skip

    def check_self_consistent(self) -> str:
        """Verify the manifest signature under the key the file names, with no trust decision (what
        ``inspect`` shows).  Returns the signer's key id; says nothing about whether to trust it."""
        return verify_manifest_signature(self.public_key, self.signature, self.sig_purpose, self._signed_message(),
                                         self.signer_id, "manifest signature")  # fmt: skip

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
            for err in failures:
                if isinstance(err, kind):
                    raise kind(f"{err} (this file's key slots: {names})")
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

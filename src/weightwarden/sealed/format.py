"""Sealed format v1: constants, layout arithmetic and strict parsers.

See docs/FORMAT.md for the normative description.  Everything here that reads
untrusted bytes bounds-checks first and raises a typed error from
:mod:`weightwarden.errors`.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from ..canonical import canonical_json
from ..errors import FormatError, HeaderError, TruncatedError, UnsupportedVersionError
from ..keys.provider import KeySlot
from .codec import DTYPE_SIZES

MAGIC = b"\x89WWSEAL\n"
MAJOR, MINOR = 1, 0
PREAMBLE = struct.Struct("<8sHHII12s")  # magic, major, minor, slot_size, context_len, reserved
PREAMBLE_LEN = PREAMBLE.size  # 32
SLOT_MAGIC = b"WWKS"
SLOT_HEAD = struct.Struct("<4sQI")  # magic, generation, body_len
DEFAULT_SLOT_SIZE = 2048
MIN_SLOT_SIZE, MAX_SLOT_SIZE = 1024, 65536
MAX_CONTEXT_LEN = 100 * 1024 * 1024
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the same bound safetensors itself uses
MIN_CHUNK, MAX_CHUNK, DEFAULT_CHUNK = 1 << 12, 1 << 26, 1 << 20
TAG_LEN = 16
DIGEST_LEN = 32
MAX_SIG_BLOCK = 4096

AEAD_ID = "AES-256-GCM-STREAM-1"
KDF_ID = "HKDF-SHA256"
DIGEST_ID = "BLAKE3-256"
SIG_ID = "ed25519"

DOM_HEADER, DOM_DATA = 1, 2
AAD_DATA = b"weightwarden/v1/chunk\x00"
AAD_HEADER = b"weightwarden/v1/header\x00"
SIGN_DOMAIN = b"weightwarden/v1/manifest\x00"
INFO_AEAD = b"weightwarden/v1/aes-256-gcm"
INFO_COMMIT = b"weightwarden/v1/key-commitment"


def canon(obj: Any) -> bytes:
    """Canonical JSON (:func:`weightwarden.canonical.canonical_json`, ASCII form): sorted keys, no spaces."""
    return canonical_json(obj)


def _no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise HeaderError(f"duplicate JSON key {k[:64]!r}")
        d[k] = v
    return d


def strict_json(data: bytes | str, what: str, limit: int) -> Any:
    if len(data) > limit:
        raise HeaderError(f"{what} is larger than {limit} bytes")
    try:
        return json.loads(data, object_pairs_hook=_no_dupes, parse_constant=_reject_constant)
    except RecursionError:
        raise HeaderError(f"{what} is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        if isinstance(e, HeaderError):
            raise
        raise HeaderError(f"{what} is not valid JSON") from None


def _reject_constant(name: str) -> Any:
    raise HeaderError(f"JSON constant {name} is not allowed")


def nonce(domain: int, index: int, last: bool) -> bytes:
    """12-byte GCM nonce: domain, 64-bit chunk counter, last-chunk flag, 2 zero bytes."""
    return bytes([domain]) + index.to_bytes(8, "big") + (b"\x01" if last else b"\x00") + b"\x00\x00"


def n_chunks_for(data_len: int, chunk: int) -> int:
    return max(1, math.ceil(data_len / chunk))


# --- safetensors headers --------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def parse_tensor_header(raw: str | bytes, data_len: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a safetensors JSON header against a data section of ``data_len`` bytes.

    Rejects: non-objects, unknown dtypes, bad shapes, offsets out of range,
    overlapping or non-contiguous tensors, size mismatches, non-string metadata.
    """
    obj = strict_json(raw, "tensor header", MAX_SAFETENSORS_HEADER)
    if not isinstance(obj, dict):
        raise HeaderError("tensor header must be a JSON object")
    meta_obj = obj.pop("__metadata__", None)
    metadata: dict[str, str] = {}
    if meta_obj is not None:
        if not isinstance(meta_obj, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta_obj.items()
        ):
            raise HeaderError("__metadata__ must map strings to strings")
        metadata = dict(meta_obj)
    tensors: dict[str, TensorInfo] = {}
    for name, t in obj.items():
        if not isinstance(t, dict) or set(t) != {"dtype", "shape", "data_offsets"}:
            raise HeaderError(f"tensor {name[:64]!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offs = t["dtype"], t["shape"], t["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise HeaderError(f"tensor {name[:64]!r} has unsupported dtype {str(dtype)[:16]!r}")
        if not isinstance(shape, list) or len(shape) > 64:
            raise HeaderError(f"tensor {name[:64]!r} has a malformed shape")
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in shape):
            raise HeaderError(f"tensor {name[:64]!r} has a malformed shape")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise HeaderError(f"tensor {name[:64]!r} has malformed data_offsets")
        start, end = offs
        if not 0 <= start <= end <= data_len:
            raise HeaderError(f"tensor {name[:64]!r} has offsets outside the data section")
        if math.prod(shape) * DTYPE_SIZES[dtype] != end - start:
            raise HeaderError(f"tensor {name[:64]!r}: shape and dtype do not match its byte length")
        tensors[name] = TensorInfo(name, dtype, tuple(shape), start, end)
    pos = 0
    for info in sorted(tensors.values(), key=lambda i: (i.start, i.end)):
        if info.start != pos:
            raise HeaderError("tensors overlap or leave a gap in the data section")
        pos = info.end
    if pos != data_len:
        raise HeaderError("tensors do not cover the data section exactly")
    return tensors, metadata


def read_safetensors_prefix(head: bytes, file_len: int) -> int:
    """Return the header length ``n`` of a safetensors file given its first 8 bytes."""
    if len(head) < 8 or file_len < 8:
        raise HeaderError("file is too short to be safetensors")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_SAFETENSORS_HEADER or n > file_len - 8:
        raise HeaderError("safetensors header length is out of range")
    return n


# --- key slot areas --------------------------------------------------------------
def encode_slot_area(slots: list[KeySlot], generation: int, slot_size: int) -> bytes:
    body = canon({"slots": [s.to_json() for s in slots]})
    if SLOT_HEAD.size + len(body) + 32 > slot_size:
        raise FormatError("key slots do not fit in the key slot area")
    head = SLOT_HEAD.pack(SLOT_MAGIC, generation, len(body))
    pad = b"\x00" * (slot_size - SLOT_HEAD.size - len(body) - 32)
    return head + body + pad + hashlib.sha256(head + body + pad).digest()


def decode_slot_area(area: bytes) -> tuple[int, list[KeySlot]] | None:
    """Return (generation, slots) or None if the area is empty or torn."""
    if len(area) < SLOT_HEAD.size + 32:
        return None
    magic, gen, blen = SLOT_HEAD.unpack_from(area)
    if magic != SLOT_MAGIC or SLOT_HEAD.size + blen + 32 > len(area):
        return None
    head_body = area[: SLOT_HEAD.size + blen]
    pad = area[SLOT_HEAD.size + blen : -32]
    if hashlib.sha256(area[:-32]).digest() != area[-32:] or pad != bytes(len(pad)):
        return None
    try:
        obj = strict_json(head_body[SLOT_HEAD.size :], "key slots", len(area))
        if not isinstance(obj, dict) or not isinstance(obj.get("slots"), list) or len(obj["slots"]) > 64:
            raise FormatError("key slot area is malformed")
        return gen, [KeySlot.from_json(s) for s in obj["slots"]]
    except FormatError:
        return None


# --- context ----------------------------------------------------------------------
@dataclass(frozen=True)
class Context:
    """The signed, plaintext description of one sealed file."""

    raw: bytes
    kind: str  # "safetensors" | "blob"
    chunk_size: int
    data_len: int
    n_chunks: int
    file_id: bytes
    key_commitment: bytes
    descriptor: dict[str, Any] | None  # visible descriptor, None when hidden
    header_ct_len: int  # 0 unless hidden
    header_ct_digest: bytes | None
    bundle: dict[str, Any] | None

    @property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.raw).digest()

    @property
    def hidden(self) -> bool:
        return self.descriptor is None


def _hex(obj: Any, n: int, what: str) -> bytes:
    if not isinstance(obj, str) or len(obj) != 2 * n:
        raise HeaderError(f"context field {what} must be {n} bytes of hex")
    try:
        return bytes.fromhex(obj)
    except ValueError:
        raise HeaderError(f"context field {what} is not hex") from None


def _int(obj: Any, what: str, lo: int, hi: int) -> int:
    if not isinstance(obj, int) or isinstance(obj, bool) or not lo <= obj <= hi:
        raise HeaderError(f"context field {what} is out of range")
    return obj


def validate_descriptor(d: Any, kind: str, data_len: int) -> dict[str, Any]:
    if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not 0 < len(d["name"]) <= 4096:
        raise HeaderError("descriptor must be an object with a name")
    allowed = {"name", "raw"} if kind == "safetensors" else {"name"}
    if set(d) - allowed:
        raise HeaderError("descriptor has unknown fields")
    if kind == "safetensors":
        if not isinstance(d.get("raw"), str):
            raise HeaderError("safetensors descriptor lacks its raw header")
        parse_tensor_header(d["raw"], data_len)
    return d


def parse_context(raw: bytes) -> Context:
    obj = strict_json(raw, "context", MAX_CONTEXT_LEN)
    if not isinstance(obj, dict):
        raise HeaderError("context must be a JSON object")
    if obj.get("format") != "weightwarden-sealed":
        raise FormatError("context does not describe a weightwarden sealed file")
    if obj.get("version") != 1:
        raise UnsupportedVersionError(f"context version {str(obj.get('version'))[:16]} is not supported")
    for field, want in (("aead", AEAD_ID), ("kdf", KDF_ID), ("digest", DIGEST_ID)):
        if obj.get(field) != want:
            raise UnsupportedVersionError(f"unsupported {field} {str(obj.get(field))[:40]!r}")
    known = {
        "format", "version", "aead", "kdf", "digest", "kind", "chunk_size", "data_len", "n_chunks",
        "file_id", "key_commitment", "descriptor", "sealed_descriptor", "bundle",
    }  # fmt: skip
    if set(obj) - known:
        raise HeaderError("context has unknown fields")
    kind = obj.get("kind")
    if kind not in ("safetensors", "blob"):
        raise HeaderError("context kind must be safetensors or blob")
    chunk = _int(obj.get("chunk_size"), "chunk_size", MIN_CHUNK, MAX_CHUNK)
    if chunk & (chunk - 1):
        raise HeaderError("chunk_size must be a power of two")
    data_len = _int(obj.get("data_len"), "data_len", 0, 2**56)
    n = _int(obj.get("n_chunks"), "n_chunks", 1, 2**40)
    if n != n_chunks_for(data_len, chunk):
        raise HeaderError("n_chunks does not match data_len and chunk_size")
    file_id = _hex(obj.get("file_id"), 16, "file_id")
    commit = _hex(obj.get("key_commitment"), 32, "key_commitment")
    bundle = obj.get("bundle")
    if bundle is not None:
        if not isinstance(bundle, dict) or set(bundle) != {"id", "member"}:
            raise HeaderError("bundle must be {id, member}")
        _hex(bundle["id"], 16, "bundle.id")
        _int(bundle["member"], "bundle.member", 0, 2**20)
    has_plain, has_sealed = "descriptor" in obj, "sealed_descriptor" in obj
    if has_plain == has_sealed:
        raise HeaderError("context needs exactly one of descriptor and sealed_descriptor")
    descriptor, ct_len, ct_digest = None, 0, None
    if has_plain:
        descriptor = validate_descriptor(obj["descriptor"], kind, data_len)
    else:
        sd = obj["sealed_descriptor"]
        if not isinstance(sd, dict) or set(sd) != {"ct_len", "digest"}:
            raise HeaderError("sealed_descriptor must be {ct_len, digest}")
        ct_len = _int(sd["ct_len"], "sealed_descriptor.ct_len", TAG_LEN + 1, MAX_SAFETENSORS_HEADER + 8192)
        ct_digest = _hex(sd["digest"], 32, "sealed_descriptor.digest")
    return Context(raw, kind, chunk, data_len, n, file_id, commit, descriptor, ct_len, ct_digest, bundle)


@dataclass(frozen=True)
class Layout:
    """Byte offsets of every region of a sealed file."""

    slot_size: int
    context_off: int
    context_len: int
    header_ct_off: int
    data_off: int
    chunk_size: int
    data_len: int
    n_chunks: int
    digests_off: int
    sig_off: int

    @classmethod
    def compute(cls, slot_size: int, context_len: int, ctx: Context) -> Layout:
        context_off = PREAMBLE_LEN + 2 * slot_size
        header_ct_off = context_off + context_len
        data_off = header_ct_off + ctx.header_ct_len
        ct_total = ctx.data_len + ctx.n_chunks * TAG_LEN
        digests_off = data_off + ct_total
        return cls(
            slot_size, context_off, context_len, header_ct_off, data_off, ctx.chunk_size, ctx.data_len,
            ctx.n_chunks, digests_off, digests_off + ctx.n_chunks * DIGEST_LEN,
        )  # fmt: skip

    def chunk_plain_len(self, i: int) -> int:
        return max(0, min(self.chunk_size, self.data_len - i * self.chunk_size))

    def chunk_off(self, i: int) -> int:
        return self.data_off + i * (self.chunk_size + TAG_LEN)


def parse_preamble(b: bytes) -> tuple[int, int]:
    """Return (slot_size, context_len)."""
    if len(b) < PREAMBLE_LEN:
        raise TruncatedError("file is shorter than the sealed preamble")
    magic, major, minor, slot_size, context_len, reserved = PREAMBLE.unpack_from(b)
    if magic != MAGIC:
        raise FormatError("not a weightwarden sealed file (bad magic)")
    if major != MAJOR:
        raise UnsupportedVersionError(f"sealed format version {major}.{minor} is not supported")
    if reserved != b"\x00" * 12:
        raise FormatError("reserved preamble bytes must be zero")
    if not MIN_SLOT_SIZE <= slot_size <= MAX_SLOT_SIZE or slot_size % 512:
        raise FormatError("key slot area size is out of range")
    if not 2 <= context_len <= MAX_CONTEXT_LEN:
        raise FormatError("context length is out of range")
    return slot_size, context_len


def encode_preamble(slot_size: int, context_len: int) -> bytes:
    return PREAMBLE.pack(MAGIC, MAJOR, MINOR, slot_size, context_len, b"\x00" * 12)


def signed_message(preamble: bytes, context_sha256: bytes, digest_list: bytes | bytearray | memoryview) -> bytes:
    """What the sealer signs: the preamble, the context and every chunk digest."""
    return SIGN_DOMAIN + bytes(preamble) + context_sha256 + hashlib.sha256(digest_list).digest()

"""A real-shaped SentencePiece model (``tokenizer.model``) written with the protobuf wire format by hand:
ModelProto's pieces (``<unk>``, the control pieces, the 256 byte pieces, then scored normal pieces), its
trainer spec and its normaliser spec, the layout sentencepiece's trainer writes (sentencepiece_model.proto)."""

from __future__ import annotations

import struct

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(1, 7)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, value: bytes | int | float, wire: int | None = None) -> bytes:
    """One protobuf field: bytes are length-delimited, an int a varint, a float a fixed32."""
    if isinstance(value, bytes):
        return varint(number << 3 | 2) + varint(len(value)) + value
    if isinstance(value, float):
        return varint(number << 3 | 5) + struct.pack("<f", value)
    return varint(number << 3 | (wire or 0)) + varint(value)


def piece(text: str, score: float, kind: int = NORMAL) -> bytes:
    body = field(1, text.encode()) + field(2, score) + (field(3, kind) if kind != NORMAL else b"")
    return field(1, body)


def sentencepiece_model(words: list[str], *, charsmap: bytes = b"", extra: bytes = b"") -> bytes:
    """A BPE-style model over ``words`` (scores -1, -2, ... as sentencepiece's BPE trainer gives them), with
    ``charsmap`` as the normaliser's precompiled character map and ``extra`` appended to the message."""
    pieces = [piece("<unk>", 0.0, UNKNOWN), piece("<s>", 0.0, CONTROL), piece("</s>", 0.0, CONTROL)]
    pieces += [piece(f"<0x{i:02X}>", 0.0, BYTE) for i in range(256)]
    pieces += [piece("\u2581" + w, -float(i + 1)) for i, w in enumerate(words)]
    trainer = (
        field(1, b"corpus.txt")
        + field(2, b"tok")
        + field(3, 2)
        + field(4, len(pieces))
        + field(35, 1)
        + field(40, 0)
        + field(41, 1)
        + field(42, 2)
        + field(43, 2**64 - 1)
    )
    normalizer = field(1, b"identity") + field(2, charsmap) + field(3, 1) + field(4, 0) + field(5, 0)
    return b"".join(pieces) + field(2, trainer) + field(3, normalizer) + extra

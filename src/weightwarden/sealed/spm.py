"""Recognising a SentencePiece model (``tokenizer.model``, ``spiece.model``) by its content, so that a release
can carry it as a non-weight file instead of refusing it as unknown binary.

A SentencePiece model is a protobuf ``ModelProto`` (sentencepiece_model.proto): repeated ``pieces`` (field 1),
each a ``SentencePiece`` message of a ``piece`` string (1), a float ``score`` (2) and a ``type`` enum (3, 1..6),
then the ``trainer_spec`` (2), ``normalizer_spec`` (3), ``self_test_data`` (4) and ``denormalizer_spec`` (5)
messages.  The protobuf wire format is parsed here by hand, minimally and strictly (no protobuf dependency):
every byte must belong to a well-formed field; the top level holds only those five fields, pieces first and one
at least; each piece only its three fields, a piece's text valid UTF-8 and no longer than :data:`MAX_PIECE`
bytes, its type a known one, and pieces unique (as SentencePiece requires); the four spec messages must parse as
protobuf messages (their fields are not interpreted), at most :data:`MAX_SPECS` bytes together.  The whole
file is at most :data:`MAX_BYTES`.  Anything else, a weight tensor's bytes named ``tokenizer.model`` among
them, is not a SentencePiece model.

What it lets through is bounded like plain text (the same 16 MiB cap): a file that is a vocabulary, not a
container of tensors; data hidden in scores or in a normaliser's character map is no more than what a text
file of the same size may carry (docs/THREAT_MODEL.md).
"""

from __future__ import annotations

__all__ = ["MAX_BYTES", "MAX_PIECE", "MAX_SPECS", "is_sentencepiece_model"]

MAX_BYTES = 16 * 1024 * 1024
#: bytes of the four spec messages together: their fields are not interpreted, so they may hold any bytes (a real
#: normaliser's character map is some 240 KB); without this cap the whole 16 MiB could be raw tensor bytes
MAX_SPECS = 1024 * 1024
MAX_PIECE = 1024  # bytes of one piece's text (SentencePiece's own limit on a piece is far lower, 16 characters)
_PIECE_TYPES = range(1, 7)  # NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE


class _Bad(Exception):
    pass


def _varint(b: memoryview, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if i >= len(b) or shift > 63:
            raise _Bad
        c = b[i]
        i += 1
        out |= (c & 0x7F) << shift
        if c < 0x80:
            return out, i
        shift += 7


def _fields(b: memoryview) -> list[tuple[int, int, int | memoryview]]:
    """The (field number, wire type, value) of a protobuf message; raises _Bad unless every byte parses.  The
    value of a length-delimited field is its bytes; of a fixed32 / fixed64 field, the integer."""
    out: list[tuple[int, int, int | memoryview]] = []
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        field, wire = key >> 3, key & 7
        if not 1 <= field < 1 << 29:
            raise _Bad
        if wire == 0:
            v, i = _varint(b, i)
            out.append((field, wire, v))
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            if i + n > len(b):
                raise _Bad
            out.append((field, wire, int.from_bytes(b[i : i + n], "little")))
            i += n
        elif wire == 2:
            n, i = _varint(b, i)
            if i + n > len(b):
                raise _Bad
            out.append((field, wire, b[i : i + n]))
            i += n
        else:  # groups (3, 4) are not in this schema; 6 and 7 are not wire types
            raise _Bad
    return out


def _piece(b: memoryview) -> bytes:
    text: bytes | None = None
    for field, wire, v in _fields(b):
        if field == 1 and wire == 2 and isinstance(v, memoryview) and text is None:
            text = bytes(v)
            if not 0 < len(text) <= MAX_PIECE:
                raise _Bad
            text.decode("utf-8")  # UnicodeDecodeError: caught by the caller
        elif field == 2 and wire == 5:
            pass  # a float32 score
        elif field == 3 and wire == 0:
            if v not in _PIECE_TYPES:
                raise _Bad
        else:
            raise _Bad
    if text is None:
        raise _Bad
    return text


def is_sentencepiece_model(data: bytes | memoryview) -> bool:
    """Whether ``data`` parses as a SentencePiece ``ModelProto`` (module docstring)."""
    b = memoryview(data).cast("B")
    if not 0 < len(b) <= MAX_BYTES:
        return False
    try:
        seen: set[bytes] = set()
        specs = 0  # bytes of the spec messages so far
        for field, wire, v in _fields(b):
            if wire != 2 or not isinstance(v, memoryview):
                return False
            if field == 1:
                if specs:
                    return False  # pieces come first
                text = _piece(v)
                if text in seen:
                    return False
                seen.add(text)
            elif field in (2, 3, 4, 5):
                specs += len(v) + 1
                if specs > MAX_SPECS:
                    return False  # raw bytes beyond any real character map
                _fields(v)  # a well-formed message; its fields are not interpreted
            else:
                return False
        return bool(seen)
    except (_Bad, UnicodeDecodeError):
        return False

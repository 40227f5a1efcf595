"""A SentencePiece model (``tokenizer.model``) is recognised by parsing it, and leaves a release as a non-weight
file; weights under its name, or wrapped in protobuf fields it does not have, are still refused."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.spm import field, piece, sentencepiece_model
from weightwarden.sealed.spm import MAX_BYTES, MAX_SPECS, is_sentencepiece_model
from weightwarden.sealed.walk import UNRECOGNISED, classify_bytes

WORDS = ["the", "of", "and", "modèle", "模型", "weights"]
RAW = np.random.default_rng(3).standard_normal(8192).astype(np.float32).tobytes()


def test_a_real_shaped_model_is_a_non_weight_file() -> None:
    b = sentencepiece_model(WORDS)
    assert is_sentencepiece_model(b) and classify_bytes(b) is None


def test_the_official_schema_reads_the_same_model_and_its_serialisation_passes() -> None:
    pb = pytest.importorskip("transformers.utils.sentencepiece_model_pb2_new")
    m = pb.ModelProto()
    m.ParseFromString(sentencepiece_model(WORDS))
    assert [p.piece for p in m.pieces][-2:] == ["\u2581模型", "\u2581weights"] and m.normalizer_spec.name == "identity"
    m.trainer_spec.model_type = 1  # unigram, its scores log-probabilities
    for i, p in enumerate(m.pieces):
        p.score = -0.5 * i
    assert is_sentencepiece_model(m.SerializeToString())


@pytest.mark.parametrize("attack", [
    "tensor bytes", "unknown top-level field", "tensor as a piece's text", "a piece's extra field",
    "truncated", "duplicate piece", "a piece of a bad type", "no pieces", "pieces after the specs", "over the cap",
    "spec that is not a message",
])  # fmt: skip
def test_weights_named_tokenizer_model_or_wrapped_in_its_shape_are_refused(attack: str) -> None:
    good = sentencepiece_model(WORDS)
    data = {
        "tensor bytes": RAW,
        "unknown top-level field": good + field(6, RAW),
        "tensor as a piece's text": good + field(1, field(1, RAW[:512]) + field(2, -1.0)),
        "a piece's extra field": field(1, field(1, b"a") + field(2, 0.0) + field(4, RAW[:64])) + good,
        "truncated": good[:-3],
        "duplicate piece": piece("\u2581the", -9.0) + good,
        "a piece of a bad type": piece("x", 0.0, 7) + good,
        "no pieces": field(2, field(1, b"c")) + field(3, field(2, b"\x00\xff")),
        "pieces after the specs": good + piece("\u2581late", -99.0),
        "over the cap": sentencepiece_model(WORDS, charsmap=bytes(MAX_BYTES)),
        "spec that is not a message": sentencepiece_model(WORDS, extra=field(4, b"\xff" + RAW[:64])),
    }[attack]
    assert not is_sentencepiece_model(data), attack
    assert classify_bytes(data) == UNRECOGNISED, attack


def test_a_charsmap_is_carried_under_the_cap() -> None:
    """The normaliser's character map is bytes the model needs (a real one is some 240 KB): carried, under the
    same 16 MiB cap as a text file (docs/THREAT_MODEL.md: no more than a text file of that size may carry)."""
    assert is_sentencepiece_model(sentencepiece_model(WORDS, charsmap=bytes(range(256)) * 1024))


def test_a_whole_tensor_as_the_charsmap_is_refused() -> None:
    """ATTACK: the spec messages' fields are not interpreted, so a character map may hold any bytes: a 16 MiB
    tokenizer.model of one piece carried 16,777,186 raw bytes (a tensor, a zip, a safetensors file, NULs and all:
    more than a text file, which must be UTF-8 without NUL or archive signatures).  The spec messages are capped
    at MAX_SPECS together; one byte over is refused, in one spec message or spread over several."""
    tensor = np.random.default_rng(4).standard_normal(MAX_BYTES // 4 - 64).astype(np.float32).tobytes()
    smuggled = piece("a", 0.0) + field(3, field(2, tensor))
    assert len(smuggled) <= MAX_BYTES and classify_bytes(smuggled) == UNRECOGNISED
    at_cap = sentencepiece_model(WORDS, charsmap=bytes(MAX_SPECS - 4096))
    assert is_sentencepiece_model(at_cap)
    half = field(2, RAW[:1] * (MAX_SPECS // 2))
    assert not is_sentencepiece_model(piece("a", 0.0) + field(4, half) + field(5, half))

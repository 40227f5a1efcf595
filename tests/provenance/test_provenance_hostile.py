"""Hostile inputs to the provenance parsers: typed errors, nothing else (no zoo needed)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from tests.support.models import tiny_llama_file
from weightwarden.errors import FormatError, HeaderError, TruncatedError, UnsupportedModelError, WardenError
from weightwarden.provenance import Signature, compare, extract_signature


@pytest.fixture(scope="module")
def sig_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return extract_signature(tiny_llama_file(tmp_path_factory.mktemp("t") / "m.safetensors")).to_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_signatures_raise_format_error(sig_bytes: bytes, data: st.DataObject) -> None:
    raw = bytearray(sig_bytes)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        sig = Signature.from_bytes(bytes(raw[:cut]))
    except FormatError:
        return
    # a mutation that still parses must still be a coherent signature
    assert all(b.in_vecs.shape == b.out_vecs.shape for b in sig.blocks)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_are_not_signatures(raw: bytes) -> None:
    with pytest.raises(FormatError):
        Signature.from_bytes(raw)


def test_truncated_and_hostile_checkpoints(tmp_path: Path) -> None:
    good = tiny_llama_file(tmp_path / "good.safetensors")
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(HeaderError):
        compare(tmp_path / "trunc.safetensors", good)
    (tmp_path / "short.safetensors").write_bytes(data[:5])
    with pytest.raises(TruncatedError):
        compare(tmp_path / "short.safetensors", good)
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(HeaderError):
        compare(tmp_path / "huge.safetensors", good)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsupportedModelError):
        compare(tmp_path / "empty", good)
    # mismatched shapes under recognised names are refused, never guessed
    rng = np.random.default_rng(0)
    save_file({"model.layers.0.mlp.gate_proj.weight": rng.standard_normal((8, 4)).astype(np.float32),
               "model.layers.0.mlp.down_proj.weight": rng.standard_normal((5, 8)).astype(np.float32)},
              str(tmp_path / "bad.safetensors"))  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="do not form an MLP"):
        extract_signature(tmp_path / "bad.safetensors")


def test_self_and_random_models_without_training(tmp_path: Path) -> None:
    """Untrained random models: the purest null, and an identical copy: the purest alternative."""
    a = tiny_llama_file(tmp_path / "a.safetensors", seed=1, d=32, ff=128, layers=3, vocab=256)
    ps = []
    for s in range(2, 12):
        b = tiny_llama_file(tmp_path / f"b{s}.safetensors", seed=s, d=32, ff=128, layers=3, vocab=256)
        c = compare(b, a)
        assert not c.derived
        ps.append(c.p_value)
    assert min(ps) > 1e-4
    assert compare(a, a).log_p < -1000
    assert issubclass(FormatError, WardenError)

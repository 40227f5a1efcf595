"""Hostile headers and random bytes: typed errors only, nothing written."""

from __future__ import annotations

import contextlib
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from safetensors.numpy import save_file

import weightwarden as ww
from weightwarden.errors import HeaderError, UnsupportedModelError, WardenError
from weightwarden.sealed import SealedFile
from weightwarden.sealed import format as F


def _st_bytes(header: object, data: bytes = b"", raw: bytes | None = None) -> bytes:
    h = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


HOSTILE = {
    "huge_length": struct.pack("<Q", 2**63) + b"{}",
    "length_past_eof": struct.pack("<Q", 1000) + b"{}",
    "bad_json": _st_bytes(None, raw=b"{not json}"),
    "deep_nesting": _st_bytes(None, raw=b"[" * 100_000 + b"]" * 100_000),
    "duplicate_key": _st_bytes(
        None,
        raw=b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
    )
    + b"x",
    "overlap": _st_bytes(
        {
            "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
            "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
        },
        b"x" * 6,
    ),
    "out_of_range": _st_bytes({"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}, b"x" * 4),
    "gap": _st_bytes({"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, b"x" * 4),
    "shape_mismatch": _st_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}, b"x" * 4),
    "unknown_dtype": _st_bytes({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"x"),
    "negative_dim": _st_bytes({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}),
    "huge_dims": _st_bytes({"a": {"dtype": "U8", "shape": [2**40, 2**40], "data_offsets": [0, 1]}}, b"x"),
    "bool_offsets": _st_bytes({"a": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, b"x"),
    "extra_field": _st_bytes({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": 1}}, b"x"),
    "metadata_not_str": _st_bytes({"__metadata__": {"a": 1}}),
    "nan_constant": _st_bytes(None, raw=b'{"__metadata__":{"a":NaN}}'),
    "not_object": _st_bytes([1, 2, 3]),
    "too_short": b"\x01\x00",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_safetensors_input(tmp_path, keyring, case):
    src = tmp_path / "evil.safetensors"
    src.write_bytes(HOSTILE[case])
    with pytest.raises(UnsupportedModelError):
        ww.seal(src, tmp_path / "out.wws", keyring=keyring)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.safetensors", "home"]


@given(st.binary(max_size=600))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_bytes_never_crash_the_parser(tmp_path, blob):
    p = tmp_path / "r.wws"
    p.write_bytes(F.MAGIC + blob if blob[:1] == b"\x00" else blob)
    with contextlib.suppress(WardenError):
        SealedFile(p).close()


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_tensor_headers_are_typed_errors(raw):
    with contextlib.suppress(HeaderError):
        F.parse_tensor_header(raw, 64)


def _mutations():
    return st.lists(st.tuples(st.integers(min_value=0), st.integers(1, 255)), min_size=1, max_size=4)


@given(_mutations())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_mutated_sealed_files_fail_closed(tmp_path_factory, muts):
    tmp = tmp_path_factory.mktemp("m")
    kr = _shared_keyring(tmp_path_factory)
    src = tmp / "s.safetensors"
    save_file({"w": np.arange(3000, dtype=np.float32)}, str(src))
    out = tmp / "s.wws"
    ww.seal(src, out, keyring=kr, chunk_size=4096)
    good = out.read_bytes()
    b = bytearray(good)
    with SealedFile(out) as sf:
        lo, hi = F.PREAMBLE_LEN + sf.layout.slot_size, F.PREAMBLE_LEN + 2 * sf.layout.slot_size
    for pos, x in muts:
        b[pos % len(b)] ^= x
    out.write_bytes(b)
    if b[:lo] == good[:lo] and b[hi:] == good[hi:]:
        return  # only the spare key-slot area changed (or the changes cancelled out)
    with pytest.raises(WardenError):
        ww.load(out, keyring=kr)


_KR: dict[str, ww.Keyring] = {}


def _shared_keyring(factory) -> ww.Keyring:
    if "k" not in _KR:
        from tests.support.cli import PASSPHRASE, TEST_KDF

        _KR["k"] = ww.Keyring.create(factory.mktemp("kr"), PASSPHRASE, kdf=TEST_KDF)
    return _KR["k"]


_DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.bool_]


@st.composite
def tensor_dicts(draw):
    n = draw(st.integers(1, 5))
    out = {}
    for i in range(n):
        dt = draw(st.sampled_from(_DTYPES))
        shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=3))
        out[f"t{i}.{draw(st.text('abc_', max_size=5))}"] = draw(arrays(dt, tuple(shape)))
    return out


@given(tensor_dicts(), st.sampled_from([4096, 8192]), st.booleans())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_roundtrip_property(tmp_path_factory, tensors, chunk, hide):
    tmp = tmp_path_factory.mktemp("p")
    kr = _shared_keyring(tmp_path_factory)
    src = tmp / "x.safetensors"
    save_file(tensors, str(src))
    ww.seal(src, tmp / "x.wws", keyring=kr, chunk_size=chunk, hide_header=hide)
    got = ww.load(tmp / "x.wws", keyring=kr)
    assert sorted(got) == sorted(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].tobytes() == v.tobytes()
    with ww.safe_open(tmp / "x.wws", keyring=kr) as f:
        for k, v in tensors.items():
            assert f.get_tensor(k).tobytes() == v.tobytes()

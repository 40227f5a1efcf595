from __future__ import annotations

import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import weightwarden as ww
from tests.support.models import assert_same, sharded_model_dir
from weightwarden.errors import OutputExistsError, UnsupportedModelError


@pytest.mark.parametrize("hide", [False, True])
@pytest.mark.parametrize("chunk", [4096, 1 << 20])
def test_seal_load_roundtrip(tmp_path, st_file, tensors, keyring, hide, chunk):
    out = tmp_path / "m.wws"
    [res] = ww.seal(st_file, out, keyring=keyring, hide_header=hide, chunk_size=chunk)
    assert res.kind == "safetensors" and res.hidden is hide
    assert_same(ww.load(out, keyring=keyring), tensors)
    assert_same(ww.load(out, keyring=keyring, check_digests=False), tensors)
    with ww.safe_open(out, keyring=keyring) as f:
        assert f.keys() == sorted(tensors)
        assert f.metadata() == {"format": "np", "owner": "lab"}
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape and got.tobytes() == t.tobytes()


def test_ciphertext_hides_plaintext(tmp_path, st_file, keyring):
    out = tmp_path / "m.wws"
    ww.seal(st_file, out, keyring=keyring, hide_header=True)
    blob = out.read_bytes()
    data = st_file.read_bytes()
    # No 32-byte window of the tensor data survives in the sealed file, and no tensor name.
    hdr_len = int.from_bytes(data[:8], "little")
    body = data[8 + hdr_len :]
    for i in range(0, len(body) - 32, 257):
        assert body[i : i + 32] not in blob
    assert b"layer.0.w" not in blob and b"embed" not in blob


def test_visible_header_is_inspectable_without_key(tmp_path, st_file, keyring, tensors):
    out = tmp_path / "m.wws"
    ww.seal(st_file, out, keyring=keyring)
    info = ww.inspect(out)
    assert info["name"] == "model.safetensors"
    assert info["tensors"]["layer.0.w"] == {"dtype": "F32", "shape": [64, 48], "nbytes": 64 * 48 * 4}
    assert info["header_hidden"] is False
    out2 = tmp_path / "h.wws"
    ww.seal(st_file, out2, keyring=keyring, hide_header=True)
    info2 = ww.inspect(out2)
    assert info2["header_hidden"] is True and "tensors" not in info2 and "name" not in info2


def test_plain_safetensors_refuses_sealed_file(tmp_path, st_file, keyring):
    out = tmp_path / "m.wws"
    ww.seal(st_file, out, keyring=keyring)
    from safetensors import SafetensorError

    with pytest.raises(SafetensorError, match="header too large"):
        load_file(str(out))
    copy = tmp_path / "m.safetensors"
    copy.write_bytes(out.read_bytes())
    with pytest.raises(SafetensorError):
        load_file(str(copy))


def test_unseal_is_byte_identical_and_refuses_overwrite(tmp_path, st_file, keyring):
    out = tmp_path / "m.wws"
    ww.seal(st_file, out, keyring=keyring, hide_header=True)
    plain = tmp_path / "plain.safetensors"
    ww.unseal(out, plain, keyring=keyring)
    assert plain.read_bytes() == st_file.read_bytes()
    assert oct(plain.stat().st_mode & 0o777) == "0o600"
    plain.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError):
        ww.unseal(out, plain, keyring=keyring)
    assert plain.read_bytes() == b"keep me"
    ww.unseal(out, plain, keyring=keyring, force=True)
    assert plain.read_bytes() == st_file.read_bytes()


def test_seal_refuses_overwrite(tmp_path, st_file, keyring):
    out = tmp_path / "m.wws"
    out.write_bytes(b"x")
    with pytest.raises(OutputExistsError):
        ww.seal(st_file, out, keyring=keyring)
    assert out.read_bytes() == b"x"


@pytest.mark.parametrize("n", [0, 1, 4095, 4096, 4097, 3 * 4096])
def test_blob_sizes_around_chunk_boundaries(tmp_path, keyring, n):
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(n))
    out = tmp_path / "blob.wws"
    [res] = ww.seal(src, out, keyring=keyring, chunk_size=4096)
    assert res.kind == "blob" and res.n_chunks == max(1, -(-n // 4096))
    ww.verify(out, keyring=keyring, deep=True)
    back = tmp_path / "back.bin"
    ww.unseal(out, back, keyring=keyring)
    assert back.read_bytes() == src.read_bytes()


def test_empty_safetensors(tmp_path, keyring):
    src = tmp_path / "e.safetensors"
    save_file({"z": np.zeros((0,), np.float32)}, str(src))
    out = tmp_path / "e.wws"
    ww.seal(src, out, keyring=keyring)
    got = ww.load(out, keyring=keyring)
    assert got["z"].shape == (0,)


def test_invalid_safetensors_input_is_rejected(tmp_path, keyring):
    src = tmp_path / "bad.safetensors"
    src.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json......}")
    with pytest.raises(UnsupportedModelError):
        ww.seal(src, tmp_path / "bad.wws", keyring=keyring)
    assert not (tmp_path / "bad.wws").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ww-tmp")] == []


@pytest.mark.parametrize("hide", [False, True])
def test_sharded_model_directory(tmp_path, tensors, keyring, hide):
    d = sharded_model_dir(tmp_path, tensors)
    out = tmp_path / "sealed"
    ww.seal(d, out, keyring=keyring, hide_header=hide)
    rep = ww.verify(out, keyring=keyring, deep=True)
    assert rep.files == 5
    assert_same(ww.load(out, keyring=keyring), tensors)
    with ww.safe_open(out, keyring=keyring) as b:
        assert b.files() == sorted(
            ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "tokenizer/vocab.txt"]
        )  # fmt: skip
        assert b.read_file("config.json") == (d / "config.json").read_bytes()
        assert b.get_tensor("layer.0.w").tobytes() == tensors["layer.0.w"].tobytes()
    back = tmp_path / "back"
    ww.unseal(out, back, keyring=keyring)
    for p in d.rglob("*"):
        if p.is_file():
            assert (back / p.relative_to(d)).read_bytes() == p.read_bytes()
    if hide:
        assert not any(b"vocab" in p.name.encode() for p in out.iterdir())


def test_safetensors_written_by_us_loads_in_safetensors(tmp_path, st_file, keyring, tensors):
    out = tmp_path / "m.wws"
    ww.seal(st_file, out, keyring=keyring)
    plain = tmp_path / "p.safetensors"
    ww.unseal(out, plain, keyring=keyring)
    got = load_file(str(plain))
    assert got["layer.0.w"].tobytes() == tensors["layer.0.w"].tobytes()

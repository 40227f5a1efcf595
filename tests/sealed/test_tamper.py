"""Bad input: every single-byte change, truncation, reordering, wrong keys and signers."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

import weightwarden as ww
from weightwarden.errors import (
    DecryptionError,
    FormatError,
    IntegrityError,
    SignatureError,
    TruncatedError,
    UnsupportedVersionError,
    UntrustedSignerError,
    WardenError,
    WrongKeyError,
)
from weightwarden.sealed import SealedFile
from weightwarden.sealed import format as F

CHUNK = 4096


@pytest.fixture
def small(tmp_path, keyring):
    src = tmp_path / "s.safetensors"
    rng = np.random.default_rng(1)
    save_file({"a": rng.standard_normal(3000).astype(np.float32), "b": np.arange(9, dtype=np.int16)}, str(src))
    out = tmp_path / "s.wws"
    ww.seal(src, out, keyring=keyring, chunk_size=CHUNK)
    return out


def _layout(path):
    with SealedFile(path) as sf:
        return sf.layout


def _load_ok(path, keyring) -> bool:
    try:
        ww.load(path, keyring=keyring)
        return True
    except WardenError:
        return False


@pytest.mark.parametrize("hide", [False, True])
def test_every_kind_of_byte_flip_is_caught(tmp_path, keyring, hide):
    src = tmp_path / "t.safetensors"
    # 1,100 weights: one full 4 KiB chunk and a partial last one, so every kind of byte is there
    save_file({"w": np.random.default_rng(2).standard_normal(1100).astype(np.float32)}, str(src))
    out = tmp_path / "t.wws"
    ww.seal(src, out, keyring=keyring, chunk_size=CHUNK, hide_header=hide)
    assert _layout(out).n_chunks == 2
    good = out.read_bytes()
    ref = ww.load(out, keyring=keyring)["w"].tobytes()
    lay = _layout(out)
    inactive = range(F.PREAMBLE_LEN + lay.slot_size, F.PREAMBLE_LEN + 2 * lay.slot_size)
    slots = range(F.PREAMBLE_LEN, F.PREAMBLE_LEN + 2 * lay.slot_size)
    # Every byte of the preamble, key slots, context, header, GCM tags, digests and signature; inside a
    # chunk's ciphertext body (uniform AES-GCM output, each of its bytes covered by the same tag) every
    # 7th byte, its first and its last: the same kinds of byte at a third of the cost (each load and
    # verify appends to the trail).
    bodies = set()
    for i in range(lay.n_chunks):
        a = lay.chunk_off(i)
        n = lay.chunk_plain_len(i)
        bodies.update(p for p in range(a + 1, a + n - 1) if (p - a) % 7)
    bodies.update(p for p in inactive if (p - inactive.start) % 7)  # the spare slot: likewise one byte in 7
    bad = tmp_path / "bad.wws"
    for pos in range(len(good)):
        if pos in bodies:
            continue
        mutated = bytearray(good)
        mutated[pos] ^= 0x01 << (pos % 8)
        bad.write_bytes(mutated)
        if pos in inactive:
            # The spare key-slot area carries no information (it is where a rewrap writes next).
            assert ww.load(bad, keyring=keyring)["w"].tobytes() == ref
            continue
        assert not _load_ok(bad, keyring), f"flip at {pos} went unnoticed by load"
        if pos not in slots:  # key slots sit outside the signature so keys can be re-wrapped
            with pytest.raises(WardenError):
                ww.verify(bad, keyring=keyring)


def test_truncation_and_extension(tmp_path, small, keyring):
    good = small.read_bytes()
    bad = tmp_path / "bad.wws"
    for n in sorted({0, 1, 7, 31, 32, 100, 2100, len(good) // 2, len(good) - 64, len(good) - 1}):
        bad.write_bytes(good[:n])
        with pytest.raises((TruncatedError, FormatError)):
            ww.verify(bad, keyring=keyring)
        with pytest.raises((TruncatedError, FormatError)):
            ww.load(bad, keyring=keyring)
    bad.write_bytes(good + b"\x00")
    with pytest.raises(FormatError):
        ww.load(bad, keyring=keyring)


def _swap_chunks(path, out, i, j, *, fix_digests: bool, dup: bool = False):
    """Reorder (or duplicate) two full ciphertext chunks, optionally also moving their digests."""
    lay = _layout(path)
    b = bytearray(path.read_bytes())
    size = CHUNK + F.TAG_LEN
    ci = bytes(b[lay.chunk_off(i) : lay.chunk_off(i) + size])
    cj = bytes(b[lay.chunk_off(j) : lay.chunk_off(j) + size])
    b[lay.chunk_off(i) : lay.chunk_off(i) + size] = cj
    if not dup:
        b[lay.chunk_off(j) : lay.chunk_off(j) + size] = ci
    if fix_digests:
        di = bytes(b[lay.digests_off + 32 * i : lay.digests_off + 32 * (i + 1)])
        dj = bytes(b[lay.digests_off + 32 * j : lay.digests_off + 32 * (j + 1)])
        b[lay.digests_off + 32 * i : lay.digests_off + 32 * (i + 1)] = dj
        if not dup:
            b[lay.digests_off + 32 * j : lay.digests_off + 32 * (j + 1)] = di
    out.write_bytes(b)


def test_reordered_and_duplicated_chunks(tmp_path, small, keyring):
    bad = tmp_path / "bad.wws"
    _swap_chunks(small, bad, 0, 1, fix_digests=False)
    with pytest.raises(IntegrityError):
        ww.verify(bad, keyring=keyring)
    # Even with the digest list reordered too (signature then fails), the AEAD catches the reorder.
    _swap_chunks(small, bad, 0, 1, fix_digests=True)
    with pytest.raises(SignatureError):
        ww.verify(bad, keyring=keyring)
    sf = SealedFile(bad)
    reader = sf.unlock([keyring.provider()])
    with pytest.raises(DecryptionError):
        reader.read_all(check_digests=False)
    sf.close()
    _swap_chunks(small, bad, 0, 1, fix_digests=False, dup=True)
    with pytest.raises(DecryptionError):
        ww.load(bad, keyring=keyring, check_digests=False)


def test_last_chunk_flag_is_bound(tmp_path, small, keyring):
    with SealedFile(small) as sf:
        r = sf.unlock([keyring.provider()])
        n = sf.context.n_chunks
        aead, aad = r._aead, r._aad
        last = bytes(sf._chunk_ct(n - 1))
        first = bytes(sf._chunk_ct(0))
        aead.decrypt(F.nonce(F.DOM_DATA, n - 1, True), last, aad)
        aead.decrypt(F.nonce(F.DOM_DATA, 0, False), first, aad)
        from cryptography.exceptions import InvalidTag

        with pytest.raises(InvalidTag):  # a truncated stream's new "last" chunk was not sealed as last
            aead.decrypt(F.nonce(F.DOM_DATA, 0, True), first, aad)
        with pytest.raises(InvalidTag):
            aead.decrypt(F.nonce(F.DOM_DATA, n - 1, False), last, aad)


def test_wrong_key(small, keyring, other_keyring):
    with pytest.raises(WrongKeyError):
        ww.load(small, providers=[other_keyring.provider()], trust=[keyring.public_key()])


def test_untrusted_signer(small, other_keyring, keyring):
    with pytest.raises(UntrustedSignerError):
        ww.verify(small, keyring=other_keyring)
    with pytest.raises(UntrustedSignerError):
        ww.load(small, keyring=other_keyring)
    # trusting explicitly by public key works
    ww.verify(small, trust=[keyring.public_key()])


def test_signature_forged_by_other_key(tmp_path, small, other_keyring, keyring):
    """Replace the signature block with a valid signature by another key: untrusted."""
    lay = _layout(small)
    b = small.read_bytes()
    sf = SealedFile(small)
    msg = F.signed_message(sf.preamble, sf.context.sha256, bytes(sf.digests))
    sf.close()
    signer = other_keyring.signer()
    block = F.canon(
        {"alg": "ed25519", "key_id": signer.key_id, "public_key": ww.keys.provider.b64e(signer.public_key),
         "purpose": signer.purpose, "signature": ww.keys.provider.b64e(signer.sign(msg))}
    )  # fmt: skip
    bad = tmp_path / "forged.wws"
    bad.write_bytes(b[: lay.sig_off] + struct.pack("<I", len(block)) + block)
    with pytest.raises(UntrustedSignerError):
        ww.verify(bad, keyring=keyring)
    ww.verify(bad, keyring=other_keyring)  # consistent, but only for whoever trusts that key...
    with pytest.raises(WrongKeyError):  # ...who still cannot decrypt
        ww.load(bad, keyring=other_keyring)


def test_unknown_version(tmp_path, small, keyring):
    b = bytearray(small.read_bytes())
    b[8:10] = (2).to_bytes(2, "little")
    bad = tmp_path / "v2.wws"
    bad.write_bytes(b)
    with pytest.raises(UnsupportedVersionError):
        ww.verify(bad, keyring=keyring)
    ctx = F.parse_context(SealedFile(small).context.raw)
    raw = ctx.raw.replace(b'"aead":"AES-256-GCM-STREAM-1"', b'"aead":"CHACHA20-POLY1305-X1"')
    with pytest.raises(UnsupportedVersionError):
        F.parse_context(raw)
    with pytest.raises(UnsupportedVersionError):
        F.parse_context(ctx.raw.replace(b'"version":1', b'"version":9'))


def test_not_a_sealed_file(tmp_path, keyring, st_file):
    with pytest.raises(FormatError):
        ww.verify(st_file, keyring=keyring)
    with pytest.raises(FormatError):
        ww.inspect(st_file)


def test_bundle_member_swap_drop_and_extra(tmp_path, keyring, tensors):
    from tests.support.models import sharded_model_dir

    d = sharded_model_dir(tmp_path, tensors)
    a, b = tmp_path / "a", tmp_path / "b"
    ww.seal(d, a, keyring=keyring)
    ww.seal(d, b, keyring=keyring)
    # a member from another bundle of the same model
    (a / "config.json.wws").write_bytes((b / "config.json.wws").read_bytes())
    with pytest.raises(IntegrityError):
        ww.verify(a, keyring=keyring)
    ww.seal(d, a, keyring=keyring, force=True)
    (a / "config.json.wws").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        ww.verify(a, keyring=keyring)
    ww.seal(d, a, keyring=keyring, force=True)
    (a / "extra.wws").write_bytes(b"x")
    with pytest.raises(IntegrityError):
        ww.verify(a, keyring=keyring)


def test_hostile_member_path_is_refused(tmp_path, keyring):
    """A sealer's member name like ../../x must never make `open` write outside its target."""
    d = tmp_path / "evil"
    d.mkdir()
    (d / "f.txt").write_text("x")
    out = tmp_path / "sealed"
    from weightwarden.sealed import bundle as B

    orig = B.seal_file

    def evil(*a, **kw):
        kw["name"] = "../../escaped.txt"
        return orig(*a, **kw)

    B.seal_file = evil
    try:
        ww.seal(d, out, keyring=keyring)
    finally:
        B.seal_file = orig
    with pytest.raises(FormatError):
        ww.unseal(out, tmp_path / "back", keyring=keyring)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "back").exists()


def test_a_trust_check_needs_something_to_trust(small, keyring):
    """No ``None`` meaning "skip the trust check": the keyless, trustless check has its own name."""
    from weightwarden.sealed import is_sealed, is_sealed_path

    assert is_sealed(small) and is_sealed_path(small)
    with SealedFile(small) as sf:
        assert sf.check_self_consistent() == sf.signer_id == sf.check_signature(keyring.trust)
        with pytest.raises(UntrustedSignerError, match="check_self_consistent"):
            sf.check_signature(None)  # type: ignore[arg-type]


def test_the_codec_writes_what_the_parser_reads_for_every_dtype(tmp_path):
    import ml_dtypes

    from weightwarden.sealed import is_bundle, is_sealed
    from weightwarden.sealed.codec import DTYPES, iter_parts, np_dtype, st_dtype

    rng = np.random.default_rng(3)
    tensors = {n: rng.integers(0, 100, size=(3, 5)).astype(np_dtype(n)) for n in DTYPES}
    assert st_dtype(np.dtype(ml_dtypes.bfloat16)) == "BF16" and st_dtype(np.dtype(np.complex64)) is None
    raw = b"".join(bytes(memoryview(p).cast("B")) for p in iter_parts(tensors, {"k": "v"}))
    n = F.read_safetensors_prefix(raw[:8], len(raw))
    infos, meta = F.parse_tensor_header(raw[8 : 8 + n], len(raw) - 8 - n)
    assert meta == {"k": "v"} and set(infos) == set(DTYPES)
    for name, info in infos.items():
        got = np.frombuffer(raw, dtype=np_dtype(info.dtype), count=15, offset=8 + n + info.start).reshape(3, 5)
        assert info.dtype == name and np.array_equal(got.view(np.uint8), tensors[name].view(np.uint8))
    (tmp_path / "p.safetensors").write_bytes(raw)
    assert not is_sealed(tmp_path / "p.safetensors") and not is_sealed(tmp_path) and not is_bundle(tmp_path)

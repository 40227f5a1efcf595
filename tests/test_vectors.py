"""The committed sealed-format v1 vectors keep decrypting and failing exactly as specified; the chip-layout-2
vectors pin the fingerprint layout."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

import weightwarden as ww
from weightwarden import errors
from weightwarden.keys.local import StaticKeyProvider

HERE = Path(__file__).parent / "vectors"
DOC = json.loads((HERE / "vectors.json").read_text())
PROVIDER = StaticKeyProvider({(DOC["kek_id"], 1): bytes.fromhex(DOC["kek_hex"])})
TRUST = [base64.b64decode(DOC["signer_public_key"])]


@pytest.mark.parametrize("name", sorted(DOC["cases"]))
def test_vector(tmp_path, name):
    case = DOC["cases"][name]
    path = HERE / name
    if case["expect"] == "ok":
        ww.verify(path, trust=TRUST, deep=True, providers=[PROVIDER])
        got = ww.load(path, providers=[PROVIDER], trust=TRUST)
        assert {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in got.items()} == DOC["tensors_sha256"]
        out = tmp_path / "plain.safetensors"
        ww.unseal(path, out, providers=[PROVIDER], trust=TRUST)
        assert hashlib.sha256(out.read_bytes()).hexdigest() == case["plaintext_sha256"]
    else:
        err = getattr(errors, case["expect"])
        with pytest.raises(err):
            ww.verify(path, trust=TRUST)
        with pytest.raises(err):
            ww.load(path, providers=[PROVIDER], trust=TRUST)


def test_vectors_reject_other_signers():
    with pytest.raises(errors.UntrustedSignerError):
        ww.verify(HERE / "v1-visible.wws", trust=[b"\x01" * 32])


CHIPS = json.loads((HERE / "chips-v2.json").read_text())


@pytest.mark.parametrize("kernel", ["numpy", "numba"])
@pytest.mark.parametrize("case", CHIPS["cases"], ids=lambda c: f"ell{c['ell']}")
def test_chip_layout_2_vectors(case: dict, kernel: str) -> None:
    """The package's chip keystream, symbols, signs and both embedding kernels against vectors written
    from docs/TRACING.md's text in plain Python (tests/vectors/make_chip_vectors.py)."""
    import ml_dtypes
    import numpy as np

    from weightwarden.trace import _kernel
    from weightwarden.trace.mark import _chips, _keystream_chunks, _tensor_key

    if kernel == "numba" and _kernel.KERNEL != "numba":
        pytest.skip("numba (the `fast` extra) is not installed: the fused kernel is not in use")
    key, name, n, ell = bytes.fromhex(CHIPS["embedding_key"]), case["name"], case["n"], case["ell"]
    assert _tensor_key(key, name).hex() == case["tensor_key"]
    sym, sign = _chips(key, name, n, ell)
    assert sym.tolist() == case["symbols"]
    assert "".join("+" if s > 0 else "-" for s in sign) == case["signs"]
    ((_, _, words),) = list(_keystream_chunks(_tensor_key(key, name), 0, n))
    tab = _kernel.chip_table(np.array([c == "1" for c in case["codeword"]]),
                             np.array(case["table_value"], np.uint32).view(np.float32))  # fmt: skip
    thr = float(np.array(case["threshold"], np.uint32).view(np.float32))
    w = np.array(case["weights_f32"], np.uint32).view(np.float32)
    out = np.empty_like(w)
    _kernel.embed_chunk(w, words, tab, ell, thr, out, kernel=kernel)
    assert out.view(np.uint32).tolist() == case["marked_f32"]
    wb = (np.array(case["weights_f32"], np.uint32) >> 16).astype(np.uint16).view(ml_dtypes.bfloat16)
    outb = np.empty_like(wb)
    _kernel.embed_chunk(wb, words, tab, ell, thr, outb, kernel=kernel)
    assert outb.view(np.uint16).tolist() == case["marked_bf16"]


AGE = json.loads((HERE / "age-slot.json").read_text())


def test_recipient_key_slot_vector() -> None:
    """The AGE-X25519-V1 key slot (docs/FORMAT.md §1.2.1), written from the age and FORMAT specs in
    tests/vectors/make_age_slot_vectors.py: rebuilt byte for byte, opened by pyrage (an independent age
    implementation), unwrapped by the package for its file id only."""
    import importlib.util

    import pyrage

    from weightwarden.keys.age import AgeIdentityProvider
    from weightwarden.keys.provider import KeySlot, wrap_aad

    spec = importlib.util.spec_from_file_location("make_age_slot_vectors", HERE / "make_age_slot_vectors.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.build() == AGE
    slot = KeySlot.from_json(AGE["slot"])
    file_id, dek = bytes.fromhex(AGE["file_id"]), bytes.fromhex(AGE["dek"])
    ident = pyrage.x25519.Identity.from_str(AGE["identity"])
    assert str(ident.to_public()) == AGE["recipient"] == slot.key_id
    assert pyrage.decrypt(slot.wrapped, [ident]) == wrap_aad("age", slot.key_id, 1, file_id) + dek
    idp = AgeIdentityProvider(AGE["identity"])
    assert bytes(idp.unwrap(slot, file_id)) == dek
    with pytest.raises(errors.WrongKeyError):
        idp.unwrap(slot, bytes(16))  # bound to its file
    with pytest.raises(errors.WrongKeyError):
        AgeIdentityProvider(str(pyrage.x25519.Identity.generate())).unwrap(slot, file_id)

"""The committed sealed-format vectors keep decrypting and failing exactly as specified (``v1-*``: written
before signatures carried a purpose label, accepted only from a trust entry marked ``legacy-sealing``;
``v2-*``: purpose-labelled); the chip-layout-2 vectors pin the fingerprint layout."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

import weightwarden as ww
from weightwarden import errors
from weightwarden.keys.local import StaticKeyProvider
from weightwarden.keys.truststore import TrustStore

HERE = Path(__file__).parents[1] / "vectors"
DOC = json.loads((HERE / "vectors.json").read_text())
V2 = DOC["v2"]
PROVIDER = StaticKeyProvider({(DOC["kek_id"], 1): bytes.fromhex(DOC["kek_hex"])})
V1_KEY = base64.b64decode(DOC["signer_public_key"])
V2_KEY = base64.b64decode(V2["signer_public_key"])


def _legacy_trust() -> TrustStore:
    ts = TrustStore()
    ts.add(V1_KEY, "pre-purpose sealing key", purpose="legacy-sealing")
    return ts


def _check(tmp_path: Path, path: Path, case: dict, trust, tensors: dict) -> None:
    if case["expect"] == "ok":
        ww.verify(path, trust=trust, deep=True, providers=[PROVIDER])
        got = ww.load(path, providers=[PROVIDER], trust=trust)
        assert {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in got.items()} == tensors
        out = tmp_path / "plain.safetensors"
        ww.unseal(path, out, providers=[PROVIDER], trust=trust)
        assert hashlib.sha256(out.read_bytes()).hexdigest() == case["plaintext_sha256"]
    else:
        err = getattr(errors, case["expect"])
        with pytest.raises(err):
            ww.verify(path, trust=trust)
        with pytest.raises(err):
            ww.load(path, providers=[PROVIDER], trust=trust)


@pytest.mark.parametrize("name", sorted(DOC["cases"]))
def test_v1_vector_with_a_legacy_trust_entry(tmp_path, name):
    _check(tmp_path, HERE / name, DOC["cases"][name], _legacy_trust(), DOC["tensors_sha256"])


@pytest.mark.parametrize("name", sorted(V2["cases"]))
def test_v2_vector(tmp_path, name):
    _check(tmp_path, HERE / name, V2["cases"][name], [V2_KEY], V2["tensors_sha256"])


def test_vectors_reject_other_signers():
    with pytest.raises(errors.UntrustedSignerError):
        ww.verify(HERE / "v1-visible.wws", trust=[b"\x01" * 32])
    with pytest.raises(errors.UntrustedSignerError):
        ww.verify(HERE / "v2-visible.wws", trust=[b"\x01" * 32])


def test_v1_vector_needs_an_entry_marked_legacy():
    """A v1 signature has no purpose label: neither a plain sealing entry nor a bare key vouches for it."""
    plain = TrustStore()
    plain.add(V1_KEY, "sealing key", purpose="sealing")
    for trust in (plain, [V1_KEY]):
        with pytest.raises(errors.KeyPurposeError, match="legacy-sealing"):
            ww.verify(HERE / "v1-visible.wws", trust=trust)
    ww.verify(HERE / "v1-visible.wws", trust=_legacy_trust())


@pytest.mark.parametrize("purpose", ["audit-log", "export-rules"])
def test_v2_vector_from_a_key_trusted_for_another_purpose(purpose):
    ts = TrustStore()
    ts.add(V2_KEY, "not a sealing key", purpose=purpose)
    with pytest.raises(errors.KeyPurposeError, match="not for sealing"):
        ww.verify(HERE / "v2-visible.wws", trust=ts)
    legacy = TrustStore()
    legacy.add(V2_KEY, "an old key, still sealing", purpose="legacy-sealing")
    ww.verify(HERE / "v2-visible.wws", trust=legacy)  # a legacy entry also takes labelled sealing signatures


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

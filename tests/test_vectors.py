"""The committed sealed-format v1 vectors keep decrypting and failing exactly as specified."""

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

"""Regenerate the sealed-format test vectors with purpose-labelled signatures (``v2-*.wws``; run once,
the outputs are committed as data).  The ``v1-*.wws`` files are frozen: they were written before
signatures carried a purpose label (docs/FORMAT.md §1.4) and this script no longer makes them.

python tests/vectors/make_vectors.py
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from weightwarden.keys.local import StaticKeyProvider
from weightwarden.keys.provider import b64e, purpose_message
from weightwarden.keys.signer import Ed25519Signer
from weightwarden.sealed import SealedFile, seal_file
from weightwarden.sealed import format as F

HERE = Path(__file__).parent
KEK = bytes(range(32))  # a published test key: never use outside tests
KEK_ID = "kek-test-vector"


def _resign(blob: bytes, sig_off: int, block: dict[str, str]) -> bytes:
    raw = F.canon(block)
    return blob[:sig_off] + len(raw).to_bytes(4, "little") + raw


def main() -> None:
    provider = StaticKeyProvider({(KEK_ID, 1): KEK})
    signer = Ed25519Signer.generate("sealing")
    log_key = Ed25519Signer.generate("audit-log")  # a key of another purpose, for the refusals
    rng = np.random.default_rng(20261201)
    tensors = {
        "w": rng.standard_normal((33, 40)).astype(np.float32),
        "b": rng.standard_normal(40).astype(np.float16),
        "ids": np.arange(7, dtype=np.int64),
    }
    cases: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.safetensors"
        save_file(tensors, str(src), metadata={"vector": "v2"})
        plain = src.read_bytes()
        for name, hide in (("v2-visible.wws", False), ("v2-hidden.wws", True)):
            seal_file(src, HERE / name, provider=provider, signer=signer, chunk_size=4096, hide_header=hide, force=True)
            cases[name] = {"expect": "ok", "plaintext_sha256": hashlib.sha256(plain).hexdigest()}
        good = (HERE / "v2-visible.wws").read_bytes()
        with SealedFile(HERE / "v2-visible.wws") as sf:
            lay = sf.layout
            msg = F.signed_message(sf.preamble, sf.context.sha256, sf.digests)
        bad: dict[str, tuple[bytes, str]] = {}
        sig = bytearray(good)
        sig[-10] ^= 0x01
        bad["v2-bad-signature.wws"] = (bytes(sig), "SignatureError")
        pub = b64e(log_key.public_key)
        # the manifest signed by an audit-log key, block saying so
        bad["v2-audit-log-key.wws"] = (_resign(good, lay.sig_off, {
            "alg": "ed25519", "key_id": log_key.key_id, "public_key": pub, "purpose": "audit-log",
            "signature": b64e(log_key._sign(purpose_message("audit-log", msg)))}), "KeyPurposeError")  # fmt: skip
        # ... and the block claiming "sealing" over a signature made under the audit-log label
        bad["v2-audit-log-label.wws"] = (_resign(good, lay.sig_off, {
            "alg": "ed25519", "key_id": log_key.key_id, "public_key": pub, "purpose": "sealing",
            "signature": b64e(log_key._sign(purpose_message("audit-log", msg)))}), "KeyPurposeError")  # fmt: skip
        for name, (blob, err) in bad.items():
            (HERE / name).write_bytes(blob)
            cases[name] = {"expect": err}
    doc = json.loads((HERE / "vectors.json").read_text())
    doc["v2"] = {
        "comment": "signatures with a purpose label (docs/FORMAT.md §1.4); same KEK",
        "signer_public_key": b64e(signer.public_key),
        "audit_log_public_key": pub,
        "tensors_sha256": {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in tensors.items()},
        "cases": cases,
    }
    (HERE / "vectors.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

"""Regenerate the sealed-format v1 test vectors (run once; the outputs are committed as data).

python tests/vectors/make_vectors.py
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from weightwarden.keys.local import Ed25519Signer, StaticKeyProvider
from weightwarden.keys.provider import b64e
from weightwarden.sealed import SealedFile, seal_file

HERE = Path(__file__).parent
KEK = bytes(range(32))  # a published test key: never use outside tests
KEK_ID = "kek-test-vector"


def main() -> None:
    provider = StaticKeyProvider({(KEK_ID, 1): KEK})
    signer = Ed25519Signer.generate()
    rng = np.random.default_rng(20261128)
    tensors = {
        "w": rng.standard_normal((33, 40)).astype(np.float32),
        "b": rng.standard_normal(40).astype(np.float16),
        "ids": np.arange(7, dtype=np.int64),
    }
    cases: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.safetensors"
        save_file(tensors, str(src), metadata={"vector": "v1"})
        plain = src.read_bytes()
        for name, hide in (("v1-visible.wws", False), ("v1-hidden.wws", True)):
            seal_file(src, HERE / name, provider=provider, signer=signer, chunk_size=4096, hide_header=hide, force=True)
            cases[name] = {"expect": "ok", "plaintext_sha256": hashlib.sha256(plain).hexdigest()}
        good = (HERE / "v1-visible.wws").read_bytes()
        with SealedFile(HERE / "v1-visible.wws") as sf:
            lay = sf.layout
        bad: dict[str, tuple[bytes, str]] = {}
        flip = bytearray(good)
        flip[lay.data_off + 100] ^= 1
        bad["v1-bad-chunk.wws"] = (bytes(flip), "IntegrityError")
        bad["v1-truncated.wws"] = (good[: lay.digests_off - 5], "TruncatedError")
        bad["v1-bad-magic.wws"] = (b"\x00" + good[1:], "FormatError")
        v2 = bytearray(good)
        v2[8:10] = (2).to_bytes(2, "little")
        bad["v1-major-2.wws"] = (bytes(v2), "UnsupportedVersionError")
        ctx = bytearray(good)
        ctx[lay.context_off + 5] ^= 0x20
        bad["v1-bad-context.wws"] = (bytes(ctx), "FormatError")
        sig = bytearray(good)
        sig[-10] ^= 0x01
        bad["v1-bad-signature.wws"] = (bytes(sig), "SignatureError")
        for name, (blob, err) in bad.items():
            (HERE / name).write_bytes(blob)
            cases[name] = {"expect": err}
    doc = {
        "comment": "weightwarden sealed format v1 vectors; KEK is a public test key",
        "kek_id": KEK_ID,
        "kek_hex": KEK.hex(),
        "signer_public_key": b64e(signer.public_key),
        "tensors_sha256": {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in tensors.items()},
        "cases": cases,
    }
    (HERE / "vectors.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

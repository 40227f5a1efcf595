"""Regenerate the chip-layout-2 test vectors (docs/TRACING.md, "Embedding (chip layout 2)").

python tests/vectors/make_chip_vectors.py

Written from the spec's text in plain Python (integers, one weight at a time), not from the package's
code, so that the vectors pin the layout: the tests check the package's keystream, symbols, signs and
both embedding kernels against them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

HERE = Path(__file__).parent
KEY = bytes(range(100, 132))  # a published test key: never use outside tests
N = 1024 + 52  # a whole block and a partial one


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def bits_f32(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b))[0]


def chips(name: str, n: int, ell: int) -> tuple[str, list[int], str]:
    tkey = hmac.new(KEY, b"chips/2|" + name.encode(), hashlib.sha256).digest()
    blocks = -(-n // 1024)
    enc = Cipher(algorithms.AES(tkey), modes.CTR(bytes(16))).encryptor()
    stream = enc.update(bytes(4 * 64 * blocks))
    words = [int.from_bytes(stream[4 * r : 4 * r + 4], "little") for r in range(64 * blocks)]
    sym, sign = [], []
    for k in range(n):
        b, o = divmod(k, 1024)
        i, j = divmod(o, 64)  # weight 64i + j of block b: word 64b + j, bit i
        u = words[64 * b + j]
        sym.append(((u >> 16) * ell) >> 16)
        sign.append("+" if (u >> i) & 1 else "-")
    return tkey.hex(), sym, "".join(sign)


def main() -> None:
    cases = []
    for name, ell in (("model.layers.0.mlp.down_proj.weight", 4096), ("ffn.w1", 1000)):
        tkey, sym, sign = chips(name, N, ell)
        # an embedding: weights, a codeword and the table value given; float32 arithmetic per weight
        w = [f32(((k * 7919) % 2001 - 1000) / 1000) for k in range(N)]
        w[5], w[6] = 0.0, -0.0
        code = "".join("1" if (c * 2654435761) % 7 < 3 else "0" for c in range(ell))
        a, thr = f32(0.0123), f32(0.5)
        out32, outbf = [], []
        for k, x in enumerate(w):
            d = a if (code[sym[k]] == "1") == (sign[k] == "+") else -a
            y = f32(x + d) if abs(x) >= thr else x
            out32.append(f32_bits(y))
            # bfloat16: the weight is the top half of w's bits; the sum in float32, rounded to nearest even
            xb = f32_bits(x) >> 16
            xf = bits_f32(xb << 16)
            yb = f32_bits(f32(xf + d)) if abs(xf) >= thr else xb << 16
            outbf.append((yb + 0x7FFF + ((yb >> 16) & 1)) >> 16 & 0xFFFF)
        cases.append({
            "name": name, "ell": ell, "n": N, "tensor_key": tkey, "symbols": sym, "signs": sign,
            "weights_f32": [f32_bits(x) for x in w], "codeword": code, "table_value": f32_bits(a),
            "threshold": f32_bits(thr), "marked_f32": out32, "marked_bf16": outbf,
        })  # fmt: skip
    doc = {"spec": "docs/TRACING.md chip layout 2", "embedding_key": KEY.hex(), "cases": cases}
    (HERE / "chips-v2.json").write_text(json.dumps(doc, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()

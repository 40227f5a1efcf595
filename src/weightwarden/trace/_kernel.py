"""The embedding's and the extraction's inner loops (chip layout 2), fused when numba is installed.

Chip layout 2 (docs/TRACING.md): a tensor's weights, in their natural order, fall in blocks of 1024;
block b takes the 64 keystream words u_{64b} .. u_{64b+63}.  Weight 64i + j of a block (i < 16, j < 64)
belongs to word j: its symbol is the word's top 16 bits scaled to the code, ``((u >> 16) * ell) >> 16``,
and its sign is bit i of the word (set: +).  A carrier (``|w| >= thr``) becomes ``w + sign * tab[symbol]``,
where ``tab`` holds +alpha*std for a codeword bit 1 and -alpha*std for a 0; any other weight keeps its
exact bits.  Arithmetic is float32.  (So a word's 16 chips lie 64 weights apart, and the 64 words of a
block are read by a loop that runs along the weights: vectorisable, with no table look-up per weight.)

The numpy kernels are the reference and the fallback; the fused ones (the ``fast`` extra) must give the
same bytes and the same sums (tested).  bfloat16 is widened by a shift and narrowed by rounding to
nearest even, as ml_dtypes does.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from .._extras import require

__all__ = [
    "BLOCK",
    "KERNEL",
    "MAX_SYMBOLS",
    "WORDS",
    "accumulate_chunk",
    "chip_signs",
    "chip_symbols",
    "chip_table",
    "embed_chunk",
    "word_symbols",
    "words_for",
]  # fmt: skip

BLOCK, WORDS, BITS = 1024, 64, 16  # weights per block, keystream words per block, chips per word
_GROUP = 16  # blocks whose words the fused embedding prepares at a time
MAX_SYMBOLS = 1 << 16  # a word's symbol is scaled from its top 16 bits
_BF16 = np.dtype(ml_dtypes.bfloat16)
_LANES = np.arange(BITS, dtype=np.uint32)


def chip_table(bits: np.ndarray, alpha_std: float) -> np.ndarray:
    """float32 [ell]: +alpha*std for a codeword bit 1, -alpha*std for a 0 (a chip's sign multiplies it)."""
    a = np.float32(alpha_std)
    return np.where(np.asarray(bits, dtype=bool), a, -a).astype(np.float32)


def words_for(n: int) -> int:
    """Keystream words that n weights take: 64 per block of 1024, the last block counted whole."""
    return -(-n // BLOCK) * WORDS


def word_symbols(u: np.ndarray, ell: int) -> np.ndarray:
    """The symbol of each keystream word: ((u >> 16) * ell) >> 16, in [0, ell) for ell <= 65536."""
    return ((u.astype(np.uint64) >> np.uint64(16)) * np.uint64(ell) >> np.uint64(16)).astype(np.intp)


def _per_weight(per_word: np.ndarray, n: int) -> np.ndarray:
    """Spread a value per word to the weights of the word (weight 64i + j of block b: word 64b + j)."""
    nb = -(-n // BLOCK)
    w = per_word[: nb * WORDS].reshape(nb, 1, WORDS)
    return np.broadcast_to(w, (nb, BITS, WORDS)).reshape(-1)[:n]


def chip_symbols(u: np.ndarray, n: int, ell: int) -> np.ndarray:
    """intp [n]: the symbol of each of the first n weights whose words are ``u``."""
    return _per_weight(word_symbols(u, ell), n)


def chip_signs(u: np.ndarray, n: int) -> np.ndarray:
    """float32 [n]: the sign of each of the first n weights whose words are ``u`` (weight 64i + j of a
    block: bit i of its word j)."""
    nb = -(-n // BLOCK)
    bits = (u[: nb * WORDS].reshape(nb, 1, WORDS) >> _LANES[None, :, None]) & np.uint32(1)
    return np.where(bits.reshape(-1)[:n] == 1, np.float32(1.0), np.float32(-1.0))


def _numpy_chunk(w: np.ndarray, u: np.ndarray, tab: np.ndarray, ell: int, thr: float, out: np.ndarray) -> None:
    n = w.size
    nb = -(-n // BLOCK)
    words = u[: nb * WORDS].reshape(nb, 1, WORDS)
    v = tab[word_symbols(words, ell)]  # +-alpha*std per word, then signed per weight by its bit
    d = np.where((words >> _LANES[None, :, None]) & np.uint32(1) == 1, v, -v).reshape(-1)[:n]
    f = w.astype(np.float32, copy=False)
    car = np.abs(f) >= np.float32(thr)
    if out.dtype == np.float32:
        np.copyto(out, np.where(car, f + d, f))
    else:  # the others keep their exact bits
        np.copyto(out, np.where(car, (f + d).astype(out.dtype), w))


class _Fused(NamedTuple):
    embed: Callable[..., None]  # embed_chunk's arguments
    accumulate: Callable[..., None]  # accumulate_chunk's arguments, thr as float32


@functools.cache
def _fused() -> _Fused:
    """The compiled kernels, built (or loaded from numba's on-disk cache) at first use."""
    numba = require("numba", extra="fast")

    def jit(fn: Callable[..., Any]) -> Any:
        return numba.njit(fn, nogil=True, cache=True, error_model="numpy", boundscheck=False)

    @jit
    def _values(u, r0, count, tab, e, vb, nu):  # pragma: no cover - compiled
        for j in range(count):  # the bits of tab[symbol] and the inverted word, of words r0 .. r0+count-1
            x = u[r0 + j]
            vb[j] = np.float32(tab[np.intp((np.uint64(x >> np.uint32(16)) * e) >> np.uint64(16))]).view(np.uint32)
            nu[j] = ~x

    @jit
    def _f32_add(x, d, thr):  # pragma: no cover - compiled
        return x + d if abs(x) >= thr else x

    @jit
    def _bf16_add(x, d, thr):  # pragma: no cover - compiled
        # bfloat16 is the top half of a float32: widen by a shift, add in float32, narrow by rounding to
        # nearest even (as ml_dtypes does); a weight left unchanged narrows back to its own bits
        f = np.uint32(np.uint32(x) << np.uint32(16)).view(np.float32)
        y = np.float32(f + d if abs(f) >= thr else f).view(np.uint32)
        return np.uint16((y + np.uint32(0x7FFF) + ((y >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))

    # The words' values are computed for a group of 16 blocks first, then the blocks are read: the loop
    # over j has a constant trip count and no branch (a weight's signed value is tab[symbol] with its sign
    # bit flipped where the weight's bit of the word is clear), which LLVM vectorises; reading values
    # stored long before avoids store-forwarding stalls.  Whole groups run loops of constant trip count;
    # the rest runs the same arithmetic per weight.  ``add`` marks one weight (float32, or bfloat16 held
    # as uint16), inlined by LLVM.
    def _kernel_for(add: Callable[..., Any]) -> Any:
        @jit
        def kern(w, u, tab, ell, thr, out):  # pragma: no cover - compiled
            vb = np.empty(_GROUP * WORDS, np.uint32)
            nu = np.empty(_GROUP * WORDS, np.uint32)
            e = np.uint64(ell)
            n = w.size
            sign = np.uint32(0x80000000)
            full = n - n % (_GROUP * BLOCK)
            for g in range(0, full, _GROUP * BLOCK):
                _values(u, g // BITS, _GROUP * WORDS, tab, e, vb, nu)
                for blk in range(_GROUP):
                    c = blk * WORDS
                    for i in range(BITS):
                        sh = np.uint32(31 - i)
                        b = g + blk * BLOCK + i * WORDS
                        for j in range(WORDS):
                            d = np.uint32(vb[c + j] ^ ((nu[c + j] << sh) & sign)).view(np.float32)
                            out[b + j] = add(w[b + j], d, thr)
            if n > full:
                _values(u, full // BITS, -(-(n - full) // BLOCK) * WORDS, tab, e, vb, nu)
                for k in range(n - full):
                    j = (k // BLOCK) * WORDS + k % WORDS
                    sh = np.uint32(31 - (k % BLOCK) // WORDS)
                    d = np.uint32(vb[j] ^ ((nu[j] << sh) & sign)).view(np.float32)
                    out[full + k] = add(w[full + k], d, thr)

        return kern

    _k32, _kbf16 = _kernel_for(_f32_add), _kernel_for(_bf16_add)

    def run(w: np.ndarray, u: np.ndarray, tab: np.ndarray, ell: int, thr: float, out: np.ndarray) -> None:
        if w.dtype == np.float32 and out.dtype == np.float32:
            _k32(w, u, tab, ell, np.float32(thr), out)
        elif w.dtype == _BF16 and out.dtype == _BF16:
            _kbf16(w.view(np.uint16), u, tab, ell, np.float32(thr), out.view(np.uint16))
        else:  # other dtypes: widen the chunk (cache-resident), then narrow it, as the numpy kernel does
            f = w.astype(np.float32)
            tmp = np.empty(w.shape, np.float32)
            _k32(f, u, tab, ell, np.float32(thr), tmp)
            np.copyto(out, np.where(np.abs(f) >= np.float32(thr), tmp.astype(out.dtype), w))

    @jit
    def _acc(orig, sus, u, first, cols, units_first, inv, thr, ell, scale, corr, var, chips):  # pragma: no cover
        # weights in their natural order (block, then i, then j), the unit counted on from the chunk's
        # first weight; each word's sums are kept apart for the block, then added to its symbol
        e = np.uint64(ell)
        n = orig.size
        row, col = first // cols, first % cols
        cs = np.zeros(WORDS, np.float64)
        vs = np.zeros(WORDS, np.float64)
        ks = np.zeros(WORDS, np.int64)
        for a in range(0, n, BLOCK):
            r0 = a // BITS
            cs[:] = 0.0
            vs[:] = 0.0
            ks[:] = 0
            for k in range(min(BLOCK, n - a)):
                j = k % WORDS
                iv = inv[row] if units_first else inv[col]
                col += 1
                if col == cols:
                    col = 0
                    row += 1
                o = orig[a + k]
                v = sus[a + k]
                if abs(o) < thr or v == 0 or iv < 0:  # not a carrier, pruned, or an unmatched unit
                    continue
                c = (v - o) * scale * iv
                cs[j] += c if (u[r0 + j] >> np.uint32(k // WORDS)) & np.uint32(1) else -c
                vs[j] += iv
                ks[j] += 1
            for j in range(WORDS):
                s = np.intp((np.uint64(u[r0 + j] >> np.uint32(16)) * e) >> np.uint64(16))
                corr[s] += cs[j]
                var[s] += vs[j]
                chips[s] += ks[j]

    return _Fused(run, _acc)


_HAVE_NUMBA = importlib.util.find_spec("numba") is not None  # imported only when a kernel first runs
KERNEL = "numba" if _HAVE_NUMBA and os.environ.get("WEIGHTWARDEN_KERNEL", "") != "numpy" else "numpy"


def embed_chunk(w: np.ndarray, u: np.ndarray, tab: np.ndarray, ell: int, thr: float, out: np.ndarray,
                kernel: str | None = None) -> None:  # fmt: skip
    """out[:] = the marked chunk ``w`` (1-D, starting a block; ``u``: its keystream words, 64 per block)."""
    if (kernel or KERNEL) == "numba" and _HAVE_NUMBA:
        _fused().embed(w, u, tab, ell, thr, out)
    else:
        _numpy_chunk(w, u, tab, ell, thr, out)


def accumulate_chunk(orig: np.ndarray, sus: np.ndarray, u: np.ndarray, first: int, cols: int, units_first: bool,
                     inv: np.ndarray, thr: float, ell: int, scale: float, corr: np.ndarray, var: np.ndarray,
                     chips: np.ndarray, kernel: str | None = None) -> None:  # fmt: skip
    """The matched filter over one chunk (flat positions first .. first+len-1 of a tensor with ``cols``
    columns; ``first`` starts a block, ``u`` holds its words): for each carrier of the original
    (|orig| >= thr) that the suspect still has (sus != 0) in a matched unit (inv >= 0; inv is per unit,
    units are rows when ``units_first``), add (sus - orig) * scale * inv * chip sign to corr[symbol], inv
    to var[symbol] and 1 to chips[symbol]."""
    if (kernel or KERNEL) == "numba" and _HAVE_NUMBA:
        _fused().accumulate(orig, sus, u, first, cols, units_first, inv, np.float32(thr), ell,
                            float(scale), corr, var, chips)  # fmt: skip
        return
    n = orig.size
    pos = np.arange(first, first + n, dtype=np.int64)
    iv = inv[pos // cols] if units_first else inv[pos % cols]
    keep = (np.abs(orig) >= np.float32(thr)) & (sus != 0) & (iv >= 0)
    sym = chip_symbols(u, n, ell)[keep]
    ivk = iv[keep].astype(np.float64)
    d = (sus[keep] - orig[keep]).astype(np.float64) * scale * ivk * chip_signs(u, n)[keep]
    corr += np.bincount(sym, weights=d, minlength=ell)
    var += np.bincount(sym, weights=ivk, minlength=ell)
    chips += np.bincount(sym, minlength=ell)

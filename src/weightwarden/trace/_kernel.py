"""The embedding's inner loop, fused into one pass when numba is installed (the ``fast`` extra).

Both kernels compute, for one cache-sized chunk, ``out = w + tab[sym + ell * top]`` where the weight
is a carrier (``|w| >= thr``) and ``out = w`` otherwise; ``sym`` is the keystream word mod ``ell``
and ``top`` its top bit; ``tab`` holds +-alpha*std per (symbol, chip sign).  The numpy kernel is the
reference: the fused kernel must give the same bytes (tested).  Arithmetic is float32 either way.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
from collections.abc import Callable

import ml_dtypes
import numpy as np

__all__ = ["KERNEL", "accumulate_chunk", "chip_table", "embed_chunk"]

_BF16 = np.dtype(ml_dtypes.bfloat16)
_scratch = threading.local()


def chip_table(bits: np.ndarray, alpha_std: float) -> np.ndarray:
    """float32 [2 * ell]: entry sym + ell * top is +alpha*std when the chip's sign (top bit) equals the
    codeword bit of its symbol, -alpha*std when it differs."""
    b = np.asarray(bits, dtype=bool)
    a = np.float32(alpha_std)
    return np.concatenate([np.where(b, -a, a), np.where(b, a, -a)]).astype(np.float32)


def _numpy_chunk(w: np.ndarray, u: np.ndarray, tab: np.ndarray, ell: int, thr: float, out: np.ndarray) -> None:
    pow2 = ell & (ell - 1) == 0
    sym = u & np.uint32(ell - 1) if pow2 else u % np.uint32(ell)
    idx = sym + (u >> np.uint32(31)) * np.uint32(ell)
    f = w.astype(np.float32, copy=False)
    d = tab[idx]
    d[np.abs(f) < np.float32(thr)] = 0.0  # not a carrier: no change
    if out.dtype == np.float32:
        np.add(f, d, out=out)
    else:
        out[...] = (f + d).astype(out.dtype)


@functools.cache
def _fused() -> Callable[..., None]:
    """The compiled kernels, built (or loaded from numba's on-disk cache) at first use."""
    import numba

    @numba.njit(nogil=True, cache=True, error_model="numpy", boundscheck=False)
    def _k32(w, u, tab, ell, pow2, thr, out):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
        mask = np.uint32(ell - 1)
        e = np.uint32(ell)
        for i in range(w.size):
            x = u[i]
            s = (x & mask) if pow2 else (x % e)
            f = w[i]
            d = tab[np.intp(s + (x >> np.uint32(31)) * e)]
            out[i] = f + (d if abs(f) >= thr else np.float32(0.0))

    @numba.njit(nogil=True, cache=True, error_model="numpy", boundscheck=False)
    def _kbf16(w, u, tab, ell, pow2, thr, out, s32):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
        # bfloat16 is the top half of a float32: widen by a shift, add in float32, narrow by rounding to
        # nearest even (as ml_dtypes does); a weight left unchanged narrows back to its own bits
        f32 = s32.view(np.float32)
        n = w.size
        for i in range(n):
            s32[i] = np.uint32(w[i]) << np.uint32(16)
        _k32(f32[:n], u, tab, ell, pow2, thr, f32[:n])
        for i in range(n):
            x = s32[i]
            out[i] = np.uint16((x + np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))

    def run(w: np.ndarray, u: np.ndarray, tab: np.ndarray, ell: int, thr: float, out: np.ndarray) -> None:
        pow2 = ell & (ell - 1) == 0
        if w.dtype == np.float32 and out.dtype == np.float32:
            _k32(w, u, tab, ell, pow2, np.float32(thr), out)
        elif w.dtype == _BF16 and out.dtype == _BF16:
            s32 = getattr(_scratch, "s32", None)
            if s32 is None or s32.size < w.size:  # one scratch buffer per thread, reused chunk after chunk
                s32 = _scratch.s32 = np.empty(w.size, np.uint32)
            _kbf16(w.view(np.uint16), u, tab, ell, pow2, np.float32(thr), out.view(np.uint16), s32)
        else:  # other dtypes: widen the chunk (cache-resident), then narrow it, as the numpy kernel does
            tmp = np.empty(w.shape, np.float32)
            _k32(w.astype(np.float32), u, tab, ell, pow2, np.float32(thr), tmp)
            out[...] = tmp.astype(out.dtype)

    @numba.njit(nogil=True, cache=True, error_model="numpy", boundscheck=False)
    def _acc(orig, sus, u, first, cols, units_first, inv, thr, ell, pow2, scale, corr, var, chips):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
        mask = np.uint32(ell - 1)
        e = np.uint32(ell)
        for i in range(orig.size):
            o = orig[i]
            v = sus[i]
            if abs(o) < thr or v == 0:
                continue
            k = first + i
            iv = inv[k // cols] if units_first else inv[k % cols]
            if iv < 0:  # an unmatched unit
                continue
            x = u[i]
            s = (x & mask) if pow2 else (x % e)
            c = (v - o) * scale * iv
            corr[s] += c if (x >> np.uint32(31)) else -c
            var[s] += iv
            chips[s] += 1

    run.accumulate = _acc  # type: ignore[attr-defined]
    return run


_HAVE_NUMBA = importlib.util.find_spec("numba") is not None  # imported only when a kernel first runs
KERNEL = "numba" if _HAVE_NUMBA and os.environ.get("WEIGHTWARDEN_KERNEL", "") != "numpy" else "numpy"


def embed_chunk(w: np.ndarray, u: np.ndarray, tab: np.ndarray, ell: int, thr: float, out: np.ndarray,
                kernel: str | None = None) -> None:  # fmt: skip
    """out[:] = the marked chunk ``w`` (1-D, same length as the keystream words ``u``)."""
    if (kernel or KERNEL) == "numba" and _HAVE_NUMBA:
        _fused()(w, u, tab, ell, thr, out)
    else:
        _numpy_chunk(w, u, tab, ell, thr, out)


def accumulate_chunk(orig: np.ndarray, sus: np.ndarray, u: np.ndarray, first: int, cols: int, units_first: bool,
                     inv: np.ndarray, thr: float, ell: int, scale: float, corr: np.ndarray, var: np.ndarray,
                     chips: np.ndarray, kernel: str | None = None) -> None:  # fmt: skip
    """The matched filter over one chunk (flat positions first .. first+len-1 of a tensor with ``cols``
    columns): for each carrier of the original (|orig| >= thr) that the suspect still has (sus != 0) in a
    matched unit (inv >= 0; inv is per unit, units are rows when ``units_first``), add
    (sus - orig) * scale * inv * chip sign to corr[symbol], inv to var[symbol] and 1 to chips[symbol]."""
    if (kernel or KERNEL) == "numba" and _HAVE_NUMBA:
        _fused().accumulate(orig, sus, u, first, cols, units_first, inv, np.float32(thr), ell, ell & (ell - 1) == 0,  # type: ignore[attr-defined]
                          float(scale), corr, var, chips)  # fmt: skip
        return
    pos = np.arange(first, first + orig.size, dtype=np.int64)
    iv = inv[pos // cols] if units_first else inv[pos % cols]
    keep = (np.abs(orig) >= np.float32(thr)) & (sus != 0) & (iv >= 0)
    pow2 = ell & (ell - 1) == 0
    sym = (u & np.uint32(ell - 1) if pow2 else u % np.uint32(ell))[keep].astype(np.intp)
    sign = np.where((u[keep] >> np.uint32(31)) == 1, 1.0, -1.0)
    ivk = iv[keep].astype(np.float64)
    d = (sus[keep].astype(np.float64) - orig[keep].astype(np.float64)) * scale * ivk * sign
    corr += np.bincount(sym, weights=d, minlength=ell)
    var += np.bincount(sym, weights=ivk, minlength=ell)
    chips += np.bincount(sym, minlength=ell)

"""Symmetric Tardos fingerprinting codes (Tardos 2003; Škorić, Katzenbeisser & Celik's symmetric score).

Everything secret derives from one 32-byte code key: the bias vector p (arcsine density, cut off at
``t``) and every recipient's codeword.  Codewords are never stored: recipient ``u``'s ``ell`` symbols
are Bernoulli(p_i) draws made from an AES-256-CTR keystream at offset ``u * ell`` words, so a batch of
consecutive recipients is one contiguous keystream and 10^6 recipients are scored in seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["TardosCode", "accusation_threshold", "chernoff_tail", "code_length"]

_U32 = float(2**32)


def code_length(n: int, c: int, eps: float) -> int:
    """Symbols needed for n recipients, c colluders and false-accusation probability eps (Laarhoven & de Weger's
    asymptotic (pi^2/2) c^2 ln(n/eps)), rounded up to a multiple of 64."""
    ell = (math.pi**2 / 2) * c * c * math.log(n / eps)
    return int(math.ceil(ell / 64) * 64)


def _prf(key: bytes, label: bytes) -> bytes:
    return hmac.new(key, label, hashlib.sha256).digest()


def _keystream_u32(key: bytes, start_word: int, n_words: int) -> np.ndarray:
    """n_words uint32 from AES-256-CTR(key) starting at word start_word (start_word % 4 == 0)."""
    if start_word % 4:
        raise ValueError("keystream offsets are whole AES blocks")
    iv = (start_word // 4).to_bytes(16, "big")
    enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    buf = enc.update(bytes(4 * n_words))
    return np.frombuffer(buf, dtype="<u4")


@dataclass(frozen=True)
class TardosCode:
    key: bytes  # 32 bytes, from the custody layer
    length: int
    cutoff: float = 1e-3  # t: biases lie in [t, 1 - t]

    def __post_init__(self) -> None:
        if len(self.key) != 32:
            raise ValueError("a code key is 32 bytes")
        if self.length <= 0 or self.length % 4:
            raise ValueError("code length must be a positive multiple of 4")

    def bias(self) -> np.ndarray:
        """The secret bias vector p (float64, length ell): p = sin^2 r, r uniform on [t', pi/2 - t']."""
        u = _keystream_u32(_prf(self.key, b"bias"), 0, self.length) / _U32
        tp = math.asin(math.sqrt(self.cutoff))
        r = tp + u * (math.pi / 2 - 2 * tp)
        return np.sin(r) ** 2

    def codewords(self, first: int, count: int, p: np.ndarray | None = None) -> np.ndarray:
        """Codewords of recipients first .. first+count-1 as a (count, ell) bool array."""
        p = self.bias() if p is None else p
        ks = _keystream_u32(_prf(self.key, b"codewords"), first * self.length, count * self.length)
        thr = (p * _U32).astype(np.uint32)  # p <= 1 - t < 1: the threshold fits, compared without widening
        return ks.reshape(count, self.length) < thr[None, :]

    def weights(self, y: np.ndarray, known: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """(p, v, c0) such that a recipient with codeword x scores c0 + x @ v (Škorić's symmetric score).
        ``known`` is a per-symbol weight: False/0 erases a symbol, a float weighs it by its reliability
        (soft decoding); it must not depend on any recipient's codeword."""
        p = self.bias()
        known = np.ones(self.length) if known is None else known.astype(np.float64)
        y = y.astype(bool)
        a = np.sqrt((1 - p) / p)
        b = np.sqrt(p / (1 - p))
        agree = np.where(y, a, b) * known  # score of x_i == y_i
        disagree = -np.where(y, b, a) * known  # score of x_i != y_i
        # x_i == y_i  <=>  eq = 1 - y + x (2y - 1)
        d = agree - disagree
        c0 = float(disagree.sum() + ((1 - y) * d).sum())
        v = (2 * y.astype(np.float64) - 1) * d
        return p, v, c0

    def scores(self, y: np.ndarray, n: int, *, known: np.ndarray | None = None, batch: int = 64) -> np.ndarray:
        """Scores of recipients 0..n-1 given extracted symbols y; an innocent's score has mean 0 and
        variance sum(known**2).

        Batches of ``batch`` codewords on threads, each in buffers that stay in the CPU cache: the
        keystream is written in place (AES-CTR), compared with the bias thresholds into 0/1 floats, and
        multiplied with the symbol weights (BLAS); AES and BLAS release the GIL."""
        import threading
        from concurrent.futures import ThreadPoolExecutor

        p, v, c0 = self.weights(y, known)
        v32 = v.astype(np.float32)
        thr = (p * _U32).astype(np.uint32)
        key = _prf(self.key, b"codewords")
        out = np.empty(n, np.float64)
        local = threading.local()
        ell = self.length

        def run(s: int) -> None:
            m = min(batch, n - s)
            if not hasattr(local, "buf"):
                local.buf = bytearray(4 * batch * ell + 16)
                local.zeros = bytes(4 * batch * ell)
                local.f = np.empty((batch, ell), np.float32)
            start = s * ell  # keystream word of codeword s; whole AES blocks since ell % 4 == 0
            enc = Cipher(algorithms.AES(key), modes.CTR((start // 4).to_bytes(16, "big"))).encryptor()
            enc.update_into(local.zeros[: 4 * m * ell], local.buf)
            ks = np.frombuffer(local.buf, dtype="<u4", count=m * ell).reshape(m, ell)
            f = local.f[:m]
            np.less(ks, thr, out=f, casting="unsafe")  # the codeword bits as 0/1
            out[s : s + m] = c0 + f @ v32

        with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
            list(pool.map(run, range(0, n, batch)))
        return out

    def innocent_tail(self, score: float, y: np.ndarray, known: np.ndarray | None = None) -> float:
        """Chernoff bound on P(an innocent recipient scores >= score), exact for these y and p: an
        innocent's symbols are Bernoulli(p_i) independent of y, so E exp(l S) factorises."""
        p, v, c0 = self.weights(y, known)
        return chernoff_tail(score - c0, p, v)


def chernoff_tail(z: float, p: np.ndarray, v: np.ndarray) -> float:
    """min over l > 0 of exp(-l z) prod_i (1 - p_i + p_i exp(l v_i)): a rigorous bound on P(x @ v >= z)."""

    def log_bound(lam: float) -> float:
        return float(-lam * z + np.sum(np.logaddexp(np.log1p(-p), np.log(p) + lam * v)))

    lo, hi = 0.0, 1.0
    while log_bound(hi) < log_bound(hi / 2) and hi < 1e3:
        hi *= 2
    # golden-section search on the convex function
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    for _ in range(60):
        if log_bound(c) < log_bound(d):
            b = d
        else:
            a = c
        c, d = b - g * (b - a), a + g * (b - a)
    return min(1.0, math.exp(min(0.0, log_bound((a + b) / 2))))


def accusation_threshold(code: TardosCode, y: np.ndarray, known: np.ndarray | None, n: int, eps: float) -> float:
    """Smallest score Z with n * P(innocent >= Z) <= eps (Chernoff), found by bisection."""
    p, v, c0 = code.weights(y, known)
    lo, hi = 0.0, float(np.abs(v).sum()) + 1.0
    target = eps / n
    for _ in range(60):
        mid = (lo + hi) / 2
        if chernoff_tail(mid, p, v) <= target:
            hi = mid
        else:
            lo = mid
    return c0 + hi

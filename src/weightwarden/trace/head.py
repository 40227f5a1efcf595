"""The output-visible part of a recipient's fingerprint: the head mark (docs/TRACING.md, "The head mark").

The weight mark (``mark.py``) lives in the MLP weights; read through an API after a fine-tune it is lost
under the fine-tune's own change of the answers.  The head mark is a second, keyed, spread-out change of
the output head (``lm_head``), made so that the answers show it and a fine-tune's change hides little of
it: recipient x's head is ``H + amp * M(s)`` with ``s[j] = 2 (x[j] - p[j])`` (p: the code's bias; centred, so
that no part is common to every copy) and

    M(s) = P (W diag(s) U^T) diag(1/g) / sqrt(d * sum_j 4 p_j (1 - p_j))

``W`` (vocabulary x ell) and ``U`` (d_model x ell) are keyed +-1 matrices (AES-256-CTR keystream of a key
derived for it), ``P`` the projection off the master head's columns (so that no part of the mark is a
change of the final hidden state, which a fine-tune also makes), ``g`` the final norm's gain (|g|,
floored at 1e-3 of its largest entry; ones when the model has none).

That part lies wholly outside the head's column space, so projecting a copy's head onto the columns of a
public base it was fine-tuned from would remove it without any key.  A second part, a share ``span`` of the
energy, lies inside it: ``Q A diag(s) U^T diag(1/g)`` with ``Q`` an orthonormal basis of the master head's
columns and ``A`` (d_model x ell) keyed +-1 (a keyed linear change of what the head reads, which the
projection keeps).  The two parts are read apart (``part="orth"`` and ``part="span"``): the first is the one
a fine-tune hides least, the second the one the projection cannot reach.  Symbol j moves the logit of token
v at a context whose final hidden state is h by ``amp * s[j] * (PW)[v, j] * (U[:, j] . h/g) / sqrt(d E)``:
under the final norm, ``h/g`` has unit spread per coordinate, so each symbol is a random direction of the
logits' space seen in every context, and ``amp`` is the whole change's rms in logit units.

The read (:func:`estimate`) is an exact least squares of the answers' change on the symbols, with three
nuisances a fine-tune or a serving change moves: a free constant per (prompt, position), a free bias per
token, and a free linear map of the final hidden state (``H G h``, on its ``k`` leading directions).  The
owner computes every feature from the master alone (its final hidden states at the queried positions), so
the estimate depends on no recipient's codeword.  Measured in ``bench/explore_ft/head_tardos.py``.

Only an untied head is marked (``lm_head.weight`` or the like, stored apart from a different embedding):
a tied head is the embedding, which the weight trace aligns on.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from .tardos import _keystream_u32

__all__ = ["DEFAULT_HEAD", "PARTS", "SPAN_SHARE", "SUGGESTED_HEAD", "HeadMark", "estimate", "estimates", "find_head",
           "project", "span_dims"]

DEFAULT_HEAD = 0.0  # off unless asked for (`warden release --head-mark`): its cost is over the weight mark's bar
SUGGESTED_HEAD = 0.06  # rms logit change measured in bench/explore_ft/head_tardos.py (docs/TRACING.md)
SPAN_SHARE = 0.15  # the in-span part's share of the energy for a model first released now (docs/TRACING.md)
PARTS = ("orth", "span")
NUISANCE_DIMS = 48  # k: leading directions of the final hidden state the nuisance map acts on


def span_dims(d_model: int) -> int:
    """k for the in-span part's read: the map on k directions absorbs about (k / d)^2 of that part."""
    return min(NUISANCE_DIMS, max(1, d_model // 2))


def project(w: np.ndarray, onto: np.ndarray) -> np.ndarray:
    """``w`` projected onto the column space of ``onto`` (both vocabulary x d_model): what a holder of a copy can do
    to its head with a public base's head (``onto``) and no keys; the in-span read fits it as a nuisance."""
    q = np.linalg.qr(np.asarray(onto, np.float64))[0]
    return q @ (q.T @ np.asarray(w, np.float64))


_HEAD = re.compile(r"(?:^|\.)(?:lm_head|embed_out|output)\.weight$")
_NORM = re.compile(r"(?:^|\.)(?:norm|ln_f|final_layernorm|final_layer_norm)\.weight$")
_ROWS = 4096  # rows of the head made at a time


def find_head(shapes: Mapping[str, tuple[int, ...]], d_model: int) -> tuple[str, str | None] | None:
    """(the output head's name, the final norm's name or None), or None when the checkpoint has no head of
    shape (vocabulary, d_model) stored on its own."""
    heads = [n for n, s in shapes.items() if _HEAD.search(n) and len(s) == 2 and s[1] == d_model and s[0] > 1]
    if len(heads) != 1:
        return None
    norms = [n for n, s in shapes.items() if _NORM.search(n) and tuple(s) == (d_model,) and ".layers." not in n
             and ".h." not in n]  # fmt: skip
    return heads[0], (norms[0] if len(norms) == 1 else None)


class HeadMark:
    """The keyed basis of the head mark for one model: ``spread`` (symbols -> change of the head),
    ``gather`` (its transpose), ``rows`` (the token side of chosen tokens) and ``embed`` (a recipient's head).
    ``head``: the master's head (vocabulary x d_model), whose columns the mark is made orthogonal to (and
    inside which the ``span`` share of its energy lies; 0 for a model recorded before that part existed)."""

    def __init__(self, key: bytes, vocab: int, d_model: int, ell: int, amp: float, gain: np.ndarray | None = None,
                 head: np.ndarray | None = None, bias: np.ndarray | None = None, span: float = 0.0):  # fmt: skip
        if not (len(key) == 32 and vocab > 0 and d_model > 0 and ell > 0 and math.isfinite(amp) and amp >= 0):
            raise ValueError("head mark: a 32-byte key, positive sizes and a finite amplitude >= 0")
        if not (math.isfinite(span) and 0.0 <= span < 1.0) or (span and head is None):
            raise ValueError("head mark: the in-span share is a number in [0, 1), and needs the master's head")
        self.key, self.vocab, self.d, self.ell, self.amp = key, vocab, d_model, ell, float(amp)
        g = np.ones(d_model) if gain is None else np.abs(np.asarray(gain, np.float64).reshape(-1))
        if g.shape != (d_model,) or not np.isfinite(g).all():
            raise ValueError("head mark: the final norm's gain must be d_model finite numbers")
        top = float(g.max()) if g.size else 0.0
        self.inv_g = 1.0 / np.maximum(g, max(top, 1e-12) * 1e-3)
        self.p = None if bias is None else np.asarray(bias, np.float64).reshape(-1)
        if self.p is not None and (self.p.shape != (ell,) or not ((self.p > 0) & (self.p < 1)).all()):
            raise ValueError("head mark: the code's bias must be ell numbers in (0, 1)")
        energy = ell if self.p is None else float(np.sum(4 * self.p * (1 - self.p)))  # E |values(x)|^2
        self.span = float(span)
        unit = self.amp / math.sqrt(d_model * energy)
        self.scale = unit * math.sqrt(1.0 - self.span)  # the part off the head's columns (rows: +-1 entries)
        self.scale_span = unit * math.sqrt(self.span * vocab / d_model)  # the part in them (rows: Q A, d/V a token)
        self.U = self._signs(1, 0, d_model)  # (d, ell)
        self.A = self._signs(2, 0, d_model) if self.span else None  # (d, ell): the in-span part's coefficients
        self.Q: np.ndarray | None = None  # orthonormal columns of the master's head (vocabulary x d_model)
        self.QW: np.ndarray | None = None  # Q^T W (d_model x ell)
        if head is not None:
            h = np.asarray(head, np.float64)
            if h.shape != (vocab, d_model) or not np.isfinite(h).all():
                raise ValueError(f"head mark: the master's head must be {(vocab, d_model)} finite numbers")
            self.Q = np.linalg.qr(h)[0]
            qw = np.zeros((d_model, ell))
            for a, b in self._row_ranges():
                qw += self.Q[a:b].T @ self._signs(0, a, b - a)
            self.QW = qw

    def _signs(self, table: int, row0: int, rows: int) -> np.ndarray:
        """Rows row0.. of keyed +-1 table ``table`` (0: W over the vocabulary, 1: U and 2: A over the hidden units),
        each row ``ell`` signs from its own whole AES blocks of the keystream."""
        words = -(-self.ell // 128) * 4  # whole AES blocks per row
        base = (table << 40) + row0 * words
        bits = np.unpackbits(_keystream_u32(self.key, base, rows * words).view(np.uint8), bitorder="little")
        bits = bits.reshape(rows, words * 32)[:, : self.ell]
        return bits.astype(np.float64) * 2.0 - 1.0

    def _row_ranges(self) -> list[tuple[int, int]]:
        return [(a, min(self.vocab, a + _ROWS)) for a in range(0, self.vocab, _ROWS)]

    def _w(self, a: int, b: int) -> np.ndarray:
        """Rows a..b-1 of the token side P W."""
        w = self._signs(0, a, b - a)
        return w if self.Q is None or self.QW is None else w - self.Q[a:b] @ self.QW

    def rows(self, tokens: np.ndarray, part: str = "orth") -> np.ndarray:
        """The token side at the given token ids (len(tokens) x ell): P W (``part="orth"``) or Q A (``"span"``)."""
        tokens = np.asarray(tokens, np.int64)
        if part not in PARTS:
            raise ValueError(f"head mark: a part is one of {PARTS}")
        if part == "span":
            if self.A is None or self.Q is None:
                raise ValueError("head mark: this model's mark has no in-span part")
            return self.Q[tokens] @ self.A
        out = np.empty((len(tokens), self.ell))
        for a, b in self._row_ranges():
            at = np.nonzero((tokens >= a) & (tokens < b))[0]
            if len(at):
                out[at] = self._w(a, b)[tokens[at] - a]
        return out

    def parts(self) -> tuple[str, ...]:
        """The parts this mark carries (read apart)."""
        return PARTS if self.span else PARTS[:1]

    def spread(self, s: np.ndarray, s_span: np.ndarray | None = None) -> np.ndarray:
        """amp * M(s): the change of the head (vocabulary x d_model, float64) for symbol values ``s`` (and, for the
        in-span part, ``s_span``, by default the same)."""
        s = np.asarray(s, np.float64)
        out = np.empty((self.vocab, self.d))
        right = (self.U * s).T * self.inv_g * self.scale  # (ell, d)
        inner = None
        if self.A is not None and self.Q is not None:
            s2 = s if s_span is None else np.asarray(s_span, np.float64)
            inner = self.A @ ((self.U * s2).T * self.inv_g) * self.scale_span  # (d, d)
        for a, b in self._row_ranges():
            out[a:b] = self._w(a, b) @ right
            if inner is not None and self.Q is not None:
                out[a:b] += self.Q[a:b] @ inner
        return out

    def gather(self, grad: np.ndarray) -> np.ndarray:
        """The transpose of :meth:`spread` (both parts of the same ``s``): per symbol, <grad, amp * M(e_j)>."""
        grad = np.asarray(grad, np.float64)
        out = np.zeros(self.ell)
        for a, b in self._row_ranges():
            gu = (grad[a:b] * self.inv_g) @ self.U  # (rows, ell)
            out += (self._w(a, b) * gu).sum(0) * self.scale
            if self.A is not None and self.Q is not None:
                out += ((self.Q[a:b] @ self.A) * gu).sum(0) * self.scale_span
        return out

    def features(self, hidden: np.ndarray, part: str = "orth") -> np.ndarray:
        """The hidden side of ``part`` per row of ``hidden``, ``(U^T (h / g))`` times the part's scale: with
        :meth:`rows`, a logit's change is ``rows(v, part) * features(h, part) @ s`` summed over the parts."""
        return (np.asarray(hidden, np.float64) * self.inv_g) @ self.U * (self.scale_span if part == "span"
                                                                           else self.scale)  # fmt: skip

    def values(self, codeword: np.ndarray) -> np.ndarray:
        """The symbol values a codeword is embedded as: ``2 (x - p)`` with the code's bias (centred: the part
        every copy would share is left out, so the energy goes where the score's information is), else
        ``2 x - 1``."""
        x = np.asarray(codeword, np.float64)
        return 2.0 * (x - self.p) if self.p is not None else 2.0 * x - 1.0

    def symbols(self, s_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(y, weight) for the Tardos decision from estimated values: ``x_hat = p + s_hat / 2`` (or
        ``(1 + s_hat) / 2``), y = x_hat > 1/2, weight |x_hat - 1/2| capped at 3x its median."""
        c = (self.p + s_hat / 2 if self.p is not None else (1 + s_hat) / 2) - 0.5
        z = np.abs(c)
        cap = 3 * float(np.median(z[z > 0])) if np.any(z > 0) else 1.0
        return c > 0, np.minimum(z, cap)

    def embed(self, head: np.ndarray, codeword: np.ndarray) -> np.ndarray:
        """Recipient ``codeword``'s head (same dtype as ``head``)."""
        if head.shape != (self.vocab, self.d):
            raise ValueError(f"head mark: the head is {head.shape}, expected {(self.vocab, self.d)}")
        new = np.asarray(head, np.float64) + self.spread(self.values(codeword))
        return new.astype(head.dtype)


def _groups(row: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group of each observation, its group's size): one group per (prompt, position)."""
    _, grp = np.unique(np.stack([row, pos]), axis=1, return_inverse=True)
    grp = grp.reshape(-1)
    return grp, np.bincount(grp).astype(np.float64)


def estimate(hidden: np.ndarray, row: np.ndarray, pos: np.ndarray, tok: np.ndarray, r: np.ndarray, hm: HeadMark,
             head: np.ndarray, *, ridge: float = 1e-3, k: int = NUISANCE_DIMS, chunk: int = 4096,
             parts: tuple[str, ...] = ("orth",), extra: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """s_hat: least squares of the answers' change ``r`` (one per observation: text ``row``, position ``pos``,
    token ``tok``) on the head mark's symbols, jointly with the nuisances of the module's docstring, every
    feature and ``r`` centred per (row, pos); ``hidden``: the master's final hidden state at each observation,
    ``head``: the master's head.  The map acts on at most ``k`` leading directions, and on fewer when the
    positions are few (k^2 at most a quarter of them): with more it would absorb the mark itself.  A ridge of
    ``ridge`` times the mean diagonal keeps the system regular.  ``parts``: the mark's parts fitted jointly,
    their estimates returned one after the other (ell each).  ``extra``: further nuisance columns, one row per
    observation (e.g. the change a projection onto a public base's head would make)."""
    return estimates(hidden, row, pos, tok, r, hm, head, [(parts, k)], ridge=ridge, chunk=chunk, extra=extra)[0]


def estimates(hidden: np.ndarray, row: np.ndarray, pos: np.ndarray, tok: np.ndarray, r: np.ndarray, hm: HeadMark,
              head: np.ndarray, fits: Sequence[tuple[tuple[str, ...], int]], *, ridge: float = 1e-3,
              chunk: int = 4096, extra: np.ndarray | None = None) -> list[np.ndarray]:  # fmt: skip
    """:func:`estimate` for each (parts, k) of ``fits``, all solved from one set of normal equations over the union
    of their columns: a map on the k' leading directions is a block of the map on k >= k' (the same directions,
    nested), and each fit keeps its own ridges, so each result is the one :func:`estimate` gives alone."""
    hidden, r = np.asarray(hidden, np.float64), np.asarray(r, np.float64)
    grp, size = _groups(row, pos)
    uniq, tix = np.unique(np.asarray(tok, np.int64), return_inverse=True)
    cap = min(hm.d, max(1, math.isqrt(len(size) // 4)))  # k^2 <= positions / 4: the map must not fit the mark
    ks = [min(k, cap) for _, k in fits]
    kmax, t, ell = max(ks), len(uniq), hm.ell
    used = list(dict.fromkeys(p for ps, _ in fits for p in ps))  # every part any fit reads, in order
    w_tok = {part: hm.rows(uniq, part) for part in used}  # (T, ell) each
    basis = np.linalg.eigh(hidden.T @ hidden)[1][:, ::-1][:, :kmax]  # the kmax leading directions of h
    hk, vk = hidden @ basis, np.asarray(head, np.float64)[uniq] @ basis  # (N, kmax), (T, kmax)
    extra = np.zeros((len(r), 0)) if extra is None else np.asarray(extra, np.float64).reshape(len(r), -1)
    n_mark, e = ell * len(used), extra.shape[1]
    n_all = n_mark + t + kmax * kmax + e

    # every group whole in one chunk, its rows contiguous (sorted by group): its means are taken there (the mark's:
    # mean over the group's tokens of W[v], times f(h); the token one-hots'; the map's: mean of V_k[v], outer h_k)
    order = np.argsort(grp, kind="stable")
    step = max(1, chunk // max(1, int(size.max())))
    cuts = np.searchsorted(grp[order], np.append(np.arange(0, len(size), step), len(size)))
    a = np.zeros((n_all, n_all))
    b = np.zeros(n_all)
    for lo, hi in itertools.pairwise(cuts):
        at = order[lo:hi]
        if not len(at):
            continue
        g, ti, n = grp[at], tix[at], len(at)
        starts = np.flatnonzero(np.concatenate([[True], g[1:] != g[:-1]]))
        counts = np.diff(np.append(starts, n))

        def centred(x: np.ndarray, starts: np.ndarray = starts, counts: np.ndarray = counts) -> np.ndarray:
            m = np.add.reduceat(x, starts, axis=0) / counts.reshape((-1,) + (1,) * (x.ndim - 1))
            return x - np.repeat(m, counts, axis=0)

        x = np.empty((n, n_all))
        for i, part in enumerate(used):
            np.multiply(centred(w_tok[part][ti]), hm.features(hidden[at], part), out=x[:, i * ell : (i + 1) * ell])
        onehot = np.zeros((n, t))
        onehot[np.arange(n), ti] = 1.0
        x[:, n_mark : n_mark + t] = centred(onehot)
        x[:, n_mark + t : n_all - e] = (centred(vk[ti])[:, :, None] * hk[at][:, None, :]).reshape(n, -1)
        x[:, n_all - e :] = centred(extra[at])
        a += x.T @ x
        b += x.T @ centred(r[at])

    out = []
    for (parts, _), k in zip(fits, ks, strict=True):
        mark = [np.arange(used.index(p) * ell, (used.index(p) + 1) * ell) for p in parts]
        grid = np.arange(kmax)[:k]
        idx = np.concatenate([*mark, n_mark + np.arange(t), n_mark + t + (grid[:, None] * kmax + grid).reshape(-1),
                              n_all - e + np.arange(e)])  # fmt: skip
        sub = a[np.ix_(idx, idx)]
        lam = [max(ridge * float(np.mean(np.diag(a)[m])), 1e-12) for m in mark]
        sub[np.diag_indices_from(sub)] += np.concatenate([np.repeat(lam, ell), np.full(len(idx) - len(mark) * ell,
                                                                                        lam[0])])  # fmt: skip
        out.append(np.linalg.solve(sub, b[idx])[: len(mark) * ell])
    return out

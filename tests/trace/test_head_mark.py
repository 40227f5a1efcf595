"""The head mark (trace/head.py): its keyed basis, and the read's least squares against what a fine-tune or a
serving change moves (a constant per position, a bias per token, a linear map of the final hidden state)."""

from __future__ import annotations

import numpy as np
import pytest

from weightwarden.trace.head import HeadMark, estimate, find_head, span_dims
from weightwarden.trace.tardos import TardosCode

V, D, ELL = 96, 12, 128


CODE = TardosCode(bytes(32), ELL)


def _mark(key: bytes = bytes(range(32)), amp: float = 0.06, span: float = 0.0) -> tuple[HeadMark, np.ndarray]:
    rng = np.random.default_rng(1)
    head = rng.normal(size=(V, D))
    return HeadMark(key, V, D, ELL, amp, gain=rng.uniform(0.5, 2.0, D), head=head, bias=CODE.bias(), span=span), head


@pytest.mark.parametrize("span", [0.0, 0.3])
def test_spread_and_gather_are_adjoint_and_keyed(span: float) -> None:
    hm, _ = _mark(span=span)
    rng = np.random.default_rng(2)
    s, g = rng.normal(size=ELL), rng.normal(size=(V, D))
    assert np.isclose(float((hm.spread(s) * g).sum()), float(s @ hm.gather(g)), rtol=1e-9)
    assert np.allclose(hm.spread(s), _mark(span=span)[0].spread(s))  # the same key, the same mark (release, trace)
    assert not np.allclose(hm.spread(s), _mark(bytes(range(1, 33)), span=span)[0].spread(s))
    # a token's logit change is the sum over the parts of rows(v, part) * features(h, part) @ s, as the read models it
    h, toks = rng.normal(size=(5, D)), np.array([0, 7, 95, 7, 40])
    pred = sum((hm.rows(toks, part) * hm.features(h, part)) @ s for part in hm.parts())
    assert np.allclose(pred, (hm.spread(s)[toks] * h).sum(1))


def test_the_mark_is_not_a_change_of_the_final_hidden_state() -> None:
    # P removes the head's columns: no part of the mark is H @ delta, which any change before the head makes
    hm, head = _mark()
    q = np.linalg.qr(head)[0]
    m = hm.spread(np.random.default_rng(3).choice([-1.0, 1.0], ELL))
    assert np.abs(q.T @ m).max() < 1e-10 * np.abs(m).max()
    # and a token's logit change is rows(v) * features(h) @ s, as the read models it
    h = np.random.default_rng(4).normal(size=(5, D))
    s = np.random.default_rng(5).normal(size=ELL)
    toks = np.array([0, 7, 95, 7, 40])
    assert np.allclose((hm.rows(toks) * hm.features(h)) @ s, (hm.spread(s)[toks] * h).sum(1))


def _observations(hm: HeadMark, head: np.ndarray, s: np.ndarray, *, nuisance: float, seed: int = 6):
    """Positions with random final hidden states, 12 observed tokens each, r = the mark's logit change plus
    the nuisances a fine-tune makes, each ``nuisance`` times the mark's size."""
    rng = np.random.default_rng(seed)
    pos_n, per = 1500, 12
    h = rng.normal(size=(pos_n, D))
    row = np.repeat(np.arange(pos_n) // 50, per)
    pos = np.repeat(np.arange(pos_n) % 50 + 1, per)
    tok = np.concatenate([rng.choice(V, per, replace=False) for _ in range(pos_n)])
    hh = np.repeat(h, per, axis=0)
    mark = (hm.rows(tok) * hm.features(hh)) @ s
    size = float(mark.std())
    per_pos = np.repeat(rng.normal(size=pos_n), per)
    per_tok = rng.normal(size=V)[tok]
    g = rng.normal(size=(D, D))
    lin = np.einsum("nd,nd->n", head[tok], hh @ g.T)  # H G h: the head reads a linearly changed hidden state
    nz = per_pos / per_pos.std() + per_tok / per_tok.std() + lin / lin.std()
    return hh, row, pos, tok, mark + nuisance * size * nz


def test_the_read_recovers_the_codeword_under_a_fine_tune_s_nuisances() -> None:
    hm, head = _mark()
    x = CODE.codewords(3, 1)[0]
    s = hm.values(x)  # centred: 2 (x - p)
    hh, row, pos, tok, r = _observations(hm, head, s, nuisance=20.0)  # nuisances 20x the mark's own change
    s_hat = estimate(hh, row, pos, tok, r, hm, head)
    y, w = hm.symbols(s_hat)
    assert np.array_equal(y, x) and (w >= 0).all()
    # and the decision names recipient 3 alone among 1,000 (the same Tardos score as a weight trace)
    scores = CODE.scores(y, 1000, known=w)
    assert int(np.argmax(scores)) == 3 and np.sort(scores)[-2] < 0.5 * scores[3]
    # a read that does not model them fails on the same answers (the attack the nuisances stand for)
    phi = hm.rows(tok) * hm.features(hh)
    naive = np.linalg.lstsq(phi, r, rcond=None)[0]
    assert not np.array_equal(hm.symbols(naive)[0], x)


def test_projecting_the_head_onto_its_own_columns_keeps_the_in_span_part() -> None:
    # the attack without keys: a master fine-tuned from a public base has (about) the base head's columns; a
    # holder of one copy projects its head onto them.  That removes the part off the columns entirely; the
    # in-span part (a share of the energy) stays whole, and its read still names the recipient.  (A wider model
    # than the other tests': the in-span part lives in d^2 dimensions, which must be many more than ell.)
    v, d = 160, 32
    rng = np.random.default_rng(8)
    head = rng.normal(size=(v, d))
    hm = HeadMark(bytes(range(32)), v, d, ELL, 0.06, gain=rng.uniform(0.5, 2.0, d), head=head, bias=CODE.bias(),
                  span=0.3)  # fmt: skip
    x = CODE.codewords(5, 1)[0]
    s = hm.values(x)
    q = np.linalg.qr(head)[0]
    m = hm.spread(s)
    kept = q @ (q.T @ m)
    assert np.allclose(kept, hm.spread(np.zeros(ELL), s)) and np.allclose(m - kept, hm.spread(s, np.zeros(ELL)))
    assert 0.25 < float((kept**2).sum() / (m**2).sum()) < 0.4  # about the span share (P W has (V - d) / V of W)
    # answers from the projected head; a fine-tune's nuisances 5x the mark's size: a constant per position and a
    # linear change of the final hidden state along its leading directions (where the model's own variation is)
    n, per = 1500, 12
    hh = np.repeat(rng.normal(size=(n, d)) * np.where(np.arange(d) < 8, 3.0, 1.0), per, axis=0)
    row, pos = np.repeat(np.arange(n) // 50, per), np.repeat(np.arange(n) % 50 + 1, per)
    tok = np.concatenate([rng.choice(v, per, replace=False) for _ in range(n)])
    r = (kept[tok] * hh).sum(1)
    top = np.arange(d) < 8
    lin = np.einsum("nd,nd->n", head[tok], hh @ (rng.normal(size=(d, d)) * top * top[:, None]).T)
    r = r + 5 * r.std() * (np.repeat(rng.normal(size=n), per) + lin / lin.std())
    s_span = estimate(hh, row, pos, tok, r, hm, head, parts=hm.parts(), k=span_dims(d))[ELL:]
    assert np.array_equal(hm.symbols(s_span)[0], x)
    # and a mark with no in-span part (a model recorded before it existed) is gone under the same projection
    old = HeadMark(bytes(range(32)), v, d, ELL, 0.06, head=head, bias=CODE.bias())
    assert np.abs(q @ (q.T @ old.spread(s))).max() < 1e-10


def test_a_projection_onto_a_public_base_the_head_was_moved_from_is_fitted_when_the_base_is_given() -> None:
    # the master's head was fine-tuned away from a public base's (its columns turned); a thief projects the copy's
    # head onto the base's columns: that removes the orthogonal part and moves every answer by the master's own
    # change of the head, far larger than the mark.  The read that is given the base fits that change as one more
    # nuisance and names the recipient from the in-span part; without the base it cannot
    v, d = 160, 32
    rng = np.random.default_rng(9)
    base = rng.normal(size=(v, d))
    master = base + 0.25 * rng.normal(size=(v, d))  # a head moved a quarter of its size
    hm = HeadMark(bytes(range(32)), v, d, ELL, 0.06, head=master, bias=CODE.bias(), span=0.3)
    x = CODE.codewords(2, 1)[0]
    qb = np.linalg.qr(base)[0]
    copy = qb @ (qb.T @ (master + hm.spread(hm.values(x))))
    n, per = 1500, 12
    hh = np.repeat(rng.normal(size=(n, d)), per, axis=0)
    row, pos = np.repeat(np.arange(n) // 50, per), np.repeat(np.arange(n) % 50 + 1, per)
    tok = np.concatenate([rng.choice(v, per, replace=False) for _ in range(n)])
    r = ((copy - master)[tok] * hh).sum(1)
    drift = np.einsum("nd,nd->n", (qb @ (qb.T @ master) - master)[tok], hh)  # what read_symbols computes
    def span_read(extra):
        return hm.symbols(estimate(hh, row, pos, tok, r, hm, master, parts=hm.parts(), k=span_dims(d),
                                   extra=extra)[ELL:])[0]  # fmt: skip
    assert np.mean(span_read(drift) == x) > 0.95
    assert np.mean(span_read(None) == x) < 0.8


def test_the_read_of_an_unmarked_model_is_noise() -> None:
    # the master (no mark) behind the endpoint: only the nuisances, and the estimate agrees with no codeword
    hm, head = _mark()
    hh, row, pos, tok, r = _observations(hm, head, np.zeros(ELL), nuisance=0.0)
    rng = np.random.default_rng(7)
    r = r + rng.normal(size=r.shape) * 1e-3  # float noise only
    s_hat = estimate(hh, row, pos, tok, r, hm, head)
    y, w = hm.symbols(s_hat)
    scores = CODE.scores(y, 1000, known=w)  # no recipient stands out: all within 5 sd of an innocent's
    assert np.abs(scores).max() < 5 * np.sqrt((w**2).sum())


@pytest.mark.parametrize(
    ("shapes", "found"),
    [
        ({"lm_head.weight": (V, D), "model.norm.weight": (D,), "model.embed_tokens.weight": (V, D)},
         ("lm_head.weight", "model.norm.weight")),
        ({"model.embed_tokens.weight": (V, D)}, None),  # tied: no head of its own
        ({"lm_head.weight": (V, D + 1)}, None),  # not d_model wide
    ],
)  # fmt: skip
def test_find_head(shapes, found) -> None:
    assert find_head(shapes, D) == found


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="32-byte key"):
        HeadMark(b"short", V, D, ELL, 0.06)
    with pytest.raises(ValueError, match="bias"):
        HeadMark(bytes(32), V, D, ELL, 0.06, bias=np.ones(ELL))
    with pytest.raises(ValueError, match="master's head"):
        HeadMark(bytes(32), V, D, ELL, 0.06, head=np.zeros((V, D + 1)))
    for span in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="in-span share"):
            HeadMark(bytes(32), V, D, ELL, 0.06, head=np.ones((V, D)), span=span)
    with pytest.raises(ValueError, match="needs the master's head"):
        HeadMark(bytes(32), V, D, ELL, 0.06, span=0.3)
    with pytest.raises(ValueError, match="a part is one of"):
        _mark()[0].rows(np.array([0]), "other")
    with pytest.raises(ValueError, match="no in-span part"):  # a mark recorded without it is not read as having it
        _mark()[0].rows(np.array([0]), "span")

"""Text mode's product-of-experts statistic (provenance/textstat.py) on synthetic pools: the fit finds the
pool model that generated the tokens, is symmetric in the pool, and refuses data that do not line up."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("scipy")

from weightwarden.errors import ProbeError
from weightwarden.provenance import textstat


def _pool(rng, n_pos, vocab, n_models):
    logits = rng.normal(scale=2.0, size=(n_models, n_pos, vocab))
    return [x - np.log(np.exp(x).sum(axis=1, keepdims=True)) for x in logits]


def _sample(rng, logp):
    p = np.exp(logp)
    return np.array([rng.choice(len(r), p=r / r.sum()) for r in p], dtype=np.int64)


def test_tokens_of_one_pool_model_give_it_the_weight():
    rng = np.random.default_rng(0)
    dists = _pool(rng, 800, 50, 4)
    for src in range(4):
        y = _sample(rng, dists[src])
        w = textstat.fit_poe(*textstat.gather(dists, y))
        assert w[src] == pytest.approx(1.0, abs=0.15), w
        others = np.delete(w, src)
        assert np.all(np.abs(others) < 0.15), w


def test_a_mixture_spreads_the_weight_and_the_fit_is_symmetric_in_the_pool():
    rng = np.random.default_rng(1)
    dists = _pool(rng, 600, 40, 5)
    y = _sample(rng, 0.5 * dists[1] + 0.5 * dists[3])  # a geometric blend of models 1 and 3
    w = textstat.fit_poe(*textstat.gather(dists, y))
    assert w[1] > 0.25 and w[3] > 0.25 and max(abs(w[0]), abs(w[2]), abs(w[4])) < 0.2, w
    perm = [3, 0, 4, 1, 2]
    wp = textstat.fit_poe(*textstat.gather([dists[i] for i in perm], y))
    np.testing.assert_allclose(wp, w[perm], atol=1e-4)


def test_large_vocabularies_keep_each_models_top_tokens_and_the_sampled_one():
    rng = np.random.default_rng(2)
    v = textstat.FULL_VOCAB + 500
    dists = _pool(rng, 40, v, 3)
    y = _sample(rng, dists[0])
    L, mask, yy = textstat.gather(dists, y)
    assert L.shape[0] == 40 and L.shape[2] == 3 and L.shape[1] <= 1 + 3 * textstat.TOP
    assert np.all(yy == 0) and mask[:, 0].all()
    np.testing.assert_allclose(L[np.arange(40), 0, 0], dists[0][np.arange(40), y])  # the sampled token first
    for m in range(3):  # each model's likeliest token is in every position's support
        best = dists[m].max(axis=1)
        got = np.where(mask, L[:, :, m], -np.inf).max(axis=1)
        np.testing.assert_allclose(got, np.maximum(best, -50.0))
    w = textstat.fit_poe(*textstat.stack([(L, mask, yy), textstat.gather(dists, y)]))
    assert w.shape == (3,) and np.all(np.isfinite(w))


def test_tokens_that_do_not_line_up_are_refused():
    rng = np.random.default_rng(3)
    dists = _pool(rng, 10, 20, 2)
    with pytest.raises(ProbeError, match="do not match"):
        textstat.gather(dists, np.zeros(9, dtype=np.int64))  # one position short
    with pytest.raises(ProbeError, match="do not match"):
        textstat.gather(dists, np.full(10, 20, dtype=np.int64))  # a token outside the vocabulary
    with pytest.raises(ProbeError, match="no sampled token"):
        textstat.fit_poe(np.zeros((0, 20, 2)), np.zeros((0, 20), dtype=bool), np.zeros(0, dtype=np.int64))


def test_shares_vocabulary_needs_whole_distributions_on_one_tokenizer():
    class M:
        def __init__(self, piece):
            self._piece = piece

        def distributions(self, prompt, continuation):  # pragma: no cover - never called here
            raise AssertionError

    class Remote:
        _piece = "a"

    assert textstat.shares_vocabulary([M("a"), M("a")])
    assert not textstat.shares_vocabulary([M("a"), M("b")])
    assert not textstat.shares_vocabulary([M("a"), Remote()])
    assert not textstat.shares_vocabulary([M(None), M(None)])

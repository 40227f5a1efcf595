"""The demo's API (demo/endpoint.py): its numpy master's derivatives are exact, and its server answers in the
shapes the endpoint client checks, with every character's log-probability when asked."""

from __future__ import annotations

import numpy as np
import pytest

from demo import lm
from demo.endpoint import NumpyScorer, logprob_table, serve
from weightwarden.trace.scorer import GradientScorer, Queries


@pytest.fixture(scope="module")
def params():
    ids = lm.text_ids(__import__("textwrap"))
    return lm.train(lm.init(np.random.default_rng(0)), ids, 20, np.random.default_rng(1), batch=64)


def _queries(rng: np.random.Generator, texts: int = 6, length: int = 40) -> Queries:
    ids = [rng.integers(0, lm.VOCAB, length).tolist() for _ in range(texts)]
    row = np.repeat(np.arange(texts), length - 1)
    pos = np.tile(np.arange(1, length), texts)
    return Queries(ids, row, pos, rng.integers(0, lm.VOCAB, len(pos)))


def test_logprobs_are_the_models_own(params) -> None:
    ids = lm.text_ids(__import__("string"))[:2000]
    q = Queries([ids.tolist()], np.zeros(len(ids) - 1, np.int64), np.arange(1, len(ids)), ids[1:])
    assert isinstance(NumpyScorer(params), GradientScorer)
    # the training code's own loss (float32 forward pass): minus the mean log-probability of each next character
    assert -NumpyScorer(params).logprobs_at(q).mean() == pytest.approx(lm.loss(params, ids), rel=1e-5)


def test_vjp_and_jvp_agree_and_match_finite_differences(params) -> None:
    rng = np.random.default_rng(3)
    q = _queries(rng)
    sc = NumpyScorer(params)
    names = list(params)
    tangent = {n: rng.standard_normal(params[n].shape) * 0.01 for n in names}
    w = rng.standard_normal(len(q.pos))
    g = sc.vjp(q, w, names)
    jv = sc.jvp(q, tangent)
    lhs = sum(float((g[n] * tangent[n]).sum()) for n in names)
    assert lhs == pytest.approx(float(w @ jv), rel=1e-9)  # <w, J t> = <J^T w, t>
    h = 1e-4  # two-sided finite differences of the float64 table
    up = logprob_table({n: params[n].astype(np.float64) + h * tangent[n] for n in names})
    down = logprob_table({n: params[n].astype(np.float64) - h * tangent[n] for n in names})
    ctx = np.array([q.ids[r][t - 1] for r, t in zip(q.row, q.pos, strict=True)])
    fd = (up - down)[ctx, q.tok] / (2 * h)
    assert np.allclose(jv, fd, rtol=1e-5, atol=1e-8)
    part = sc.jvp(q, {"model.layers.1.mlp.up_proj.weight": tangent["model.layers.1.mlp.up_proj.weight"]})
    assert not np.allclose(part, jv)  # a tangent on one tensor is that tensor's part only


def test_server_answers_what_the_client_checks(params) -> None:
    pytest.importorskip("httpx")
    from weightwarden.errors import EndpointError
    from weightwarden.provenance.endpoint import Endpoint

    table = logprob_table(params)
    text = "def f(x):\n    return x"
    with serve(params, "demo") as url, Endpoint(url) as ep:
        ans = ep.echo(text, top=lm.VOCAB)
        assert ans.tokens == list(text) and ep.served_model == "demo"
        for t in range(1, len(text)):
            assert ans.logprobs[t] == pytest.approx(table[ord(text[t - 1]), ord(text[t])])
            assert len(ans.top[t]) == lm.VOCAB  # the whole distribution
        with pytest.raises(EndpointError, match="refused"):
            ep.echo("caf\u00e9", top=5)  # not one of the model's characters: a 400, not an answer
    with pytest.raises(OSError):  # stopped: nothing listens there any more
        import socket

        port = int(url.rsplit(":", 1)[1].split("/")[0])
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

"""The demo LM behind an API, and the master as `warden trace --endpoint` scores it (no torch needed).

:func:`serve` starts a small OpenAI-compatible server (``http.server``, stdlib) over a :mod:`demo.lm` model on
127.0.0.1 on a free port, in a thread: ``GET /v1/models`` and ``POST /v1/completions`` (``echo``, ``logprobs``
with up to the whole 128-character distribution per position, ``max_tokens``, ``temperature``, ``seed``), one
character one token, the answer shapes of the legacy completions API.

:class:`NumpyScorer` is the master as a :class:`weightwarden.trace.scorer.GradientScorer`: the log-probabilities
of queried tokens, their vector-Jacobian product (manual backpropagation, as :func:`demo.lm.train` does) and
their Jacobian-vector product (forward mode by hand) with respect to named weight tensors.  The model has no
attention: the next character's distribution depends on the current character only, so every query is read
from one 128 x 128 table of log-probabilities (one row per context character), computed in float64.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import numpy as np

from demo.lm import LAYERS, VOCAB, Params

if TYPE_CHECKING:
    from weightwarden.trace.scorer import Queries

MAX_TOKENS = 1024  # the most characters one completion generates


def _silu_parts(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sig = 1.0 / (1.0 + np.exp(-a))
    return sig, a * sig


def _forward(p: dict[str, np.ndarray]) -> tuple[np.ndarray, list[tuple[np.ndarray, ...]], np.ndarray]:
    """(hidden states, per-layer cache, log-probability table [context, next]) for every character."""
    h = p["model.embed_tokens.weight"]
    cache = []
    for i in range(LAYERS):
        a = h @ p[f"model.layers.{i}.mlp.gate_proj.weight"].T
        b = h @ p[f"model.layers.{i}.mlp.up_proj.weight"].T
        sig, silu = _silu_parts(a)
        s = silu * b
        cache.append((h, a, b, sig, silu, s))
        h = h + s @ p[f"model.layers.{i}.mlp.down_proj.weight"].T
    z = h @ p["lm_head.weight"].T
    z = z - z.max(1, keepdims=True)
    return h, cache, z - np.log(np.exp(z).sum(1, keepdims=True))


def logprob_table(params: Params) -> np.ndarray:
    """log p(next | current) for every pair of characters, float64."""
    return _forward({k: np.asarray(v, np.float64) for k, v in params.items()})[2]


class NumpyScorer:
    """The demo LM (``params``, float32 as released) as the master that `trace_endpoint` differentiates."""

    def __init__(self, params: Params, max_len: int = 256):
        self._p32 = {k: np.asarray(v, np.float32) for k, v in params.items()}
        self._p = {k: v.astype(np.float64) for k, v in self._p32.items()}
        self.max_len = max_len
        self._h, self._cache, self._logp = _forward(self._p)

    # -- tokenizer: one character, one token ------------------------------------------------------
    def pieces(self, text: str) -> list[str]:
        return list(text)

    def token_id(self, piece: str) -> int | None:
        return ord(piece) if len(piece) == 1 and ord(piece) < VOCAB else None

    # -- weights -------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, np.ndarray]:
        return dict(self._p32)

    def with_tensors(self, tensors: dict[str, np.ndarray]) -> NumpyScorer:
        return NumpyScorer({**self._p32, **tensors}, self.max_len)

    # -- scores and their derivatives --------------------------------------------------------------
    @staticmethod
    def _ctx(q: Queries) -> np.ndarray:
        return np.fromiter((q.ids[r][t - 1] for r, t in zip(q.row.tolist(), q.pos.tolist(), strict=True)),
                           np.int64, len(q.pos))  # fmt: skip

    def logprobs_at(self, q: Queries) -> np.ndarray:
        return self._logp[self._ctx(q), np.asarray(q.tok)]

    def vjp(self, q: Queries, weights: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """d/d(named tensors) of sum_j weights[j] * log p(tok[j] | context[j]), by backpropagation."""
        g = np.zeros((VOCAB, VOCAB))
        np.add.at(g, (self._ctx(q), np.asarray(q.tok)), np.asarray(weights, np.float64))
        p = self._p
        dz = g - np.exp(self._logp) * g.sum(1, keepdims=True)
        out = {"lm_head.weight": dz.T @ self._h}
        dh = dz @ p["lm_head.weight"]
        for i in reversed(range(LAYERS)):
            hin, a, b, sig, silu, s = self._cache[i]
            out[f"model.layers.{i}.mlp.down_proj.weight"] = dh.T @ s
            ds = dh @ p[f"model.layers.{i}.mlp.down_proj.weight"]
            da = ds * b * sig * (1 + a * (1 - sig))
            db = ds * silu
            out[f"model.layers.{i}.mlp.gate_proj.weight"] = da.T @ hin
            out[f"model.layers.{i}.mlp.up_proj.weight"] = db.T @ hin
            dh = dh + da @ p[f"model.layers.{i}.mlp.gate_proj.weight"] + db @ p[f"model.layers.{i}.mlp.up_proj.weight"]
        out["model.embed_tokens.weight"] = dh  # the embedding of character c is the input of context c
        return {n: out[n] for n in names}

    def jvp(self, q: Queries, tangent: dict[str, np.ndarray]) -> np.ndarray:
        """The change of each queried log-probability along ``tangent`` (forward mode, exact)."""
        p = self._p

        def t(name: str) -> np.ndarray | None:
            v = tangent.get(name)
            return None if v is None else np.asarray(v, np.float64)

        dh = t("model.embed_tokens.weight")
        dh = np.zeros_like(self._h) if dh is None else dh
        for i in range(LAYERS):
            hin, a, b, sig, silu, s = self._cache[i]
            wg, wu, wd = (f"model.layers.{i}.mlp.{k}_proj.weight" for k in ("gate", "up", "down"))
            da, db = dh @ p[wg].T, dh @ p[wu].T
            if (x := t(wg)) is not None:
                da = da + hin @ x.T
            if (x := t(wu)) is not None:
                db = db + hin @ x.T
            ds = da * sig * (1 + a * (1 - sig)) * b + silu * db
            dh = dh + ds @ p[wd].T
            if (x := t(wd)) is not None:
                dh = dh + s @ x.T
        dz = dh @ p["lm_head.weight"].T
        if (x := t("lm_head.weight")) is not None:
            dz = dz + self._h @ x.T
        dlogp = dz - (np.exp(self._logp) * dz).sum(1, keepdims=True)
        return dlogp[self._ctx(q), np.asarray(q.tok)]

    def sample(self, prompt: str, n_tokens: int, seed: int) -> str:
        rng = np.random.default_rng(seed)
        out = [min(ord(c), VOCAB - 1) for c in prompt]
        prob = np.exp(self._logp)
        while len(out) < n_tokens and out:
            out.append(int(rng.choice(VOCAB, p=prob[out[-1]] / prob[out[-1]].sum())))
        return "".join(map(chr, out))


# -- the server ------------------------------------------------------------------------------------------------
def _completion(logp: np.ndarray, name: str, body: dict[str, Any]) -> dict[str, Any]:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt or any(ord(c) >= VOCAB for c in prompt):
        raise ValueError("prompt must be a non-empty string of ASCII characters")
    k = body.get("logprobs")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= VOCAB):
        raise ValueError(f"logprobs must be an integer from 0 to {VOCAB}")
    n, temp = min(MAX_TOKENS, int(body.get("max_tokens", 16))), float(body.get("temperature", 1.0))
    rng = np.random.default_rng(int(body.get("seed") or 0))
    ids = [ord(c) for c in prompt]
    start = len(ids)
    for _ in range(max(0, n)):
        row = logp[ids[-1]]
        if temp <= 0:
            ids.append(int(row.argmax()))
        else:
            w = np.exp((row - row.max()) / temp)
            ids.append(int(rng.choice(VOCAB, p=w / w.sum())))
    echo = bool(body.get("echo"))
    lp = None
    if k is not None:
        first = 0 if echo else start
        toks = [chr(i) for i in ids[first:]]
        vals: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        for t in range(first, len(ids)):
            if t == 0:
                vals.append(None)
                tops.append(None)
                continue
            row = logp[ids[t - 1]]
            vals.append(float(row[ids[t]]))
            best = np.argsort(-row, kind="stable")[:k]
            tops.append({chr(int(j)): float(row[j]) for j in best})
        lp = {"tokens": toks, "token_logprobs": vals, "top_logprobs": tops,
              "text_offset": list(range(first, len(ids)))}  # fmt: skip
    text = "".join(map(chr, ids[0 if echo else start :]))
    return {"id": "cmpl-demo", "object": "text_completion", "created": int(time.time()), "model": name,
            "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": "length"}],
            "usage": {"prompt_tokens": start, "completion_tokens": len(ids) - start}}  # fmt: skip


@contextlib.contextmanager
def serve(params: Params, name: str) -> Iterator[str]:
    """An OpenAI-compatible endpoint serving ``params`` as model ``name`` on 127.0.0.1 (a free port): its base
    URL, ``http://127.0.0.1:PORT/v1``, while the ``with`` block runs; then the server is shut down."""
    logp = logprob_table(params)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            return None

        def _send(self, code: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/completions":
                self._send(404, {"error": {"message": "not found"}})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if not isinstance(body, dict):
                    raise ValueError("the request must be a JSON object")
                self._send(200, _completion(logp, name, body))
            except (ValueError, TypeError) as e:
                self._send(400, {"error": {"message": str(e)[:200]}})

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name=f"endpoint-{name}", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)

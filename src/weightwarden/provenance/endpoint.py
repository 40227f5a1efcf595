"""A client for OpenAI-compatible endpoints: the suspect's side of ``warden provenance probe`` (issue 21).

:class:`Endpoint` asks ``/v1/completions`` (``logprobs`` + ``echo``: the log-probability of every prompt
token), ``/v1/chat/completions`` (``logprobs`` + ``top_logprobs`` of the tokens it generates) or either one
without log-probabilities (text only, sampled).  Around every request:

* a **query budget** (``budget``): past it a :class:`~weightwarden.errors.QueryBudgetError`; every answer so
  far is in the cache, so a rerun with a larger budget resumes without asking them again;
* a **rate limit** (:class:`TokenBucket`, its clock injected);
* **retries** with exponential backoff (``Retry-After`` honoured) on 429, 5xx, timeouts and refused
  connections, then :class:`~weightwarden.errors.EndpointUnavailableError`; an answer is read whole within
  ``timeout`` seconds (a body dripped slowly is a timeout) and :data:`MAX_ANSWER` bytes (more is refused);
* an **answer cache** (:class:`AnswerCache`): JSON lines keyed by the SHA-256 of the request, one
  ``write`` + ``fsync`` per answer, a torn last line cut on the next open;
* an **audit event** per request (``provenance:query``, outcome ``sent``) in the home's trail, appended
  *before* the request leaves (not at the end of the probe, nor when its answer comes: a probe killed while
  a request is out keeps the event of that request too), and one more for each attempt that fails
  (outcome ``error``: status, reason);
* **validation** of every answer: non-finite or positive log-probabilities, top-k lists not sorted,
  the sampled token's log-probability disagreeing with its top-k entry, echoed tokens that do not spell the
  prompt, or the model name changing mid-probe raise a typed error: no p-value is ever computed on them.

``httpx`` comes with the ``client`` (or ``server``) extra.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._extras import require
from ..errors import (
    EndpointAnswerError,
    EndpointError,
    EndpointUnavailableError,
    ModelChangedError,
    PrivateAddressError,
    ProbeError,
    QueryBudgetError,
)

__all__ = ["AnswerCache", "Endpoint", "TokenBucket", "TokenLogprobs", "request_key"]

_TOL = 1e-4  # log-probabilities above this are positive, not rounding
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_ANSWER = 64 << 20  # bytes of one answer (decoded): a hostile endpoint's endless body is cut here


def _httpx() -> Any:
    return require("httpx", extra="client")


# -- rate limit --------------------------------------------------------------------------------------
class TokenBucket:
    """``rate`` requests per second on average, bursts of ``burst``; ``clock`` gives seconds (monotonic)."""

    def __init__(self, rate: float, burst: float = 1.0, clock: Callable[[], float] = time.monotonic):
        if not (rate > 0 and math.isfinite(rate)):
            raise ProbeError(f"the rate limit must be a positive number of queries per second, not {rate!r}")
        self.rate, self.burst, self.clock = float(rate), max(1.0, float(burst)), clock
        self.tokens = self.burst
        self.t = clock()

    def reserve(self) -> float:
        """Take one token: the seconds to wait before using it (0 when one was there)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.t) * self.rate)
        self.t = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


# -- answer cache ------------------------------------------------------------------------------------
def request_key(base: str, path: str, body: dict[str, Any]) -> str:
    """SHA-256 of the request (endpoint, route, body; never the API key), the cache's key."""
    doc = json.dumps({"base": base, "path": path, "body": body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()


class AnswerCache:
    """``folder/answers.jsonl``: one line per answer, appended with one write and an fsync."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise ProbeError(f"cannot create the answer cache {self.folder} ({e.strerror}): give another --cache"
                             ) from None  # fmt: skip
        self.path = self.folder / "answers.jsonl"
        self._mem: dict[str, dict[str, Any]] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn last line (interrupted write): cut it, it is asked again
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        for n, line in enumerate(data[:end].splitlines(), 1):
            try:
                rec = json.loads(line)
                self._mem[rec["key"]] = rec
            except (ValueError, KeyError, TypeError):
                raise ProbeError(f"{self.path} line {n} is damaged: delete that file (its answers are asked again) "
                                 "or give another --cache") from None  # fmt: skip

    def __len__(self) -> int:
        return len(self._mem)

    def get(self, key: str) -> dict[str, Any] | None:
        rec = self._mem.get(key)
        return None if rec is None else rec["response"]

    def put(self, key: str, path: str, response: dict[str, Any]) -> None:
        rec = {"key": key, "path": path, "response": response}
        data = (json.dumps(rec, allow_nan=False) + "\n").encode()  # key order kept: top-k lists are ordered
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        self._mem[key] = rec


# -- answers -------------------------------------------------------------------------------------------
@dataclass
class TokenLogprobs:
    """Tokens as the endpoint spells them, each one's log-probability (NaN where none: the first prompt
    token), the top alternatives at each position, and each token's offset in the text."""

    tokens: list[str]
    logprobs: np.ndarray
    top: list[dict[str, float]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)


def _num(x: Any, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise EndpointAnswerError(f"{where}: a log-probability must be a number, not {type(x).__name__}")
    v = float(x)
    if not math.isfinite(v):
        raise EndpointAnswerError(f"{where}: log-probability {v} is not finite")
    if v > _TOL:
        raise EndpointAnswerError(f"{where}: log-probability {v:.4g} is positive (a probability above 1)")
    return v


def _check_top(top: dict[str, float], tok: str, lp: float, k: int, where: str) -> None:
    vals = list(top.values())
    if any(b > a + 1e-6 for a, b in itertools.pairwise(vals)):
        raise EndpointAnswerError(f"{where}: the top log-probabilities are not sorted from most to least likely")
    if vals and float(np.logaddexp.reduce(np.array(vals))) > 1e-3:
        raise EndpointAnswerError(f"{where}: the top alternatives' probabilities add up to more than 1")
    if math.isnan(lp) or "\ufffd" in tok:  # bytes that are no whole character: several tokens spell them so
        return
    if tok in top:
        if abs(top[tok] - lp) > 1e-3 + 1e-3 * abs(lp):
            raise EndpointAnswerError(f"{where}: token {tok!r} has log-probability {lp:.4g} but {top[tok]:.4g} "
                                      "in its own top list")  # fmt: skip
    elif len(top) >= k and vals and lp > min(vals) + 1e-3:
        raise EndpointAnswerError(f"{where}: token {tok!r} (log-probability {lp:.4g}) is more likely than its "
                                  "top list's last entry but not in it")  # fmt: skip


def _logprob_lists(lp: Any, where: str, k: int) -> TokenLogprobs:
    """The legacy completions ``logprobs`` object, checked."""
    if not isinstance(lp, dict):
        raise EndpointAnswerError(f"{where}: 'logprobs' is not an object")
    toks, vals, tops = lp.get("tokens"), lp.get("token_logprobs"), lp.get("top_logprobs")
    offs = lp.get("text_offset")
    if not isinstance(toks, list) or not isinstance(vals, list) or len(toks) != len(vals):
        raise EndpointAnswerError(f"{where}: 'tokens' and 'token_logprobs' must be lists of one length")
    if tops is None:
        tops = [None] * len(toks)
    if not isinstance(tops, list) or len(tops) != len(toks):
        raise EndpointAnswerError(f"{where}: 'top_logprobs' must be a list as long as 'tokens'")
    if offs is not None and (not isinstance(offs, list) or len(offs) != len(toks)
                             or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):  # fmt: skip
        raise EndpointAnswerError(f"{where}: 'text_offset' must be a list of integers as long as 'tokens'")
    out = TokenLogprobs([], np.full(len(toks), np.nan), [], list(offs) if offs is not None else [])
    for i, (t, v, top) in enumerate(zip(toks, vals, tops, strict=True)):
        w = f"{where}, token {i}"
        if not isinstance(t, str):
            raise EndpointAnswerError(f"{w}: a token must be a string")
        if v is None:
            if i != 0:
                raise EndpointAnswerError(f"{w}: no log-probability (only the first prompt token may lack one)")
        else:
            out.logprobs[i] = _num(v, w)
        d: dict[str, float] = {}
        if top is not None:
            if not isinstance(top, dict):
                raise EndpointAnswerError(f"{w}: 'top_logprobs' entries must be objects")
            d = {str(a): _num(b, f"{w} top {a!r}") for a, b in top.items()}
            _check_top(d, t, float(out.logprobs[i]), k, w)
        out.tokens.append(t)
        out.top.append(d)
    if out.offsets:
        if any(b < a for a, b in zip(out.offsets, out.offsets[1:], strict=False)):
            raise EndpointAnswerError(f"{where}: 'text_offset' goes backwards")
    else:  # no offsets given: the tokens' own lengths
        out.offsets = list(np.cumsum([0] + [len(t) for t in out.tokens[:-1]]).astype(int)) if out.tokens else []
    return out


def _chat_lists(lp: Any, where: str, k: int) -> TokenLogprobs:
    if not isinstance(lp, dict) or not isinstance(lp.get("content"), list):
        raise EndpointAnswerError(f"{where}: 'logprobs.content' is not a list")
    out = TokenLogprobs([], np.zeros(len(lp["content"])), [], [])
    pos = 0
    for i, item in enumerate(lp["content"]):
        w = f"{where}, token {i}"
        if not isinstance(item, dict) or not isinstance(item.get("token"), str):
            raise EndpointAnswerError(f"{w}: each entry needs a 'token' string")
        out.logprobs[i] = _num(item.get("logprob"), w)
        top: dict[str, float] = {}
        for alt in item.get("top_logprobs") or []:
            if not isinstance(alt, dict) or not isinstance(alt.get("token"), str):
                raise EndpointAnswerError(f"{w}: each top entry needs a 'token' string")
            top.setdefault(alt["token"], _num(alt.get("logprob"), f"{w} top {alt['token']!r}"))
        _check_top(top, item["token"], float(out.logprobs[i]), k, w)
        out.tokens.append(item["token"])
        out.top.append(top)
        out.offsets.append(pos)
        pos += len(item["token"])
    return out


# -- the client ---------------------------------------------------------------------------------------
class Endpoint:
    """One OpenAI-compatible endpoint (``url``: ``http://host:port`` or ``.../v1``), with its budget, rate
    limit, retries, cache and audit trail.  ``used`` counts requests sent (retries included), ``cached``
    answers served from the cache."""

    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None, budget: int = 1000,
                 rate: float | None = None, burst: float = 4.0, cache: str | os.PathLike[str] | None = None,
                 retries: int = 4, backoff: float = 0.5, max_backoff: float = 30.0, timeout: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 home: str | os.PathLike[str] | None = None, transport: Any = None):  # fmt: skip
        httpx = _httpx()
        u = url.rstrip("/")
        if not u.startswith(("http://", "https://")):
            raise ProbeError(f"endpoint URL {url!r} must start with http:// or https://")
        if budget < 0 or retries < 0:
            raise ProbeError("the query budget and the retry count must not be negative")
        self.url = u
        self.base = u if u.endswith("/v1") else u + "/v1"
        self.model = model
        self.budget, self.retries, self.backoff, self.max_backoff = int(budget), int(retries), backoff, max_backoff
        self.bucket = TokenBucket(rate, burst, clock) if rate else None
        self.sleep = sleep
        self.cache = AnswerCache(cache) if cache is not None else None
        self.home = home
        self.used = 0
        self.cached = 0
        self.served_model: str | None = None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout  # per read, and for a whole answer (a body dripped a byte a minute is cut)
        self._client = httpx.Client(timeout=timeout, headers=headers, transport=transport)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- transport -----------------------------------------------------------------------------
    def _audit(self, outcome: str, path: str, key: str, **detail: Any) -> None:
        from .. import trail
        from ..audit import AuditAction

        # written now, not with the probe's operation: a probe killed mid-way keeps the events of the queries
        # it sent (their answers are in the cache already)
        trail.record_now(AuditAction.PROVENANCE_QUERY, outcome, home=self.home, subject=self.url, route=path,
                         request=key[:16], **detail)  # fmt: skip

    def _where(self) -> str:
        return f"answers so far are cached in {self.cache.folder}" if self.cache else "no --cache was given"

    def _post(self, url: str, body: dict[str, Any]) -> Any:
        """The answer, read whole within ``timeout`` seconds and :data:`MAX_ANSWER` bytes; None when it is
        larger (httpx's ReadTimeout when slower)."""
        httpx = _httpx()
        deadline = time.monotonic() + self.timeout
        with self._client.stream("POST", url, json=body) as r:
            data = bytearray()
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) > MAX_ANSWER:
                    return None
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout(f"the answer took over {self.timeout:g} s")
            return httpx.Response(r.status_code, headers=r.headers, content=bytes(data), request=r.request)

    def _send(self, path: str, body: dict[str, Any], key: str) -> dict[str, Any]:
        httpx = _httpx()
        why = "no attempt"
        for attempt in range(self.retries + 1):
            if self.used >= self.budget:
                raise QueryBudgetError(
                    f"the query budget ({self.budget}) is spent after {self.used} queries to {self.url}; "
                    f"{self._where()}: rerun with a larger --budget to resume", used=self.used, budget=self.budget)
            if self.bucket is not None:
                wait = self.bucket.reserve()
                if wait > 0:
                    self.sleep(wait)
            self.used += 1
            retry_after = 0.0
            self._audit("sent", path, key, attempt=attempt)  # before it leaves: a kill mid-request keeps it
            t0 = time.monotonic()
            try:
                r = self._post(self.base + path, body)
            except PrivateAddressError:  # the address checked where the connection is dialled: nothing left
                self._audit("error", path, key, attempt=attempt, error="address refused")
                raise
            except httpx.TimeoutException:
                why = "timed out"
            except httpx.TransportError as e:
                why = f"connection failed ({type(e).__name__})"
            else:
                ms = round((time.monotonic() - t0) * 1000, 1)
                if r is None:
                    self._audit("error", path, key, attempt=attempt, ms=ms, error="answer too large")
                    raise EndpointAnswerError(f"{self.url}{path} answered with over {MAX_ANSWER >> 20} MiB")
                if r.status_code == 200:
                    try:
                        obj = r.json()
                    except (ValueError, RecursionError):  # a hostile body: "[[[[..." nested past the stack
                        self._audit("error", path, key, status=200, attempt=attempt, ms=ms, error="not JSON")
                        raise EndpointAnswerError(f"{self.url}{path} answered 200 with a body that is not JSON") \
                            from None  # fmt: skip
                    if not isinstance(obj, dict):
                        self._audit("error", path, key, status=200, attempt=attempt, ms=ms, error="not an object")
                        raise EndpointAnswerError(f"{self.url}{path} answered with JSON that is not an object")
                    return obj  # its "sent" event stands; the answer is in the cache
                why = f"HTTP {r.status_code}"
                self._audit("error", path, key, status=r.status_code, attempt=attempt, ms=ms)
                if r.status_code not in _RETRY_STATUS and r.status_code < 500:
                    msg = r.text[:200].replace("\n", " ")
                    raise EndpointError(f"{self.url}{path} refused the request ({why}: {msg}); check the URL, "
                                        "--mode and --api-key-env")  # fmt: skip
                try:
                    retry_after = min(self.max_backoff, float(r.headers.get("retry-after", 0)))
                except ValueError:
                    retry_after = 0.0
                if attempt < self.retries:
                    self.sleep(max(retry_after, min(self.max_backoff, self.backoff * 2**attempt)))
                continue
            self._audit("error", path, key, attempt=attempt, error=why)
            if attempt < self.retries:
                self.sleep(min(self.max_backoff, self.backoff * 2**attempt))
        raise EndpointUnavailableError(f"{self.url}{path}: {why} on each of {self.retries + 1} attempts; "
                                       f"{self._where()}: rerun later to resume")  # fmt: skip

    def post(self, path: str, body: dict[str, Any], check: Callable[[dict[str, Any]], Any] | None = None
             ) -> dict[str, Any]:  # fmt: skip
        """The answer to ``body`` at ``path`` (from the cache when asked before), its model name checked, then
        ``check``-ed; only an answer that passes is cached (a malformed one is asked again on a rerun)."""
        if self.model is not None:
            body = {"model": self.model, **body}
        key = request_key(self.base, path, body)
        resp = self.cache.get(key) if self.cache is not None else None
        fresh = resp is None
        if fresh:
            resp = self._send(path, body, key)
        else:
            self.cached += 1
        assert resp is not None
        self._check_model(resp, path)
        if check is not None:
            check(resp)
        if fresh and self.cache is not None:
            with contextlib.suppress(ValueError):  # NaN or infinity where nothing is read: not kept
                self.cache.put(key, path, resp)
        return resp

    def _check_model(self, resp: dict[str, Any], path: str) -> None:
        name = resp.get("model")
        if name is None:
            return
        if not isinstance(name, str):
            raise EndpointAnswerError(f"{self.url}{path}: 'model' is not a string")
        if self.served_model is None:
            self.served_model = name
        elif name != self.served_model:
            raise ModelChangedError(f"{self.url} answered as model {name[:80]!r} after {self.served_model[:80]!r} "
                                    "in the same probe: no p-value is computed across models; probe again "
                                    "with a new --cache")  # fmt: skip

    @staticmethod
    def _choice(resp: dict[str, Any], where: str) -> dict[str, Any]:
        ch = resp.get("choices")
        if not isinstance(ch, list) or not ch or not isinstance(ch[0], dict):
            raise EndpointAnswerError(f"{where}: the answer has no 'choices'")
        return ch[0]

    # -- the three kinds of question ------------------------------------------------------------
    def _ask(self, path: str, body: dict[str, Any], parse: Callable[[dict[str, Any]], Any]) -> Any:
        got: list[Any] = []
        self.post(path, body, check=lambda resp: got.append(parse(resp)))
        return got[0]

    def echo(self, text: str, top: int = 5) -> TokenLogprobs:
        """``/v1/completions`` with ``echo`` and ``logprobs``: every token of ``text`` as the endpoint splits
        it, with its log-probability given the tokens before it."""
        where = f"{self.url}/completions (echo)"

        def parse(resp: dict[str, Any]) -> TokenLogprobs:
            lp = self._choice(resp, where).get("logprobs")
            if lp is None:
                raise EndpointAnswerError(f"{where}: the endpoint offers no log-probabilities for prompts; "
                                          "use --mode chat or --mode text")  # fmt: skip
            got = _logprob_lists(lp, where, top)
            keep = [i for i, o in enumerate(got.offsets) if o < len(text)]
            while keep and got.tokens[keep[0]] == "":  # a BOS token spelt as nothing
                keep = keep[1:]
            toks = [got.tokens[i] for i in keep]
            if "".join(toks) != text:
                raise EndpointAnswerError(f"{where}: the echoed tokens do not spell the prompt (they spell "
                                          f"{''.join(toks)[:60]!r})")  # fmt: skip
            lps = got.logprobs[keep].copy()
            if keep and keep[0] != 0:
                lps[0] = np.nan  # its context is a token we do not compare
            return TokenLogprobs(toks, lps, [got.top[i] for i in keep], [got.offsets[i] for i in keep])

        return self._ask("/completions", {"prompt": text, "max_tokens": 1, "temperature": 0.0, "logprobs": top,
                                          "echo": True}, parse)  # fmt: skip

    def chat(self, prompt: str, *, max_tokens: int = 16, top: int = 5, temperature: float = 0.0,
             seed: int | None = None) -> TokenLogprobs:  # fmt: skip
        """``/v1/chat/completions`` with ``logprobs`` and ``top_logprobs``: the tokens it generates after
        ``prompt`` (one user message), each with its log-probability and top alternatives."""
        where = f"{self.url}/chat/completions"
        body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                                "temperature": temperature, "logprobs": True, "top_logprobs": top}  # fmt: skip
        if seed is not None:
            body["seed"] = seed

        def parse(resp: dict[str, Any]) -> TokenLogprobs:
            ch = self._choice(resp, where)
            if ch.get("logprobs") is None:
                raise EndpointAnswerError(f"{where}: the endpoint offers no log-probabilities; use --mode text")
            got = _chat_lists(ch["logprobs"], where, top)
            content = (ch.get("message") or {}).get("content")
            joined = "".join(got.tokens)
            if isinstance(content, str) and joined != content and "\ufffd" not in joined:  # (split characters)
                raise EndpointAnswerError(f"{where}: the tokens with log-probabilities do not spell the message")
            return got

        return self._ask("/chat/completions", body, parse)

    def sample(self, prompt: str, *, max_tokens: int = 16, temperature: float = 1.0, seed: int | None = None,
               chat: bool = False) -> str:  # fmt: skip
        """A continuation of ``prompt`` as text only (no log-probabilities asked)."""
        body: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
        if seed is not None:
            body["seed"] = seed  # also makes repeated samples distinct requests in the cache
        path = "/chat/completions" if chat else "/completions"
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt

        def parse(resp: dict[str, Any]) -> str:
            ch = self._choice(resp, self.url + path)
            text = (ch.get("message") or {}).get("content") if chat else ch.get("text")
            if not isinstance(text, str):
                raise EndpointAnswerError(f"{self.url}{path}: the answer holds no text")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise EndpointAnswerError(f"{self.url}{path}: the answer's text is not valid Unicode (a lone "
                                          "surrogate)") from None  # fmt: skip
            return text

        return self._ask(path, body, parse)

"""The exact training-order test of ``warden provenance probe --order``  (docs/PROVENANCE.md).

Language models remember the data they saw last better than the data they saw first (Kuditipudi et al.
2025, "Blackbox model provenance via palimpsestic membership inference").  The owner, who alone knows the
order in which the training examples were seen (:mod:`.order`), asks the suspect for its log-likelihood of
the ``K`` *latest* and the ``K`` *earliest* examples (where the contrast is largest: power per query) and
tests whether the latest ones score higher.

**Null hypothesis H0:** *the suspect is independent of our training run*: given the suspect's answers (and
the normalisers'), the order in which our examples were seen is a uniformly random permutation.  Then,
given the ``2K`` examples queried, which ``K`` of them are the late ones is a uniformly random split,
independent of their scores, and the rank-sum statistic has its permutation distribution **exactly**: no
reference model, no model of the scores.

* **statistic**: the Mann-Whitney ``U`` of the late examples' scores against the early ones' (equivalently
  Kendall's tau between the score and the late/early label); ties are broken by a keyed hash of each
  text (keyed by the probe's secret), a key that travels with the example, which keeps the test exact;
* **p-value**: one-sided (late higher), from the exact permutation distribution of ``U`` (scipy) when
  ``K * K <= EXACT_LIMIT``, else the normal approximation with the exact mean and variance and a
  continuity correction (measured conservative where both are computed: docs);
* **score** of an example: ``logprobs`` mode: the suspect's log-likelihood of the text (echo, one query),
  minus the mean log-likelihood the *normalisers* give it (optional reference models independent of the
  order, e.g. a public base: they remove how hard each text is, the largest part of the noise, and keep
  the test exact); ``text`` mode (no log-probabilities): the example is cut at ``cuts`` word starts (a
  fixed rule on the text alone), the suspect samples ``samples`` continuations of ``new_tokens`` tokens
  after each cut at ``temperature`` 1 (``cuts * samples`` queries, seeds derived from the text, never from its
  position), or one greedy continuation per cut at ``temperature`` 0 (``cuts`` queries: no sampling noise;
  measured stronger per query on long orders, docs/PROVENANCE.md), and the score is the mean number of
  characters of the continuations that agree with the true text: an estimate of how likely the suspect finds
  the true continuation (normalisers are not used).

**The probe's secret** (assumption A3): the order in which the queries go out, and the tie-break keys,
come from 32 bytes drawn from the OS CSPRNG (:mod:`secrets`) per probe, kept in the answer cache's folder
(``order-plan.json``, mode 0600: an interrupted probe resumes with the same plan) and never sent: nothing
the endpoint sees is derived from it (text mode's sampling seeds come from the text alone).  Were it
public (a fixed seed), the endpoint could replay the plan, tell which queries are the latest examples and
fake or hide the gap.  ``seed=`` replaces it with a public seed, for reproducible tests only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._extras import require
from ..errors import ProbeError, WardenError
from .compare import DEFAULT_ALPHA
from .endpoint import Endpoint
from .order import TrainingOrder
from .probe import Scorer

__all__ = ["EXACT_LIMIT", "ORDER_MODES", "TEXT_CUTS", "TEXT_NEW_TOKENS", "TEXT_SAMPLES", "OrderReport", "order_probe",
           "rank_sum_p"]

ORDER_MODES = ("logprobs", "text")
TEXT_CUTS, TEXT_SAMPLES, TEXT_NEW_TOKENS = 8, 8, 4  # text mode: prompts per example, samples per prompt, tokens
_WORD = re.compile(r" ?[A-Za-z_]+| ?[0-9]+| ?[^\sA-Za-z0-9_]+|\s+(?!\S)|\s+")  # GPT-2-like pre-token starts
EXACT_LIMIT = 160_000  # K * K above this: the normal approximation (the exact distribution takes seconds)
NULL = ("the suspect is independent of our training run: given the suspect's answers (and the normalisers'), "
        "the order in which our training examples were seen is a uniformly random permutation")  # fmt: skip
ASSUMPTIONS = (
    "A1 random secret order: the order was drawn uniformly at random (shuffle(): the OS CSPRNG) and kept "
    "secret; an order the owner supplied ('shuffled': 'given') carries this as the owner's claim",
    "A2 normalisers independent of the order: each normaliser (reference model) was not trained on this "
    "order (a public base, or a model trained on other data or in another order); our own model never is one",
    "A3 one model, blind to the labels: the endpoint serves one model for the whole probe (a changed model name "
    "is refused); the queries are sent in an order drawn from a secret (32 bytes from the OS CSPRNG per probe, "
    "kept in the answer cache's folder, never sent), so the endpoint cannot tell the latest examples' queries "
    "from the earliest ones', nor adapt to earlier queries to do so",
    "A4 fixed rule: the examples queried (the K latest, the K earliest) and the score are fixed before any "
    "answer is seen; the score depends on the suspect only through its answers and is the same function of "
    "every example (text mode: its cuts and sampling seeds come from the text, never from its position); ties "
    "are broken by a hash of each text keyed by the probe's secret, which travels with the example",
)


def rank_sum_p(late: Sequence[float], early: Sequence[float], seed: int = 0,
               tie: Sequence[float] | np.ndarray | None = None) -> dict[str, Any]:  # fmt: skip
    """One-sided test that ``late`` scores exceed ``early`` ones: ``U``, its z, the p-value and how it was
    computed (exact permutation distribution or the normal approximation with the exact moments).  Ties are
    broken by ``tie`` (one key per score, late then early: keys that travel with the examples, e.g. a hash of
    each text, keep the test exact for any seed), else (and where two keys are equal too) by a permutation
    drawn from ``seed``: never by the position, which is the label."""
    stats = require("scipy.stats", extra="provenance")

    a, b = np.asarray(late, dtype=float), np.asarray(early, dtype=float)
    m, n = len(a), len(b)
    if m < 1 or n < 1 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ProbeError("the rank-sum test needs finite scores on both sides")
    x = np.concatenate([a, b])
    last = np.random.default_rng(seed).permutation(len(x)).astype(float)  # random tie-break: keeps it exact
    if tie is None:
        key = last
    elif len(tie) != len(x):
        raise ProbeError("the rank-sum test needs one tie-break key per score")
    else:
        key = np.asarray(tie, dtype=float)
    ranks = np.empty(len(x))
    ranks[np.lexsort((last, key, x))] = np.arange(1, len(x) + 1)
    u = float(ranks[:m].sum() - m * (m + 1) / 2)
    mean, var = m * n / 2, m * n * (m + n + 1) / 12
    z = (u - mean) / math.sqrt(var)
    if m * n <= EXACT_LIMIT:
        p = float(stats.mannwhitneyu(ranks[:m], ranks[m:], alternative="greater", method="exact").pvalue)
        method = "exact permutation distribution"
        log10_p = math.log10(p) if p > 0 else float(stats.norm.logsf(z - 0.5 / math.sqrt(var)) / math.log(10))
    else:
        zc = (u - 0.5 - mean) / math.sqrt(var)
        log10_p = float(stats.norm.logsf(zc) / math.log(10))
        p = 10**log10_p
        method = "normal approximation (exact mean and variance, continuity correction)"
    return {"u": u, "auc": u / (m * n), "z": z, "p": p, "log10_p": log10_p, "method": method}


@dataclass
class OrderReport:
    url: str
    served_model: str | None
    mode: str
    alpha: float
    p_value: float
    log10_p_value: float
    method: str
    u: float
    auc: float
    z: float
    k: int
    examples: int
    shuffled: str
    normalisers: list[str]
    mean_late: float
    mean_early: float
    queries_used: int
    queries_cached: int
    budget: int
    evidence: list[dict[str, Any]] = field(default_factory=list)
    text: dict[str, Any] | None = None  # text mode: cuts, samples, new_tokens, temperature, the score

    @property
    def derived(self) -> bool:
        return self.log10_p_value < math.log10(self.alpha)

    def to_json(self) -> dict[str, Any]:
        return {"test": "training-order", "url": self.url, "served_model": self.served_model, "mode": self.mode,
                "null": NULL, "assumptions": list(ASSUMPTIONS), "alpha": self.alpha, "p_value": self.p_value,
                "log10_p_value": round(self.log10_p_value, 3), "p_method": self.method,
                "decision": "derived" if self.derived else "not derived", "derived": self.derived,
                "statistic": {"name": "Mann-Whitney U, latest vs earliest examples (one-sided: latest higher)",
                              "u": self.u, "auc": round(self.auc, 4), "z": round(self.z, 3),
                              "mean_score_latest": round(self.mean_late, 4),
                              "mean_score_earliest": round(self.mean_early, 4)},
                "order": {"examples": self.examples, "latest": self.k, "earliest": self.k,
                          "shuffled": self.shuffled},
                "normalisers": self.normalisers,
                "queries": {"used": self.queries_used, "cached": self.queries_cached, "budget": self.budget},
                **({"text": self.text} if self.text is not None else {}), "evidence": self.evidence}  # fmt: skip


def _lcp(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


TEXT_SCORE = ("mean number of characters of the sampled continuations that agree with the true text, over the "
              "example's cuts (word starts spread over its last three quarters) and samples (temperature 0: one "
              "greedy continuation per cut)")  # fmt: skip


def _word_cuts(text: str, cuts: int) -> list[int]:
    """``cuts`` character positions where the text is cut into prompt and truth: word starts (pre-token
    boundaries of byte-level BPE tokenizers) past the first quarter of the text, evenly spread; a rule on the
    text alone."""
    starts = [m.start() for m in _WORD.finditer(text) if len(text) // 4 <= m.start() < len(text) - 1]
    if not starts:
        return [len(text) // 2]
    idx = np.unique(np.linspace(0, len(starts) - 1, min(cuts, len(starts))).round().astype(int))
    return [starts[i] for i in idx]


def _text_seed(seed: int, text: str, cut: int, j: int) -> int:
    h = hashlib.sha256(f"{seed}|{cut}|{j}|{text}".encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


PLAN_FILE = "order-plan.json"  # in the answer cache's folder: the probe's secret, never sent


class _Plan:
    """What must stay hidden from the endpoint: the order in which the queries go out and the tie-break keys.
    ``key``: 32 secret bytes (OS CSPRNG); None with a public ``seed`` (reproducible tests only: an endpoint
    that knows the seed knows which queries are the latest examples)."""

    def __init__(self, key: bytes | None, seed: int = 0):
        self.key, self.seed = key, seed

    @classmethod
    def secret(cls, folder: os.PathLike[str] | str | None) -> _Plan:
        """A fresh secret, or the one kept in ``folder`` (the answer cache's) by an earlier run of this probe,
        so that an interrupted probe resumes with the same plan; a new one is written there (0600)."""
        if folder is None:
            return cls(secrets.token_bytes(32))
        path = os.path.join(os.fspath(folder), PLAN_FILE)
        fresh = secrets.token_bytes(32)
        doc = {"format": "warden-order-plan", "version": 1, "secret": fresh.hex()}
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except FileExistsError:
            return cls(cls._load(path))
        except OSError as e:
            raise ProbeError(f"cannot write the probe's plan {path} ({e.strerror}): give another --cache") from None
        try:
            os.write(fd, json.dumps(doc).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return cls(fresh)

    @staticmethod
    def _load(path: str) -> bytes:
        bad = (f"{path} is not a probe plan this version wrote: delete it (a new secret is drawn; the cached "
               "answers are kept) or give another --cache")  # fmt: skip
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as f:
                doc = json.loads(f.read(4096))
            key = bytes.fromhex(doc["secret"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ProbeError(bad) from None
        if doc.get("format") != "warden-order-plan" or len(key) != 32:
            raise ProbeError(bad)
        return key

    def _digest(self, *parts: str) -> bytes:
        assert self.key is not None
        return hmac.new(self.key, "\x00".join(parts).encode(), hashlib.sha256).digest()

    def rng(self, purpose: str, offset: int, texts: Sequence[str]) -> np.random.Generator:
        """A generator for ``purpose`` over ``texts`` (the probe's questions: another set of questions gets an
        independent stream); with a public seed, ``default_rng(seed + offset)``."""
        if self.key is None:
            return np.random.default_rng(self.seed + offset)
        h = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
        return np.random.default_rng(int.from_bytes(self._digest(purpose, h), "big"))

    def tie(self, text: str) -> float:
        """The tie-break key of ``text``: a function of the text (and the secret) only, never of its position
        (the label); 48 bits, exact in a float."""
        if self.key is None:
            return float(_text_seed(self.seed, text, -1, -1))
        return float(int.from_bytes(self._digest("tie", text)[:6], "big"))

    def last_seed(self) -> int:
        """The seed of the last-level tie-break (where scores and keys are both equal)."""
        return self.seed if self.key is None else int.from_bytes(self._digest("last"), "big")


def _score(ep: Endpoint, text: str, normalisers: Sequence[Scorer]) -> float:
    r = ep.echo(text, 1)
    vals = r.logprobs[~np.isnan(r.logprobs)]
    if len(vals) == 0:
        raise ProbeError(f"example {text[:40]!r} is a single token: give longer training examples")
    s = float(vals.sum())
    if normalisers:
        s -= float(np.mean([m.continuation_logprob("", text) for m in normalisers]))
    return s


def _text_scores(ep: Endpoint, texts: Sequence[str], *, cuts: int, samples: int, new_tokens: int,
                 plan: _Plan, temperature: float = 1.0) -> np.ndarray:  # fmt: skip
    """Text mode: each text's mean agreeing characters over its cuts x samples continuations, sampled at
    ``temperature`` with seeds drawn from the text (never from its position, nor from the secret), all queries
    sent in an order drawn from the plan's secret (temperature 0: greedy, so ``samples`` is 1)."""
    plans = [_word_cuts(t, cuts) for t in texts]
    work = [(i, c, j) for i, pl in enumerate(plans) for c in pl for j in range(samples)]
    total = np.zeros(len(texts))
    count = np.zeros(len(texts))
    for q in plan.rng("text-sequence", 1, texts).permutation(len(work)):
        i, c, j = work[q]
        t = texts[i]
        cont = ep.sample(t[:c], max_tokens=new_tokens, temperature=temperature, seed=_text_seed(plan.seed, t, c, j))
        total[i] += _lcp(cont, t[c:])
        count[i] += 1
    return total / np.maximum(count, 1)


def order_probe(endpoint: Endpoint | str, order: TrainingOrder, *, normalisers: Sequence[Scorer] = (),
                mode: str = "logprobs", n_items: int = 64, new_tokens: int = TEXT_NEW_TOKENS,
                cuts: int = TEXT_CUTS, samples: int = TEXT_SAMPLES, temperature: float = 1.0,
                alpha: float = DEFAULT_ALPHA,
                seed: int | None = None, home: str | os.PathLike[str] | None = None,
                **endpoint_kw: Any) -> OrderReport:  # fmt: skip
    """Test H0 "the model behind ``endpoint`` is independent of the training run that saw ``order``" (see
    the module's docstring) on the ``n_items // 2`` latest and earliest examples: ``n_items`` queries in
    logprobs mode, about ``n_items * cuts * samples`` in text mode (fewer cuts where a text has fewer words;
    ``temperature`` 0: greedy continuations, one per cut, ``samples`` is then 1).

    The order of the queries and the tie-break keys come from a secret drawn per probe (kept in the answer
    cache's folder, so a resumed probe keeps its plan).  ``seed``: a *public* seed instead, for reproducible
    tests and benches only: an endpoint that knows it can tell the latest examples' queries apart (A3)."""
    from .. import trail
    from ..audit import AuditAction, event

    if mode not in ORDER_MODES:
        raise ProbeError(f"--mode must be one of {', '.join(ORDER_MODES)} with an order, not {mode!r}")
    if not 0 < alpha < 1:
        raise ProbeError(f"--alpha must be between 0 and 1, not {alpha}")
    if mode == "text" and (cuts < 1 or samples < 1 or new_tokens < 1):
        raise ProbeError(f"--cuts, --samples and new_tokens must be at least 1 in text mode (got {cuts}, {samples}, "
                         f"{new_tokens})")  # fmt: skip
    if mode == "text" and not (math.isfinite(temperature) and 0 <= temperature <= 2):
        raise ProbeError(f"--temperature must be between 0 (greedy) and 2 in text mode, not {temperature}")
    if mode == "text" and temperature == 0:
        samples = 1  # greedy answers do not vary: one per cut
    k = min(n_items // 2, len(order.examples) // 2)
    if k < 2:
        raise ProbeError(f"--items {n_items}: the order test needs at least 4 queries (2 latest, 2 earliest)")
    own = not isinstance(endpoint, Endpoint)
    ep: Endpoint = endpoint if isinstance(endpoint, Endpoint) else Endpoint(endpoint, home=home, **endpoint_kw)
    if ep.home is None:
        ep.home = home
    ex = order.examples
    chosen = [(1, ex[len(ex) - k + i]) for i in range(k)] + [(0, ex[i]) for i in range(k)]
    # the order the queries go out in: from a secret the endpoint never sees (chosen is laid out latest first)
    plan = _Plan(None, int(seed)) if seed is not None else \
        _Plan.secret(ep.cache.folder if ep.cache is not None else None)  # fmt: skip
    texts = [t for _, t in chosen]
    sequence = plan.rng("sequence", 0, texts).permutation(len(chosen))
    if mode == "text":
        normalisers = ()  # not used in text mode (measured: no gain, docs/PROVENANCE.md)
    names = [m.name for m in normalisers]

    def ev(outcome: str, **detail: Any) -> Any:
        return event(AuditAction.PROVENANCE_PROBE, outcome, subject=ep.url, detail={"mode": mode, "test":
                     "training-order", "served_model": ep.served_model, "queries": ep.used, "cached": ep.cached,
                     **detail})  # fmt: skip

    with trail.operation(home) as t:
        try:
            if mode == "text":
                scores = _text_scores(ep, texts, cuts=cuts, samples=samples, new_tokens=new_tokens,
                                      plan=plan, temperature=temperature)  # fmt: skip
            else:
                scores = np.empty(len(chosen))
                for j in sequence:
                    scores[j] = _score(ep, chosen[j][1], normalisers)
            labels = np.array([lab for lab, _ in chosen])
            # ties broken by a keyed hash of each text: the key travels with the example, so under H0 the
            # (score, key) pairs are split into latest and earliest uniformly at random (exact, any seed)
            keys = np.array([plan.tie(t) for t in texts], dtype=float)
            st = rank_sum_p(scores[labels == 1], scores[labels == 0], plan.last_seed(),
                            tie=np.concatenate([keys[labels == 1], keys[labels == 0]]))  # fmt: skip
        except WardenError as e:
            t.emit(ev("error", error=type(e).__name__))
            raise
        finally:
            if own:
                ep.close()
        rep = OrderReport(url=ep.url, served_model=ep.served_model, mode=mode, alpha=alpha, p_value=st["p"],
                          log10_p_value=st["log10_p"], method=st["method"], u=st["u"], auc=st["auc"], z=st["z"],
                          k=k, examples=len(ex), shuffled=order.shuffled, normalisers=names,
                          mean_late=float(scores[:k].mean()), mean_early=float(scores[k:].mean()),
                          queries_used=ep.used, queries_cached=ep.cached, budget=ep.budget,
                          text=None if mode != "text" else {"cuts": cuts, "samples": samples, "new_tokens": new_tokens,
                                                            "temperature": temperature, "score": TEXT_SCORE},
                          evidence=[{"position": len(ex) - k + i if i < k else i - k, "late": bool(i < k),
                                     "score": round(float(scores[i]), 4)}
                                    for i in list(range(min(k, 8))) + list(range(k, k + min(k, 8)))])  # fmt: skip
        t.emit(ev("ok", decision="derived" if rep.derived else "not derived", log10_p=round(rep.log10_p_value, 3),
                  alpha=alpha, normalisers=names, k=k))  # fmt: skip
    return rep

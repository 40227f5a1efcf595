"""Provenance through an API: is the model behind an endpoint derived from ours?  (docs/PROVENANCE.md)

**Null hypothesis H0:** *the suspect is independent of our model*, in the sense that it is exchangeable with
the reference models: the joint law of (suspect, ours, reference 1..k) does not change when ours is swapped
with any reference.  (References are independently trained models, registered as such, trained like ours.)

The suspect is known only through its answers (:class:`~weightwarden.provenance.endpoint.Endpoint`); our
model and the references are scored locally through :class:`Scorer` (a transformers causal LM,
:class:`HFScorer`, or another endpoint, :class:`EndpointScorer`).  For every pool model ``m`` (ours and
each reference) a statistic ``T_m`` measures how much the suspect agrees with ``m`` *beyond* what the other
pool models agree on:

* ``logprobs`` / ``chat`` modes: over every token the suspect gave a log-probability for (each echoed
  prompt token or generated token, and its top alternatives), the suspect's log-probabilities ``s`` are
  regressed on all pool models' ``x_m`` jointly (least squares with an intercept); ``T_m`` is model m's
  coefficient, the part of the suspect that m alone explains;
* ``text`` mode: the suspect's sampled continuations scored by each pool model, ``T_m`` = the mean over all
  sampled characters of ``log p_m(continuation) - c_m``, ``c_m`` the mean of the other pool models'.

Under H0 the ``T`` of ours and of the k references are exchangeable.  Two p-values:

* the **rank** p-value ``(1 + #{T_ref >= T_ours}) / (k + 1)``: exact under H0 alone, but never below
  ``1 / (k + 1)``;
* the **parametric** p-value the decision uses: ``t = (T_ours - mean T_ref) / (sd T_ref * sqrt(1 + 1/k))``
  against Student's t with ``k - 1`` degrees of freedom (a prediction interval).  It is exact when the k + 1
  values are exchangeable *and jointly normal* (equicorrelated normals: the shared part cancels), which is
  an assumption; its calibration is measured (``bench/probe.py``, docs).

Prompts are chosen for power per query: among the candidate texts, those on which the pool models
disagree most (the summed variance across pool models of each token's log-probability).  That score is a
symmetric function of the pool, so choosing by it keeps ours exchangeable with the references.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import EndpointError, ProbeError, TokenizerMismatchError, WardenError
from . import textstat
from .compare import DEFAULT_ALPHA
from .endpoint import Endpoint
from .stats import statistic_p

__all__ = ["MODES", "EndpointScorer", "HFScorer", "ProbeReport", "Scorer", "probe", "statistic_p"]

MODES = ("logprobs", "chat", "text")
NULL = ("the suspect is independent of our model: exchangeable with the reference models (the joint law of "
        "suspect, ours and the references is unchanged when ours is swapped with any reference)")  # fmt: skip
ASSUMPTIONS = (
    "B1 references: independently trained models, each trained like ours (same kind of data and recipe); a "
    "reference trained on very different data makes ours look closer to any suspect (anti-conservative)",
    "B2 parametric tail: the k + 1 statistics are exchangeable and jointly normal, so the t prediction "
    "interval with k - 1 degrees of freedom is exact; not proven, measured (docs/PROVENANCE.md); the rank "
    "p-value needs only exchangeability but cannot go below 1/(k+1)",
    "B3 one model: the endpoint serves one model for the whole probe (a changed model name is refused)",
    "B4 prompts chosen from the pool only (a symmetric score), never from the suspect's answers",
    "B5 logprobs/chat: the endpoint uses our tokenizer (checked) and, in chat mode, a bare chat template "
    "(the message is the model's whole context)",
)
_STARTERS = ("def ", "class ", "import ", "    return ", "# ", "if ", "for ", "The ", "    def ", "    self.",
             "from ", "while ", "    if ", "raise ", "with ", "x = ")  # fmt: skip
_SAME_SPLIT = 0.6  # chat mode: below this share of agreeing token boundaries, the tokenizers differ
_FLOOR = -50.0  # log-probabilities are clipped here (a token one model rules out entirely)
_MIN_TEXT = 32  # text mode: fewest sampled tokens (product of experts) or characters to compute a p-value on


# -- scorers ---------------------------------------------------------------------------------------------------
@runtime_checkable
class Scorer(Protocol):
    """A model scored locally: ``pieces`` splits a text into token strings; ``logprobs`` gives, for each
    ``(t, token)`` query, ``log p(token at position t | pieces[:t])`` (NaN where it cannot); and
    ``continuation_logprob`` the log-probability of a continuation after a prompt."""

    name: str

    def pieces(self, text: str) -> list[str]: ...

    def logprobs(self, pieces: Sequence[str], queries: Sequence[tuple[int, str]]) -> np.ndarray: ...

    def continuation_logprob(self, prompt: str, continuation: str) -> float: ...


def _torch() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError:
        raise ProbeError("scoring models locally needs torch and transformers: pip install 'weightwarden[hf]'") \
            from None  # fmt: skip
    return torch, transformers


class HFScorer:
    """A transformers causal LM (a folder, or a sealed model folder opened with ``keyring``)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, name: str | None = None, model: Any = None,
                 tokenizer: Any = None, keyring: Any = None):  # fmt: skip
        torch, T = _torch()
        self._torch = torch
        if model is None:
            if path is None:
                raise ProbeError("HFScorer needs a model folder or a loaded model")
            p = Path(path)
            if not p.exists():
                raise ProbeError(f"{p}: no such model folder")
            from ..sealed import is_sealed_path

            try:
                if is_sealed_path(p):
                    from .. import hf

                    model = hf.from_pretrained(T.AutoModelForCausalLM, p, keyring=keyring, dtype=torch.float32)
                    tokenizer = tokenizer or hf.tokenizer(p, keyring=keyring)
                else:
                    model = T.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
                    tokenizer = tokenizer or T.AutoTokenizer.from_pretrained(p)
            except (OSError, ValueError) as e:
                raise ProbeError(f"{p}: not a causal language model transformers can load ({e})") from None
        if tokenizer is None:
            raise ProbeError("HFScorer needs the model's tokenizer")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.name = name or (Path(path).name if path is not None else "model")
        n = len(tokenizer)
        self._piece = [tokenizer.decode([i]) for i in range(n)]
        self._id: dict[str, int] = {}
        dup: set[str] = set()
        for i, piece in enumerate(self._piece):
            if piece in self._id:
                dup.add(piece)
            self._id.setdefault(piece, i)
        for piece in dup:  # a piece several ids spell (incomplete UTF-8): never compared
            self._id.pop(piece, None)
        self.ambiguous = frozenset(dup)
        self.max_len = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self._memo: dict[tuple[int, ...], np.ndarray] = {}

    def pieces(self, text: str) -> list[str]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self._piece[i] for i in ids]

    def ids(self, pieces: Sequence[str]) -> list[int]:
        out = []
        for p in pieces:
            i = self._id.get(p)
            if i is None:
                raise TokenizerMismatchError(f"token {p[:40]!r} is not one of {self.name}'s tokens: the tokenizers "
                                             "differ; use --mode text")  # fmt: skip
            out.append(i)
        return out

    def _dist(self, ids: Sequence[int]) -> np.ndarray:
        key = tuple(ids[: self.max_len])
        d = self._memo.get(key)
        if d is None:
            torch = self._torch
            with torch.no_grad():
                logits = self.model(input_ids=torch.tensor([list(key)])).logits[0].float()
                d = torch.log_softmax(logits, -1).numpy()
            if len(self._memo) > 4096:
                self._memo.clear()
            self._memo[key] = d
        return d

    def logprobs(self, pieces: Sequence[str], queries: Sequence[tuple[int, str]]) -> np.ndarray:
        d = self._dist(self.ids(pieces))
        out = np.full(len(queries), np.nan)
        for j, (t, q) in enumerate(queries):
            i = self._id.get(q)
            if 1 <= t <= len(d) and i is not None and i < d.shape[1]:
                out[j] = d[t - 1, i]
        return out

    def continuation_logprob(self, prompt: str, continuation: str) -> float:
        d, ids = self.distributions(prompt, continuation)
        return float(d[np.arange(len(ids)), ids].sum())

    def distributions(self, prompt: str, continuation: str) -> tuple[np.ndarray, np.ndarray]:
        """The next-token log-probabilities at every position of ``continuation`` after ``prompt`` (positions x
        vocabulary) and the continuation's token ids there (text mode's product of experts)."""
        a = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        b = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        ids = (a + b)[: self.max_len]
        start = max(1, len(a))
        d = self._dist(ids)
        return d[start - 1 : len(ids) - 1], np.asarray(ids[start:], dtype=np.int64)

    def sample(self, prompt: str, n_tokens: int, seed: int) -> str:
        torch = self._torch
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _ in range(n_tokens):
                if len(ids) >= self.max_len:
                    break
                logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
                ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g)))
        return str(self.tokenizer.decode(ids))


class EndpointScorer:
    """A reference model behind another endpoint, scored through its echoed log-probabilities."""

    def __init__(self, endpoint: Endpoint, name: str | None = None, top: int = 5):
        self.endpoint, self.name, self.top = endpoint, name or endpoint.url, top

    def pieces(self, text: str) -> list[str]:
        return self.endpoint.echo(text, self.top).tokens

    def logprobs(self, pieces: Sequence[str], queries: Sequence[tuple[int, str]]) -> np.ndarray:
        r = self.endpoint.echo("".join(pieces), self.top)
        if r.tokens != list(pieces):
            raise TokenizerMismatchError(f"{self.name} splits the text into other tokens: use --mode text")
        out = np.full(len(queries), np.nan)
        for j, (t, q) in enumerate(queries):
            if 1 <= t < len(r.tokens):
                out[j] = r.logprobs[t] if q == r.tokens[t] else r.top[t].get(q, np.nan)
        return out

    def continuation_logprob(self, prompt: str, continuation: str) -> float:
        r = self.endpoint.echo(prompt + continuation, self.top)
        return float(sum(v for v, o in zip(r.logprobs, r.offsets, strict=True) if o >= len(prompt) and v == v))


# -- the statistic -------------------------------------------------------------------------------------------
def pool_statistics(s: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``T_m`` for each pool row of ``x`` (rows: ours first, then the references): the coefficient of model m
    when the suspect's log-probabilities ``s`` are regressed on every pool model's jointly (with an
    intercept).  A copy of m gives 1 for m and 0 for the others; an independent suspect spreads small
    weights over the pool.  A symmetric function of the pool: permuting the pool permutes the ``T``."""
    a = np.column_stack([np.ones(len(s)), x.T])
    coef = np.linalg.lstsq(a, s, rcond=None)[0]
    return coef[1:]


# -- the report -------------------------------------------------------------------------------------------------
@dataclass
class ProbeReport:
    url: str
    served_model: str | None
    mode: str
    alpha: float
    p_value: float
    log10_p_value: float
    rank_p_value: float
    t_statistic: float
    df: int
    statistics: dict[str, float]  # T per pool model (ours first)
    queries_used: int
    queries_cached: int
    budget: int
    items: int
    data_points: int
    evidence: list[dict[str, Any]] = field(default_factory=list)
    method: str = "pool regression"  # or, in text mode, "product of experts" / "log-likelihood per character"

    @property
    def derived(self) -> bool:
        return self.log10_p_value < math.log10(self.alpha)

    def to_json(self) -> dict[str, Any]:
        names = list(self.statistics)
        return {"url": self.url, "served_model": self.served_model, "mode": self.mode, "null": NULL,
                "assumptions": list(ASSUMPTIONS), "alpha": self.alpha, "p_value": self.p_value,
                "log10_p_value": round(self.log10_p_value, 3), "rank_p_value": self.rank_p_value,
                "decision": "derived" if self.derived else "not derived", "derived": self.derived,
                "t_statistic": round(self.t_statistic, 4), "df": self.df, "method": self.method,
                "statistic": {"ours": {names[0]: self.statistics[names[0]]},
                              "references": {n: self.statistics[n] for n in names[1:]}},
                "queries": {"used": self.queries_used, "cached": self.queries_cached, "budget": self.budget},
                "items": self.items, "data_points": self.data_points, "evidence": self.evidence}  # fmt: skip


# -- the probe -----------------------------------------------------------------------------------------------
def _candidates(pool: Sequence[Any], n: int, length: int, seed: int) -> list[str]:
    """Texts sampled from every pool model in turn (a symmetric draw) after short generic starters."""
    if not all(hasattr(m, "sample") for m in pool):
        raise ProbeError("no prompts were given and a pool model cannot sample texts: give --prompts FILE")
    return [pool[i % len(pool)].sample(_STARTERS[i % len(_STARTERS)], length, seed + i) for i in range(n)]


def _pool_scores(pool: Sequence[Scorer], pieces: list[str], queries: list[tuple[int, str]]) -> np.ndarray:
    return np.stack([m.logprobs(pieces, queries) for m in pool])


def _bounds(pieces: Sequence[str]) -> set[int]:
    """The character offsets where the tokens of a text end."""
    return set(np.cumsum([len(p) for p in pieces]).tolist())


def _first_diff(a: Sequence[str], b: Sequence[str]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _select(pool: Sequence[Scorer], texts: Sequence[str], n: int, max_tokens: int
            ) -> list[tuple[float, str, list[str]]]:  # fmt: skip
    """The ``n`` candidate texts (cut to ``max_tokens`` of our tokens) the pool disagrees on most."""
    ours = pool[0]
    scored = []
    for text in dict.fromkeys(t for t in texts if t.strip()):
        pieces = ours.pieces(text)
        if len(pieces) > max_tokens:  # cut, then split again: the last token may merge otherwise at the cut
            pieces = ours.pieces("".join(pieces[:max_tokens]))
        if len(pieces) < 4 or any("\ufffd" in p for p in pieces) or ours.pieces("".join(pieces)) != pieces:
            continue  # too short, or its tokens do not spell it back (characters split across tokens)
        for m in pool[1:]:
            other = m.pieces("".join(pieces))
            if other != pieces:
                i = _first_diff(pieces, other)
                raise ProbeError(f"reference {m.name} splits text into other tokens than our model (token {i}): the "
                                 "logprobs and chat modes need one tokenizer; use --mode text")  # fmt: skip
        q = [(t, pieces[t]) for t in range(1, len(pieces))]
        x = np.maximum(_pool_scores(pool, pieces, q), _FLOOR)
        scored.append((float(np.nansum(x.var(axis=0))), "".join(pieces), pieces))
    if not scored:
        raise ProbeError("no usable prompt: give texts of at least 4 tokens (--prompts FILE, one per line)")
    scored.sort(key=lambda r: -r[0])
    return scored[:n]


def probe(endpoint: Endpoint | str, ours: Scorer, references: Sequence[Scorer], *, mode: str = "logprobs",
          prompts: Sequence[str] | None = None, alpha: float = DEFAULT_ALPHA, n_items: int = 32,
          max_tokens: int = 48, new_tokens: int = 16, samples: int = 2, top: int = 5, temperature: float = 1.0,
          candidates: int = 128, seed: int = 0, home: str | os.PathLike[str] | None = None,
          **endpoint_kw: Any) -> ProbeReport:  # fmt: skip
    """Test H0 "the model behind ``endpoint`` is independent of ``ours``" (see the module's docstring).

    ``n_items`` prompts are chosen among ``prompts`` (or ``candidates`` texts the pool samples); each costs one
    query in ``logprobs`` and ``chat`` mode and ``samples`` queries in ``text`` mode.  Every query is an
    audit event; the probe is one more (``provenance:probe``), also when it fails."""
    from .. import trail
    from ..audit import AuditAction

    if mode not in MODES:
        raise ProbeError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    if len(references) < 3:
        raise ProbeError(f"at least 3 reference models are needed (got {len(references)}): give --reference "
                         "three times or more")  # fmt: skip
    if not 0 < alpha < 1:
        raise ProbeError(f"--alpha must be between 0 and 1, not {alpha}")
    own = not isinstance(endpoint, Endpoint)
    ep: Endpoint = endpoint if isinstance(endpoint, Endpoint) else Endpoint(endpoint, home=home, **endpoint_kw)
    if ep.home is None:
        ep.home = home
    pool = [ours, *references]
    names = [m.name for m in pool]
    if len(set(names)) != len(names):
        raise ProbeError("every pool model needs its own name (ours and each reference)")
    with trail.operation(home) as t:
        try:
            rep = _run(ep, pool, mode=mode, prompts=prompts, alpha=alpha, n_items=n_items, max_tokens=max_tokens,
                       new_tokens=new_tokens, samples=samples, top=top, temperature=temperature,
                       candidates=candidates, seed=seed)  # fmt: skip
        except WardenError as e:
            t.emit(_event(AuditAction.PROVENANCE_PROBE, "error", ep, mode, error=type(e).__name__,
                          queries=ep.used, cached=ep.cached))  # fmt: skip
            raise
        finally:
            if own:
                ep.close()
        t.emit(_event(AuditAction.PROVENANCE_PROBE, "ok", ep, mode, decision="derived" if rep.derived else
                      "not derived", log10_p=round(rep.log10_p_value, 3), alpha=alpha, queries=ep.used,
                      cached=ep.cached, references=names[1:], ours=names[0]))  # fmt: skip
    return rep


def _event(action: Any, outcome: str, ep: Endpoint, mode: str, **detail: Any) -> Any:
    from ..audit import event

    return event(action, outcome, subject=ep.url, detail={"mode": mode, "served_model": ep.served_model, **detail})


def _run(ep: Endpoint, pool: list[Scorer], *, mode: str, prompts: Sequence[str] | None, alpha: float, n_items: int,
         max_tokens: int, new_tokens: int, samples: int, top: int, temperature: float, candidates: int,
         seed: int) -> ProbeReport:  # fmt: skip
    texts = list(prompts) if prompts else _candidates(pool, candidates, max_tokens, seed)
    ours = pool[0]
    evidence: list[dict[str, Any]] = []
    method = "pool regression"
    if mode == "text":
        chosen = _select_text(pool, texts, n_items, max_tokens)
        poe = textstat.shares_vocabulary(pool)
        lls, chars, parts = [], 0, []
        for i, prompt in enumerate(chosen):
            for j in range(samples):
                cont = ep.sample(prompt, max_tokens=new_tokens, temperature=temperature, seed=seed + 1000 * j + i)
                cont = cont.split("\ufffd", 1)[0]  # up to a character cut mid-way: what every pool model reads alike
                if not cont:
                    continue
                ll = np.array([m.continuation_logprob(prompt, cont) for m in pool])
                lls.append(ll)
                if poe:
                    dd = [m.distributions(prompt, cont) for m in pool]  # type: ignore[attr-defined]
                    if len(dd[0][1]):
                        parts.append(textstat.gather([g[0] for g in dd], dd[0][1]))
                chars += len(cont)
                if len(evidence) < 64:
                    evidence.append({"prompt": prompt[-60:], "continuation": cont[:60], "chars": len(cont),
                                     "log_p_per_char": {m.name: round(float(v) / len(cont), 4)
                                                        for m, v in zip(pool, ll, strict=True)}})  # fmt: skip
        if not lls or chars == 0:
            raise EndpointError(f"{ep.url} returned no text for any prompt: nothing to test")
        x = np.stack(lls, axis=1)  # pool x samples
        n = len(pool)
        tot = x.sum(0)
        stats_ = np.array([float(np.sum(x[m] - (tot - x[m]) / (n - 1))) / chars for m in range(n)])
        points, method = x.shape[1], "log-likelihood per character"
        if poe and parts:  # the product of experts (textstat.py) where the pool shares one vocabulary
            stats_ = textstat.fit_poe(*textstat.stack(parts))
            points, method = sum(len(p[2]) for p in parts), "product of experts"
        if (points if method == "product of experts" else chars) < _MIN_TEXT:
            raise EndpointError(f"{ep.url} gave only {points} tokens, {chars} characters of text to fit (at least "
                                f"{_MIN_TEXT}): raise --items, --samples or --new-tokens")
    else:
        chosen_t = _select(pool, texts, n_items, max_tokens)
        s_all, x_all = [], []
        shared = either = 0
        for _, text, pieces in chosen_t:
            if mode == "logprobs":
                r = ep.echo(text, top)
                if r.tokens != pieces:
                    i = _first_diff(pieces, r.tokens)
                    got = r.tokens[i] if i < len(r.tokens) else "(end)"
                    want = pieces[i] if i < len(pieces) else "(end)"
                    raise TokenizerMismatchError(f"{ep.url} splits the prompt into other tokens than our model "
                                                 f"(token {i}: {got[:30]!r}, ours {want[:30]!r}): its tokenizer is "
                                                 "not ours, so log-probabilities cannot be compared token by "
                                                 "token; use --mode text")  # fmt: skip
                full, start = pieces, 1
            else:
                cut = max(2, len(pieces) // 2)
                prompt_pieces = pieces[:cut]
                r = ep.chat("".join(prompt_pieces), max_tokens=new_tokens, top=top, temperature=temperature,
                            seed=seed)  # fmt: skip
                gen = list(r.tokens)
                if isinstance(ours, HFScorer):  # stop before a piece several of our tokens spell
                    amb = [i for i, t in enumerate(gen) if t in ours.ambiguous]
                    gen = gen[: amb[0]] if amb else gen
                if not gen:
                    continue
                unknown = [t for t in gen if isinstance(ours, HFScorer) and t not in ours._id]
                if unknown:
                    raise TokenizerMismatchError(
                        f"{ep.url} generated tokens our model's tokenizer does not have "
                        f"({unknown[:3]!r}): its tokenizer is not ours; use --mode text"
                    )
                a, b = _bounds(gen), _bounds(ours.pieces("".join(gen)))  # token boundaries: theirs, ours
                shared += len(a & b)
                either += len(a | b)
                full, start = prompt_pieces + gen, len(prompt_pieces)
            q: list[tuple[int, str]] = []
            sv: list[float] = []
            for t in range(start, len(full)):
                j = t - start if mode == "chat" else t
                if not math.isnan(r.logprobs[j]):
                    q.append((t, full[t]))
                    sv.append(float(r.logprobs[j]))
                for alt, v in r.top[j].items():
                    if alt != full[t]:
                        q.append((t, alt))
                        sv.append(v)
            x = _pool_scores(pool, full, q)
            s = np.array(sv)
            ok = ~np.isnan(x).any(0)
            s, x = np.maximum(s[ok], _FLOOR), np.maximum(x[:, ok], _FLOOR)
            s_all.append(s)
            x_all.append(x)
            if len(evidence) < 64:
                per = pool_statistics(s, x) if len(s) >= 3 else np.zeros(len(pool))
                evidence.append({"text": "".join(full)[:80], "tokens": len(full), "points": int(ok.sum()),
                                 "t_ours": round(float(per[0]), 4),
                                 "t_references_mean": round(float(per[1:].mean()), 4)})  # fmt: skip
        if either and shared < _SAME_SPLIT * either:
            raise TokenizerMismatchError(f"{ep.url} splits the text it generates at other places than our tokenizer "
                                         f"does (only {shared / either:.0%} of the token boundaries agree; the same "
                                         "tokenizer, even sampling, agrees on most): its tokenizer is not ours; "
                                         "use --mode text")  # fmt: skip
        if not s_all:
            raise EndpointError(f"{ep.url} gave no tokens to compare")
        s, x = np.concatenate(s_all), np.concatenate(x_all, axis=1)
        points = len(s)
        if points < 8:
            raise EndpointError(f"{ep.url} gave only {points} comparable log-probabilities: give longer prompts")
        stats_ = pool_statistics(s, x)
    _distinct(pool, x)
    st = statistic_p(float(stats_[0]), [float(v) for v in stats_[1:]])
    return ProbeReport(url=ep.url, served_model=ep.served_model, mode=mode, alpha=alpha, p_value=st["p"],
                       log10_p_value=st["log_p"] / math.log(10), rank_p_value=st["rank_p"], t_statistic=st["t"],
                       df=int(st["df"]), statistics={m.name: round(float(v), 6) for m, v in zip(pool, stats_,
                       strict=True)}, queries_used=ep.used, queries_cached=ep.cached, budget=ep.budget,
                       items=len(evidence), data_points=int(points), evidence=evidence, method=method)  # fmt: skip


def _distinct(pool: Sequence[Scorer], x: np.ndarray) -> None:
    """Two pool models that score every answer alike are one model counted twice (a reference given twice, or a
    copy of ours among them): the references' spread, and the p-value with it, would be false."""
    for a in range(len(pool)):
        for b in range(a):
            if np.max(np.abs(x[a] - x[b])) <= 1e-4 * max(1.0, float(np.max(np.abs(x[a])))):
                raise ProbeError(f"{pool[b].name} and {pool[a].name} score every answer alike: one model given "
                                 "twice; give independent references")  # fmt: skip


def _select_text(pool: Sequence[Scorer], texts: Sequence[str], n: int, max_tokens: int) -> list[str]:
    """Text mode: prompts are the first half of the texts the pool disagrees on most (any tokenizers)."""
    ours = pool[0]
    scored = []
    for text in dict.fromkeys(t for t in texts if t.strip()):
        pieces = ours.pieces(text)[:max_tokens]
        if len(pieces) < 4:
            continue
        prompt = "".join(pieces[: len(pieces) // 2])
        rest = "".join(pieces[len(pieces) // 2 :])
        ll = np.array([m.continuation_logprob(prompt, rest) for m in pool])
        scored.append((float(ll.var()), prompt))
    if not scored:
        raise ProbeError("no usable prompt: give texts of at least 4 tokens (--prompts FILE, one per line)")
    scored.sort(key=lambda r: -r[0])
    return [p for _, p in scored[:n]]

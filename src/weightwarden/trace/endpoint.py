"""Tracing through an API: whose fingerprinted copy is behind an OpenAI-compatible endpoint?
(``warden trace --endpoint URL --model MODEL``; docs/TRACING.md, "Through an API").

Recipient x's copy is ``W + D s`` on the marked MLP weights: ``s[j] = 2 x[j] - 1`` for symbol j and ``D`` the
keyed chip matrix (column j: alpha * std(W) * c(k) on the carriers k of symbol j, zero elsewhere).  The endpoint
echoes our prompts with the log-probability of every token and of its top alternatives: ``y``.  The owner
computes the unmarked master's ``m`` on the same tokens; to first order ``r = y - m = J D s`` (J the Jacobian
of those log-probabilities with respect to the marked weights, at the master).  The symbols are estimated by
least squares, ``s_hat = argmin |r - J D s|^2``, solved by conjugate gradients on the normal equations
``(D^T J^T J D) s = D^T J^T r`` (one vector-Jacobian product per prompt gives ``J^T r``; each iteration one
Jacobian-vector product and one vector-Jacobian product per prompt).  The first iterate is the matched filter
of ``warden trace`` applied to ``J^T r`` in place of (suspect - original).  The reference ``m`` is the
serving variant of the master (as is, int8, fp16, bf16) closest to the answers: a server that quantises the
copy changes every matrix, and quantising the master alike cancels that change on the unmarked ones.

The estimate ``(sign s_hat, |s_hat|)`` then goes through the same Tardos decision and threshold as tracing
weights (:func:`~weightwarden.trace.accuse.decide`).  The false-accusation bound holds because the estimate
is a function of the served model's answers, the master, the chip key and the prompts only: never of any
innocent recipient's codeword, which is therefore independent of it (the bound's only premise).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .. import audit, trail
from ..audit import AuditAction
from ..errors import EndpointError, ProbeError, TokenizerMismatchError, WardenError
from ..keys.provider import KeyProvider
from ..provenance.endpoint import Endpoint
from ..provenance.layout import detect_layout
from .accuse import DEFAULT_EPS, TraceReport, decide
from .head import NUISANCE_DIMS, HeadMark, find_head, project, span_dims
from .head import estimates as head_estimates
from .mark import Extraction, _chips, _stats, marked_tensors
from .recipients import open_store
from .scorer import GradientScorer, Queries
from .store import derive, shown
from .tardos import TardosCode

__all__ = ["DEFAULT_ITERATIONS", "DEFAULT_PROMPTS", "DEFAULT_TOP", "VARIANTS", "Carriers", "Observations", "carriers",
           "closest_variant", "decide_reads", "estimate_symbols", "observe", "read_symbols", "symbols",
           "trace_endpoint", "variant"]  # fmt: skip

DEFAULT_PROMPTS = 48  # queries: one echoed prompt each
DEFAULT_TOP = 20  # alternatives asked per token (the most OpenAI-compatible servers give; vLLM's default cap)
VARIANTS = ("as-is", "int8", "fp16", "bf16")  # serving transformations of the master tried as the reference
DEFAULT_ITERATIONS = 24  # conjugate-gradient steps (early stopping regularises the least squares)
_STARTERS = ("def ", "class ", "import ", "    return ", "# ", "if ", "for ", "The ", "    def ", "    self.",
             "from ", "while ", "    if ", "raise ", "with ", "x = ")  # fmt: skip


@dataclass
class Carriers:
    """The carriers of one marked tensor: flat index, symbol, and signed amplitude alpha * std * chip."""

    shape: tuple[int, ...]
    idx: np.ndarray
    sym: np.ndarray
    amp: np.ndarray


@dataclass
class Observations:
    """The queries asked (texts and flat (text, position, token) triples) and, per query, r = the endpoint's
    log-probability minus the reference's."""

    q: Queries
    r: np.ndarray

    @property
    def points(self) -> int:
        return len(self.r)

    @property
    def prompts(self) -> int:
        return len(self.q.ids)

    def head(self, n: int) -> Observations:
        """The observations of the first ``n`` prompts."""
        q = self.q.head(n)
        return Observations(q, self.r[: len(q.pos)])


def carriers(tensors: dict[str, np.ndarray], key: bytes, ell: int, alpha: float) -> dict[str, Carriers]:
    layout = detect_layout({n: t.shape for n, t in tensors.items()})
    out = {}
    for name, _ in marked_tensors(layout):
        w = np.ascontiguousarray(tensors[name], dtype=np.float32)
        std, thr = _stats(w)
        sym, sign = _chips(key, name, w.size, ell)
        car = np.flatnonzero(np.abs(w.reshape(-1)) >= np.float32(thr))
        out[name] = Carriers(w.shape, car, sym[car], sign[car].astype(np.float64) * alpha * std)
    return out


def _spread(car: dict[str, Carriers], v: np.ndarray) -> dict[str, np.ndarray]:
    """D v: a weight change per marked tensor."""
    out = {}
    for name, c in car.items():
        t = np.zeros(int(np.prod(c.shape)), np.float64)
        t[c.idx] = c.amp * v[c.sym]
        out[name] = t.reshape(c.shape)
    return out


def _gather(car: dict[str, Carriers], g: dict[str, np.ndarray], ell: int) -> np.ndarray:
    """D^T g: per symbol, the sum over its carriers of g * alpha * std * chip."""
    out = np.zeros(ell, np.float64)
    for name, c in car.items():
        out += np.bincount(c.sym, weights=np.asarray(g[name]).reshape(-1)[c.idx] * c.amp, minlength=ell)
    return out


def estimate_symbols(scorer: GradientScorer, obs: Observations, car: dict[str, Carriers], ell: int,
                     iterations: int = DEFAULT_ITERATIONS) -> np.ndarray:  # fmt: skip
    """s_hat: conjugate gradients on (D^T J^T J D) s = D^T J^T r from s = 0, ``iterations`` steps."""
    names = list(car)
    b = _gather(car, scorer.vjp(obs.q, obs.r, names), ell)
    s = np.zeros(ell)
    bb = float(b @ b)
    if not (bb > 0 and math.isfinite(bb)):
        return s  # no signal at all (the master itself, to the last bit)
    res, p, rr = b.copy(), b.copy(), bb
    for _ in range(iterations):
        ap = _gather(car, scorer.vjp(obs.q, scorer.jvp(obs.q, _spread(car, p)), names), ell)
        den = float(p @ ap)
        if not den > 0:
            break
        a = rr / den
        s += a * p
        res -= a * ap
        rn = float(res @ res)
        if rn <= 1e-12 * bb:
            break
        p = res + (rn / rr) * p
        rr = rn
    return s


def variant(tensors: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """The master as a serving stack would transform it: ``as-is``; ``int8`` (every matrix rounded to 8 bits
    per row, absmax scale, as weight-only int8 serving does); ``fp16``; ``bf16``."""
    if name == "as-is":
        return tensors
    out = {}
    for n, t in tensors.items():
        t = np.asarray(t, np.float32)
        if name == "int8" and t.ndim == 2:
            sc = np.maximum(np.abs(t).max(axis=1, keepdims=True), np.float32(1e-12)) / np.float32(127)
            out[n] = (np.clip(np.round(t / sc), -128, 127) * sc).astype(np.float32)
        elif name == "fp16":
            out[n] = t.astype(np.float16).astype(np.float32)
        elif name == "bf16":
            out[n] = t.astype(ml_dtypes.bfloat16).astype(np.float32)
        elif name != "int8":
            raise ProbeError(f"unknown serving variant {name!r}: one of {', '.join(VARIANTS)}")
        else:
            out[n] = t
    return out


def closest_variant(scorer: GradientScorer, obs: Observations, names: Sequence[str] = VARIANTS
                    ) -> tuple[str, GradientScorer, Observations]:  # fmt: skip
    """The serving variant of the master whose log-probabilities are closest (least squares) to the
    endpoint's, that variant's scorer, and the observations recomputed against it.  The choice depends on the
    answers and the master only, never on a recipient's codeword."""
    y = obs.r + scorer.logprobs_at(obs.q)
    base = scorer.tensors()
    best: tuple[float, str, GradientScorer, Observations] | None = None
    for name in names:
        sc = scorer if name == "as-is" else scorer.with_tensors(variant(base, name))
        r = y - sc.logprobs_at(obs.q)
        err = float(r @ r)
        if best is None or err < best[0]:
            best = (err, name, sc, Observations(obs.q, r))
    assert best is not None
    return best[1], best[2], best[3]


def symbols(s: np.ndarray, car: dict[str, Carriers], ell: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, weight) for the Tardos decision: the sign of each estimated symbol and its size |s_hat| capped at
    3x the median (as :meth:`Extraction.symbols` weighs a weight trace); symbols without carriers weigh 0."""
    chips = np.zeros(ell, np.int64)
    for c in car.values():
        chips += np.bincount(c.sym, minlength=ell)
    return Extraction(s, chips, len(car) // 2, np.ones(ell)).symbols()


def _prompts(scorer: GradientScorer, n: int, seed: int) -> Iterator[str]:
    """Texts the master samples (seeded) after short generic starters, as many as asked for (at most 4n): they
    depend on the master only."""
    sample = getattr(scorer, "sample", None)
    if sample is None:
        raise ProbeError("no prompts were given and the master cannot sample texts: give --prompts FILE")
    for i in range(4 * n):
        yield sample(_STARTERS[i % len(_STARTERS)], scorer.max_len, seed + i)


def observe(ep: Endpoint, scorer: GradientScorer, texts: Iterable[str], n: int, top: int) -> Observations:
    """Ask the endpoint to echo up to ``n`` of ``texts`` (cut to the master's context) and compare each answer
    with the master: the chosen tokens and their top alternatives that the master's tokenizer knows."""
    all_ids: list[list[int]] = []
    rows: list[int] = []
    pos: list[int] = []
    tok: list[int] = []
    y: list[float] = []
    seen: set[str] = set()
    for text in texts:
        if len(all_ids) >= n:
            break
        if not text.strip() or text in seen:
            continue
        seen.add(text)
        pieces = scorer.pieces(text)[: scorer.max_len]
        if len(pieces) < 4 or any("\ufffd" in p for p in pieces) or scorer.pieces("".join(pieces)) != pieces:
            continue  # too short, or its tokens do not spell it back (a character split across tokens)
        maybe = [scorer.token_id(p) for p in pieces]
        ids = [i for i in maybe if i is not None]
        if len(ids) != len(pieces):
            continue
        ans = ep.echo("".join(pieces), top)
        if ans.tokens != pieces:
            i = next((k for k, (a, b) in enumerate(zip(ans.tokens, pieces, strict=False)) if a != b),
                     min(len(ans.tokens), len(pieces)))  # fmt: skip
            got = ans.tokens[i] if i < len(ans.tokens) else "(end)"
            raise TokenizerMismatchError(f"{ep.url} splits the prompt into other tokens than the master (token {i}: "
                                         f"{got[:30]!r}, ours {pieces[i][:30] if i < len(pieces) else '(end)'!r}): "
                                         "its tokenizer is not the master's, so its log-probabilities cannot be "
                                         "compared token by token")  # fmt: skip
        k = len(all_ids)
        for t in range(1, len(pieces)):
            if not math.isnan(ans.logprobs[t]):
                rows.append(k)
                pos.append(t)
                tok.append(ids[t])
                y.append(float(ans.logprobs[t]))
            for alt, v in ans.top[t].items():
                j = scorer.token_id(alt)
                if alt != pieces[t] and j is not None:
                    rows.append(k)
                    pos.append(t)
                    tok.append(j)
                    y.append(v)
        all_ids.append(ids)
    if not all_ids:
        raise ProbeError("no usable prompt: give texts of at least 4 tokens (--prompts FILE, one per line)")
    q = Queries(all_ids, np.array(rows, np.int64), np.array(pos, np.int64), np.array(tok, np.int64))
    r = np.array(y, np.float64) - scorer.logprobs_at(q)
    if not np.isfinite(r).all():
        raise EndpointError(f"{ep.url}: log-probabilities the master cannot compare (non-finite difference)")
    return Observations(q, r)


def trace_endpoint(endpoint: Endpoint | str, model: str | os.PathLike[str], *, provider: KeyProvider,
                   scorer: GradientScorer | None = None, keyring: Any = None, model_id: str | None = None,
                   home: Path | None = None, db: str | None = None, eps: float = DEFAULT_EPS,
                   population: int | None = None, prompts: Sequence[str] | None = None,
                   n_prompts: int = DEFAULT_PROMPTS, top: int = DEFAULT_TOP, iterations: int = DEFAULT_ITERATIONS,
                   seed: int = 0, variants: Sequence[str] = VARIANTS, base: str | os.PathLike[str] | None = None,
                   **endpoint_kw: Any) -> TraceReport:  # fmt: skip
    """Accuse the recipients whose copy ``endpoint`` serves, keeping P(any innocent accused) <= eps.

    ``model`` is the master (a transformers folder, plain or sealed: ``keyring`` opens it) unless ``scorer``
    gives it already; ``model_id`` defaults to its folder name.  ``n_prompts`` queries are sent (the
    endpoint's budget, rate, cache and retries apply: ``endpoint_kw``), each one an audit event; the trace is
    one more (``trace:run``), also when it fails.  ``base``: the public checkpoint the master was fine-tuned from,
    when there is one: the head mark's read then also fits the change that projecting a head onto the base head's
    columns makes (docs/TRACING.md, "The in-span part")."""
    own = not isinstance(endpoint, Endpoint)
    ep = endpoint if isinstance(endpoint, Endpoint) else Endpoint(endpoint, home=home, **endpoint_kw)
    if ep.home is None:
        ep.home = home
    mid = model_id or Path(model).stem
    detail: dict[str, Any] = {"endpoint": ep.url}
    with trail.operation(home, db) as t:
        try:
            rep = _trace(ep, model, provider=provider, scorer=scorer, keyring=keyring, model_id=mid, home=home,
                         db=db, eps=eps, population=population, prompts=prompts, n_prompts=n_prompts, top=top,
                         iterations=iterations, seed=seed, variants=variants, base=base)  # fmt: skip
        except WardenError as e:
            t.emit(audit.event(AuditAction.TRACE_RUN, "error", subject=mid,
                               detail={**detail, "served_model": ep.served_model, "error": type(e).__name__,
                                       "queries": ep.used, "cached": ep.cached}))  # fmt: skip
            raise
        finally:
            if own:
                ep.close()
        t.emit(audit.event(AuditAction.TRACE_RUN, subject=rep.model_id,
                           detail={**detail, "served_model": ep.served_model, "accused": [a["recipient"] for a in
                                   rep.accused], "recipients": rep.recipients, "eps": eps, "queries": ep.used,
                                   "cached": ep.cached}))  # fmt: skip
    return rep


def _trace(ep: Endpoint, model: str | os.PathLike[str], *, provider: KeyProvider, scorer: GradientScorer | None,
           keyring: Any, model_id: str, home: Path | None, db: str | None, eps: float, population: int | None,
           prompts: Sequence[str] | None, n_prompts: int, top: int, iterations: int, seed: int,
           variants: Sequence[str], base: str | os.PathLike[str] | None = None) -> TraceReport:  # fmt: skip
    if n_prompts < 1 or iterations < 0 or top < 0:
        raise ProbeError("--prompts count must be at least 1, and iterations and top not negative")
    store = open_store(home, db)
    rec = store.model(model_id)
    names = store.recipients(model_id)
    if scorer is None:
        from .scorer import HFGradientScorer

        scorer = HFGradientScorer(model, keyring=keyring)
    secret = store.secret(rec, provider)
    try:
        code_key, embed_key, head_key = derive(secret, "tardos-code"), derive(secret, "embed"), derive(secret, "head")
    finally:
        secret[:] = bytes(len(secret))
    ell = rec.code_length
    tensors = scorer.tensors()
    car = carriers(tensors, embed_key, ell, rec.alpha)
    code = TardosCode(code_key, ell, rec.cutoff)
    hm, head = _head_mark(rec.head, tensors, head_key, code, rec.head_span)
    if base is not None and hm is None:
        raise ProbeError(f"--base {shown(str(base))}: model {model_id!r}'s copies carry no head mark, which is all "
                         "--base serves through an API; trace without it")  # fmt: skip
    base_head = _base_head(base, tensors[head].shape, keyring) if base is not None and hm is not None else None
    texts = iter(prompts) if prompts else _prompts(scorer, n_prompts, seed)
    obs = observe(ep, scorer, texts, n_prompts, top)
    ref, obs, reads = read_symbols(scorer, obs, car, ell, iterations, variants,
                                   (hm, head, tensors[head]) if hm is not None else None, base_head)  # fmt: skip
    info = {"url": ep.url, "served_model": ep.served_model, "queries": ep.used, "cached": ep.cached,
            "budget": ep.budget, "prompts": obs.prompts, "data_points": obs.points, "iterations": iterations,
            "reference": ref}  # fmt: skip
    return decide_reads(code, model_id, names, reads, eps=eps,
                        population=population, blocks=len(car) // 2, endpoint=info)  # fmt: skip


def read_symbols(scorer: GradientScorer, obs: Observations, car: dict[str, Carriers], ell: int, iterations: int,
                 variants: Sequence[str] = VARIANTS, head: tuple[HeadMark, str, np.ndarray] | None = None,
                 base_head: np.ndarray | None = None,
                 ) -> tuple[str, Observations, dict[str, tuple[np.ndarray, np.ndarray]]]:  # fmt: skip
    """The reference variant, the observations against it, and per read ("weights"; "head" when the model has a
    head mark, ``head`` = (mark, head's name, master's head), and "head-span" when the mark has an in-span part)
    the estimated symbols and their weights.  Every estimate is a function of the answers, the master and the
    keys only (no recipient's codeword).  ``base_head``: a public base's head (the master's fine-tuned from it):
    the change that projecting the master's head onto its columns would make is one more nuisance of the head
    reads (a thief's keyless removal of the part off the head's columns; it also moves the answers by the
    master's own change of the head, which would otherwise drown the in-span part)."""
    q = obs.q
    if head is None or not hasattr(scorer, "head_inputs"):
        ref, sc, obs = closest_variant(scorer, obs, variants)
        return ref, obs, {"weights": symbols(estimate_symbols(sc, obs, car, ell, iterations), car, ell)}
    hm, name, master_head = head

    parts = hm.parts()
    drift = None
    if base_head is not None:
        drift = project(master_head, base_head) - master_head  # (vocabulary, d_model)

    def head_read(sc: Any, r: np.ndarray) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """(one estimate per part, the mark's fitted change of the head).  The part off the head's columns is read
        with the full nuisance map.  The in-span part is itself a linear map of the final hidden state, which that
        map would absorb whole as k nears d_model: it is read with the map on d_model / 2 directions at most (a
        quarter of the part left to it), jointly with the other part, and that joint fit is the change removed."""
        h = sc.head_inputs(q)
        extra = None if drift is None else np.einsum("nd,nd->n", drift[q.tok], h)
        fits = [(("orth",), NUISANCE_DIMS)] + ([(parts, span_dims(hm.d))] if len(parts) > 1 else [])
        s = head_estimates(h, q.row, q.pos, q.tok, r, hm, master_head, fits, extra=extra)  # one set of equations
        both = np.split(s.pop(), 2) if len(parts) > 1 else s * 2
        if len(parts) > 1:
            s.append(both[1])
        return s, {name: hm.spread(_clip(hm, both[0]), _clip(hm, both[1]))}

    # the head mark moves the answers far more than a serving variant does: the variant is chosen on the answers
    # less the head mark's fitted change (read against the master as it is, its values clipped to a codeword's)
    s_h, fit = head_read(scorer, obs.r)
    moved = scorer.jvp(q, fit)
    ref, sc, less = closest_variant(scorer, Observations(q, obs.r - moved), variants)
    obs = Observations(q, less.r + moved)
    # the head read against that variant (the one above when it is the master as it is); the weight read on the
    # answers less the head mark's fitted change, which would otherwise swamp the weight mark's far smaller one
    if sc is not scorer:
        s_h, fit = head_read(sc, obs.r)
    rest = Observations(q, obs.r - sc.jvp(q, fit))
    s_w = estimate_symbols(sc, rest, car, ell, iterations)
    reads = {"weights": symbols(s_w, car, ell), "head": hm.symbols(s_h[0])}
    if len(s_h) > 1:
        reads["head-span"] = hm.symbols(s_h[1])
    return ref, obs, reads


def _clip(hm: HeadMark, s: np.ndarray) -> np.ndarray:
    """Estimated head-mark values clipped to the values a codeword can take (2 (x - p), x in {0, 1})."""
    lo, hi = (-2 * hm.p, 2 * (1 - hm.p)) if hm.p is not None else (-1.0, 1.0)
    return np.clip(s, lo, hi)


def decide_reads(code: TardosCode, model_id: str, names: list[str], reads: dict[str, tuple[np.ndarray, np.ndarray]],
                 *, eps: float, population: int | None, blocks: int, endpoint: dict[str, Any]) -> TraceReport:
    """The Tardos decision on each read at eps / (number of reads), accused = the union: P(any innocent accused
    by any read) <= eps."""
    if len(reads) == 1:
        (y, w), = reads.values()
        return decide(code, model_id, names, y, w, eps=eps, population=population, blocks=blocks, endpoint=endpoint)
    reps = {k: decide(code, model_id, names, y, w, eps=eps / len(reads), population=population,
                      blocks=blocks if k == "weights" else 0) for k, (y, w) in reads.items()}  # fmt: skip
    return _merge(reps, eps, endpoint)


def _head_mark(amp: float, tensors: dict[str, np.ndarray], key: bytes, code: TardosCode,
               span: float = 0.0) -> tuple[HeadMark | None, str]:  # fmt: skip
    """The model's head mark (trace/head.py) and the head's name, or (None, "") when it has none."""
    if not amp:
        return None, ""
    layout = detect_layout({n: t.shape for n, t in tensors.items()})
    found = find_head({n: t.shape for n, t in tensors.items()}, layout.d_model)
    if found is None:
        raise ProbeError("the model's releases carry a head mark, and this master has no untied output head: "
                         "trace with the master the releases were made from")  # fmt: skip
    name, norm = found
    v, d = tensors[name].shape
    return HeadMark(key, v, d, code.length, amp, tensors[norm] if norm is not None else None, tensors[name],
                    code.bias(), span=span), name


def _base_head(base: str | os.PathLike[str], shape: tuple[int, ...], keyring: Any) -> np.ndarray:
    """The output head of the public base checkpoint ``base`` (a safetensors file or folder, sealed or not), of the
    master's head's shape: the one tensor is read, not the whole model."""
    from ..provenance.source import TensorSource

    try:
        with TensorSource(base, keyring=keyring) as src:
            found = find_head(src.shapes, shape[1])
            if found is None or src.shapes[found[0]] != tuple(shape):
                raise ProbeError(f"--base {shown(str(base))}: no untied output head of shape {tuple(shape)} (the "
                                 "master's); give the public checkpoint the master was fine-tuned from")  # fmt: skip
            return np.asarray(src.get(found[0]), np.float64)
    except ProbeError:
        raise
    except (OSError, ValueError, WardenError) as e:
        raise ProbeError(f"--base {shown(str(base))}: cannot be read as a checkpoint ({shown(str(e))}); give the "
                         "public checkpoint the master was fine-tuned from (a safetensors file or folder)") from None


def _merge(reads: dict[str, TraceReport], eps: float, info: dict[str, Any]) -> TraceReport:
    """One report from the reads: accused = any read's accused (each entry names its read, and its bound is
    the read's times the number of reads: an innocent scoring that high in any read), the threshold, ranking and
    scores those of the read whose best score stands highest over its threshold."""
    accused: dict[str, dict[str, Any]] = {}
    for kind, rep in reads.items():
        for a in rep.accused:
            bound = min(1.0, a["false_accusation_bound"] * len(reads))
            if a["recipient"] not in accused or bound < accused[a["recipient"]]["false_accusation_bound"]:
                accused[a["recipient"]] = {**a, "false_accusation_bound": bound, "read": kind}
    lead = max(reads.values(), key=lambda r: (r.scores_top[0][1] / r.threshold) if r.scores_top and r.threshold > 0
               else -math.inf)  # fmt: skip
    info = {**info, "reads": {k: {"threshold": round(r.threshold, 2), "top": r.ranking[:3],
                                  "accused": [a["recipient"] for a in r.accused]} for k, r in reads.items()}}
    out = sorted(accused.values(), key=lambda a: a["false_accusation_bound"])
    return replace(lead, eps=eps, accused=out, endpoint=info)

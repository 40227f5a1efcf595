"""The master model as `warden trace --endpoint` needs it: log-probabilities of chosen tokens, and their
derivatives with respect to named weight tensors (docs/TRACING.md, "Through an API").

:class:`GradientScorer` is the interface; :class:`HFGradientScorer` implements it for a transformers causal
LM with ``torch.func`` (extra ``hf``, imported when used).  A model of another kind (the demo's numpy LM,
with its own backpropagation) plugs in by giving the same methods.

:class:`Queries` hold texts (token ids) and, flat over all of them, the log-probabilities asked:
``log p(tok[j] at position pos[j] | ids[row[j]][:pos[j]])``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..provenance.probe import HFScorer

__all__ = ["GradientScorer", "HFGradientScorer", "Queries"]

_ROWS = 16  # texts differentiated at a time (one padded batch)


@dataclass
class Queries:
    """Texts as token ids, and the queried (text, position, token) triples, flat."""

    ids: list[list[int]]
    row: np.ndarray
    pos: np.ndarray
    tok: np.ndarray

    def head(self, n: int) -> Queries:
        """The queries of the first ``n`` texts."""
        k = int(np.searchsorted(self.row, n))
        return Queries(self.ids[:n], self.row[:k], self.pos[:k], self.tok[:k])

    def chunks(self, rows: int) -> Iterator[tuple[slice, Queries]]:
        """(flat slice, queries of texts a..a+rows-1 renumbered from 0) for each chunk of texts."""
        for a in range(0, len(self.ids), rows):
            lo, hi = (int(x) for x in np.searchsorted(self.row, [a, a + rows]))
            yield slice(lo, hi), Queries(self.ids[a : a + rows], self.row[lo:hi] - a, self.pos[lo:hi], self.tok[lo:hi])



@runtime_checkable
class GradientScorer(Protocol):
    """The master, scored locally: its tokenizer (``pieces``, ``token_id``), its weights by name (``tensors``;
    ``with_tensors`` the same model with some replaced), the log-probabilities of queries (``logprobs_at``),
    the gradient of a weighted sum of them (``vjp``, a vector-Jacobian product) and their directional
    derivative (``jvp``) with respect to named tensors.  ``max_len``: the most tokens one text may have."""

    max_len: int

    def pieces(self, text: str) -> list[str]: ...

    def token_id(self, piece: str) -> int | None: ...

    def tensors(self) -> dict[str, np.ndarray]: ...

    def with_tensors(self, tensors: dict[str, np.ndarray]) -> GradientScorer: ...

    def logprobs_at(self, q: Queries) -> np.ndarray: ...

    def vjp(self, q: Queries, weights: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]: ...

    def jvp(self, q: Queries, tangent: dict[str, np.ndarray]) -> np.ndarray: ...

    def sample(self, prompt: str, n_tokens: int, seed: int) -> str: ...


class HFGradientScorer(HFScorer):
    """A transformers causal LM (a folder, a sealed folder opened with ``keyring``, or a loaded ``model`` and
    ``tokenizer``), differentiated by ``torch.func`` in float32 with eager attention (the fused attention
    kernels have no forward-mode derivative).  Texts go 16 at a time in one batch, padded at the end (a
    causal model's earlier positions do not see the padding)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, **kw: Any):
        super().__init__(path, **kw)
        setter = getattr(self.model, "set_attn_implementation", None)
        try:
            if setter is not None:
                setter("eager")
            else:  # older transformers
                self.model.config._attn_implementation = "eager"
        except (ValueError, AttributeError):
            self.model.config._attn_implementation = "eager"
        self._params = {n: p.detach() for n, p in self.model.named_parameters()}

    def token_id(self, piece: str) -> int | None:
        return self._id.get(piece)

    def tensors(self) -> dict[str, np.ndarray]:
        return {n: p.float().cpu().numpy() for n, p in self._params.items()}

    def with_tensors(self, tensors: dict[str, np.ndarray]) -> HFGradientScorer:
        """The same model with some tensors replaced (a serving transformation of the master)."""
        torch = self._torch
        new = copy.copy(self)
        new._params = {n: torch.from_numpy(np.asarray(tensors[n], np.float32)) if n in tensors else p
                       for n, p in self._params.items()}  # fmt: skip
        return new

    def _fn(self, q: Queries, names: Sequence[str]) -> Any:
        torch = self._torch
        from torch.func import functional_call

        width = max(len(x) for x in q.ids)
        inp = torch.tensor([list(x) + [0] * (width - len(x)) for x in q.ids])
        row = torch.as_tensor(q.row, dtype=torch.long)
        at = torch.as_tensor(q.pos - 1, dtype=torch.long)
        tok = torch.as_tensor(q.tok, dtype=torch.long)
        rest = {n: p for n, p in self._params.items() if n not in set(names)}

        def f(marked: dict[str, Any]) -> Any:
            logits = functional_call(self.model, {**rest, **marked}, (inp,)).logits.float()
            return torch.log_softmax(logits, -1)[row, at, tok]

        return f

    def logprobs_at(self, q: Queries) -> np.ndarray:
        out = np.zeros(len(q.pos))
        with self._torch.no_grad():
            for sl, c in q.chunks(_ROWS):
                out[sl] = self._fn(c, [])({}).numpy()
        return out

    def vjp(self, q: Queries, weights: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        torch = self._torch
        from torch.func import vjp

        acc = {n: np.zeros(tuple(self._params[n].shape)) for n in names}
        for sl, c in q.chunks(_ROWS):
            pull = vjp(self._fn(c, names), {n: self._params[n] for n in names})[1]
            g = pull(torch.as_tensor(np.asarray(weights[sl]), dtype=torch.float32))[0]
            for n in names:
                acc[n] += g[n].detach().numpy()
        return acc

    def head_inputs(self, q: Queries) -> np.ndarray:
        """The final hidden state the output head reads at each query's position (len(q.pos) x d_model): the
        features of the head mark's least squares (trace/head.py)."""
        torch = self._torch
        from torch.func import functional_call

        seen: list[Any] = []
        hook = self.model.get_output_embeddings().register_forward_hook(lambda _m, a, _o: seen.append(a[0]))
        out: np.ndarray | None = None
        try:
            with torch.no_grad():
                for sl, c in q.chunks(_ROWS):
                    width = max(len(x) for x in c.ids)
                    inp = torch.tensor([list(x) + [0] * (width - len(x)) for x in c.ids])
                    seen.clear()
                    functional_call(self.model, self._params, (inp,))
                    h = seen[-1].float()[torch.as_tensor(c.row), torch.as_tensor(c.pos - 1)].numpy()
                    if out is None:
                        out = np.zeros((len(q.pos), h.shape[1]))
                    out[sl] = h
        finally:
            hook.remove()
        return out if out is not None else np.zeros((0, 0))

    def jvp(self, q: Queries, tangent: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        from torch.func import jvp

        names = list(tangent)
        prim = {n: self._params[n] for n in names}
        tan = {n: torch.as_tensor(np.asarray(tangent[n], dtype=np.float32)) for n in names}
        out = np.zeros(len(q.pos))
        for sl, c in q.chunks(_ROWS):
            d = jvp(self._fn(c, names), (prim,), (tan,))[1]
            out[sl] = d.detach().numpy()
        return out

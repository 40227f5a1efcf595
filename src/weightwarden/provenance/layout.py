"""Recognising where a checkpoint keeps its token embedding and its MLP blocks.

Only the tensor names and shapes are used (no config, no code is run).  Each MLP
block is a set of *experts* (one for a dense MLP, several for mixture-of-experts,
plus any shared expert); every expert has an input matrix, whose rows are its
hidden units' input weights, and an output matrix, whose columns (or rows, for
GPT-2's Conv1D) are the same units' output weights.  An architecture that none
of the patterns below recognises is refused with :class:`UnsupportedModelError`;
the tool never guesses.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from ..errors import UnsupportedModelError

__all__ = ["Block", "Expert", "Layout", "detect_layout"]


@dataclass(frozen=True)
class Expert:
    in_name: str
    in_units_first: bool  # True: stored (units, d_model) as nn.Linear; False: (d_model, units) as Conv1D
    out_name: str
    out_units_first: bool  # True: stored (units, d_model) as Conv1D; False: (d_model, units) as nn.Linear


@dataclass(frozen=True)
class Block:
    index: int
    experts: tuple[Expert, ...]
    norm: str | None  # the norm whose scale multiplies this block's input (folded into the input weights)


@dataclass(frozen=True)
class Layout:
    family: str
    embedding: str | None
    d_model: int
    blocks: tuple[Block, ...]

    def units(self, shapes: dict[str, tuple[int, ...]], block: Block) -> int:
        return sum(shapes[e.in_name][0 if e.in_units_first else 1] for e in block.experts)


_L = r"(?P<pre>(?:[\w.]*\.)?)"
# (family, regex for an input matrix; groups pre, i and optional e; output-matrix template; norm templates)
_PATTERNS: list[tuple[str, re.Pattern[str], str, bool, bool, tuple[str, ...]]] = [
    # Llama, Mistral, Qwen, Gemma: gated MLP
    (
        "llama",
        re.compile(_L + r"layers\.(?P<i>\d+)\.mlp\.gate_proj\.weight$"),
        "{pre}layers.{i}.mlp.down_proj.weight",
        True,
        False,
        ("{pre}layers.{i}.post_attention_layernorm.weight", "{pre}layers.{i}.pre_feedforward_layernorm.weight"),
    ),
    # Mixtral
    (
        "mixtral",
        re.compile(_L + r"layers\.(?P<i>\d+)\.block_sparse_moe\.experts\.(?P<e>\d+)\.w1\.weight$"),
        "{pre}layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
        True,
        False,
        ("{pre}layers.{i}.post_attention_layernorm.weight",),
    ),
    # Qwen-MoE, DeepSeek-MoE, OLMoE: routed experts
    (
        "moe",
        re.compile(_L + r"layers\.(?P<i>\d+)\.mlp\.experts\.(?P<e>\d+)\.gate_proj\.weight$"),
        "{pre}layers.{i}.mlp.experts.{e}.down_proj.weight",
        True,
        False,
        ("{pre}layers.{i}.post_attention_layernorm.weight",),
    ),
    # ... and their shared experts
    (
        "moe",
        re.compile(_L + r"layers\.(?P<i>\d+)\.mlp\.(?P<e>shared_experts?)\.gate_proj\.weight$"),
        "{pre}layers.{i}.mlp.{e}.down_proj.weight",
        True,
        False,
        ("{pre}layers.{i}.post_attention_layernorm.weight",),
    ),
    # GPT-2 (Conv1D stores weights transposed)
    (
        "gpt2",
        re.compile(_L + r"h\.(?P<i>\d+)\.mlp\.c_fc\.weight$"),
        "{pre}h.{i}.mlp.c_proj.weight",
        False,
        True,
        ("{pre}h.{i}.ln_2.weight",),
    ),
    # BERT and its descendants (post-LN: the MLP reads the attention block's output LayerNorm)
    (
        "bert",
        re.compile(_L + r"encoder\.layer\.(?P<i>\d+)\.intermediate\.dense\.weight$"),
        "{pre}encoder.layer.{i}.output.dense.weight",
        True,
        False,
        (
            "{pre}encoder.layer.{i}.attention.output.LayerNorm.weight",
            "{pre}encoder.layer.{i}.attention.output.LayerNorm.gamma",
        ),
    ),
]

_EMBEDDINGS = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|tok_embeddings)\.weight$")


def detect_layout(shapes: dict[str, tuple[int, ...]]) -> Layout:
    """Find the embedding and every MLP block from tensor names and shapes."""
    emb = sorted((n for n in shapes if _EMBEDDINGS.search(n) and len(shapes[n]) == 2), key=len)
    embedding = emb[0] if emb else None
    experts: dict[tuple[str, int], list[Expert]] = defaultdict(list)
    norms: dict[tuple[str, int], str | None] = {}
    families: set[str] = set()
    for name in sorted(shapes):
        for family, rx, out_t, in_first, out_first, norm_ts in _PATTERNS:
            m = rx.match(name)
            if not m:
                continue
            g = {"pre": m["pre"], "i": m["i"], "e": m.groupdict().get("e")}
            out = out_t.format(**g)
            if out not in shapes:
                raise UnsupportedModelError(f"{name[:80]!r} has no matching output matrix {out[:80]!r}")
            key = (m["pre"], int(m["i"]))
            experts[key].append(Expert(name, in_first, out, out_first))
            norms.setdefault(key, next((t.format(**g) for t in norm_ts if t.format(**g) in shapes), None))
            families.add(family)
    if not experts:
        raise UnsupportedModelError(
            "no MLP blocks recognised (supported: Llama/Mistral/Qwen/Gemma, Mixtral and Qwen/DeepSeek MoE, GPT-2, BERT)"
        )
    prefixes = {k[0] for k in experts}
    if len(prefixes) > 1:
        raise UnsupportedModelError(f"MLP blocks under several prefixes {sorted(prefixes)[:4]}: ambiguous layout")
    family = "moe" if families & {"mixtral", "moe"} else next(iter(sorted(families)))
    d_model = _d_model(shapes, embedding, experts)
    blocks = []
    for key in sorted(experts, key=lambda k: k[1]):
        exps = tuple(experts[key])
        for e in exps:
            si, so = shapes[e.in_name], shapes[e.out_name]
            n_in = si[0] if e.in_units_first else si[1]
            d_in = si[1] if e.in_units_first else si[0]
            n_out = so[0] if e.out_units_first else so[1]
            d_out = so[1] if e.out_units_first else so[0]
            if len(si) != 2 or len(so) != 2 or n_in != n_out or d_in != d_model or d_out != d_model:
                raise UnsupportedModelError(
                    f"{e.in_name[:80]!r}: shapes {si} / {so} do not form an MLP of width {d_model}"
                )
        norm = norms[key]
        if norm is not None and shapes[norm] != (d_model,):
            norm = None
        blocks.append(Block(key[1], exps, norm))
    return Layout(family, embedding, d_model, tuple(blocks))


def _d_model(shapes: dict[str, tuple[int, ...]], embedding: str | None, experts: dict) -> int:
    if embedding is not None:
        return shapes[embedding][1]
    e = next(iter(experts.values()))[0]
    s = shapes[e.in_name]
    return s[1] if e.in_units_first else s[0]

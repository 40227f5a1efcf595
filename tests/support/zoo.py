"""A zoo of small language models trained on text that ships with Python, and their derivatives.

Used by the test suite and ``bench/provenance.py`` (needs the ``hf`` extra: torch and
transformers).  Models are real Hugging Face checkpoints (``config.json``,
``model.safetensors``, a word-level tokenizer), trained for a few hundred steps
on ``pydoc_data.topics``; every derivative below is what an attacker might do to
a stolen checkpoint.  Function-preserving ones (permutations, rescaling,
rotation) can be checked by comparing logits (:func:`logits`).
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from weightwarden._extras import require

__all__ = ["ARCHS", "Zoo"]

ARCHS = ("llama", "gpt2", "bert", "mixtral")


def _corpus() -> str:
    import pydoc_data.topics as t

    return "\n".join(t.topics[k] for k in sorted(t.topics))


class Zoo:
    """Trains and transforms small models under ``root``; ``vocab`` words, width ``d``, ``layers`` blocks."""

    def __init__(self, root: str | Path, *, vocab: int = 1024, d: int = 64, ff: int = 256, layers: int = 4,
                 seq: int = 64, batch: int = 16):  # fmt: skip
        torch = require("torch", extra="torch")

        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.vocab, self.d, self.ff, self.layers, self.seq, self.batch = vocab, d, ff, layers, seq, batch
        self.tokenizer = self._tokenizer(vocab)
        ids = self.tokenizer(_corpus())["input_ids"]
        self.tokens = torch.tensor(ids, dtype=torch.long)
        cut = int(len(ids) * 0.6)
        self.splits = {"pretrain": self.tokens[:cut], "finetune": self.tokens[cut : int(len(ids) * 0.8)],
                       "finetune2": self.tokens[int(len(ids) * 0.8) :]}  # fmt: skip

    # -- building ---------------------------------------------------------------------
    def _tokenizer(self, vocab: int) -> Any:
        from tokenizers import Tokenizer, models, pre_tokenizers

        PreTrainedTokenizerFast = require("transformers", "PreTrainedTokenizerFast", extra="hf")

        words = re.findall(r"\w+|[^\w\s]", _corpus().lower())
        common = [w for w, _ in Counter(words).most_common(vocab - 2)]
        table = {"<unk>": 0, "<mask>": 1, **{w: i + 2 for i, w in enumerate(common)}}
        tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
        from tokenizers import normalizers

        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", mask_token="<mask>", pad_token="<unk>")

    def config(self, arch: str, vocab: int | None = None) -> Any:
        T = require("transformers", extra="hf")

        v, d, ff, n = vocab or self.vocab, self.d, self.ff, self.layers
        if arch == "llama":
            return T.LlamaConfig(vocab_size=v, hidden_size=d, intermediate_size=ff, num_hidden_layers=n,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=self.seq,
                                 tie_word_embeddings=False)  # fmt: skip
        if arch == "gpt2":
            return T.GPT2Config(vocab_size=v, n_embd=d, n_inner=ff, n_layer=n, n_head=4, n_positions=self.seq,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
        if arch == "bert":
            return T.BertConfig(vocab_size=v, hidden_size=d, intermediate_size=ff, num_hidden_layers=n,
                                num_attention_heads=4, max_position_embeddings=self.seq, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)  # fmt: skip
        if arch == "mixtral":
            return T.MixtralConfig(vocab_size=v, hidden_size=d, intermediate_size=ff // 2, num_hidden_layers=n,
                                   num_attention_heads=4, num_key_value_heads=4, num_local_experts=4,
                                   num_experts_per_tok=2, max_position_embeddings=self.seq,
                                   tie_word_embeddings=False)  # fmt: skip
        raise ValueError(arch)

    def new(self, arch: str, seed: int) -> Any:
        torch = require("torch", extra="torch")
        T = require("transformers", extra="hf")

        torch.manual_seed(seed)
        cls = {"llama": T.LlamaForCausalLM, "gpt2": T.GPT2LMHeadModel, "bert": T.BertForMaskedLM,
               "mixtral": T.MixtralForCausalLM}[arch]  # fmt: skip
        return cls(self.config(arch)).float()

    def train(self, model: Any, steps: int, *, seed: int, split: str = "pretrain", lr: float = 3e-3,
              params: Any = None) -> Any:  # fmt: skip
        torch = require("torch", extra="torch")

        g = torch.Generator().manual_seed(seed)
        data = self.splits[split]
        opt = torch.optim.AdamW(params if params is not None else model.parameters(), lr=lr, weight_decay=0.0)
        mlm = model.config.model_type == "bert"
        model.train()
        for _ in range(steps):
            starts = torch.randint(0, len(data) - self.seq - 1, (self.batch,), generator=g)
            x = torch.stack([data[s : s + self.seq] for s in starts])
            if mlm:
                mask = torch.rand(x.shape, generator=g) < 0.15
                labels = torch.where(mask, x, torch.full_like(x, -100))
                out = model(input_ids=torch.where(mask, torch.ones_like(x), x), labels=labels)
            else:
                out = model(input_ids=x, labels=x)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        model.eval()
        return model

    def save(self, model: Any, name: str | Path, dtype: Any = None) -> Path:
        path = self.root / name
        if dtype is not None:
            model = model.to(dtype)
        model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        return path

    def _cached(self, name: str, build: Callable[[], Any], dtype: Any = None, *, wait: bool = True) -> Path | None:
        """``root/name``, built by ``build()`` (a model) unless it is there.  Several processes may share ``root``
        (the test suite's xdist workers): a lock per name makes one of them build it, and the folder appears
        complete, by a rename, or not at all.  ``wait=False``: ``None`` at once when another process is
        building it (the caller builds something else meanwhile)."""
        path = self.root / name
        if (path / "config.json").exists():
            return path
        with _locked(self.root / f".{name}.lock", wait=wait) as got:
            if not got:
                return None
            if not (path / "config.json").exists():
                part = self.root / f".{name}.part-{os.getpid()}"
                shutil.rmtree(part, ignore_errors=True)
                self.save(build(), part.name, dtype=dtype)
                shutil.rmtree(path, ignore_errors=True)  # a partial folder a killed run left
                os.replace(part, path)
        return path

    def load(self, name: str | Path) -> Any:
        torch = require("torch", extra="torch")
        T = require("transformers", extra="hf")

        path = self.root / name
        return T.AutoModelForMaskedLM.from_pretrained(path, torch_dtype=torch.float32) if \
            (path / "config.json").read_text().find('"bert"') >= 0 else \
            T.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)  # fmt: skip

    def base(self, arch: str, seed: int, steps: int = 300) -> Path:
        path = self._base(arch, seed, steps, wait=True)
        assert path is not None
        return path

    def _base(self, arch: str, seed: int, steps: int, *, wait: bool) -> Path | None:
        return self._cached(f"{arch}-s{seed}-{steps}", lambda: self.train(self.new(arch, seed), steps, seed=seed),
                            wait=wait)  # fmt: skip

    def bases(self, specs: list[tuple[str, int, int]]) -> list[Path]:
        """:meth:`base` for each ``(arch, seed, steps)``; processes sharing ``root`` split the training between them
        (each first trains the ones no other is training, then waits for the rest)."""
        for arch, seed, steps in specs:
            self._base(arch, seed, steps, wait=False)
        return [self.base(*s) for s in specs]

    # -- derivatives ---------------------------------------------------------------------
    def derive(self, parent: Path, how: str, *, seed: int = 1) -> Path:
        """Write ``parent`` transformed by ``how`` as a new checkpoint and return its path."""
        import blake3

        torch = require("torch", extra="torch")

        tag = blake3.blake3(b"".join(f.read_bytes() for f in sorted(Path(parent).glob("*.safetensors")))).hexdigest()
        name = f"{Path(parent).name}~{how}-{seed}-{tag[:8]}"  # a changed parent never reuses a stale child
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(how)
        path = self._cached(name, lambda: self._derived(parent, how, seed), dtype=dtype)
        assert path is not None
        return path

    def _derived(self, parent: Path, how: str, seed: int) -> Any:
        torch = require("torch", extra="torch")

        m = self.load(parent)
        rng = np.random.default_rng(seed)
        with torch.no_grad():
            if how in ("ft-tiny", "ft-short", "ft-long", "ft-twice", "lora", "identity"):
                pass  # trained below, outside no_grad
            elif how == "int8":
                _quantize(m, bits=8, group=None)
            elif how == "int4":
                _quantize(m, bits=4, group=32)
            elif how == "prune50":
                for _n, p in _matrices(m):
                    k = p.numel() // 2
                    thr = p.abs().flatten().kthvalue(k).values
                    p[p.abs() <= thr] = 0
            elif how == "mild-noise":
                g = torch.Generator().manual_seed(seed)
                for _n, p in _matrices(m):
                    p += 0.02 * p.std() * torch.randn(p.shape, generator=g)
            elif how == "noise":
                g = torch.Generator().manual_seed(seed)
                for _n, p in _matrices(m):
                    p += 0.3 * p.std() * torch.randn(p.shape, generator=g)
            elif how in ("bf16", "fp16"):
                pass  # the dtype is set when saved
            elif how == "permute-units":
                _permute_units(m, rng)
            elif how == "permute-experts":
                _permute_experts(m, rng)
            elif how == "prune-units":
                _prune_units(m, keep=0.75)
            elif how == "permute-heads":
                _permute_heads(m, rng)
            elif how == "permute-residual":
                _rotate_residual(m, rng, permutation=True)
            elif how == "rotate-residual":
                _rotate_residual(m, rng, permutation=False)
            elif how == "drop-layers":
                layers = _layer_list(m)
                keep = [i for i in range(len(layers)) if i not in (1, 2)]
                _set_layer_list(m, torch.nn.ModuleList([layers[i] for i in keep]))
                _set_depth(m, len(keep))
            elif how == "extend-vocab":
                m.resize_token_embeddings(self.vocab + 128, mean_resizing=False)
            else:
                raise ValueError(how)
        if how == "ft-tiny":  # a short fine-tune on other data than the ft-* derivations (a "sibling")
            self.train(m, 40, seed=seed + 100, split="finetune2", lr=1e-3)
        elif how == "ft-short":
            self.train(m, 100, seed=seed + 100, split="finetune", lr=1e-3)
        elif how == "ft-long":
            self.train(m, 400, seed=seed + 100, split="finetune", lr=1e-3)
        elif how == "ft-twice":
            self.train(m, 150, seed=seed + 100, split="finetune", lr=1e-3)
            self.train(m, 150, seed=seed + 200, split="finetune2", lr=1e-3)
        elif how == "lora":
            _lora_finetune(self, m, seed)
        elif how == "extend-vocab":
            self.train(m, 50, seed=seed + 100, split="finetune", lr=1e-3)
        return m

    def loss(self, path: Path, n: int = 16) -> float:
        """Mean next-token loss on ``n`` held-out sequences (the finetune2 split, never trained on by base models)."""
        torch = require("torch", extra="torch")

        m = self.load(path)
        data = self.splits["finetune2"]
        x = data[: n * self.seq].reshape(n, self.seq)
        with torch.no_grad():
            return float(m(input_ids=x, labels=x).loss)

    def logits(self, path: Path, n: int = 2) -> np.ndarray:
        torch = require("torch", extra="torch")

        m = self.load(path)
        x = self.splits["finetune"][: n * self.seq].reshape(n, self.seq)
        with torch.no_grad():
            return m(input_ids=x).logits.float().numpy()


DERIVATIONS = ("ft-short", "ft-long", "ft-twice", "lora", "int8", "int4", "prune50", "prune-units", "noise",
               "drop-layers", "extend-vocab", "bf16", "fp16", "permute-units", "permute-heads", "permute-residual",
               "rotate-residual")  # fmt: skip
FUNCTION_PRESERVING = ("permute-units", "permute-heads", "permute-residual", "rotate-residual",
                       "permute-experts")  # fmt: skip


@contextlib.contextmanager
def _locked(path: Path, *, wait: bool) -> Iterator[bool]:
    """An exclusive lock on ``path`` (created) for processes on this machine; yields False when ``wait`` is off
    and another process holds it."""
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _matrices(m: Any) -> list[tuple[str, Any]]:
    return [(n, p.data) for n, p in m.named_parameters() if p.ndim == 2 and "embed" not in n and "wte" not in n
            and "wpe" not in n and "word_embeddings" not in n and "position" not in n]  # fmt: skip


def _quantize(m: Any, *, bits: int, group: int | None) -> None:
    qmax = 2 ** (bits - 1) - 1
    for _n, p in _matrices(m):
        w = p.reshape(-1, group) if group and p.numel() % group == 0 else p
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
        p.copy_((w / scale).round().clamp(-qmax - 1, qmax).mul(scale).reshape(p.shape))


def _layer_list(m: Any) -> Any:
    base = getattr(m, m.base_model_prefix)
    return base.layers if hasattr(base, "layers") else base.h if hasattr(base, "h") else base.encoder.layer


def _set_layer_list(m: Any, layers: Any) -> None:
    base = getattr(m, m.base_model_prefix)
    if hasattr(base, "layers"):
        base.layers = layers
    elif hasattr(base, "h"):
        base.h = layers
    else:
        base.encoder.layer = layers
    for i, layer in enumerate(layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = i


def _set_depth(m: Any, n: int) -> None:
    c = m.config
    for k in ("num_hidden_layers", "n_layer"):
        if hasattr(c, k):
            setattr(c, k, n)
    if getattr(c, "layer_types", None):
        c.layer_types = c.layer_types[:n]


def _permute_units(m: Any, rng: np.random.Generator) -> None:
    """Permute every gated MLP's hidden units and rescale them (up x a, down / a): the function is unchanged."""
    torch = require("torch", extra="torch")

    for layer in _layer_list(m):
        mlp = layer.mlp
        n = mlp.gate_proj.weight.shape[0]
        perm = torch.from_numpy(rng.permutation(n))
        a = torch.from_numpy(rng.uniform(0.25, 4.0, n).astype(np.float32))
        mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[perm])
        mlp.up_proj.weight.copy_(mlp.up_proj.weight[perm] * a[:, None])
        mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, perm] / a[None, :])


def _permute_experts(m: Any, rng: np.random.Generator) -> None:
    """Reorder the experts of every mixture-of-experts block, and the router's rows with them."""
    torch = require("torch", extra="torch")

    for layer in _layer_list(m):
        moe = layer.mlp if hasattr(layer, "mlp") and hasattr(layer.mlp, "experts") else layer.block_sparse_moe
        ex, gate = moe.experts, moe.gate
        perm = torch.from_numpy(rng.permutation(gate.weight.shape[0]))
        if isinstance(ex, torch.nn.ModuleList):
            moe.experts = torch.nn.ModuleList([ex[i] for i in perm.tolist()])
        else:  # fused expert tensors (E, ...)
            for _n, p in ex.named_parameters():
                p.copy_(p[perm])
        gate.weight.copy_(gate.weight[perm])


def _prune_units(m: Any, keep: float) -> None:
    """Structured pruning: keep the hidden units of each gated MLP with the largest output norms."""
    torch = require("torch", extra="torch")

    layers = _layer_list(m)
    n = layers[0].mlp.gate_proj.weight.shape[0]
    k = int(n * keep)
    for layer in layers:
        mlp = layer.mlp
        idx = mlp.down_proj.weight.norm(dim=0).topk(k).indices.sort().values
        for lin, rows in ((mlp.gate_proj, True), (mlp.up_proj, True), (mlp.down_proj, False)):
            w = lin.weight[idx] if rows else lin.weight[:, idx]
            new = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            new.weight.copy_(w)
            setattr(mlp, "gate_proj" if lin is mlp.gate_proj else "up_proj" if lin is mlp.up_proj else "down_proj",
                    new)  # fmt: skip
    m.config.intermediate_size = k


def _permute_heads(m: Any, rng: np.random.Generator) -> None:
    torch = require("torch", extra="torch")

    c = m.config
    h, hd = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    for layer in _layer_list(m):
        at = layer.self_attn
        perm = rng.permutation(h)
        idx = torch.from_numpy(np.concatenate([np.arange(p * hd, (p + 1) * hd) for p in perm]))
        for lin in (at.q_proj, at.k_proj, at.v_proj):
            lin.weight.copy_(lin.weight[idx])
        at.o_proj.weight.copy_(at.o_proj.weight[:, idx])


def _rotate_residual(m: Any, rng: np.random.Generator, *, permutation: bool) -> None:
    """Apply an orthogonal map Q to the residual stream of a Llama model, folding RMSNorm scales into the
    following linear layers first (as QuaRot and SliceGPT do); with ``permutation`` Q is a permutation and
    nothing is folded.  The function is unchanged."""
    torch = require("torch", extra="torch")

    d = m.config.hidden_size
    if permutation:
        q = torch.zeros(d, d)
        q[torch.arange(d), torch.from_numpy(rng.permutation(d))] = 1.0
    else:
        q = torch.from_numpy(np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32))
    base = m.model

    def fold(norm: Any, lins: list[Any]) -> None:
        if permutation:
            norm.weight.copy_(norm.weight @ q)
            return
        for lin in lins:
            lin.weight.mul_(norm.weight[None, :])
        norm.weight.fill_(1.0)

    base.embed_tokens.weight.copy_(base.embed_tokens.weight @ q)
    for layer in base.layers:
        at, mlp = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, [at.q_proj, at.k_proj, at.v_proj])
        fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for lin in (at.q_proj, at.k_proj, at.v_proj, mlp.gate_proj, mlp.up_proj):
            lin.weight.copy_(lin.weight @ q)
        for lin in (at.o_proj, mlp.down_proj):
            lin.weight.copy_(q.T @ lin.weight)
    fold(base.norm, [m.lm_head])
    m.lm_head.weight.copy_(m.lm_head.weight @ q)


def _lora_finetune(zoo: Zoo, m: Any, seed: int, rank: int = 4, steps: int = 200) -> None:
    """Train rank-``rank`` adapters on every attention and MLP projection, then merge them into the weights."""
    torch = require("torch", extra="torch")
    parametrize = require("torch.nn.utils", "parametrize", extra="torch")

    class LoRA(torch.nn.Module):
        def __init__(self, out_f: int, in_f: int):
            super().__init__()
            self.a = torch.nn.Parameter(torch.randn(rank, in_f) / math.sqrt(in_f))
            self.b = torch.nn.Parameter(torch.zeros(out_f, rank))

        def forward(self, w: Any) -> Any:
            return w + self.b @ self.a

    torch.manual_seed(seed)
    for p in m.parameters():
        p.requires_grad_(False)
    adapters = []
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(k in name for k in ("q_proj", "v_proj", "gate_proj", "down_proj")):
            lora = LoRA(*mod.weight.shape)
            parametrize.register_parametrization(mod, "weight", lora)
            adapters.append(mod)
    params = [p for mod in adapters for p in mod.parametrizations.weight[0].parameters()]
    zoo.train(m, steps, seed=seed + 300, split="finetune", lr=3e-3, params=params)
    with torch.no_grad():
        for mod in adapters:
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    for p in m.parameters():
        p.requires_grad_(True)

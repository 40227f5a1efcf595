"""A minimal OpenAI-compatible HTTP server over tiny causal LMs trained in seconds (issue 21).

:class:`Family` trains small Llama models on Python's own standard-library sources with a byte-level BPE
tokenizer, and makes the derivatives a thief would serve (fine-tune, LoRA merge, int8 and int4 round trips, magnitude
pruning, a function-preserving permutation of neurons and heads).
:class:`OAIServer` serves any number of them from one ``http.server`` thread, each under its own base URL
``http://127.0.0.1:PORT/<route>/v1``, answering ``/v1/completions`` (``logprobs``, ``echo``),
``/v1/chat/completions`` (``logprobs``, ``top_logprobs``; the chat template is the bare message) and
``/v1/models``.  Each route can be made hostile: always 500, 429 a few times, hang, return NaN / positive /
unsorted log-probabilities, change its model name after a few requests, or refuse with escape sequences in
a plain-text body.
"""

from __future__ import annotations

import copy
import importlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

STDLIB = ("textwrap", "string", "shlex", "fnmatch", "glob", "calendar", "heapq", "bisect", "colorsys", "difflib",
          "argparse", "json.decoder", "json.encoder", "csv", "pprint", "reprlib", "dataclasses")  # fmt: skip


def corpus(limit: int = 400_000) -> str:
    """Python's own standard-library sources (the same text on every machine with this Python)."""
    parts = []
    for name in STDLIB:
        mod = importlib.import_module(name)
        parts.append(Path(mod.__file__).read_text(encoding="utf-8"))
    return "\n".join(parts)[:limit]


def bpe_tokenizer(text: str, vocab: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _fit(model: Any, batches: Any, lr: float) -> Any:
    """AdamW steps of the language-modelling loss over ``batches`` (token id tensors); the model, in eval mode."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for x in batches:
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


class Family:
    """Tiny Llama models on one tokenizer: ``train`` from a seed, derive, ``save`` as HF folders."""

    def __init__(self, root: str | Path, *, vocab: int = 384, d: int = 48, ff: int = 128, layers: int = 2,
                 seq: int = 64, batch: int = 16, tokenizer_vocab: int | None = None,
                 text_limit: int = 400_000):  # fmt: skip
        import torch

        torch.set_num_threads(1)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.text = corpus(text_limit)
        self.tokenizer = bpe_tokenizer(self.text, tokenizer_vocab or vocab)
        self.vocab, self.d, self.ff, self.layers, self.seq, self.batch = len(self.tokenizer), d, ff, layers, seq, batch
        ids = self.tokenizer(self.text)["input_ids"]
        self.tokens = torch.tensor(ids, dtype=torch.long)
        cut = int(len(ids) * 0.7)
        self.splits = {"pretrain": self.tokens[:cut], "finetune": self.tokens[cut:]}

    def new(self, seed: int) -> Any:
        import torch
        import transformers as T

        torch.manual_seed(seed)
        cfg = T.LlamaConfig(vocab_size=self.vocab, hidden_size=self.d, intermediate_size=self.ff,
                            num_hidden_layers=self.layers, num_attention_heads=4, num_key_value_heads=4,
                            max_position_embeddings=self.seq, tie_word_embeddings=False)  # fmt: skip
        return T.LlamaForCausalLM(cfg).float()

    def train(self, model: Any, steps: int, *, seed: int, split: str = "pretrain", lr: float = 3e-3) -> Any:
        import torch

        g = torch.Generator().manual_seed(seed)
        data = self.splits[split]

        def batches() -> Any:
            for _ in range(steps):
                starts = torch.randint(0, len(data) - self.seq - 1, (self.batch,), generator=g)
                yield torch.stack([data[s : s + self.seq] for s in starts])

        return _fit(model, batches(), lr)

    def examples(self, length: int, split: str = "pretrain") -> list[str]:
        """Disjoint windows of ``length`` tokens of ``split`` as texts, each kept only where it tokenizes back to
        the same ``length`` tokens (so training on the text is training on those tokens) and is ASCII (no
        character split across tokens, which an echo cannot spell back token by token)."""
        data = self.splits[split].tolist()
        out = []
        for i in range(0, len(data) - length + 1, length):
            text = self.tokenizer.decode(data[i : i + length])
            if text.isascii() and self.tokenizer(text, add_special_tokens=False)["input_ids"] == data[i : i + length]:
                out.append(text)
        return list(dict.fromkeys(out))

    def train_in_order(self, model: Any, texts: list[str], *, lr: float = 6e-3) -> Any:
        """One pass over ``texts`` in the order given, each seen once, ``batch`` texts a step (equal lengths)."""
        import torch

        def batches() -> Any:
            for s in range(0, len(texts), self.batch):
                ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[s : s + self.batch]]
                n = min(len(i) for i in ids)
                yield torch.tensor([i[:n] for i in ids])

        return _fit(model, batches(), lr)

    def base(self, seed: int, steps: int = 150) -> Any:
        return self.train(self.new(seed), steps, seed=seed)

    def finetune(self, model: Any, steps: int = 25, seed: int = 1, lr: float = 5e-4) -> Any:
        """A short fine-tune on the held-out split (a copy; the original is left as it is)."""
        return self.train(copy.deepcopy(model), steps, seed=seed + 1000, split="finetune", lr=lr)

    @staticmethod
    def int8(model: Any) -> Any:
        """Per-row absmax int8 round trip of every matrix (what an int8 serving stack does to the weights)."""
        import torch

        m = copy.deepcopy(model)
        with torch.no_grad():
            for p in m.parameters():
                if p.ndim == 2:
                    s = p.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
                    p.copy_((p / s).round().clamp(-128, 127) * s)
        return m

    @staticmethod
    def prune(model: Any, frac: float = 0.3) -> Any:
        """Magnitude pruning of every non-embedding matrix."""
        import torch

        m = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if p.ndim == 2 and "embed" not in n:
                    thr = p.abs().flatten().kthvalue(max(1, int(p.numel() * frac))).values
                    p[p.abs() <= thr] = 0
        return m

    def lora_merge(self, model: Any, rank: int = 8, steps: int = 40, seed: int = 2, lr: float = 3e-3,
                   alpha: float = 16.0) -> Any:  # fmt: skip
        """A LoRA fine-tune merged into the weights (a copy): a rank-``rank`` update ``B A * alpha / rank`` of
        every attention and MLP projection, trained ``steps`` steps on the held-out split with the base frozen
        (B starts at zero, as in LoRA), then added to the weights."""
        import torch

        m = copy.deepcopy(model)
        for p in m.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(seed)
        adapters, hooks = [], []
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in (
                    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):  # fmt: skip
                a = torch.nn.Parameter(torch.randn(rank, mod.in_features, generator=g) / mod.in_features**0.5)
                b = torch.nn.Parameter(torch.zeros(mod.out_features, rank))
                adapters.append((mod, a, b))
                hooks.append(mod.register_forward_hook(
                    lambda _m, inp, out, a=a, b=b: out + (inp[0] @ a.T @ b.T) * (alpha / rank)))  # fmt: skip
        opt = torch.optim.AdamW([t for _, a, b in adapters for t in (a, b)], lr=lr, weight_decay=0.0)
        data = self.splits["finetune"]
        m.train()
        for _ in range(steps):
            starts = torch.randint(0, len(data) - self.seq - 1, (self.batch,), generator=g)
            x = torch.stack([data[s : s + self.seq] for s in starts])
            loss = m(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for mod, a, b in adapters:
                mod.weight += (b @ a) * (alpha / rank)
        m.eval()
        return m

    @staticmethod
    def int4(model: Any, group: int = 32) -> Any:
        """Group-wise symmetric int4 round trip of every matrix (groups of ``group`` inputs per row, one absmax
        scale each, levels -8..7: what a GPTQ/AWQ-style 4-bit serving stack stores, without their tuning)."""
        import torch

        m = copy.deepcopy(model)
        with torch.no_grad():
            for p in m.parameters():
                if p.ndim == 2:
                    rows, cols = p.shape
                    g = group if cols % group == 0 else cols
                    w = p.reshape(rows, cols // g, g)
                    s = w.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 7
                    p.copy_(((w / s).round().clamp(-8, 7) * s).reshape(rows, cols))
        return m

    @staticmethod
    def permute(model: Any, seed: int = 3) -> Any:
        """A function-preserving permutation of every layer's MLP neurons (rows of gate/up, columns of down) and
        attention heads (q, k, v head blocks and the matching columns of o): the same function, other weights."""
        import torch

        m = copy.deepcopy(model)
        g = torch.Generator().manual_seed(seed)
        cfg = m.config
        hd = cfg.hidden_size // cfg.num_attention_heads
        assert cfg.num_key_value_heads == cfg.num_attention_heads
        with torch.no_grad():
            for layer in m.model.layers:
                mlp, att = layer.mlp, layer.self_attn
                pi = torch.randperm(mlp.gate_proj.out_features, generator=g)
                mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[pi])
                mlp.up_proj.weight.copy_(mlp.up_proj.weight[pi])
                mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, pi])
                heads = torch.randperm(cfg.num_attention_heads, generator=g)
                idx = (heads[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)
                for lin in (att.q_proj, att.k_proj, att.v_proj):
                    lin.weight.copy_(lin.weight[idx])
                    if lin.bias is not None:
                        lin.bias.copy_(lin.bias[idx])
                att.o_proj.weight.copy_(att.o_proj.weight[:, idx])
        return m

    def save(self, model: Any, name: str, tokenizer: Any = None) -> Path:
        path = self.root / name
        model.save_pretrained(path, safe_serialization=True)
        (tokenizer or self.tokenizer).save_pretrained(path)
        return path


# -- the server --------------------------------------------------------------------------------------------
@dataclass
class Served:
    """One route: a model, its tokenizer, the name it answers as, and how it behaves."""

    model: Any
    tokenizer: Any
    name: str
    logprobs: bool = True  # offers log-probabilities (else: text only, logprobs null)
    echo: bool = True  # honours echo
    temperature: float | None = None  # forced sampling temperature (None: as asked)
    fault: str = ""  # "500" | "429:N" | "hang" | "nan" | "positive" | "unsorted" | "switch:N" | "badecho" | "rude"
    # | "surrogate" (a lone surrogate after the text)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    on_request: Callable[[int], None] | None = None  # called with each request's number before it is answered


def _run(served: Served, prompt_ids: list[int], max_tokens: int, temperature: float, seed: int | None,
         want_logp: bool = True) -> tuple[list[int], Any]:  # fmt: skip
    """Generate ``max_tokens`` after the prompt; the log-softmax at every position of prompt + generation."""
    import torch

    seq = served.model.config.max_position_embeddings
    ids = list(prompt_ids)
    g = torch.Generator().manual_seed(seed if seed is not None else 0)
    with torch.no_grad():
        for _ in range(max_tokens):
            if len(ids) >= seq:
                break
            logits = served.model(input_ids=torch.tensor([ids[-seq:]])).logits[0, -1]
            if temperature <= 0:
                nxt = int(logits.argmax())
            else:
                nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g))
            ids.append(nxt)
        if not want_logp:  # text only: no second pass
            return ids[len(prompt_ids) :], None
        logp = torch.log_softmax(served.model(input_ids=torch.tensor([ids[:seq]])).logits[0].float(), -1)
    return ids[len(prompt_ids) :], logp


class OAIServer:
    """``add(route, Served)`` -> that route's base URL; ``close()`` stops the thread."""

    def __init__(self) -> None:
        self.routes: dict[str, Served] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                return None

            def _send(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
                body = json.dumps(obj).encode()  # allow_nan: hostile routes send NaN on purpose
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _route(self) -> tuple[Served | None, str]:
                parts = self.path.strip("/").split("/", 2)
                if len(parts) < 3 or parts[1] != "v1" or parts[0] not in server.routes:
                    return None, ""
                return server.routes[parts[0]], parts[2]

            def do_GET(self) -> None:
                s, rest = self._route()
                if s is None or rest != "models":
                    self._send(404, {"error": {"message": "not found"}})
                    return
                self._send(200, {"object": "list", "data": [{"id": s.name, "object": "model"}]})

            def do_POST(self) -> None:
                s, rest = self._route()
                if s is None or rest not in ("completions", "chat/completions"):
                    self._send(404, {"error": {"message": "not found"}})
                    return
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                except ValueError:
                    self._send(400, {"error": {"message": "bad JSON"}})
                    return
                with s.lock:
                    s.requests += 1
                    n = s.requests
                if s.on_request is not None:
                    s.on_request(n)
                kind, _, arg = s.fault.partition(":")
                if kind == "rude":  # a refusal whose plain-text body tries to drive the terminal
                    body = b"no access \x1b]0;owned\x07\x1b[2J"
                    self.send_response(403)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if kind == "500":
                    self._send(500, {"error": {"message": "internal error"}})
                    return
                if kind == "429" and n <= int(arg):
                    self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
                    return
                if kind == "hang":
                    time.sleep(2.0)
                name = s.name + "-v2" if kind == "switch" and n > int(arg) else s.name
                try:
                    obj = server.complete(s, body) if rest == "completions" else server.chat(s, body)
                except ValueError as e:
                    self._send(400, {"error": {"message": str(e)}})
                    return
                obj["model"] = name
                self._send(200, obj)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def add(self, route: str, served: Served) -> str:
        self.routes[route] = served
        return f"http://127.0.0.1:{self.port}/{route}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- answers ----------------------------------------------------------------------------------------
    @staticmethod
    def _temp(s: Served, body: dict[str, Any]) -> float:
        return s.temperature if s.temperature is not None else float(body.get("temperature", 1.0))

    @staticmethod
    def _piece(s: Served, i: int) -> str:
        return s.tokenizer.decode([i])

    @staticmethod
    def _top(s: Served, row: Any, k: int) -> list[tuple[str, float]]:
        v, idx = row.topk(k)
        out = [(OAIServer._piece(s, int(i)), float(x)) for x, i in zip(v, idx, strict=True)]
        if s.fault == "unsorted":
            out.reverse()
        return out

    def complete(self, s: Served, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError("prompt must be a string")
        ids = s.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > s.model.config.max_position_embeddings:
            raise ValueError("prompt too long")
        k = body.get("logprobs")
        gen, logp = _run(s, ids, int(body.get("max_tokens", 16)), self._temp(s, body), body.get("seed"),
                         k is not None and s.logprobs)  # fmt: skip
        echo = bool(body.get("echo")) and s.echo
        lp_obj = None
        if k is not None and s.logprobs:
            allids = ids + gen
            start = 0 if echo else len(ids)
            toks, lps, tops, offs, pos = [], [], [], [], 0
            for t in range(len(allids)):
                piece = self._piece(s, allids[t])
                if t >= start:
                    toks.append(piece)
                    offs.append(pos)
                    if t == 0:
                        lps.append(None)
                        tops.append(None)
                    else:
                        lp = float(logp[t - 1, allids[t]])
                        if s.fault == "nan" and t == 2:
                            lp = float("nan")
                        if s.fault == "positive" and t == 2:
                            lp = 0.5
                        lps.append(lp)
                        top: dict[str, float] = {}
                        for a, b in self._top(s, logp[t - 1], int(k)) if k else []:
                            top.setdefault(a, b)  # pieces several ids spell: the likeliest one
                        tops.append(top if k else None)
                pos += len(piece)
            if s.fault == "badecho" and toks:
                toks[0] = toks[0] + "x"
            lp_obj = {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}
        text = s.tokenizer.decode(gen) + ("\ud800" if s.fault == "surrogate" else "")  # a lone surrogate
        return {"id": "cmpl-test", "object": "text_completion", "created": int(time.time()),
                "choices": [{"index": 0, "text": (prompt + text) if echo else text, "logprobs": lp_obj,
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(gen)}}  # fmt: skip

    def chat(self, s: Served, body: dict[str, Any]) -> dict[str, Any]:
        msgs = body.get("messages")
        if not isinstance(msgs, list):
            raise ValueError("messages must be a list")
        prompt = "".join(str(m.get("content", "")) for m in msgs)  # the bare template
        ids = s.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        gen, logp = _run(s, ids, int(body.get("max_tokens", 16)), self._temp(s, body), body.get("seed"))
        lp_obj = None
        if body.get("logprobs") and s.logprobs:
            k = int(body.get("top_logprobs") or 0)
            content = []
            for j, i in enumerate(gen):
                row = logp[len(ids) + j - 1]
                lp = float(row[i])
                if s.fault == "positive" and j == 1:
                    lp = 0.5
                if s.fault == "nan" and j == 1:
                    lp = float("nan")
                top = [{"token": a, "logprob": b, "bytes": list(a.encode())} for a, b in self._top(s, row, k)] if k \
                    else []  # fmt: skip
                piece = self._piece(s, i)
                content.append({"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": top})
            lp_obj = {"content": content}
        return {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": s.tokenizer.decode(gen)},
                             "logprobs": lp_obj, "finish_reason": "length"}]}  # fmt: skip

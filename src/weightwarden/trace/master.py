"""The master a release copies: an inventory of its files (a plain file or folder, or an opened sealed file or
bundle), their tensors and bytes, and the guard against tensors that copy a marked one."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import numpy as np

from ..provenance.source import TensorSource

__all__ = ["CopyGuard", "Entry", "digest_files", "entry_bytes", "entry_tensors", "inventory_plain",
           "inventory_sealed", "master_files"]  # fmt: skip


def digest_files(files: list[Path]) -> str:
    h = blake3.blake3()
    for f in files:
        h.update_mmap(f) if hasattr(h, "update_mmap") else h.update(f.read_bytes())
    return h.hexdigest()[:32]


@dataclass
class Entry:
    """One file of the master: its relative path, its weight format (None: not a weight file), and where
    its bytes are (a plain file on disk, or the member of an opened sealed master)."""

    rel: str
    kind: str | None
    path: Path | None = None  # plain master
    member: Any = None  # sealed master: a SealedReader
    in_source: bool = False  # read by the master's TensorSource (its layout, trace reads it)


def inventory_plain(model: Path) -> tuple[list[Entry], list[str]]:
    from ..sealed.walk import classify, walk

    if model.is_symlink():
        return [], [f"{model.name} (a symbolic link: links are not followed; give the file itself)"]
    if model.is_file():
        kind = classify(model)
        return [Entry(model.name, kind, path=model, in_source=kind == "safetensors")], []
    w = walk(model)
    entries = []
    for rel in w.files:
        kind = classify(model / rel)
        top = "/" not in rel and rel.endswith(".safetensors")
        entries.append(Entry(rel, kind, path=model / rel, in_source=top and kind == "safetensors"))
    return entries, w.problems


def inventory_sealed(reader: Any) -> list[Entry]:
    from ..sealed.bundle import BundleReader
    from ..sealed.walk import classify_bytes

    members = [reader.member(n) for n in reader.files()] if isinstance(reader, BundleReader) else [reader]
    out = []
    for r in members:
        if r.kind == "safetensors":
            out.append(Entry(r.name, "safetensors", member=r, in_source=True))
        else:
            out.append(Entry(r.name, classify_bytes(r.read_all().data), member=r))
    return out


def entry_tensors(e: Entry) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if e.member is not None:
        return e.member.load_numpy(), dict(e.member.metadata())
    with TensorSource(e.path) as part:  # type: ignore[arg-type]
        tensors = {n: part.raw(n) for n in part.names()}  # memory maps (the map outlives the source's close)
        meta = part.file_metadata(next(iter(tensors))) if tensors else {}
    return tensors, meta


def entry_bytes(e: Entry) -> Any:
    """A non-weight member of a sealed master, in memory (the original bytes)."""
    r = e.member
    body = r.read_all()
    if r.kind == "safetensors":
        return r.safetensors_header_bytes() + body.tobytes()
    return body


# names the supported layouts give their tensors (inside a block, or at the top): a tensor outside the marked
# set under any other name, shaped like a marked tensor (or its transpose), is taken for a hidden copy
_BLOCK_PARTS = re.compile(
    r"(?:^|\.)(?:layers|h|encoder\.layer)\.\d+\.(?:"
    r"self_attn\.(?:[qkvo]_proj|[qk]_norm)|input_layernorm|post_attention_layernorm|pre_feedforward_layernorm"
    r"|post_feedforward_layernorm|mlp\.(?:gate|up|down)_proj|mlp\.gate|mlp\.shared_expert_gate"
    r"|mlp\.experts\.\d+\.(?:gate|up|down)_proj|mlp\.shared_experts?\.(?:gate|up|down)_proj"
    r"|block_sparse_moe\.gate|block_sparse_moe\.experts\.\d+\.w[123]"
    r"|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj|ln_1|ln_2"
    r"|attention\.self\.(?:query|key|value)|attention\.output\.dense|attention\.output\.LayerNorm"
    r"|intermediate\.dense|output\.dense|output\.LayerNorm)\.(?:weight|bias|gamma|beta)$"
    r"|(?:^|\.)layers\.\d+\.self_attn\.rotary_emb\.inv_freq$|(?:^|\.)h\.\d+\.attn\.(?:masked_)?bias$"
)
_TOP_PARTS = re.compile(
    r"(?:^|\.)(?:embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|tok_embeddings"
    r"|lm_head|norm|ln_f|final_layernorm|embeddings\.LayerNorm|pooler\.dense|cls\.predictions\.[\w.]+"
    r"|position_ids)(?:\.(?:weight|bias|gamma|beta))?$"
)


def _known_name(name: str) -> bool:
    return bool(_BLOCK_PARTS.search(name) or _TOP_PARTS.search(name))


def _hash(a: Any) -> str:
    return blake3.blake3(np.ascontiguousarray(a).view(np.uint8).data).hexdigest()


class CopyGuard:
    """Refuses tensors outside the marked set that copy a marked one (issue 17, red team): under a name the
    layout does not know, one shaped like a marked tensor or its transpose; under any name, one whose bytes
    hash equal to a marked tensor's (BLAKE3, only for tensors of a marked tensor's byte size)."""

    def __init__(self, targets: set[str], files: list[tuple[str, dict[str, Any]]]):
        self.targets = targets
        self.shapes: dict[tuple[int, ...], str] = {}
        self.by_size: dict[int, list[tuple[str, Any]]] = {}
        for _rel, tensors in files:
            for n, a in tensors.items():
                if n in targets:
                    self.shapes.setdefault(tuple(a.shape), n)
                    self.shapes.setdefault(tuple(a.shape)[::-1], n)
                    self.by_size.setdefault(a.nbytes, []).append((n, a))
        self._hashes: dict[str, str] | None = None

    def hashes(self) -> dict[str, str]:
        if self._hashes is None:
            self._hashes = {}
            for items in self.by_size.values():
                for n, a in items:
                    self._hashes.setdefault(_hash(a), n)
        return self._hashes

    def problems(self, rel: str, tensors: dict[str, Any]) -> list[str]:
        out = []
        for n, a in tensors.items():
            if n in self.targets:
                continue
            t = self.shapes.get(tuple(a.shape)) if not _known_name(n) and a.ndim >= 2 else None
            if t is None and a.nbytes in self.by_size:
                t = self.hashes().get(_hash(a))
                why = "holds the same bytes as"
            else:
                why = "is shaped like"
            if t is not None:
                out.append(f"{rel} (tensor '{n}' {why} the marked tensor '{t}': a copy would leave unmarked; "
                           "remove the tensor from the file, --exclude cannot split a file)")  # fmt: skip
        return out


def master_files(model: Path) -> list[Path]:
    if model.is_file():
        return [model]
    from ..sealed.walk import walk

    return [model / f for f in walk(model).files]

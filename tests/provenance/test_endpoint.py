"""Provenance through an API (issue 21): `warden provenance probe` against a real OpenAI-compatible HTTP
server (tests/support/oai_server.py) over tiny Llama models trained here on Python's stdlib sources."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("httpx")

from weightwarden import trail
from weightwarden.errors import (
    EndpointAnswerError,
    EndpointError,
    EndpointUnavailableError,
    ModelChangedError,
    ProbeError,
    QueryBudgetError,
    RegistryError,
    TokenizerMismatchError,
)
from weightwarden.provenance.endpoint import AnswerCache, Endpoint, TokenBucket
from weightwarden.provenance.probe import EndpointScorer, HFScorer, probe

ALPHA = 1e-3
LOOSE_ALPHA = 1e-2  # chat and text modes: few tokens per probe here (they need more queries for 1e-3)
N_REFS = 5  # the references of the `world` fixture (tests/provenance/conftest.py)


def _probe(w, key, home, **kw):
    kw.setdefault("mode", "logprobs")
    kw.setdefault("n_items", 16)
    kw.setdefault("alpha", ALPHA)
    return probe(w["urls"][key], w["ours"], w["refs"], prompts=w["prompts"], home=home, **kw)


def test_token_bucket_waits_by_its_clock():
    now = [100.0]
    b = TokenBucket(rate=2.0, burst=2, clock=lambda: now[0])
    assert b.reserve() == 0.0 and b.reserve() == 0.0
    assert b.reserve() == pytest.approx(0.5)  # the third in the same instant waits one token's time
    assert b.reserve() == pytest.approx(1.0)
    now[0] += 10.0  # refills up to the burst, no more
    assert b.reserve() == 0.0 and b.reserve() == 0.0 and b.reserve() == pytest.approx(0.5)
    with pytest.raises(ProbeError):
        TokenBucket(rate=0)


def test_answer_cache_cuts_a_torn_line(tmp_path):
    c = AnswerCache(tmp_path)
    c.put("a", "/completions", {"x": 1})
    with open(c.path, "ab") as f:
        f.write(b'{"key": "b", "resp')  # an interrupted append
    c2 = AnswerCache(tmp_path)
    assert len(c2) == 1 and c2.get("a") == {"x": 1} and c2.get("b") is None
    assert c.path.read_bytes().endswith(b"\n")
    c.path.write_text("not json\n")
    with pytest.raises(ProbeError, match="line 1 is damaged"):
        AnswerCache(tmp_path)


def test_logprobs_mode_detects_derived_not_independent(world, tmp_path):
    fam_ft = _probe(world, "ft", tmp_path)
    fam_i8 = _probe(world, "int8", tmp_path)
    ind = _probe(world, "ind", tmp_path)
    assert fam_ft.derived and fam_i8.derived, (fam_ft.to_json(), fam_i8.to_json())
    assert fam_i8.log10_p_value < fam_ft.log10_p_value < math.log10(ALPHA)
    assert not ind.derived and ind.log10_p_value > -2, ind.to_json()
    # the rank p-value is exact but cannot go below 1/(k+1)
    assert fam_i8.rank_p_value == pytest.approx(1 / (N_REFS + 1))
    j = fam_ft.to_json()
    assert j["decision"] == "derived" and j["served_model"] == "suspect-ft" and j["queries"]["used"] == 16
    assert "independent" in j["null"] and len(j["assumptions"]) >= 4 and j["data_points"] > 500
    assert set(j["statistic"]["references"]) == {f"ref{i}" for i in range(1, N_REFS + 1)}
    # every query and each probe is an audit event of the home's trail
    ev = trail.events(tmp_path)
    acts = [e["action"] for e in ev]
    assert acts.count("provenance:query") == 48 and acts.count("provenance:probe") == 3
    last = [e for e in ev if e["action"] == "provenance:probe"][-1]
    assert last["detail"]["decision"] == "not derived" and last["subject"] == world["urls"]["ind"]


def test_chat_mode_at_temperature_one(world, tmp_path):
    kw = {"mode": "chat", "n_items": 24, "new_tokens": 20, "alpha": LOOSE_ALPHA}
    ft = _probe(world, "ft-t1", tmp_path, **kw)
    ind = _probe(world, "ind-t1", tmp_path, **kw)
    assert ft.derived, ft.to_json()
    assert not ind.derived and ind.log10_p_value > -2, ind.to_json()


def test_text_mode_without_logprobs(world, tmp_path):
    with pytest.raises(EndpointAnswerError, match="no log-probabilities"):
        _probe(world, "ft-text", tmp_path)
    kw = {"mode": "text", "n_items": 16, "samples": 4, "new_tokens": 24, "alpha": ALPHA}
    ft = _probe(world, "ft-text", tmp_path, **kw)
    ind = _probe(world, "ind-text", tmp_path, **kw)
    assert ft.queries_used == 64 and ft.mode == "text" and ft.to_json()["method"] == "product of experts"
    assert ft.derived and ft.log10_p_value < -4, ft.to_json()  # -5.0 here
    # -2.0 here: ours is a "hub" these tiny models lean on (docs/PROVENANCE.md, "Hub models")
    assert not ind.derived, ind.to_json()


def test_budget_exhaustion_resumes_from_the_cache(world, tmp_path):
    served = world["srv"].routes["budget"]
    before = served.requests
    cache = tmp_path / "cache"
    with pytest.raises(QueryBudgetError, match="rerun with a larger --budget") as e:
        _probe(world, "budget", tmp_path, budget=5, cache=cache)
    assert e.value.used == 5 and served.requests - before == 5
    rep = _probe(world, "budget", tmp_path, budget=100, cache=cache)
    assert rep.queries_used == 11 and rep.queries_cached == 5 and served.requests - before == 16
    again = _probe(world, "budget", tmp_path, budget=0, cache=cache)  # all from the cache: nothing re-spent
    assert again.queries_used == 0 and again.queries_cached == 16 and served.requests - before == 16
    assert again.log10_p_value == rep.log10_p_value and rep.derived
    probes = [x for x in trail.events(tmp_path) if x["action"] == "provenance:probe"]
    assert [x["outcome"] for x in probes] == ["error", "ok", "ok"]
    assert probes[0]["detail"]["error"] == "QueryBudgetError"


@pytest.mark.parametrize(("fault", "error", "match"), [
    ("500", EndpointUnavailableError, "HTTP 500 on each of 2 attempts"),
    ("hang", EndpointUnavailableError, "timed out"),
    ("nan", EndpointAnswerError, "not finite"),
    ("positive", EndpointAnswerError, "positive"),
    ("unsorted", EndpointAnswerError, "not sorted"),
    ("badecho", EndpointAnswerError, "do not spell the prompt"),
    ("switch:3", ModelChangedError, "answered as model 'hostile-v2' after 'hostile'"),
])  # fmt: skip
def test_hostile_endpoints_get_a_typed_error_and_no_p_value(world, tmp_path, fault, error, match):
    with pytest.raises(error, match=match):
        _probe(world, fault, tmp_path, retries=1, backoff=0.01, timeout=0.5, cache=tmp_path / "c")
    probes = [x for x in trail.events(tmp_path) if x["action"] == "provenance:probe"]
    assert len(probes) == 1 and probes[0]["outcome"] == "error" and "log10_p" not in probes[0]["detail"]
    # only answers that passed are cached: a rerun asks again instead of replaying a bad one
    assert len(AnswerCache(tmp_path / "c")) == (3 if fault == "switch:3" else 0)


def test_attack_hostile_text_gets_a_typed_error_and_no_p_value(world, tmp_path):
    with pytest.raises(EndpointAnswerError, match="lone surrogate"):  # text that is not valid Unicode
        _probe(world, "surrogate", tmp_path, mode="text", n_items=4, samples=1)
    with pytest.raises(EndpointError, match="at least 32"):  # one token per answer: too little to fit
        _probe(world, "ft-text", tmp_path, mode="text", n_items=4, samples=1, new_tokens=1)
    probes = [x for x in trail.events(tmp_path) if x["action"] == "provenance:probe"]
    assert [x["outcome"] for x in probes] == ["error", "error"] and "log10_p" not in probes[1]["detail"]


def test_attack_one_model_given_twice_is_refused(world, tmp_path):
    """A reference given twice (or a copy of ours among the references) would fake the references' spread:
    three copies of one reference made an independent suspect "derived" at p = 1e-24."""
    ours, refs = world["ours"], world["refs"]
    again = [HFScorer(model=refs[0].model, tokenizer=refs[0].tokenizer, name=f"ref1-again{i}") for i in (1, 2)]
    ours_copy = HFScorer(model=ours.model, tokenizer=ours.tokenizer, name="ours-as-reference")
    for pool in ([refs[0], *again, *refs[1:3]], [ours_copy, *refs[:3]]):
        for mode, key, kw in (("logprobs", "ind", {}), ("text", "ind-text", {"n_items": 4, "samples": 2})):
            with pytest.raises(ProbeError, match="given twice"):
                probe(world["urls"][key], ours, pool, prompts=world["prompts"], mode=mode, home=tmp_path, **kw)


def test_rate_limited_endpoint_is_retried(world, tmp_path):
    slept = []
    rep = _probe(world, "429:2", tmp_path, retries=3, backoff=0.01, sleep=slept.append, n_items=4)
    assert rep.queries_used == 6 and len(slept) == 2  # two 429s, each retried after a backoff


def test_chat_and_tokenizer_mismatch_is_reported(world, tmp_path):
    with pytest.raises(TokenizerMismatchError, match="its tokenizer is not ours"):
        _probe(world, "other-tok", tmp_path)
    with pytest.raises(TokenizerMismatchError):
        _probe(world, "other-tok", tmp_path, mode="chat")
    rep = _probe(world, "other-tok", tmp_path, mode="text", n_items=8, samples=2)  # text mode needs no tokenizer
    assert rep.queries_used == 16 and not rep.derived


def test_a_reference_behind_an_endpoint(world, tmp_path):
    ep = Endpoint(world["urls"]["ref1"], home=tmp_path, cache=tmp_path / "ref1")
    refs = [EndpointScorer(ep, name="ref1@endpoint"), *world["refs"][1:]]
    rep = probe(world["urls"]["int8"], world["ours"], refs, prompts=world["prompts"], alpha=ALPHA, n_items=8,
                home=tmp_path)  # fmt: skip
    assert rep.derived and "ref1@endpoint" in rep.statistics and ep.used > 0
    txt = probe(world["urls"]["ft-text"], world["ours"], refs, prompts=world["prompts"], mode="text", n_items=4,
                samples=1, home=tmp_path)  # fmt: skip
    assert txt.method == "log-likelihood per character"  # no whole distributions from a remote reference
    with pytest.raises(ProbeError, match="at least 3 reference"):
        probe(world["urls"]["int8"], world["ours"], refs[:2], prompts=world["prompts"], home=tmp_path)


def test_cli_json(world, tmp_path, capsys):
    from weightwarden.cli import main

    p = world["paths"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(x.replace("\n", " ") for x in world["prompts"]) + "\n")
    base = ["provenance", "probe", world["urls"]["int8"], "--model", str(p["ours"]), "--prompts", str(prompts),
            "--home", str(tmp_path), "--items", "8", "--alpha", "1e-2"]  # fmt: skip
    refs = [a for i in (1, 2, 3) for a in ("--reference", str(p[f"ref{i}"]))]
    assert main([*base, *refs, "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["decision"] == "derived" and j["queries"]["used"] == 8 and j["served_model"] == "suspect-int8"
    assert j["df"] == 2 and j["rank_p_value"] == pytest.approx(0.25)
    assert main([*base, *refs]) == 0  # the human report, answered from the cache
    text = capsys.readouterr().out
    assert "DERIVED" in text and "0 queries sent, 8 from the cache" in text
    assert main([*base, *refs[:4]]) == 2  # usage: too few references
    assert "at least 3 times" in capsys.readouterr().err
    assert main([*base, *refs, "--api-key-env", "WW_NO_SUCH_VAR_X"]) == 1
    assert "WW_NO_SUCH_VAR_X" in capsys.readouterr().err


def test_without_prompts_the_pool_samples_candidates(world, tmp_path):
    rep = probe(world["urls"]["int8"], world["ours"], world["refs"], alpha=ALPHA, n_items=6, candidates=16,
                max_tokens=24, home=tmp_path)  # fmt: skip
    assert rep.queries_used == rep.items == 6 and rep.data_points > 100, rep.to_json()
    assert rep.derived, rep.to_json()


def test_models_and_references_by_their_registered_names(world, tmp_path, capsys):
    """`--model NAME`: the registry remembers where a model was registered from; references registered as
    such (`register --reference`) calibrate a probe given none, and are never candidates of identify."""
    from weightwarden.cli import main
    from weightwarden.provenance import Registry

    p = world["paths"]
    home, reg = tmp_path / "home", tmp_path / "reg"
    common = ["--registry", str(reg), "--home", str(home)]
    assert main(["provenance", "register", str(p["ours"]), "--name", "ours", *common]) == 0
    assert "registered ours as protected" in capsys.readouterr().out
    for i in (1, 2, 3):
        assert main(["provenance", "register", str(p[f"ref{i}"]), "--name", f"public-{i}", "--reference",
                     *common, "--json"]) == 0  # fmt: skip
        assert json.loads(capsys.readouterr().out)["role"] == "reference"
    r = Registry(reg)
    assert r.references() == ["public-1", "public-2", "public-3"] and r.model_path("ours") == p["ours"].absolute()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(x.replace("\n", " ") for x in world["prompts"]) + "\n")
    args = ["provenance", "probe", world["urls"]["int8"], "--model", "ours", "--prompts", str(prompts),
            "--items", "8", "--alpha", "1e-2", *common, "--json"]  # fmt: skip
    assert main(args) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["decision"] == "derived" and sorted(j["statistic"]["references"]) == ["ref1", "ref2", "ref3"]
    # identify never names a reference, even for the reference itself
    assert main(["provenance", "identify", str(p["ref1"]), *common, "--json"]) == 0
    assert all(m["name"] == "ours" for m in json.loads(capsys.readouterr().out)["matches"])
    # an unknown name, or a model whose folder moved: one line saying what to do
    assert main([*args[:4], "theirs", *args[5:]]) == 1
    assert "no registered model named 'theirs'" in capsys.readouterr().err
    moved = tmp_path / "moved"
    p["ref2"].rename(moved)
    try:
        assert main(args) == 1
        assert "'public-2' was registered from" in capsys.readouterr().err
    finally:
        moved.rename(p["ref2"])


def test_attack_a_copy_of_ours_cannot_be_registered_as_a_reference(world, tmp_path, capsys):
    """ATTACK (red team a, b): a copy of ours among the references turns a probe's derived verdict into "not
    derived", and `--reference --replace` over one of ours hides it from identify.  Both are refused, in either
    order of registration, and the registry is left as it was."""
    import shutil

    from weightwarden.cli import main
    from weightwarden.provenance import Registry

    p = world["paths"]
    copy = tmp_path / "ours-copy"
    shutil.copytree(p["ours"], copy)
    home, reg = tmp_path / "home", tmp_path / "reg"
    common = ["--registry", str(reg), "--home", str(home)]
    assert main(["provenance", "register", str(p["ours"]), "--name", "ours", *common]) == 0
    assert main(["provenance", "register", str(p["ref1"]), "--name", "public-1", "--reference", *common]) == 0
    capsys.readouterr()
    # (a) the copy, registered as a reference: refused with one line naming the model it is derived from
    assert main(["provenance", "register", str(copy), "--name", "x", "--reference", *common]) == 1
    e = capsys.readouterr().err
    assert "'x' is not independent of our model 'ours'" in e and "not registered" in e
    # (b) one of ours demoted to a reference by --replace (and a reference promoted): refused
    assert main(["provenance", "register", str(p["ours"]), "--name", "ours", "--reference", "--replace",
                 *common]) == 1  # fmt: skip
    assert "'ours' is registered as protected; replace keeps a model's role" in capsys.readouterr().err
    assert main(["provenance", "register", str(p["ref1"]), "--name", "public-1", "--replace", *common]) == 1
    assert "'public-1' is registered as reference" in capsys.readouterr().err
    r = Registry(reg)
    assert r.names() == ["ours", "public-1"] and r.references() == ["public-1"]
    with pytest.raises(RegistryError, match="replace keeps a model's role"):
        r.add("ours", r.get("ours"), replace=True, reference=True)
    assert r.references() == ["public-1"] and r.identify(copy, log=False).best[0] == "ours"
    # the other order: the copy enrolled as a reference first, then ours registered: refused, naming the copy
    reg2 = ["--registry", str(tmp_path / "reg2"), "--home", str(home)]
    assert main(["provenance", "register", str(copy), "--name", "x", "--reference", *reg2]) == 0
    capsys.readouterr()
    assert main(["provenance", "register", str(p["ours"]), "--name", "ours", *reg2]) == 1
    assert "the registered reference 'x' is not independent of 'ours'" in capsys.readouterr().err
    assert Registry(tmp_path / "reg2").names() == ["x"]


def test_attack_a_folder_named_like_a_registered_model_does_not_win(world, tmp_path, monkeypatch):
    """ATTACK (red team c): a folder in the working directory named like a registered model must not stand in
    for it in `--model NAME` / `--reference NAME`; `./NAME` (anything that looks like a path) is the folder."""
    import shutil

    from weightwarden.cli._common import _ws
    from weightwarden.cli.probe import _model, _references
    from weightwarden.provenance import Registry

    p = world["paths"]
    home, reg = tmp_path / "home", tmp_path / "reg"
    r = Registry(reg, home=home)
    r.register(p["ours"], "ours")
    r.register(p["ref1"], "public-1", reference=True)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for planted in ("ours", "public-1", "mine"):
        shutil.copytree(p["ref4"], cwd / planted)
    monkeypatch.chdir(cwd)
    ws = _ws(home)
    assert _model("ours", ws, reg) == (p["ours"].absolute(), "ours")
    assert _references(["public-1"], ws, reg, default=False) == [str(p["ref1"].absolute())]
    # a path, or an unregistered name of a folder here, is that folder
    assert _model("./ours", ws, reg)[0] == Path("./ours") and _model("mine", ws, reg)[0] == Path("mine")
    assert _references(["./public-1"], ws, reg, default=False) == ["public-1"]

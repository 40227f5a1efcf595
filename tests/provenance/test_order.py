"""The exact training-order test (`warden provenance probe --order`): a tiny Llama trained once on examples
in a recorded order, each seen once, served through the suite's OpenAI-compatible server."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("httpx")

from tests.support.cli import PASSPHRASE
from tests.support.oai_server import Family, OAIServer, Served
from weightwarden import trail
from weightwarden.errors import EndpointAnswerError, KeyPurposeError, ProbeError, QueryBudgetError, WrongKeyError
from weightwarden.provenance.order import OrderStore, TrainingOrder, record_order, shuffle
from weightwarden.provenance.ordertest import order_probe, rank_sum_p
from weightwarden.provenance.probe import HFScorer

ALPHA = 1e-3
K = 64  # latest and earliest examples asked: 128 queries a probe


def _lls(model, tokenizer, texts):
    """Each text's log-likelihood (all tokens after the first), computed in one batch."""
    import torch

    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    n = min(len(i) for i in ids)
    x = torch.tensor([i[:n] for i in ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1)
    return lp.gather(-1, x[:, 1:, None])[..., 0].sum(-1).numpy()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("order-family")
    fam = Family(root, vocab=320, d=32, ff=96, seq=48, batch=8, text_limit=80_000)
    texts = fam.examples(40)
    rng = np.random.default_rng(11)
    order = TrainingOrder(tuple(texts[i] for i in rng.permutation(len(texts))))  # seeded here: reproducible
    ours = fam.train_in_order(fam.new(0), list(order.examples), lr=1e-2)
    other = [texts[i] for i in rng.permutation(len(texts))]  # the same data in another order: independent
    ind = fam.train_in_order(fam.new(5), other, lr=1e-2)
    ft = fam.finetune(ours, steps=25, lr=5e-4)
    more = {"lora": fam.lora_merge(ours, rank=8, steps=40), "int4": Family.int4(ours), "perm": Family.permute(ours)}
    base = fam.base(7, steps=60)  # a "public base": trained on random windows, never on our order
    srv = OAIServer()
    tok = fam.tokenizer
    urls = {n: srv.add(n, Served(m, tok, n)) for n, m in (("ft", ft), ("ind", ind))}
    urls.update({n: srv.add(n, Served(m, tok, n)) for n, m in more.items()})
    urls["ft-text"] = srv.add("ft-text", Served(ft, tok, "ft", logprobs=False))
    urls["nan"] = srv.add("nan", Served(ft, tok, "hostile", fault="nan"))
    yield {"fam": fam, "order": order, "urls": urls, "ind": ind, "ours": ours, "tok": tok,
           "norm": HFScorer(model=base, tokenizer=tok, name="public-base"), "base": base, "root": root,
           "more": more}  # fmt: skip
    srv.close()


def test_derived_is_detected_independent_is_not(run, tmp_path):
    kw = {"normalisers": [run["norm"]], "alpha": ALPHA, "home": tmp_path}
    ft = order_probe(run["urls"]["ft"], run["order"], n_items=2 * K, cache=tmp_path / "ft", **kw)
    ind = order_probe(run["urls"]["ind"], run["order"], n_items=K, **kw)  # (fewer queries: only its validity)
    assert ft.derived and ft.log10_p_value < -4, ft.to_json()
    assert not ind.derived and ind.log10_p_value > -2, ind.to_json()
    j = ft.to_json()
    assert j["p_method"] == "exact permutation distribution" and j["queries"]["used"] == 2 * K
    assert j["order"] == {"examples": len(run["order"].examples), "latest": K, "earliest": K, "shuffled": "given"}
    assert "uniformly random permutation" in j["null"] and len(j["assumptions"]) == 4
    dumped = json.dumps(j)  # the report never shows the secret examples
    assert not any(e[:30] in dumped for e in run["order"].examples[:K] + run["order"].examples[-K:])
    probes = [e for e in trail.events(tmp_path) if e["action"] == "provenance:probe"]
    assert [e["detail"]["decision"] for e in probes] == ["derived", "not derived"]
    assert all(e["detail"]["test"] == "training-order" for e in probes)
    # without a normaliser the texts' own difficulty swamps the signal: the p-value is still valid, less small
    raw = order_probe(run["urls"]["ft"], run["order"], n_items=2 * K, alpha=ALPHA, home=tmp_path, cache=tmp_path / "ft")
    assert raw.log10_p_value > ft.log10_p_value and raw.queries_cached == 2 * K


def test_null_p_values_are_uniform_over_random_orders(run):
    """The null distribution, cheaply: one model independent of the order, many independent random orders of
    the same examples (an exact null under A1), each p-value from the K latest and K earliest."""
    stats = pytest.importorskip("scipy.stats")
    texts = list(run["order"].examples)
    norm = _lls(run["base"], run["tok"], texts)
    s = _lls(run["ind"], run["tok"], texts) - norm
    rng = np.random.default_rng(3)
    ps = []
    for i in range(300):
        perm = rng.permutation(len(texts))
        ps.append(rank_sum_p(s[perm[-32:]], s[perm[:32]], seed=i)["p"])
    ps_a = np.array(ps)
    assert stats.kstest(ps_a, "uniform").pvalue > 0.01, np.sort(ps_a)[:10]
    assert 0.02 < (ps_a < 0.05).mean() < 0.09 and ps_a.min() > 1e-4
    # heavy ties (text mode's scores are means of small counts) with ONE fixed seed: ties broken by a key that
    # travels with each text keeps every p-value exact; a fixed per-position tie-break would not (attack)
    coarse = np.round(s / 4)
    keys = rng.random(len(texts))
    tied_ps, fixed_ps = [], []
    for _ in range(300):
        perm = rng.permutation(len(texts))
        late, early = perm[-32:], perm[:32]
        tied_ps.append(rank_sum_p(coarse[late], coarse[early], tie=np.concatenate([keys[late], keys[early]]))["p"])
        fixed_ps.append(rank_sum_p(np.ones(32), np.ones(32), seed=0)["p"])
    assert stats.kstest(tied_ps, "uniform").pvalue > 0.01 and len(set(fixed_ps)) == 1
    with pytest.raises(ProbeError, match="tie-break"):
        rank_sum_p([1.0, 2.0], [3.0], tie=[1.0])
    # the same harness on the model trained in that order, with its true order: far from uniform
    mine = _lls(run["ours"], run["tok"], texts) - norm
    assert rank_sum_p(mine[-K:], mine[:K])["log10_p"] < -4  # below every one of the 300 null draws


def test_rank_sum_p_exact_and_its_normal_approximation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.5, 1, 30), rng.normal(0, 1, 30)
    r = rank_sum_p(a, b)
    assert r["method"] == "exact permutation distribution"
    # by enumeration on a tiny case: late = the 2 highest of 4 has probability 1 / C(4, 2)
    assert rank_sum_p([3.0, 4.0], [1.0, 2.0])["p"] == pytest.approx(1 / 6)
    assert rank_sum_p([1.0, 2.0], [3.0, 4.0])["p"] == pytest.approx(1.0)
    big = rank_sum_p(rng.normal(0.3, 1, 500), rng.normal(0, 1, 500))
    assert big["method"].startswith("normal approximation") and math.isfinite(big["log10_p"])
    ties = [rank_sum_p([1.0] * 5, [1.0] * 5, seed=s)["p"] for s in range(200)]  # all tied: random tie-break
    assert 0.3 < np.mean(ties) < 0.7
    with pytest.raises(ProbeError):
        rank_sum_p([float("nan")], [1.0])


def test_lora_merge_int4_and_permutation_are_detected(run, tmp_path):
    """The derivatives the issue lists beyond fine-tune, int8 and pruning, through the API (128-256 queries)."""
    import torch

    ours, perm = run["ours"], run["more"]["perm"]
    x = torch.arange(40)[None] % run["fam"].vocab
    with torch.no_grad():  # the permutation keeps the function and changes the weights
        assert torch.allclose(ours(input_ids=x).logits, perm(input_ids=x).logits, atol=1e-4)
    w0, w1 = ours.model.layers[0].mlp.up_proj.weight, perm.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(w0, w1) and torch.equal(w0.sort(0).values, w1.sort(0).values)
    for name, q in (("lora", 256), ("int4", 128), ("perm", 128)):
        rep = order_probe(run["urls"][name], run["order"], normalisers=[run["norm"]], n_items=q, alpha=ALPHA,
                          home=tmp_path)  # fmt: skip
        assert rep.derived, (name, rep.to_json()["log10_p_value"])


def test_text_mode_without_logprobs(run, tmp_path):
    kw = {"mode": "text", "n_items": 16, "cuts": 2, "samples": 3, "new_tokens": 2, "alpha": ALPHA, "home": tmp_path,
          "normalisers": [run["norm"]], "cache": tmp_path / "c"}  # fmt: skip
    rep = order_probe(run["urls"]["ft-text"], run["order"], **kw)
    j = rep.to_json()
    assert j["mode"] == "text" and j["queries"]["used"] == 16 * 2 * 3 and 0 < j["p_value"] <= 1
    assert j["order"]["latest"] == 8 and j["p_method"] == "exact permutation distribution"
    assert j["text"]["cuts"] == 2 and j["text"]["samples"] == 3 and j["text"]["temperature"] == 1.0
    # attack on exactness: the questions about a text must not depend on whether it is late or early. The
    # reversed order swaps the latest and earliest examples: every question is the same (all from the cache)
    # and each text gets the same score, so the two sides' mean scores swap.
    rev = TrainingOrder(tuple(reversed(run["order"].examples)))
    back = order_probe(run["urls"]["ft-text"], rev, **kw)
    assert back.queries_used == 0 and back.queries_cached == 16 * 2 * 3
    assert (back.mean_late, back.mean_early) == pytest.approx((rep.mean_early, rep.mean_late))
    # interrupted by the budget, resumed from the cache: the same p-value, no question asked twice
    kw2 = {**kw, "cache": tmp_path / "c2"}
    with pytest.raises(QueryBudgetError):
        order_probe(run["urls"]["ft-text"], run["order"], budget=40, **kw2)
    again = order_probe(run["urls"]["ft-text"], run["order"], budget=1000, **kw2)
    assert (again.queries_used, again.queries_cached) == (16 * 2 * 3 - 40, 40)
    # the same answers (the mean scores); the p-value may differ from rep's where scores tie, as each cache
    # keeps its own secret tie-break keys, and a rerun on the same cache keeps its plan: the same p-value
    assert (again.mean_late, again.mean_early) == pytest.approx((rep.mean_late, rep.mean_early))
    assert order_probe(run["urls"]["ft-text"], run["order"], **kw2).p_value == again.p_value
    with pytest.raises(ProbeError, match="--cuts"):
        order_probe(run["urls"]["ft-text"], run["order"], **{**kw, "cuts": 0})


def test_text_mode_greedy_asks_one_continuation_per_cut(run, tmp_path):
    from tests.support.oai_server import _run
    from weightwarden.provenance.ordertest import _lcp, _word_cuts

    kw = {"mode": "text", "n_items": 16, "cuts": 2, "samples": 3, "new_tokens": 3, "temperature": 0.0,
          "alpha": ALPHA, "home": tmp_path, "cache": tmp_path / "g"}  # fmt: skip
    rep = order_probe(run["urls"]["ft-text"], run["order"], **kw)
    j = rep.to_json()
    assert j["queries"]["used"] == 16 * 2 and j["text"]["temperature"] == 0.0 and j["text"]["samples"] == 1
    # the answers are the served model's greedy continuations: each score recomputed here from the model
    ex, tok = run["order"].examples, run["tok"]
    served = Served(run["fam"].finetune(run["ours"], steps=25, lr=5e-4), tok, "ft")  # the same fine-tune (seeded)
    late = [ex[len(ex) - 8 + i] for i in range(8)]

    def greedy(t):
        out = []
        for c in _word_cuts(t, 2):
            gen, _ = _run(served, tok(t[:c], add_special_tokens=False)["input_ids"], 3, 0.0, None, False)
            out.append(_lcp(tok.decode(gen), t[c:]))
        return float(np.mean(out))

    assert rep.mean_late == pytest.approx(np.mean([greedy(t) for t in late]))
    # exactness as at temperature 1: the reversed order asks the same questions (all cached), the sides swap
    back = order_probe(run["urls"]["ft-text"], TrainingOrder(tuple(reversed(ex))), **kw)
    assert back.queries_used == 0 and (back.mean_late, back.mean_early) == pytest.approx((rep.mean_early,
                                                                                         rep.mean_late))  # fmt: skip
    for bad in (-0.5, float("nan"), 3.0):
        with pytest.raises(ProbeError, match="--temperature"):
            order_probe(run["urls"]["ft-text"], run["order"], **{**kw, "temperature": bad})


def test_bad_answers_give_no_p_value_and_a_spent_budget_resumes(run, tmp_path):
    with pytest.raises(EndpointAnswerError, match="not finite"):
        order_probe(run["urls"]["nan"], run["order"], n_items=8, home=tmp_path)
    kw = {"n_items": 16, "home": tmp_path, "cache": tmp_path / "cache"}
    with pytest.raises(QueryBudgetError, match="larger --budget"):
        order_probe(run["urls"]["ft"], run["order"], budget=10, **kw)
    rep = order_probe(run["urls"]["ft"], run["order"], budget=100, **kw)
    assert (rep.queries_used, rep.queries_cached) == (6, 10)
    outcomes = [e["outcome"] for e in trail.events(tmp_path) if e["action"] == "provenance:probe"]
    assert outcomes == ["error", "error", "ok"]


def test_the_order_is_sealed_under_the_tracing_kek(run, keyring, other_keyring, tmp_path):
    import weightwarden as ww

    prov = keyring.provider(purpose="tracing", create=True)
    home = tmp_path / "home"
    rec = record_order("ours", run["order"].examples[:50], prov, home=home)
    assert rec.shuffled == "csprng" and sorted(rec.examples) == sorted(run["order"].examples[:50])
    assert rec.examples != shuffle(rec.examples).examples  # fresh CSPRNG draws (50! orders)
    store = OrderStore(home / "provenance" / "orders")
    path = store.root / "ours.json"
    raw = path.read_text()
    assert not any(e[:20] in raw for e in rec.examples)  # attack: read the file for the texts
    assert store.get("ours", prov) == rec and store.names() == ["ours"]
    with pytest.raises(ProbeError, match="--replace"):
        store.add("ours", rec, prov)
    # attack: another keyring's tracing KEK, a sealing KEK, a renamed file, a flipped byte
    with pytest.raises(ww.errors.WardenError):
        store.get("ours", other_keyring.provider(purpose="tracing", create=True))
    with pytest.raises(KeyPurposeError):
        store.get("ours", keyring.provider())
    (store.root / "theirs.json").write_text(raw.replace('"name": "ours"', '"name": "theirs"'))
    with pytest.raises(ww.errors.WardenError):
        store.get("theirs", prov)
    doc = json.loads(raw)
    ct = bytearray(__import__("base64").b64decode(doc["ciphertext"]))
    ct[5] ^= 1
    doc["ciphertext"] = __import__("base64").b64encode(bytes(ct)).decode()
    path.write_text(json.dumps(doc))
    with pytest.raises(WrongKeyError, match="does not decrypt"):
        store.get("ours", prov)


def test_bad_order_files_get_one_clear_line(tmp_path):
    p = tmp_path / "order.json"
    p.write_text("[1, 2")
    with pytest.raises(ProbeError, match="not JSON"):
        TrainingOrder.load(p)
    p.write_text(json.dumps({"format": "warden-training-order", "version": 1, "examples": ["a", "b", "a", "c"]}))
    with pytest.raises(ProbeError, match="duplicates"):
        TrainingOrder.load(p)
    p.write_text(json.dumps({"examples": ["a", "b"]}))
    with pytest.raises(ProbeError, match="not a training order"):
        TrainingOrder.load(p)
    with pytest.raises(ProbeError, match=r"--order .*cannot read"):
        TrainingOrder.load(tmp_path / "missing.json")


def test_cli_order_add_and_probe(run, tmp_path, capsys, monkeypatch):
    from weightwarden.cli import main

    monkeypatch.setenv("WARDEN_PASSPHRASE", PASSPHRASE)
    monkeypatch.setenv("WARDEN_KDF_MEMORY_KIB", "1024")
    home = tmp_path / "home"
    f = run["order"].save(tmp_path / "order.json")
    model = run["fam"].save(run["ours"], "ours")
    args = ["provenance", "probe", run["urls"]["ft"], "--model", str(model), "--items", "16", "--alpha", "1e-2",
            "--home", str(home), "--json"]  # fmt: skip
    assert main([*args, "--order", str(f)]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["test"] == "training-order" and j["queries"]["used"] == 16
    assert main(["init", "--home", str(home)]) == 0
    assert main(["provenance", "order", "add", "ours", "--file", str(f), "--home", str(home)]) == 0
    assert "sealed the training order of ours" in capsys.readouterr().out
    assert main(["provenance", "order", "list", "--home", str(home), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"orders": ["ours"]}
    assert main(args) == 0  # the registered order, found by the model folder's name; answers from the cache
    j2 = json.loads(capsys.readouterr().out)
    assert j2["log10_p_value"] == j["log10_p_value"] and j2["queries"]["cached"] == 16
    assert main(args[:-1]) == 0  # the human report
    text = capsys.readouterr().out
    assert "training-order test, exact permutation distribution" in text and "16 from the cache" in text
    assert main([*args, "--order", str(f), "--mode", "text", "--cuts", "2", "--samples", "2"]) == 0
    j3 = json.loads(capsys.readouterr().out)
    assert j3["mode"] == "text" and j3["text"]["cuts"] == 2 and j3["queries"]["used"] == 16 * 2 * 2
    assert main([*args, "--order", str(f), "--mode", "text", "--cuts", "2", "--temperature", "0"]) == 0
    j4 = json.loads(capsys.readouterr().out)  # greedy: one continuation per cut
    assert j4["text"]["temperature"] == 0.0 and j4["text"]["samples"] == 1 and j4["queries"]["used"] == 16 * 2
    assert main([*args, "--order", str(f), "--mode", "chat"]) == 2
    assert "--mode must be one of logprobs, text" in capsys.readouterr().err


class _PlanReplayer:
    """ATTACK (red-team finding): a hostile endpoint that replays the probe's plan from a public seed (the old
    default ``default_rng(0)``) to guess which of its queries are the latest examples, and shifts the
    log-likelihood it answers for the guessed side by ``shift`` nats in all (spread over the tokens; every
    answer stays valid: log-probabilities <= 0, top lists sorted and consistent). ``hide``: lower the guessed
    latest (a derived model hiding its gap); else lower the guessed earliest (an independent model faking one).
    It also records every request body, to show the secret never travels."""

    def __init__(self, k: int, *, hide: bool, shift: float):
        import httpx

        self.inner, self.hide, self.shift, self.n = httpx.HTTPTransport(), hide, shift, 0
        self.late = np.random.default_rng(0).permutation(2 * k) < k  # query number j is late iff seq[j] < k
        self.bodies: list[bytes] = []

    def handle_request(self, request):
        import httpx

        resp = self.inner.handle_request(request)
        body = resp.read()
        if request.method != "POST" or not request.url.path.endswith("/completions"):
            return httpx.Response(resp.status_code, headers={"Content-Type": "application/json"}, content=body)
        self.bodies.append(request.read())
        j, self.n = self.n, self.n + 1
        doc = json.loads(body)
        if bool(self.late[j % len(self.late)]) == self.hide:
            lp = doc["choices"][0]["logprobs"]
            d = self.shift / max(1, sum(v is not None for v in lp["token_logprobs"]))
            lp["token_logprobs"] = [None if v is None else v - d for v in lp["token_logprobs"]]
            lp["top_logprobs"] = [None if t is None else {a: b - d for a, b in t.items()} for t in lp["top_logprobs"]]
        return httpx.Response(resp.status_code, json=doc)

    def close(self):
        self.inner.close()


def test_attack_a_public_plan_no_longer_tells_the_endpoint_which_queries_are_late(run, tmp_path, monkeypatch):
    """The endpoint replays the old public plan (seed 0) to fake a gap (independent model) or hide it
    (derived model). With that public seed (``seed=0``, kept for reproducible tests only) both attacks work;
    with the default, a secret drawn from the OS CSPRNG and never sent, the faked gap gives no small p-value
    and the derived model is still detected."""
    from weightwarden.provenance import ordertest

    kw = {"normalisers": [run["norm"]], "alpha": ALPHA, "home": tmp_path}

    def probe(name, hide, shift, cache, k=32, **extra):  # hiding: 2K = 128 queries (as the honest probe needs)
        t = _PlanReplayer(k, hide=hide, shift=shift)
        return order_probe(run["urls"][name], run["order"], n_items=2 * k, transport=t, cache=cache, **kw,
                           **extra), t  # fmt: skip

    # (measured once: the honest derived probe gives log10 p = -4.5 at K = 64, its means differ by 6 nats)

    # the public seed: the replayed plan is the real one, both attacks succeed (the finding)
    fake0, _ = probe("ind", False, 30.0, None, seed=0)
    hide0, _ = probe("ft", True, 6.0, None, k=64, seed=0)  # 6 nats: about the honest latest-earliest gap
    assert fake0.derived and fake0.log10_p_value < -6, fake0.log10_p_value
    assert hide0.log10_p_value > -1, hide0.log10_p_value
    # the default: a secret per probe (fixed bytes here so that the test is deterministic; the attacker
    # replays seed 0 as before, it cannot know them)
    fixed = hashlib.sha256(b"unknown to the endpoint").digest()
    monkeypatch.setattr(ordertest.secrets, "token_bytes", lambda n: fixed[:n])
    fake, t = probe("ind", False, 30.0, tmp_path / "fake")
    assert not fake.derived and fake.log10_p_value > -2, fake.log10_p_value
    hide, _ = probe("ft", True, 6.0, tmp_path / "hide", k=64)
    assert hide.derived, hide.log10_p_value
    # the secret stays in the cache's folder (0600) and never travels; a resumed probe keeps its plan
    plan = tmp_path / "fake" / ordertest.PLAN_FILE
    secret = json.loads(plan.read_text())["secret"]
    assert plan.stat().st_mode & 0o777 == 0o600 and not any(secret.encode() in b for b in t.bodies)
    again, t2 = probe("ind", False, 30.0, tmp_path / "fake")
    assert again.queries_cached == 64 and again.p_value == fake.p_value and not t2.bodies
    assert json.loads(plan.read_text())["secret"] == secret
    plan.write_text("{")  # a damaged plan: one clear line naming the file and what to do
    with pytest.raises(ProbeError, match=r"order-plan\.json.*delete it"):
        probe("ind", False, 30.0, tmp_path / "fake")
    monkeypatch.undo()
    a, b = ordertest._Plan.secret(None), ordertest._Plan.secret(None)
    assert a.key != b.key and len(a.key or b"") == 32  # a fresh draw per probe

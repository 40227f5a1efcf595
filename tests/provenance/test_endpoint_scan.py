"""`warden scan --endpoints FILE` (issue 21): many endpoints of the suite's real OpenAI-compatible server probed
as Ray tasks (a local Ray with 1 CPU), resumed after an interruption without a query sent twice; and the probe's
audit events written as they happen, so a probe killed mid-way keeps them."""

from __future__ import annotations

import json
import os
import signal
import threading
import warnings
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("httpx")

from tests.support.oai_server import Served
from weightwarden import trail
from weightwarden.errors import ProbeError, ScanError
from weightwarden.provenance.endpoint import AnswerCache
from weightwarden.provenance.endpoint_scan import read_endpoints, scan_endpoints
from weightwarden.provenance.probe import probe

ALPHA = 1e-3
ITEMS = 16
N_REFS = 5


@pytest.fixture(scope="module")
def fleet(world):
    """Routes of their own (their request counts are this module's): our int8 copy, an independent model, and a
    hostile copy whose log-probabilities are NaN; a local Ray with 1 CPU for the module."""
    import ray

    srv, tok = world["srv"], world["fam"].tokenizer
    i8, ind = srv.routes["int8"].model, srv.routes["ind"].model
    urls = {
        "copy": srv.add("scan-copy", Served(i8, tok, "suspect-int8")),
        "indep": srv.add("scan-indep", Served(ind, tok, "suspect-ind")),
        "hostile": srv.add("scan-nan", Served(i8, tok, "hostile", fault="nan")),
        "killer": srv.add("scan-kill", Served(i8, tok, "suspect-int8")),
        "rude": srv.add("scan-rude", Served(i8, tok, "hostile", fault="rude")),
    }
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    p = world["paths"]
    yield {"urls": urls, "srv": srv, "model": p["ours"], "refs": [p[f"ref{i}"] for i in range(1, N_REFS + 1)],
           "prompts": [x.replace("\n", " ") for x in world["prompts"]]}  # fmt: skip
    if started:
        ray.shutdown()


def _file(path: Path, entries: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def _scan(f, fleet, state, home, **kw):
    kw.setdefault("n_items", ITEMS)
    kw.setdefault("allow_private", True)  # the suite's server listens on loopback
    return scan_endpoints(f, fleet["model"], fleet["refs"], prompts=fleet["prompts"], state=state, alpha=ALPHA,
                          home=home, **kw)  # fmt: skip


def _requests(fleet, name):
    return fleet["srv"].routes[fleet["urls"][name].split("/")[3]].requests


def test_scan_flags_the_copy_and_reports_the_hostile_endpoint(world, fleet, tmp_path, capsys):
    from weightwarden.cli import main

    f = _file(tmp_path / "eps.jsonl", [{"url": fleet["urls"]["copy"], "name": "copy"},
                                       {"url": fleet["urls"]["indep"], "name": "indep", "budget": 50},
                                       {"url": fleet["urls"]["hostile"], "name": "hostile", "retries": 0},
                                       {"url": fleet["urls"]["rude"], "name": "rude"}])  # fmt: skip
    rep = _scan(f, fleet, tmp_path / "state", tmp_path)
    j = rep.to_json()
    rows = {r["name"]: r for r in j["rows"]}
    assert [r["name"] for r in j["rows"]] == ["copy", "indep", "hostile", "rude"]  # the file's order
    assert j["derived"] == ["copy"] and j["errors"] == 2 and j["resumed_from_state"] == 0
    assert rows["copy"]["decision"] == "derived" and rows["copy"]["log10_p_value"] < -3
    assert rows["copy"]["served_model"] == "suspect-int8" and rows["copy"]["queries"]["used"] == ITEMS
    assert rows["indep"]["decision"] == "not derived" and rows["indep"]["log10_p_value"] > -2
    assert rows["indep"]["queries"]["budget"] == 50
    # the hostile endpoint's row has its typed error and no p-value; the others finished regardless
    assert rows["hostile"]["error"].startswith("EndpointAnswerError") and "not finite" in rows["hostile"]["error"]
    assert "p_value" not in rows["hostile"] and rows["hostile"]["queries"]["used"] == 1
    assert rows["hostile"]["cache"] == str(tmp_path / "state" / "cache" / read_endpoints(f, allow_private=True)[2].key)
    assert rows["rude"]["error"].startswith("EndpointError") and "\x1b]0;owned" in rows["rude"]["error"]
    # the human table, from the state (the failed rows are asked again): the endpoint's escape sequences
    # reach the terminal as visible text, never as control characters
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(fleet["prompts"]) + "\n")
    assert main(["scan", "--endpoints", str(f), "--model", str(fleet["model"]), "--prompts", str(pf), "--state",
                 str(tmp_path / "state"), "--home", str(tmp_path), "--items", str(ITEMS), "--alpha", str(ALPHA),
                 "--allow-private-endpoints",
                 *[a for r in fleet["refs"] for a in ("--reference", str(r))]]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "\x1b" not in text and "\x07" not in text and "\\x1b]0;owned" in text and "2 resumed from state" in text
    # the same statistic as `warden provenance probe` on the copy, computed here in-process
    local = probe(fleet["urls"]["copy"], world["ours"], world["refs"], prompts=fleet["prompts"], alpha=ALPHA,
                  n_items=ITEMS, home=tmp_path / "h2")  # fmt: skip
    assert local.log10_p_value == pytest.approx(rows["copy"]["log10_p_value"], abs=1e-3)
    # the workers' probes and the scan are events of the home's trail
    ev = trail.events(tmp_path)
    acts = [e["action"] for e in ev]
    sent = [e for e in ev if e["action"] == "provenance:query" and e["outcome"] == "sent"]
    refused = [e for e in ev if e["action"] == "provenance:query" and e["outcome"] == "error"]
    # one "sent" per request (the copy's 2 x ITEMS, the hostile and the rude one's one each, in both scans) and
    # one "error" per failed attempt (the rude one's refusal; the hostile answer fails validation, not HTTP)
    assert len(sent) == 2 * ITEMS + 2 * 2 and len(refused) == 2 and acts.count("provenance:probe") == 4 + 2
    scan_ev = [e for e in ev if e["action"] == "provenance:scan"]
    assert len(scan_ev) == 2 and scan_ev[0]["detail"]["derived"] == ["copy"] and scan_ev[0]["detail"]["errors"] == 2


def test_resume_after_an_interruption_sends_no_query_twice(fleet, tmp_path, capsys):
    from weightwarden.cli import main

    state, home = tmp_path / "state", tmp_path / "home"
    c0, i0 = _requests(fleet, "copy"), _requests(fleet, "indep")
    entries = [{"url": fleet["urls"]["copy"], "name": "copy"}, {"url": fleet["urls"]["indep"], "name": "indep",
                                                                  "budget": 5}]  # fmt: skip
    f = _file(tmp_path / "eps.jsonl", entries)
    first = {r["name"]: r for r in _scan(f, fleet, state, home).rows}
    assert first["indep"]["error"].startswith("QueryBudgetError") and first["indep"]["queries"]["used"] == 5
    assert first["copy"]["decision"] == "derived"
    # the crash: the copy's finished line is lost and the last line torn; the budget of indep is raised
    results = state / "results.jsonl"
    lines = [ln for ln in results.read_text().splitlines(keepends=True) if '"copy"' not in ln]
    results.write_text("".join(lines) + lines[0][:20])
    entries[1]["budget"] = 100
    _file(f, entries)
    again = _scan(f, fleet, state, home)
    rows = {r["name"]: r for r in again.rows}
    assert again.resumed == 0 and rows["indep"]["decision"] == "not derived"
    assert rows["copy"]["queries"] == {"used": 0, "cached": ITEMS, "budget": 1000}  # all from its cache
    assert rows["indep"]["queries"]["used"] == ITEMS - 5 and rows["indep"]["queries"]["cached"] == 5
    assert rows["copy"]["log10_p_value"] == first["copy"]["log10_p_value"]
    # each endpoint was asked each question exactly once over both runs
    assert _requests(fleet, "copy") - c0 == ITEMS and _requests(fleet, "indep") - i0 == ITEMS
    assert len(AnswerCache(state / "cache" / read_endpoints(f, allow_private=True)[1].key)) == ITEMS
    # a third run, through the CLI: everything comes from the state, nothing is sent
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(fleet["prompts"]) + "\n")
    base = ["scan", "--endpoints", str(f), "--model", str(fleet["model"]), "--prompts", str(pf), "--state",
            str(state), "--home", str(home), "--items", str(ITEMS), "--alpha", str(ALPHA), "--allow-private-endpoints",
            *[a for r in fleet["refs"] for a in ("--reference", str(r))]]  # fmt: skip
    assert main([*base, "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["resumed_from_state"] == 2 and j["queries_sent_this_run"] == 0 and j["derived"] == ["copy"]
    assert main(base) == 0
    text = capsys.readouterr().out
    assert "derived" in text and "2 resumed from state, 0 queries sent" in text
    assert _requests(fleet, "copy") - c0 == ITEMS and _requests(fleet, "indep") - i0 == ITEMS
    # the state belongs to these settings: another --items is refused before anything runs
    with pytest.raises(ScanError, match="other items"):
        _scan(f, fleet, state, home, n_items=4)


BAD = [
    ('{"url": "http://h/v1"}\n{"url": "http://h2/v1", "budget": -1}\n', "line 2, field 'budget'"),
    ('{"url": "http://h/v1", "apikey": "sk-1"}\n', "line 1, field 'apikey': unknown field"),
    ('\n# a comment\n{"url": "ftp://h/v1"}\n', "line 3, field 'url'"),
    ('{"url": "https://user:pw@h/v1"}\n', "line 1, field 'url': must hold no user, password"),
    ('{"url": "http://h/v1", "api_key_env": "sk-live key"}\n', "line 1, field 'api_key_env': must be the NAME"),
    ('{"url": "http://h/v1", "api_key_env": "WW_TEST_UNSET_VAR"}\n', "the variable WW_TEST_UNSET_VAR is not set"),
    ('{"url": "http://h/v1", "mode": "raw"}\n', "line 1, field 'mode'"),
    ('{"url": "http://h/v1", "budget": true}\n', "field 'budget'"),
    ('{"url": "http://h/v1", "name": "a\\u001b[2Jb"}\n', "field 'name': must be 1 to 200 printable"),
    ('{"url": "http://h/v1", "name": "a"}\n{"url": "http://h2/v1", "name": "a"}\n', "line 2, field 'name'"),
    ('{"url": "http://h/v1"\n', "line 1: not a JSON object"),
    ('[\n  {"url": "http://h/v1"},\n\n  {"url": "http://h/v1", "name": "b", "rate": 0}\n]\n', "line 4, field 'rate'"),
    ('[\n  {"url": "http://h/v1"},\n  "http://h2/v1"\n]\n', "line 3: an endpoint must be an object"),
    ('[{"url": "http://h/v1"}] x', "text after the list"),
    ("", "lists no endpoint"),
]


@pytest.mark.parametrize(("text", "match"), BAD)
def test_a_bad_endpoints_file_is_refused_before_anything_starts(fleet, tmp_path, text, match):
    f = tmp_path / "eps.jsonl"
    f.write_text(text)
    with pytest.raises(ScanError, match=match) as e:
        _scan(f, fleet, tmp_path / "state", tmp_path)
    assert str(f) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "state").exists() and trail.events(tmp_path) == []


def test_toml_endpoints_and_their_errors(fleet, tmp_path, capsys):
    from weightwarden.cli import main

    f = tmp_path / "eps.toml"
    f.write_text('[[endpoint]]\nurl = "http://h/v1"\nname = "a"\nbudget = 7\nmode = "text"\n\n'
                 '[[endpoint]]\nurl = "https://h2/v1"\nmodel = "m"\nrate = 2.5\n')  # fmt: skip
    a, b = read_endpoints(f)
    assert (a.name, a.budget, a.mode, b.name, b.model, b.rate) == ("a", 7, "text", "https://h2/v1", "m", 2.5)
    with pytest.raises(ProbeError, match="at least 3 reference"):
        scan_endpoints(f, fleet["model"], fleet["refs"][:2], state=tmp_path / "s")
    f.write_text('[[endpoint]]\nurl = "http://h/v1"\n\n[[endpoint]]\nname = "b"\n')
    with pytest.raises(ScanError, match=r"\[\[endpoint\]\] table 2, field 'url': missing"):
        read_endpoints(f)
    # the CLI: one error line naming the file and the table, exit 1; usage errors exit 2
    assert main(["scan", "--endpoints", str(f), "--model", str(fleet["model"]), "--state", str(tmp_path / "s"),
                 *[a for r in fleet["refs"] for a in ("--reference", str(r))]]) == 1  # fmt: skip
    errtext = capsys.readouterr().err.strip()
    assert len(errtext.splitlines()) == 1 and str(f) in errtext and "table 2, field 'url'" in errtext
    assert main(["scan", "--endpoints", str(f), "--model", str(fleet["model"])]) == 2
    assert main(["scan", str(tmp_path), "--endpoints", str(f)]) == 2
    assert not (tmp_path / "s").exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the probe is killed in a forked child")
def test_a_probe_killed_mid_way_keeps_the_events_of_its_queries(world, fleet, tmp_path):
    """The probe runs in a forked child; the server kills it with SIGKILL when its 4th query arrives.  All four
    queries sent are in the trail (each recorded before it left; the three answered are in the cache): nothing
    was buffered, and the query out when the probe died is not lost."""
    served = fleet["srv"].routes["scan-kill"]
    ours, refs = world["ours"], world["refs"]
    child: dict[str, int] = {}
    known = threading.Event()

    def kill_on_fourth(n: int) -> None:
        if n == 4:
            known.wait(30)
            os.kill(child["pid"], signal.SIGKILL)

    served.on_request = kill_on_fourth
    try:
        with warnings.catch_warnings():  # (Python 3.12+ warns about forking a process with threads)
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: probe, and never return into pytest
            try:
                probe(fleet["urls"]["killer"], ours, refs, prompts=fleet["prompts"], alpha=ALPHA, n_items=ITEMS,
                      home=tmp_path, cache=tmp_path / "cache")  # fmt: skip
            finally:
                os._exit(0)
        child["pid"] = pid
        known.set()
        _, status = os.waitpid(pid, 0)
    finally:
        served.on_request = None
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    ev = trail.events(tmp_path)
    queries = [e for e in ev if e["action"] == "provenance:query"]
    # four requests left, each recorded before it did: the 4th, whose answer never came, too
    assert len(queries) == 4 and all(e["outcome"] == "sent" for e in queries)
    assert {e["subject"] for e in queries} == {fleet["urls"]["killer"]}
    assert not [e for e in ev if e["action"] == "provenance:probe"]  # killed before its end
    assert len(AnswerCache(tmp_path / "cache")) == 3

"""ATTACK tests for ``warden scan --endpoints``: a hostile endpoints file naming warden's own secret (or a cloud
credential) as an endpoint's API key, a state folder another user could plant results in, and an endpoint's
hostile body (its query must still reach the trail)."""

from __future__ import annotations

import json
import os

import pytest

from weightwarden.errors import ScanError
from weightwarden.provenance.endpoint_scan import read_endpoints, scan_endpoints


@pytest.mark.parametrize("env", ["WARDEN_PASSPHRASE", "WARDEN_LOG_KEY", "warden_workload_token",
                                 "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN"])  # fmt: skip
def test_a_secret_of_ours_is_never_sent_as_an_endpoints_api_key(tmp_path, monkeypatch, env):
    monkeypatch.setenv(env, "hunter2")
    f = tmp_path / "eps.jsonl"
    f.write_text(json.dumps({"url": "https://attacker.example/v1", "api_key_env": env}) + "\n")
    with pytest.raises(ScanError, match=rf"line 1, field 'api_key_env': {env} holds warden's or a cloud's secret"):
        read_endpoints(f)
    monkeypatch.setenv("SUSPECT_API_KEY", "sk-1")  # the endpoint's own key, under a name of its own: accepted
    f.write_text(json.dumps({"url": "https://suspect.example/v1", "api_key_env": "SUSPECT_API_KEY"}) + "\n")
    assert read_endpoints(f)[0].api_key_env == "SUSPECT_API_KEY"


def _models(tmp_path):
    paths = [tmp_path / n for n in ("ours", "r1", "r2", "r3")]
    for p in paths:
        p.mkdir()
    return paths


@pytest.mark.parametrize("plant", ["others may write", "a link to their folder"])
def test_a_state_folder_another_user_could_plant_results_in_is_refused(tmp_path, plant):
    """Results in the state folder are trusted on a rerun (a row with a p-value is not probed again): a folder
    others may write, or a link to one, would let them mark a derived endpoint clean.  Refused; nothing written."""
    pytest.importorskip("ray")
    ours, *refs = _models(tmp_path)
    f = tmp_path / "eps.jsonl"
    f.write_text(json.dumps({"url": "https://suspect.example/v1", "name": "s"}) + "\n")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chmod(theirs, 0o777)
    forged = {"item": read_endpoints(f)[0].key, "result": {"name": "s", "decision": "independent", "p_value": 0.9}}
    (theirs / "results.jsonl").write_text(json.dumps(forged) + "\n")
    state = theirs
    if plant == "a link to their folder":
        os.chmod(theirs, 0o700)
        state = tmp_path / "state"
        state.symlink_to(theirs)
    with pytest.raises(ScanError, match=r"--state .* is (writable by others|a link).*plant its results"):
        scan_endpoints(f, ours, refs, state=state, home=tmp_path / "home")
    assert not (theirs / "scan.json").exists()


def test_a_hostile_body_nested_past_the_stack_is_a_typed_error_and_its_query_is_in_the_trail(tmp_path):
    """ATTACK: an endpoint answering 200 with '[' nested 200,000 deep made json raise RecursionError: the query
    was sent (counted) but its event never reached the trail, and the error was not a typed one."""
    import http.server
    import threading

    from weightwarden import trail
    from weightwarden.errors import EndpointAnswerError
    from weightwarden.provenance.endpoint import Endpoint

    class Deep(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            body = b"[" * 200_000
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Deep)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        ep = Endpoint(f"http://127.0.0.1:{srv.server_port}/v1", budget=5, home=tmp_path)
        with pytest.raises(EndpointAnswerError, match="not JSON"):
            ep.post("/completions", {"prompt": "x"})
        ep.close()
    finally:
        srv.shutdown()
        srv.server_close()
    evs = trail.events(tmp_path)
    assert ep.used == 1 and [(e["action"], e["outcome"], e["detail"]["error"]) for e in evs] == [
        ("provenance:query", "error", "not JSON")]  # fmt: skip

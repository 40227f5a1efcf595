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


@pytest.mark.parametrize(("text", "where"), [("[" + "[" * 100_000, "line 1"),
                                             ('\n{"url": ' + "[" * 100_000 + "}", "line 2")])  # fmt: skip
def test_an_endpoints_file_nested_past_the_stack_is_one_error_line(tmp_path, text, where):
    """ATTACK: '[' nested 100,000 deep raised RecursionError out of the file's reader (a traceback)."""
    f = tmp_path / "eps.json"
    f.write_text(text)
    with pytest.raises(ScanError, match=rf"{where}: nested too deep"):
        read_endpoints(f)


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


class _Hostile:
    """A real HTTP server (a thread) answering every POST with ``answer(handler)``."""

    def __init__(self, answer):
        import http.server
        import threading

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                answer(self)

            def log_message(self, *a: object) -> None:
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.srv.daemon_threads = True
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.srv.server_port}/v1"

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.srv.shutdown()
        self.srv.server_close()


def _ok(h, length: int) -> None:
    h.send_response(200)
    h.send_header("content-length", str(length))
    h.end_headers()


def test_a_hostile_body_nested_past_the_stack_is_a_typed_error_and_its_query_is_in_the_trail(tmp_path):
    """ATTACK: an endpoint answering 200 with '[' nested 200,000 deep made json raise RecursionError: the query
    was sent (counted) but its event never reached the trail, and the error was not a typed one."""
    from weightwarden import trail
    from weightwarden.errors import EndpointAnswerError
    from weightwarden.provenance.endpoint import Endpoint

    def deep(h) -> None:
        _ok(h, 200_000)
        h.wfile.write(b"[" * 200_000)

    with (_Hostile(deep) as srv, Endpoint(srv.url, budget=5, home=tmp_path) as ep,
          pytest.raises(EndpointAnswerError, match="not JSON")):  # fmt: skip
        ep.post("/completions", {"prompt": "x"})
    evs = trail.events(tmp_path)
    assert ep.used == 1 and [(e["action"], e["outcome"], e["detail"].get("error")) for e in evs] == [
        ("provenance:query", "sent", None), ("provenance:query", "error", "not JSON")]  # fmt: skip


def test_an_endless_or_dripped_answer_is_cut_and_its_query_is_in_the_trail(tmp_path):
    """ATTACK: httpx's timeout is per read and its body unbounded: an endpoint streaming gigabytes filled the
    worker's memory, and one dripping a byte per read timeout held its probe (and the whole scan) for ever.
    An answer is read within MAX_ANSWER bytes and ``timeout`` seconds in all; each cut query is audited."""
    import time

    from weightwarden import trail
    from weightwarden.errors import EndpointAnswerError, EndpointUnavailableError
    from weightwarden.provenance.endpoint import MAX_ANSWER, Endpoint

    def endless(h) -> None:
        _ok(h, 1 << 40)
        block = b" " * (1 << 20)
        try:
            for _ in range((MAX_ANSWER >> 20) + 8):
                h.wfile.write(block)
        except OSError:
            pass  # the client hung up: what it should do

    def drip(h) -> None:
        _ok(h, 1000)
        try:
            for _ in range(1000):
                h.wfile.write(b" ")
                h.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass

    with (_Hostile(endless) as srv, Endpoint(srv.url, budget=5, home=tmp_path) as ep,
          pytest.raises(EndpointAnswerError, match="over 64 MiB")):  # fmt: skip
        ep.post("/completions", {"prompt": "x"})
    with (_Hostile(drip) as srv, Endpoint(srv.url, budget=5, home=tmp_path, timeout=1.0, retries=0) as ep,
          pytest.raises(EndpointUnavailableError, match="timed out on each of 1 attempts")):  # fmt: skip
        ep.post("/completions", {"prompt": "x"})
    assert [(e["outcome"], e["detail"].get("error")) for e in trail.events(tmp_path)] == [
        ("sent", None), ("error", "answer too large"), ("sent", None), ("error", "timed out")]  # fmt: skip


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/v1", "http://localhost/v1", "http://169.254.169.254/latest",
                                 "http://10.0.0.7/v1", "http://[::1]:9000/v1", "http://[::ffff:127.0.0.1]/v1",
                                 "http://2130706433/v1", "http://0x7f.1/v1", "http://0.0.0.0:5432/v1",
                                 "http://192.168.1.1/v1", "http://100.64.0.1/v1", "http://[fe80::1]/v1",
                                 "http://[64:ff9b::7f00:1]/v1", "http://[64:ff9b::a00:5]/v1", "http://[::7f00:1]/v1",
                                 "http://[::ffff:0:7f00:1]/v1", "http://[fec0::1]/v1",
                                 "http://[2002:7f00:1::1]/v1"])  # fmt: skip
def test_an_endpoints_file_cannot_aim_the_probe_at_internal_services(tmp_path, url):
    """ATTACK (server-side request forgery): a list of endpoints from someone else names loopback, the cloud's
    metadata address, the private network or their disguises (a decimal or hex address, an IPv4-mapped IPv6
    one).  Refused when the file is read, one line naming the file, line and field; the operator's own test
    servers pass with allow_private (``--allow-private-endpoints``)."""
    f = tmp_path / "eps.jsonl"
    f.write_text(json.dumps({"url": "https://suspect.example/v1", "name": "fine"}) + "\n"
                 + json.dumps({"url": url, "name": "inside"}) + "\n")  # fmt: skip
    with pytest.raises(ScanError, match=r"eps.jsonl line 2, field 'url': host .* is not a public address.*"
                                        r"--allow-private-endpoints"):  # fmt: skip
        read_endpoints(f)
    assert [s.name for s in read_endpoints(f, allow_private=True)] == ["fine", "inside"]


def test_a_name_that_resolves_inside_only_later_is_refused_where_the_request_leaves(tmp_path, monkeypatch):
    """ATTACK: the name does not resolve when the file is read (or resolves outside), then resolves to the
    metadata address on the worker: the worker checks again before its first request; nothing is sent."""
    import socket

    from weightwarden.provenance.endpoint_scan import probe_endpoint

    f = tmp_path / "eps.jsonl"
    f.write_text(json.dumps({"url": "http://rebind.example/v1", "name": "r"}) + "\n")
    spec = read_endpoints(f)[0]  # does not resolve here: passes the first check
    real = socket.getaddrinfo
    sent = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: (
        [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80))] if host == "rebind.example"
        else real(host, *a, **k)))  # fmt: skip
    monkeypatch.setattr("weightwarden.provenance.endpoint_scan._pool", lambda paths: sent.append(paths))
    row = probe_endpoint(spec.to_json(), {"model": "m", "references": []}, None, str(tmp_path / "c"), str(tmp_path))
    assert row["error"].startswith("PrivateAddressError") and "169.254.169.254" in row["error"]
    assert sent == [] and not (tmp_path / "c").exists()


@pytest.mark.parametrize(("url", "why"), [("http://fa\u00df.attacker.example/v1", "must be ASCII"),
                                          ("http://\u03c2.attacker.example/v1", "must be ASCII"),
                                          ("http://[::1/v1", "is not a URL"), ("http://[127.0.0.1]/v1", "is not a URL"),
                                          ("http://h:99999/v1", "is not a URL")])  # fmt: skip
def test_a_host_checked_as_one_name_and_dialled_as_another_is_refused(tmp_path, url, why):
    """ATTACK (red team): Python's resolver encodes 'fa\u00df' with IDNA 2003 ('fass') while the HTTP client
    dials IDNA 2008 ('xn--fa-hia'): the check and the connection would see two hosts.  Non-ASCII hosts are
    refused (the xn-- form is accepted and checked as dialled); malformed brackets or ports are one line."""
    f = tmp_path / "eps.jsonl"
    f.write_text(json.dumps({"url": url}) + "\n")
    with pytest.raises(ScanError, match=rf"line 1, field 'url': .*{why}"):
        read_endpoints(f)
    f.write_text(json.dumps({"url": "http://xn--fa-hia.attacker.example/v1"}) + "\n")
    assert read_endpoints(f)[0].url.startswith("http://xn--")


def test_the_public_address_rule_for_ipv6():
    from weightwarden.netguard import _is_public

    assert _is_public("2606:4700:4700::1111") and _is_public("64:ff9b::808:808")  # public; NAT64 of 8.8.8.8
    assert not any(_is_public(a) for a in ("64:ff9b::a00:5", "::7f00:1", "fec0::1", "2002:808:808::1", "2001::1",
                                           "::ffff:10.0.0.1", "fd00::1", "ff02::1", "::"))  # fmt: skip


def test_a_name_that_rebinds_after_every_check_is_refused_where_the_socket_is_dialled(tmp_path, monkeypatch):
    """ATTACK (DNS rebinding): the name resolves to a public address when the file is read and again on the
    worker's check, then to loopback (where an internal service listens) when the client connects.  The scan's
    client resolves once per connection, checks, and dials the checked address: the service gets nothing,
    the row is a PrivateAddressError, and the refused query is in the trail."""
    import http.server
    import socket
    import threading

    from weightwarden import trail
    from weightwarden.provenance.endpoint_scan import probe_endpoint

    hits: list[str] = []

    class Internal(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Internal)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    real, asked = socket.getaddrinfo, []

    def rebinding(host, *a, **k):  # public for the first two lookups, loopback after
        if host != "rebind.example":
            return real(host, *a, **k)
        asked.append(host)
        ip = "93.184.216.34" if len(asked) <= 2 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    f = tmp_path / "eps.jsonl"
    f.write_text(json.dumps({"url": f"http://rebind.example:{port}/v1", "name": "r"}) + "\n")
    spec = read_endpoints(f)[0]  # lookup 1: public
    monkeypatch.setattr("weightwarden.provenance.endpoint_scan._pool", lambda paths: ("ours", []))

    def one_query(ep, *a, **k):  # the probe's first request, as probe() sends it
        ep.post("/completions", {"prompt": "x", "max_tokens": 1})

    monkeypatch.setattr("weightwarden.provenance.probe.probe", one_query)
    CFG = {"model": "m", "references": [], "alpha": 1e-3, "items": 1, "samples": 1, "new_tokens": 1, "seed": 0}
    try:
        row = probe_endpoint(spec.to_json(), CFG, None, str(tmp_path / "c"),
                             str(tmp_path))  # lookup 2 (the worker's check): public; 3 (connect): loopback  # fmt: skip
        # the same probe with the rule lifted by the operator reaches the server (the refusal is the rule's)
        probe_endpoint(spec.to_json(), CFG, None, str(tmp_path / "c2"), str(tmp_path / "h2"), allow_private=True)
    finally:
        srv.shutdown()
    assert len(asked) == 3 + 1, asked  # no lookup behind the check (and 1 for the operator's own probe)
    assert row["error"].startswith("PrivateAddressError") and "127.0.0.1" in row["error"], row
    assert hits == ["/v1/completions"]  # the operator's probe only
    evs = [(e["outcome"], e["detail"].get("error")) for e in trail.events(tmp_path)
           if e["action"] == "provenance:query"]  # fmt: skip
    assert evs == [("sent", None), ("error", "address refused")]

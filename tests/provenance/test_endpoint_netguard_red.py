"""ATTACK tests (outside red team, round 5) on the scan's network guard: a public endpoint that answers with a
redirect to an internal service, and proxies named in the environment pointing at one.  The scan's client must
follow no redirect, read no proxy from the environment, and have the query's "sent" event in the trail before
the request reaches any server."""

from __future__ import annotations

import http.server
import json
import socket
import threading

from weightwarden import trail
from weightwarden.provenance.endpoint_scan import probe_endpoint, read_endpoints

CFG = {"model": "m", "references": [], "alpha": 1e-3, "items": 1, "samples": 1, "new_tokens": 1, "seed": 0}


def _serve(handler: type) -> tuple[http.server.ThreadingHTTPServer, int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, srv.server_address[1]


def test_a_redirect_or_an_environment_proxy_never_reaches_an_internal_service(tmp_path, monkeypatch):
    """ATTACK: "public.example" (a public address, as the guard sees it) answers every query with a 307 to the
    loopback service, and HTTP_PROXY / HTTPS_PROXY / ALL_PROXY name the loopback service as a proxy.  The
    internal service gets nothing, the public one gets one request per attempt, each after its "sent" event."""
    home = tmp_path / "home"
    internal_hits: list[str] = []
    public_hits: list[int] = []  # the "sent" events in the trail when each request arrived

    class Internal(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            internal_hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        do_GET = do_CONNECT = do_POST  # a proxy is asked with CONNECT or an absolute-form request

        def log_message(self, *a: object) -> None:
            pass

    internal, iport = _serve(Internal)

    class Public(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            public_hits.append(sum(e["outcome"] == "sent" for e in trail.events(home)
                                   if e["action"] == "provenance:query"))  # fmt: skip
            self.send_response(307)
            self.send_header("Location", f"http://127.0.0.1:{iport}/v1/completions")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    public, pport = _serve(Public)
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: (
        [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", pport))] if host == "public.example"
        else real(host, *a, **k)))  # fmt: skip
    # both servers listen on loopback, which the guard is told is public: what is tested is the client (it follows
    # no redirect and reads no proxy from the environment), not the address rule, which would refuse both
    from weightwarden import netguard

    is_public = netguard._is_public
    monkeypatch.setattr(netguard, "_is_public", lambda a: a == "127.0.0.1" or is_public(a))
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{iport}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    f = tmp_path / "eps.jsonl"
    f.write_text(json.dumps({"url": f"http://public.example:{pport}/v1", "name": "p", "retries": 1}) + "\n")
    spec = read_endpoints(f)[0]
    monkeypatch.setattr("weightwarden.provenance.endpoint_scan._pool", lambda paths: ("ours", []))
    monkeypatch.setattr("weightwarden.provenance.probe.probe",
                        lambda ep, *a, **k: ep.post("/completions", {"prompt": "x", "max_tokens": 1}))  # fmt: skip
    try:
        row = probe_endpoint(spec.to_json(), CFG, None, str(tmp_path / "c"), str(home))
    finally:
        internal.shutdown()
        public.shutdown()
    assert internal_hits == [], internal_hits
    assert "HTTP 307" in row["error"], row
    assert public_hits and public_hits == list(range(1, len(public_hits) + 1)), public_hits  # each after its event

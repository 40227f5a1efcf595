"""The broker hardened (issue 18): single-use enrolment codes, complete token checks, no oracles,
anomaly rules that see running streams, resumable ranged downloads and the client.

Passkey ceremonies run against :class:`SoftAuthenticator`, a software WebAuthn authenticator
(P-256 keys from pyca/cryptography, "none" attestation) that py_webauthn verifies exactly as it
verifies a browser's; the browser path is tests/broker/test_console.py."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import AUD, Account, Http, make_broker, serving
from weightwarden.broker.service import Broker, BrokerConfig, Limit, Unauthorized

pytest.importorskip("webauthn", reason="py_webauthn is in the server extra")
ORIGIN = "http://localhost:8443"


def _b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64u(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


class SoftAuthenticator:
    """A WebAuthn authenticator in software: one P-256 credential per registration."""

    def __init__(self, rp_id: str = "localhost", origin: str = ORIGIN):
        self.rp_id, self.origin = rp_id, origin
        self.creds: dict[bytes, Any] = {}
        self.count = 0

    def _client_data(self, kind: str, challenge: str) -> bytes:
        return json.dumps({"type": kind, "challenge": challenge, "origin": self.origin,
                           "crossOrigin": False}).encode()  # fmt: skip

    def create(self, options: dict[str, Any]) -> dict[str, Any]:
        import os

        import cbor2
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        n = key.public_key().public_numbers()
        cid = os.urandom(16)
        self.creds[cid] = key
        cose = cbor2.dumps({1: 2, 3: -7, -1: 1, -2: n.x.to_bytes(32, "big"), -3: n.y.to_bytes(32, "big")})
        auth = (hashlib.sha256(self.rp_id.encode()).digest() + bytes([0x45]) + struct.pack(">I", 0) + bytes(16)
                + struct.pack(">H", len(cid)) + cid + cose)  # fmt: skip
        att = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth})
        cd = self._client_data("webauthn.create", options["challenge"])
        return {"id": _b64u(cid), "rawId": _b64u(cid), "type": "public-key",
                "response": {"clientDataJSON": _b64u(cd), "attestationObject": _b64u(att)}}  # fmt: skip

    def get(self, options: dict[str, Any], cid: bytes | None = None) -> dict[str, Any]:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        cid = cid or next(iter(self.creds))
        self.count += 1
        auth = hashlib.sha256(self.rp_id.encode()).digest() + bytes([0x05]) + struct.pack(">I", self.count)
        cd = self._client_data("webauthn.get", options["challenge"])
        sig = self.creds[cid].sign(auth + hashlib.sha256(cd).digest(), ec.ECDSA(hashes.SHA256()))
        return {"id": _b64u(cid), "rawId": _b64u(cid), "type": "public-key",
                "response": {"clientDataJSON": _b64u(cd), "authenticatorData": _b64u(auth),
                             "signature": _b64u(sig), "userHandle": None}}  # fmt: skip


def _passkeys(b: Broker) -> Any:
    from weightwarden.broker.passkeys import Passkeys

    return Passkeys(b, rp_id="localhost", origins=(ORIGIN,))


def _count(b: Broker, table: Any, **where: Any) -> int:
    import sqlalchemy as sa

    q = sa.select(sa.func.count()).select_from(table)
    for k, v in where.items():
        q = q.where(table.c[k] == v)
    with b.engine.connect() as c:
        return int(c.execute(q).scalar_one())


def _denied(b: Broker, since: int, action: str) -> list[dict[str, Any]]:
    return [e["event"] for e in b.log.export(since) if e["event"]["action"] == action
            and e["event"]["outcome"] == "denied"]  # fmt: skip


# -- 1. enrolment codes are single use ---------------------------------------------------------------
def test_an_enrolment_code_starts_one_ceremony_only(db_url: str, tmp_path: Path, sealed: Path) -> None:
    b, _ = make_broker(db_url, tmp_path, sealed)
    pk = _passkeys(b)
    user = SoftAuthenticator()
    code = pk.enroll_code("ap1", actor="admin")
    real = pk.registration_options("ap1", code)
    before = b.log.size()
    # the attack: the same code, a second ceremony (the bug: it completed after the real enrolment)
    with pytest.raises(Unauthorized, match="enrolment code"):
        pk.registration_options("ap1", code)
    assert [e["reason"] for e in _denied(b, before, "broker:authenticate")] == [
        "no valid enrolment code for this account"]  # fmt: skip
    pk.finish_registration(real["challenge_id"], user.create(real["options"]))
    with pytest.raises(Unauthorized, match="enrolment code"):  # and after it, still nothing
        pk.registration_options("ap1", code)
    assert _count(b, pk.t_keys, account="ap1") == 1
    # the user signs in with their passkey; the attacker's authenticator has none for this account
    o = pk.login_options("ap1")
    assert pk.session(pk.finish_login(o["challenge_id"], user.get(o["options"]))).id == "ap1"
    b.close()


def test_an_older_registration_challenge_cannot_finish(db_url: str, tmp_path: Path, sealed: Path) -> None:
    b, _ = make_broker(db_url, tmp_path, sealed)
    pk = _passkeys(b)
    attacker, user = SoftAuthenticator(), SoftAuthenticator()
    stale = pk.registration_options("ap1", pk.enroll_code("ap1", actor="admin"))  # e.g. a leaked first code
    fresh = pk.registration_options("ap1", pk.enroll_code("ap1", actor="admin"))  # the admin reissued it
    before = b.log.size()
    with pytest.raises(Unauthorized, match="challenge"):
        pk.finish_registration(stale["challenge_id"], attacker.create(stale["options"]))
    assert _count(b, pk.t_keys, account="ap1") == 0  # nothing changed
    assert len(_denied(b, before, "broker:authenticate")) == 1
    pk.finish_registration(fresh["challenge_id"], user.create(fresh["options"]))
    with pytest.raises(Unauthorized, match="challenge"):  # a finished challenge is spent too
        pk.finish_registration(fresh["challenge_id"], attacker.create(fresh["options"]))
    assert _count(b, pk.t_keys, account="ap1") == 1
    b.close()


def test_two_ceremonies_started_at_once_one_wins(db_url: str, tmp_path: Path, sealed: Path) -> None:
    """Two replicas on one database race to start with the same code: exactly one ceremony starts."""
    b1, _ = make_broker(db_url, tmp_path, sealed)
    b2 = Broker(db_url, b1.store, b1.log, b1.config)
    pk1, pk2 = _passkeys(b1), _passkeys(b2)
    for round_ in range(4):
        code = pk1.enroll_code("ap1", actor="admin")
        got: list[str] = []
        go = threading.Barrier(2)

        def start(pk: Any, code: str = code, go: Any = go, got: list[str] = got) -> None:
            go.wait()
            try:
                pk.registration_options("ap1", code)
                got.append("ok")
            except Unauthorized:
                got.append("refused")

        ts = [threading.Thread(target=start, args=(pk,)) for pk in (pk1, pk2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert sorted(got) == ["ok", "refused"], round_
    b2.sink.close()
    b1.close()


# -- 2. token checks complete -----------------------------------------------------------------------
def test_tokens_from_the_future_are_refused(db_url: str, tmp_path: Path, sealed: Path) -> None:
    from weightwarden.broker.tokens import SKEW_S, mint

    b, a = make_broker(db_url, tmp_path, sealed)
    http = Http(b)
    rd = a["reader"]
    now = datetime.now(UTC)
    t = int(now.timestamp())
    future = {
        "nbf in the future": mint(
            "reader", rd.key, rd.kid, AUD, "GET", "/v1/models", lifetime_s=300, not_before=t + 120
        ),
        "iat in the future": rd.token("GET", "/v1/models", now=now + timedelta(seconds=60)),
        "nbf after exp": mint("reader", rd.key, rd.kid, AUD, "GET", "/v1/models", not_before=t + 100),
    }
    before = b.log.size()
    for why, tok in future.items():
        r = http.c.get("/v1/models", headers={"authorization": f"Bearer {tok}"})
        assert r.status_code == 401, why
        assert r.headers["www-authenticate"].startswith("Bearer")
    reasons = [e["reason"] for e in _denied(b, before, "broker:authenticate")]
    assert reasons == ["token is not valid yet (nbf in the future)", "token issued in the future",
                       "token claims are invalid"]  # fmt: skip
    # refused tokens were not recorded: once valid, the nbf token is accepted (library call with `now`)
    later = now + timedelta(seconds=120)
    assert b.authenticate(future["nbf in the future"], "GET", "/v1/models", now=later).id == "reader"
    # inside the stated skew: accepted
    ok = mint("reader", rd.key, rd.kid, AUD, "GET", "/v1/models", not_before=t + SKEW_S)
    assert http.c.get("/v1/models", headers={"authorization": f"Bearer {ok}"}).status_code == 200
    b.close()


# -- 3. no oracles -----------------------------------------------------------------------------------
def _shape(o: dict[str, Any]) -> Any:
    """What sign-in options reveal, with the random parts (challenge, ids) reduced to their lengths."""
    opts = o["options"]
    return (sorted(o), len(o["challenge_id"]), sorted(opts), len(opts["challenge"]),
            [(sorted(c), len(c["id"]), c["type"]) for c in opts["allowCredentials"]],
            {k: v for k, v in opts.items() if k not in ("challenge", "allowCredentials")})  # fmt: skip


def test_sign_in_options_do_not_reveal_accounts_or_passkeys(db_url: str, tmp_path: Path, sealed: Path) -> None:
    from weightwarden.broker.passkeys import DECOY_ID_BYTES

    b, _ = make_broker(db_url, tmp_path, sealed)
    pk = _passkeys(b)
    user = SoftAuthenticator()
    o = pk.registration_options("ap1", pk.enroll_code("ap1", actor="admin"))
    pk.finish_registration(o["challenge_id"], user.create(o["options"]))
    real_id = _b64u(next(iter(user.creds)))
    before = b.log.size()
    real, nokey, ghost = pk.login_options("ap1"), pk.login_options("ap2"), pk.login_options("no-such-user")
    assert _shape(nokey) == _shape(ghost)
    assert len(_unb64u(nokey["options"]["allowCredentials"][0]["id"])) == DECOY_ID_BYTES
    # a real account differs only in its id's length, which depends on the authenticator (ours: 16 bytes)
    assert _shape(real)[:4] == _shape(nokey)[:4] and _shape(real)[5] == _shape(nokey)[5]
    assert len(real["options"]["allowCredentials"]) == len(ghost["options"]["allowCredentials"]) == 1
    assert real["options"]["allowCredentials"][0]["id"] == real_id
    # decoys are stable (asking twice shows nothing new), differ per account, and across replicas agree
    again = pk.login_options("no-such-user")["options"]["allowCredentials"]
    assert again == ghost["options"]["allowCredentials"] != nokey["options"]["allowCredentials"]
    other = _passkeys(Broker(db_url, b.store, b.log, b.config))
    assert other.login_options("no-such-user")["options"]["allowCredentials"] == again
    other.broker.sink.close()
    assert b.log.size() == before  # asking leaves the same trace (none) for every kind of account
    # a sign-in on a decoy challenge fails (audited) and opens nothing
    forged = SoftAuthenticator()
    forged.create({"challenge": "x"})
    with pytest.raises(Unauthorized, match="unknown passkey"):
        pk.finish_login(ghost["challenge_id"], forged.get(ghost["options"]))
    assert len(_denied(b, before, "broker:authenticate")) == 1
    assert _count(b, pk.t_sess) == 0
    b.close()


def test_another_teams_model_answers_as_a_missing_one(db_url: str, tmp_path: Path, sealed: Path) -> None:
    b, a = make_broker(db_url, tmp_path, sealed)
    b.add_model("m2", "other", sealed)  # ap3 is on team "other"; everyone else in the fixture on "core"
    http = Http(b)
    before = b.log.size()
    for who, path, kw in [
        ("reader", "/v1/models/{}", {}),
        ("loader", "/v1/models/{}/weights", {}),
        ("rel", "/v1/requests", {"json": {"action": "copy"}}),
        ("rel", "/v1/requests", {"json": {"action": "release", "recipient": "x", "country": "DE"}}),
    ]:
        got = []
        for name in ("m2", "m9"):  # hidden, and missing: names of one length
            method = "POST" if "json" in kw else "GET"
            k = {"json": {**kw["json"], "model": name}} if kw else {}
            r = http(a[who], method, path.format(name), **k)
            got.append((r.status_code, r.content.replace(name.encode(), b"NAME"), sorted(r.headers.items())))
        assert got[0] == got[1], (who, path)
        assert got[0][0] == 404 and json.loads(got[0][1]) == {"error": "no model 'NAME'"}
    # the team's own model still answers (and a permission it lacks on a visible model is still a 403)
    assert http(a["reader"], "GET", "/v1/models/m1").status_code == 200
    assert http(a["reader"], "GET", "/v1/models/m1/weights").status_code == 403
    assert http(a["ap3"], "GET", "/v1/models/m2").json()["team"] == "other"
    denied = [e["subject"] for e in _denied(b, before, "broker:authorize")]
    assert denied.count("m2") == denied.count("m9") == 4  # both kinds of refusal audited
    b.close()


# -- 4. anomalies in flight ----------------------------------------------------------------------------
def _fetch_all(b: Broker, who: str, models: list[str], parallel: bool) -> dict[str, Any]:
    """Fetch ``models`` one after another or all at once (every stream started before any is read)."""
    from weightwarden.broker.service import Forbidden, StreamCut

    p = b.principal(who)
    out: dict[str, Any] = {"refused": [], "cut": 0, "complete": 0}
    streams: list[Any] = []
    lock = threading.Lock()

    def start(m: str) -> Any:
        try:
            it = b.stream(p, m)
        except Forbidden as e:
            with lock:
                out["refused"].append(str(e))
            return None
        return it

    def drain(it: Any) -> None:
        try:
            for _ in it:
                pass
            out["complete"] += 1
        except StreamCut:
            out["cut"] += 1

    if parallel:
        go = threading.Barrier(len(models))

        def run(m: str) -> None:
            go.wait()
            it = start(m)
            if it is not None:
                with lock:
                    streams.append(it)

        ts = [threading.Thread(target=run, args=(m,)) for m in models]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        for it in streams:
            drain(it)
    else:
        for m in models:
            it = start(m)
            if it is not None:
                drain(it)
    out["refused"].sort()
    out["alerts"] = sorted(a["kind"] for a in b.alerts() if a["principal"] == who)
    out["suspended"] = b.principal(who).suspended
    return out


def test_parallel_fetches_trigger_what_serial_ones_do(db_url: str, tmp_path: Path, sealed: Path) -> None:
    size = sealed.stat().st_size
    b, a = make_broker(db_url, tmp_path, sealed)
    for i in range(2, 8):
        b.add_model(f"m{i}", "core", sealed)
    for n in ("serial", "parallel", "serial-volume", "parallel-volume"):
        b.add_account(n, "workload", a["loader"].pub, {"inference-loader"}, {"core"})
    seven = [f"m{i}" for i in range(1, 8)]
    serial = _fetch_all(b, "serial", seven, parallel=False)
    parallel = _fetch_all(b, "parallel", seven, parallel=True)
    # seven models at once: the sixth admitted is judged as the sixth in a row (the bug: nothing fired)
    assert serial["alerts"] == parallel["alerts"] == ["many-models"]
    assert serial["refused"] == parallel["refused"] == ["account suspended", "suspended by an anomaly rule"]
    assert serial["suspended"] and parallel["suspended"]
    assert serial["complete"] == 5  # fetched one after another, five finished before the sixth
    assert parallel["complete"] == 0 and parallel["cut"] == 5  # the running five are cut by the suspension
    # volume: four fetches of one model, the rule seeing bytes reserved by running streams (and, since
    # issue 18, the new stream's own size: the fourth would make 4 x size)
    bv = Broker(db_url, b.store, b.log, BrokerConfig(chunk=1 << 16, volume_bytes_per_hour=3.5 * size))
    vs = _fetch_all(bv, "serial-volume", ["m1"] * 4, parallel=False)
    vp = _fetch_all(bv, "parallel-volume", ["m1"] * 4, parallel=True)
    assert vs["alerts"] == vp["alerts"] == ["volume"] and vs["suspended"] and vp["suspended"]
    assert vs["refused"] == vp["refused"] == ["suspended by an anomaly rule"]
    assert vs["complete"] == 3 and vp["cut"] == 3
    bv.sink.close()
    b.close()


def test_suspension_cuts_a_running_stream(db_url: str, tmp_path: Path, sealed: Path) -> None:
    from weightwarden.broker.service import StreamCut

    b, _ = make_broker(db_url, tmp_path, sealed)
    other = Broker(db_url, b.store, b.log, b.config)  # the suspension comes from another replica
    it = b.stream(b.principal("loader"), "m1")
    first = next(it)
    other.suspend("loader", actor="aud", reason="incident")
    with pytest.raises(StreamCut):
        next(it)  # the next chunk is not sent
    ev = [e["event"] for e in b.log.export() if e["event"]["action"] == "broker:stream"]
    assert [(e["detail"]["phase"], e["outcome"]) for e in ev] == [("start", "ok"), ("cut", "denied")]
    assert ev[-1]["detail"]["bytes"] == len(first)
    import sqlalchemy as sa

    with b.engine.connect() as c:  # the registration became an egress record of what was sent
        assert c.execute(sa.select(sa.func.count()).select_from(b.t.streams)).scalar_one() == 0
        assert c.execute(sa.select(b.t.egress.c.bytes)).scalars().all() == [len(first)]
    other.sink.close()
    b.close()


# -- 5. ranges, resumes and the client -----------------------------------------------------------------
def _buckets(b: Broker) -> dict[str, float]:
    import sqlalchemy as sa

    with b.engine.connect() as c:
        return {r.key: r.tokens for r in c.execute(sa.select(b.t.buckets))}


def test_single_ranges_are_served_and_bad_ones_refused(db_url: str, tmp_path: Path, sealed: Path) -> None:
    data = sealed.read_bytes()
    n = len(data)
    b, a = make_broker(db_url, tmp_path, sealed)
    http = Http(b)
    ld = a["loader"]
    full = http(ld, "GET", "/v1/models/m1/weights")
    assert full.status_code == 200 and full.content == data and full.headers["accept-ranges"] == "bytes"
    etag = full.headers["etag"]
    for spec, (lo, hi) in {"bytes=0-99": (0, 100), "bytes=1000-": (1000, n), "bytes=-500": (n - 500, n),
                           f"bytes={n - 10}-{n + 999}": (n - 10, n), f"bytes=-{n + 5}": (0, n)}.items():  # fmt: skip
        r = http(ld, "GET", "/v1/models/m1/weights", headers={"range": spec})
        assert r.status_code == 206, spec
        assert r.content == data[lo:hi] and r.headers["content-range"] == f"bytes {lo}-{hi - 1}/{n}"
        assert r.headers["content-length"] == str(hi - lo) and r.headers["etag"] == etag
    assert http(ld, "GET", "/v1/models/m1/weights", headers={"range": "bytes=5-", "if-match": etag}).status_code == 206
    spent = _buckets(b)
    with b.engine.connect() as c:
        import sqlalchemy as sa

        egress = c.execute(sa.select(sa.func.count()).select_from(b.t.egress)).scalar_one()
    before = b.log.size()
    bad = {"bytes=abc": 400, "items=0-1": 400, "bytes=9-2": 400, "bytes=0-1,5-6": 400, "bytes=0-10, 5-20": 400,
           "bytes=": 400, f"bytes={n}-": 416, f"bytes={n + 7}-{n + 9}": 416, "bytes=-0": 416}  # fmt: skip
    for spec, status in bad.items():
        r = http(ld, "GET", "/v1/models/m1/weights", headers={"range": spec})
        assert r.status_code == status, spec
        assert set(r.json()) == {"error"}
        if status == 416:
            assert r.headers["content-range"] == f"bytes */{n}"
    other = http(ld, "GET", "/v1/models/m1/weights", headers={"range": "bytes=0-", "if-match": '"another-file"'})
    assert other.status_code == 412 and "changed" in other.json()["error"]
    # refused: nothing sent, nothing charged, nothing registered; every refusal audited
    assert _buckets(b) == spent
    with b.engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(b.t.egress)).scalar_one() == egress
    refused = [e for e in _denied(b, before, "broker:stream") if e["detail"]["phase"] == "refused"]
    assert len(refused) == len(bad) + 1
    b.close()


def test_a_resumed_range_is_not_charged_twice(db_url: str, tmp_path: Path, sealed: Path) -> None:
    data = sealed.read_bytes()
    n = len(data)
    cfg = BrokerConfig(chunk=1 << 16, per_principal=Limit(rate=0.0, burst=n + 4096), max_models_per_hour=99)
    b, a = make_broker(db_url, tmp_path, sealed, cfg)
    b.add_model("m1copy", "core", sealed)  # the same bytes under another name: another file
    http = Http(b)
    ld = a["loader"]
    # a whole-file stream is cut after its first chunk: the file was reserved (charged) in full, one chunk sent
    it = b.stream(b.principal("loader"), "m1")
    got = next(it)
    it.close()
    etag = it.etag
    # the resume of the unsent tail (paid for, never sent) is served and not charged again
    r = http(ld, "GET", "/v1/models/m1/weights", headers={"range": f"bytes={len(got)}-", "if-match": etag})
    assert r.status_code == 206 and got + r.content == data
    # the credit is spent: bytes already sent are charged again (the budget holds 4 KiB), a whole-file GET
    # is charged, and so is a range of another file
    for spec in ("bytes=0-", f"bytes={len(got)}-"):
        assert http(ld, "GET", "/v1/models/m1/weights", headers={"range": spec}).status_code == 429, spec
    assert http(ld, "GET", "/v1/models/m1/weights").status_code == 429
    assert http(ld, "GET", "/v1/models/m1copy/weights", headers={"range": "bytes=0-"}).status_code == 429
    ends = [e["event"]["detail"] for e in b.log.export() if e["event"]["action"] == "broker:stream"
            and e["event"]["detail"]["phase"] in ("end", "closed")]  # fmt: skip
    assert [(d["phase"], d["bytes"], d["charged"]) for d in ends] == [("closed", len(got), n), ("end", n - len(got), 0)]
    b.close()


def test_ranges_after_a_complete_download_are_charged(db_url: str, tmp_path: Path, sealed: Path) -> None:
    """The red team's attack (issue 18): one full GET, then Range: bytes=0- again and again."""
    from weightwarden.broker.service import StreamCut

    data = sealed.read_bytes()
    n = len(data)
    # budget for two copies: the first re-download by range is charged, the second is refused
    cfg = BrokerConfig(chunk=1 << 16, per_principal=Limit(rate=0.0, burst=2 * n + 4096), max_models_per_hour=99)
    b, a = make_broker(db_url, tmp_path, sealed, cfg)
    http, ld = Http(b), a["loader"]
    full = http(ld, "GET", "/v1/models/m1/weights")
    assert full.status_code == 200
    etag = full.headers["etag"]
    r = http(ld, "GET", "/v1/models/m1/weights", headers={"range": "bytes=0-", "if-match": etag})
    assert r.status_code == 206 and r.content == data
    assert http(ld, "GET", "/v1/models/m1/weights", headers={"range": "bytes=0-", "if-match": etag}).status_code == 429
    ends = [e["event"]["detail"] for e in b.log.export() if e["event"]["action"] == "broker:stream"
            and e["event"]["detail"]["phase"] == "end"]  # fmt: skip
    assert [d["charged"] for d in ends] == [n, n]
    # the volume rule counts bytes sent: with a cap of 1.5 copies, the first re-download is refused,
    # alerted and the account suspended; nothing more is sent
    cfg2 = BrokerConfig(chunk=1 << 16, volume_bytes_per_hour=1.5 * n, max_models_per_hour=99)
    bv = Broker(db_url, b.store, b.log, cfg2)
    bv.add_account("drain", "workload", ld.pub, {"inference-loader"}, {"core"})
    who = bv.principal("drain")
    assert b"".join(bv.stream(who, "m1")) == data
    before = b.log.size()
    from weightwarden.broker.service import Forbidden

    with pytest.raises(Forbidden, match="anomaly"):
        bv.stream(who, "m1", range_="bytes=0-", if_match=etag)
    assert [x["kind"] for x in bv.alerts() if x["principal"] == "drain"] == ["volume"]
    assert bv.principal("drain").suspended
    for _ in range(4):
        with pytest.raises((Forbidden, StreamCut)):
            bv.stream(who, "m1", range_="bytes=0-")
    acts = [e["event"]["action"] for e in b.log.export(before)]
    assert "broker:suspend" in acts and "broker:alert" in acts
    bv.sink.close()
    b.close()


def test_one_stream_larger_than_the_volume_cap_is_refused(db_url: str, tmp_path: Path, sealed: Path) -> None:
    import dataclasses

    import sqlalchemy as sa

    from weightwarden.broker.service import Forbidden, StreamCut

    n = sealed.stat().st_size
    cfg = BrokerConfig(chunk=1 << 16, lease=1 << 16, volume_bytes_per_hour=0.5 * n)
    b, a = make_broker(db_url, tmp_path, sealed, cfg)
    b.add_account("big", "workload", a["loader"].pub, {"inference-loader"}, {"core"})
    # the stream alone is twice the hourly cap: refused before its first byte, alerted, suspended
    with pytest.raises(Forbidden, match="anomaly"):
        b.stream(b.principal("big"), "m1")
    assert [x["kind"] for x in b.alerts()] == ["volume"] and b.principal("big").suspended
    with b.engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(b.t.egress)).scalar_one() == 0
    # the cap is re-checked per lease during a stream: lowered while a stream runs (an operator's change on
    # another replica), the stream is cut at its next lease, alerted and its principal suspended
    b.config = dataclasses.replace(cfg, volume_bytes_per_hour=10.0 * n)
    it = b.stream(b.principal("loader"), "m1")
    first = next(it)
    b.config = dataclasses.replace(cfg, volume_bytes_per_hour=1.5 * len(first))
    with pytest.raises(StreamCut, match="volume"):
        for _ in it:
            pass
    assert [x["kind"] for x in b.alerts()] == ["volume", "volume"] and b.principal("loader").suspended
    with b.engine.connect() as c:  # the egress record is what was sent: one chunk, then the cut
        assert c.execute(sa.select(b.t.egress.c.bytes)).scalars().all() == [len(first)]
    cut = [e["event"] for e in b.log.export() if e["event"]["action"] == "broker:stream"
           and e["event"]["detail"]["phase"] == "cut"]  # fmt: skip
    assert len(cut) == 1 and cut[0]["outcome"] == "denied" and cut[0]["reason"] == "hourly volume exceeded"
    b.close()


def test_an_approved_copy_resumes_for_its_requester_only(db_url: str, tmp_path: Path, sealed: Path) -> None:
    b, a = make_broker(db_url, tmp_path, sealed)
    http = Http(b)
    req = b.request_copy(b.principal("rel"), "m1", now=None)
    msg = b.approval_message(req)
    for ap in ("ap1", "ap2"):
        b.approve(b.principal(ap), req["id"], a[ap].sign(msg))
    path = f"/v1/requests/{req['id']}/download"
    data = sealed.read_bytes()
    first = http(a["rel"], "GET", path, headers={"range": "bytes=0-999"})
    assert first.status_code == 206 and first.content == data[:1000]
    assert b.request(req["id"])["status"] == "used"
    rest = http(a["rel"], "GET", path, headers={"range": "bytes=1000-", "if-match": first.headers["etag"]})
    assert rest.status_code == 206 and first.content + rest.content == data
    assert http(a["rel"], "GET", path).status_code == 409  # a second whole copy: refused
    assert http(a["rel2"], "GET", path, headers={"range": "bytes=0-"}).status_code == 403  # not the requester
    later = datetime.now(UTC) + timedelta(hours=2)  # after the request's window: no more resumes
    from weightwarden.broker.service import Conflict

    with pytest.raises(Conflict, match="used"):
        b.stream(b.principal("rel"), "m1", request_id=req["id"], range_="bytes=0-", now=later)
    b.close()


class _CutAfter:
    """An httpx transport (over the real one) whose first ``cuts`` responses break after ``limit`` bytes,
    as a dropped connection would."""

    def __init__(self, limit: int, cuts: int = 1):
        import httpx

        self.inner, self.limit, self.cuts = httpx.HTTPTransport(), limit, cuts

    def handle_request(self, request: Any) -> Any:
        import httpx

        r = self.inner.handle_request(request)
        if self.cuts <= 0 or r.status_code >= 300 or not request.url.path.endswith(("/weights", "/download")):
            return r  # (a pull's metadata call is not cut: only body streams are)
        self.cuts -= 1
        limit, stream = self.limit, r.stream

        class Cut(httpx.SyncByteStream):
            def __iter__(self) -> Any:
                got = 0
                for b in stream:
                    if got + len(b) > limit:
                        yield b[: limit - got]
                        raise httpx.ReadError("connection reset (test)")
                    got += len(b)
                    yield b

            def close(self) -> None:
                stream.close()

        return httpx.Response(r.status_code, headers=r.headers, stream=Cut(), request=request)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def served(tmp_path: Path, sealed: Path) -> Any:
    b, a = make_broker(f"sqlite:///{tmp_path / 'b.db'}", tmp_path, sealed)
    with serving(b) as base:
        yield b, a, base
    b.close()


def _client(base: str, acct: Account, **kw: Any) -> Any:
    from weightwarden.broker.client import BrokerClient

    return BrokerClient(base, acct.name, acct.key, **kw)


def test_pull_resumes_after_a_cut_and_verifies(served: Any, tmp_path: Path, sealed: Path, keyring: Any) -> None:
    b, a, base = served
    out = tmp_path / "got" / "m1.wws"
    out.parent.mkdir()
    with _client(base, a["loader"], transport=_CutAfter(300_000, cuts=2)) as c:
        res = c.pull("m1", out, trust=keyring.trust)
    assert out.read_bytes() == sealed.read_bytes() and res.attempts == 3
    assert not (out.parent / "m1.wws.part").exists() and not (out.parent / "m1.wws.part.json").exists()
    starts = [e["event"]["detail"] for e in b.log.export() if e["event"]["action"] == "broker:stream"
              and e["event"]["detail"]["phase"] == "start"]  # fmt: skip
    assert [d.get("range", "").split("-")[0] for d in starts] == ["", "300000", "600000"]

    def _ends() -> list[dict[str, Any]]:  # the server records a stream's end after its last byte went out
        return [e["event"]["detail"] for e in b.log.export() if e["event"]["action"] == "broker:stream"
                and e["event"]["detail"]["phase"] in ("end", "closed")]  # fmt: skip

    import time

    for _ in range(200):
        if len(_ends()) == 3:
            break
        time.sleep(0.05)
    ends = _ends()
    assert len(ends) == 3 and ends[-1]["phase"] == "end"  # (a cut attempt may have been sent whole: buffers)
    # (issue 18) each stream is charged what it sent beyond its resume credit (bytes charged and never sent);
    # bytes the broker sent but the cut lost in buffers are charged again: it cannot tell them from delivered ones
    free = [d.get("free", 0) for d in starts]
    assert free[0] == 0 and all(d["charged"] >= d["bytes"] - f for d, f in zip(ends, free, strict=True))
    assert ends[-1]["charged"] == ends[-1]["bytes"] - free[-1]
    import sqlalchemy as sa

    with b.engine.connect() as c:
        row = c.execute(sa.select(b.t.downloads)).one()
    assert (row.charged, row.sent) == (sum(d["charged"] for d in ends), sum(d["bytes"] for d in ends))
    assert row.charged >= sealed.stat().st_size
    # an existing output is not overwritten
    from weightwarden.errors import OutputExistsError

    with _client(base, a["loader"]) as c, pytest.raises(OutputExistsError):
        c.pull("m1", out, trust=keyring.trust)


def test_pull_refuses_to_resume_another_file(served: Any, tmp_path: Path, sealed: Path, keyring: Any) -> None:
    from weightwarden.broker.client import BrokerHTTPError, ResumeMismatchError

    b, a, base = served
    out = tmp_path / "m1.wws"
    part, side = tmp_path / "m1.wws.part", tmp_path / "m1.wws.part.json"
    with _client(base, a["loader"], transport=_CutAfter(300_000, cuts=5)) as c, pytest.raises(BrokerHTTPError):
        c.pull("m1", out, trust=keyring.trust, max_tries=1)
    kept = part.read_bytes()
    assert len(kept) == 300_000 and json.loads(side.read_text())["model"] == "m1"
    # names that are not model names or request ids never reach the broker
    from weightwarden.broker.storage import BadNameError
    from weightwarden.errors import WardenError

    with _client(base, a["loader"]) as c:
        with pytest.raises(BadNameError):
            c.pull("../audit/head", tmp_path / "x.wws")
        with pytest.raises(WardenError, match="request id"):
            c.pull("m1", tmp_path / "x.wws", request_id="../../v1/audit/head")
    # the sidecar is for m1: pulling another model into the same file is refused, nothing touched
    with _client(base, a["loader"]) as c, pytest.raises(ResumeMismatchError, match="another download"):
        c.pull("m2", out, trust=keyring.trust)
    # the broker's m1 is replaced (a new version): the resume is refused by the broker (412, audited)
    b.add_model("m1", "core", sealed)
    before = b.log.size()
    with _client(base, a["loader"]) as c, pytest.raises(ResumeMismatchError, match="changed"):
        c.pull("m1", out, trust=keyring.trust)
    assert part.read_bytes() == kept and not out.exists()
    assert [e["reason"] for e in _denied(b, before, "broker:stream")] == [
        "the file changed since your partial copy (ETag differs): download it again from the start"]  # fmt: skip


def test_pull_never_puts_a_tampered_copy_in_place(served: Any, tmp_path: Path, sealed: Path, keyring: Any) -> None:
    _, a, base = served
    out = tmp_path / "m1.wws"
    from weightwarden.broker.client import BrokerHTTPError

    with _client(base, a["loader"], transport=_CutAfter(300_000)) as c, pytest.raises(BrokerHTTPError, match="resume"):
        c.pull("m1", out, trust=keyring.trust, max_tries=1)
    part = tmp_path / "m1.wws.part"
    raw = bytearray(part.read_bytes())
    raw[-1000] ^= 0xFF  # the partial copy is altered on disk before the resume
    part.write_bytes(bytes(raw))
    from weightwarden.errors import IntegrityError

    with _client(base, a["loader"]) as c, pytest.raises(IntegrityError):
        c.pull("m1", out, trust=keyring.trust)
    assert not out.exists() and not part.exists()  # never put in place, and not resumed again
    # a signer the caller does not trust: refused the same way
    from weightwarden.errors import UntrustedSignerError

    with _client(base, a["loader"]) as c, pytest.raises(UntrustedSignerError):
        c.pull("m1", out, trust=[b"\x01" * 32])
    assert not out.exists()


def test_pull_refuses_another_validly_signed_file(served: Any, tmp_path: Path, sealed: Path, keyring: Any) -> None:
    """Issue 18: a malicious broker or TLS terminator serves another file signed by the same trusted key."""
    import httpx

    import weightwarden as ww
    from weightwarden.broker.client import WrongFileError

    b, a, base = served
    other = tmp_path / "other.wws"
    ww.seal(tmp_path / "w.safetensors", other, keyring=keyring, chunk_size=1 << 16)  # same signer, new file id
    want = b.model("m1")["detail"]["file_id"]
    # the genuine stream names its file
    with _client(base, a["loader"]) as c:
        r = c.request("GET", "/v1/models/m1/weights")
    assert r.headers["x-warden-file-id"] == want

    class Swap(httpx.BaseTransport):  # answers the weights GET with the other file, otherwise passes through
        def __init__(self, file_id: str | None):
            self.inner, self.file_id = httpx.HTTPTransport(), file_id

        def handle_request(self, request: Any) -> Any:
            if not request.url.path.endswith("/weights"):
                return self.inner.handle_request(request)
            body = other.read_bytes()
            h = {"etag": '"x"', "content-length": str(len(body))}
            if self.file_id:
                h["x-warden-file-id"] = self.file_id
            return httpx.Response(200, headers=h, content=body, request=request)

    out = tmp_path / "got.wws"
    from weightwarden.sealed.reader import SealedFile

    with SealedFile(other) as sf:
        other_id = sf.context.file_id.hex()
    # lying header (names m1's file): caught from the sealed header after download, before the rename
    # honest header of the other file: caught before anything is written
    for fid, where in ((want, "not the one asked for"), (other_id, "another file")):
        with _client(base, a["loader"], transport=Swap(fid)) as c, pytest.raises(WrongFileError, match=where):
            c.pull("m1", out, trust=keyring.trust)
        assert not out.exists() and not (tmp_path / "got.wws.part").exists()
    # the genuine broker: the same pull succeeds
    with _client(base, a["loader"]) as c:
        c.pull("m1", out, trust=keyring.trust)
    assert out.read_bytes() == sealed.read_bytes()


def test_warden_pull(served: Any, tmp_path: Path, sealed: Path, cli_env: dict[str, str]) -> None:
    import base64 as b64

    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    from tests.support.cli import warden
    from weightwarden.sealed.reader import SealedFile

    _, a, base = served
    keyfile = tmp_path / "loader.pem"
    keyfile.write_bytes(a["loader"].key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    with SealedFile(sealed) as sf:
        signer = b64.b64encode(sf.public_key).decode()
    env = {**cli_env, "WARDEN_BROKER_URL": base, "WARDEN_ACCOUNT": "loader", "WARDEN_ACCOUNT_KEY": str(keyfile)}
    out = tmp_path / "pulled.wws"
    r = warden(env, "pull", "m1", "-o", str(out), "--trust-key", signer, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bytes"] == sealed.stat().st_size and out.read_bytes() == sealed.read_bytes()
    # a partial copy of another model in the way: refused, one line naming the file, nothing touched
    other = tmp_path / "other.wws"
    (tmp_path / "other.wws.part").write_bytes(b"x" * 10)
    (tmp_path / "other.wws.part.json").write_text(json.dumps({"broker": base, "model": "m9", "request": None,
                                                              "etag": '"e"', "size": 99}))  # fmt: skip
    r = warden(env, "pull", "m1", "-o", str(other), "--trust-key", signer)
    assert r.returncode == 1 and r.stderr.startswith("error: ResumeMismatchError") and "other.wws.part" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and (tmp_path / "other.wws.part").read_bytes() == b"x" * 10
    # a signer the caller does not trust: nothing put in place
    r = warden(env, "pull", "m1", "-o", str(tmp_path / "x.wws"), "--trust-key", b64.b64encode(b"\x01" * 32).decode())
    assert r.returncode == 3 and "Untrusted" in r.stderr and not (tmp_path / "x.wws").exists()


# -- 6. the zero-copy door -------------------------------------------------------------------------------
def test_zero_copy_streams_are_metered_like_copied_ones(tmp_path: Path, sealed: Path) -> None:
    import httpx

    data = sealed.read_bytes()
    n = len(data)
    # (issue 18: the range below, of bytes already sent, is charged: its 200,001 bytes are in the budget)
    cfg = BrokerConfig(chunk=1 << 16, zero_copy_span=1 << 16, max_models_per_hour=99,
                       per_principal=Limit(rate=0.0, burst=n + n // 2 + 200_001))  # fmt: skip
    b, a = make_broker(f"sqlite:///{tmp_path / 'b.db'}", tmp_path, sealed, cfg)
    ld = a["loader"]

    def get(base: str, path: str, **headers: str) -> Any:
        return httpx.get(base + path, headers={**headers, "authorization": f"Bearer {ld.token('GET', path)}"})

    with serving(b) as base:
        full = get(base, "/v1/models/m1/weights")
        assert full.status_code == 200 and full.content == data
        part = get(base, "/v1/models/m1/weights", range="bytes=100000-300000")
        assert part.status_code == 206 and part.content == data[100000:300001]
        # the budget (n / 2 left) ends a whole-file stream part-way, on the sendfile path too
        with pytest.raises(httpx.RemoteProtocolError):
            get(base, "/v1/models/m1/weights").read()
    starts = [e["event"]["detail"] for e in b.log.export() if e["event"]["action"] == "broker:stream"
              and e["event"]["detail"]["phase"] == "start"]  # fmt: skip
    assert len(starts) == 3 and all(d["zero_copy"] for d in starts)
    cut = [e["event"]["detail"] for e in b.log.export() if e["event"]["action"] == "broker:stream"
           and e["event"]["detail"]["phase"] == "suspended"]  # fmt: skip
    assert len(cut) == 1 and n // 2 - (1 << 16) < cut[0]["bytes"] <= n // 2
    b.close()

"""The broker hardened (issue 18): single-use enrolment codes, complete token checks, no oracles,
anomaly rules that see running streams, resumable ranged downloads and the client.

Passkey ceremonies run against :class:`SoftAuthenticator`, a software WebAuthn authenticator
(P-256 keys from pyca/cryptography, "none" attestation) that py_webauthn verifies exactly as it
verifies a browser's; the browser path is tests/test_console.py."""

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

from weightwarden.broker.service import Broker, BrokerConfig, Unauthorized

from .test_broker import AUD, Account, Http, _broker, sealed  # noqa: F401 - the sealed-file fixture

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
def test_an_enrolment_code_starts_one_ceremony_only(db_url: str, tmp_path: Path, sealed: Path) -> None:  # noqa: F811
    b, _ = _broker(db_url, tmp_path, sealed)
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


def test_an_older_registration_challenge_cannot_finish(db_url: str, tmp_path: Path, sealed: Path) -> None:  # noqa: F811
    b, _ = _broker(db_url, tmp_path, sealed)
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


def test_two_ceremonies_started_at_once_one_wins(db_url: str, tmp_path: Path, sealed: Path) -> None:  # noqa: F811
    """Two replicas on one database race to start with the same code: exactly one ceremony starts."""
    b1, _ = _broker(db_url, tmp_path, sealed)
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
def test_tokens_from_the_future_are_refused(db_url: str, tmp_path: Path, sealed: Path) -> None:  # noqa: F811
    from weightwarden.broker.tokens import SKEW_S, mint

    b, a = _broker(db_url, tmp_path, sealed)
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


def test_sign_in_options_do_not_reveal_accounts_or_passkeys(db_url: str, tmp_path: Path, sealed: Path) -> None:  # noqa: F811
    from weightwarden.broker.passkeys import DECOY_ID_BYTES

    b, _ = _broker(db_url, tmp_path, sealed)
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


def test_another_teams_model_answers_as_a_missing_one(db_url: str, tmp_path: Path, sealed: Path) -> None:  # noqa: F811
    b, a = _broker(db_url, tmp_path, sealed)
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


def test_parallel_fetches_trigger_what_serial_ones_do(db_url: str, tmp_path: Path, sealed: Path) -> None:  # noqa: F811
    size = sealed.stat().st_size
    b, a = _broker(db_url, tmp_path, sealed)
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
    # volume: four fetches of one model, the rule seeing bytes reserved by running streams
    bv = Broker(db_url, b.store, b.log, BrokerConfig(chunk=1 << 16, volume_bytes_per_hour=2.5 * size))
    vs = _fetch_all(bv, "serial-volume", ["m1"] * 4, parallel=False)
    vp = _fetch_all(bv, "parallel-volume", ["m1"] * 4, parallel=True)
    assert vs["alerts"] == vp["alerts"] == ["volume"] and vs["suspended"] and vp["suspended"]
    assert vs["refused"] == vp["refused"] == ["suspended by an anomaly rule"]
    assert vs["complete"] == 3 and vp["cut"] == 3
    bv.sink.close()
    b.close()


def test_suspension_cuts_a_running_stream(db_url: str, tmp_path: Path, sealed: Path) -> None:  # noqa: F811
    from weightwarden.broker.service import StreamCut

    b, _ = _broker(db_url, tmp_path, sealed)
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

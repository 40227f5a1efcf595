"""The web console in a real headless Chromium with a virtual WebAuthn authenticator (DevTools
protocol, through Selenium): passkey enrolment, sign-in, two approvals signed by the approvers'
authenticators, the audit log's proof check, and a sign-in from the wrong origin failing."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import Account
from tests.support.services import free_port
from weightwarden.broker.service import Broker, BrokerConfig, Unauthorized
from weightwarden.broker.storage import LocalWeightStore
from weightwarden.keys import Ed25519Signer
from weightwarden.merkle import AuditLog

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
pytest.importorskip("webauthn", reason="py_webauthn is in the server extra")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Debian chromium and chromium-driver: make test "
                                "installs them")  # fmt: skip


@pytest.fixture
def console(tmp_path: Path, sealed: Path) -> Iterator[dict[str, Any]]:
    import uvicorn

    from weightwarden.broker.app import create_app
    from weightwarden.broker.passkeys import Passkeys

    port = free_port()
    url = f"sqlite:///{tmp_path / 'b.db'}"
    from weightwarden.release import default_rules
    from weightwarden.release.gate import ReleaseGate
    from weightwarden.release.screen import ScreeningList

    sample = Path(__file__).parents[2] / "src" / "weightwarden" / "release" / "lists" / "sample_csl.json"
    gate = ReleaseGate(default_rules(), ScreeningList.load(sample))
    log = AuditLog(url, Ed25519Signer.generate("audit-log"))
    b = Broker(url, LocalWeightStore(tmp_path / "store"), log, BrokerConfig(), gate=gate)
    pk = Passkeys(b, rp_id="localhost", origins=(f"http://localhost:{port}",))
    rel = Account("rel")
    b.add_account("rel", "service", rel.pub, {"releaser"}, {"core"})
    for name, role in (("ap1", "approver"), ("ap2", "approver"), ("aud", "auditor")):
        b.add_account(name, "human", Account(name).pub, {role}, {"core"})
    b.add_model("m1", "core", sealed)
    server = uvicorn.Server(uvicorn.Config(create_app(b, pk), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield {"broker": b, "pk": pk, "base": f"http://localhost:{port}", "port": port}
    finally:
        server.should_exit = True
        th.join(10)
        b.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.virtual_authenticator import VirtualAuthenticatorOptions

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    va = VirtualAuthenticatorOptions()
    va.protocol = VirtualAuthenticatorOptions.Protocol.CTAP2
    va.transport = VirtualAuthenticatorOptions.Transport.INTERNAL
    va.has_resident_key = True
    va.has_user_verification = True
    va.is_user_verified = True
    d.add_virtual_authenticator(va)
    try:
        yield d
    finally:
        d.quit()


def _wait(cond: Any, what: str, timeout: float = 15) -> Any:
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _status(d: Any) -> str:
    from selenium.webdriver.common.by import By

    return d.find_element(By.ID, "status").text


def _enroll_and_sign_in(d: Any, c: dict[str, Any], account: str) -> None:
    from selenium.webdriver.common.by import By

    code = c["pk"].enroll_code(account, actor="admin")
    d.delete_all_cookies()
    d.get(c["base"] + "/console/enroll")
    _wait(lambda: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"), "the page")
    d.find_element(By.ID, "account").send_keys(account)
    d.find_element(By.ID, "code").send_keys(code)
    d.find_element(By.ID, "enroll").click()
    _wait(lambda: "registered" in _status(d) or "failed" in _status(d), "enrolment")
    assert _status(d) == "passkey registered: sign in"
    d.get(c["base"] + "/console/login")
    _wait(lambda: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"), "the page")
    d.find_element(By.ID, "account").send_keys(account)
    d.find_element(By.ID, "login").click()
    _wait(lambda: d.current_url.rstrip("/").endswith("/console"), f"{account}'s dashboard")
    assert account in d.find_element(By.ID, "me").text


def test_approvals_with_passkeys_in_a_real_browser(console: dict[str, Any], browser: Any) -> None:
    from selenium.webdriver.common.by import By

    b: Broker = console["broker"]
    d = browser
    d.get(console["base"] + "/console")  # no session: sent to sign in
    assert d.current_url.endswith("/console/login")
    req = b.request_copy(b.principal("rel"), "m1", reason="partner evaluation")
    # a release the export gate denied: approvers see the recipient, the decision and what they would override
    held = b.request_copy(b.principal("rel"), "m1", "release", recipient="Sergei I. Petrov", country="DE")
    for n, approver in enumerate(("ap1", "ap2"), start=1):
        _enroll_and_sign_in(d, console, approver)
        item = d.find_element(By.ID, f"req-{held['id']}").text
        assert "Sergei I. Petrov" in item and "DENY" in item and "approving overrides: " in item
        assert "screening:sample-000" in item and "classification:failed" in item  # admitted unclassified
        assert "Sergei I. Petrov" in d.find_element(By.ID, "releases").text
        btn = d.find_element(By.CSS_SELECTOR, f"#req-{req['id']} button.approve")
        btn.click()
        _wait(lambda: "approved:" in _status(d) or "failed" in _status(d), "the approval")
        assert _status(d) == ("approved: request is " + ("pending" if n == 1 else "approved"))
    final = b.request(req["id"])
    assert final["status"] == "approved" and final["approvals"] == ["ap1", "ap2"]
    import sqlalchemy as sa

    with b.engine.connect() as c:
        proofs = [bytes(x) for x in c.execute(sa.select(b.t.approvals.c.signature)).scalars()]
    assert all(b'"authenticatorData"' in p for p in proofs)  # each approval is a WebAuthn assertion on record
    # the auditor sees the log and checks an event's inclusion proof from the page
    _enroll_and_sign_in(d, console, "aud")
    first = d.find_elements(By.CSS_SELECTOR, "#audit button.proof")[0]
    idx = first.get_attribute("data-index")
    first.click()
    _wait(lambda: d.find_element(By.ID, f"proof-{idx}").text, "the proof check")
    assert d.find_element(By.ID, f"proof-{idx}").text.startswith("verified under the signed head of")
    acts = [e["event"]["action"] for e in b.log.export()]
    assert acts.count("approval:grant") == 2
    b.log.verify()


def test_sign_in_from_another_origin_fails(console: dict[str, Any], browser: Any) -> None:
    """The passkey is bound to its origin: the same console reached under another name (as a phishing
    proxy would serve it) cannot get an assertion the broker accepts."""
    from selenium.webdriver.common.by import By

    _enroll_and_sign_in(browser, console, "ap1")
    # no oracle: a browser's real credential id and a decoy for an unknown account look alike
    real = console["pk"].login_options("ap1")["options"]["allowCredentials"]
    ghost = console["pk"].login_options("nobody")["options"]["allowCredentials"]
    assert len(real) == len(ghost) == 1 and len(real[0]["id"]) == len(ghost[0]["id"]), (real, ghost)
    browser.delete_all_cookies()
    browser.get(f"http://127.0.0.1:{console['port']}/console/login")
    _wait(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-ready"), "the page")
    browser.find_element(By.ID, "account").send_keys("ap1")
    browser.find_element(By.ID, "login").click()
    _wait(lambda: "failed" in _status(browser), "the refusal")
    assert "/console/login" in browser.current_url


def test_passkey_ceremonies_refuse_replays_and_bad_codes(console: dict[str, Any]) -> None:
    pk = console["pk"]
    with pytest.raises(Unauthorized, match="enrolment code"):
        pk.registration_options("ap1", "wrong-code")
    # no oracle (issue 18): an account without a passkey gets options shaped as a real one's, with a decoy id
    decoy = pk.login_options("ap2")["options"]["allowCredentials"]
    assert len(decoy) == 1 and decoy == pk.login_options("ap2")["options"]["allowCredentials"]
    with pytest.raises(Unauthorized, match="challenge"):
        pk.finish_login("0" * 32, {"id": "x"})
    with pytest.raises(Unauthorized):
        pk.session("forged-session-token")
    from weightwarden.broker.service import BrokerError

    with pytest.raises(BrokerError, match="human"):
        pk.enroll_code("rel", actor="admin")

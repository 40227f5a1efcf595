"""The web console: server-rendered pages over the broker, signed in with passkeys.

Pages: sign in, enrol a passkey, and a dashboard with pending approvals (approve with your
passkey), your requests, models, alerts, and the audit log with a proof check per event.  All
dynamic text is HTML-escaped; the session cookie is HttpOnly, SameSite=Strict and scoped to
``/console``; every state-changing call is a JSON POST that must carry ``X-Warden-Console: 1``
(which a cross-site form cannot send).
"""

# no `from __future__ import annotations`: FastAPI reads the route annotations at run time
import html
from importlib import resources
from typing import Any

from .._extras import extra_imports
from .errors import BrokerError
from .passkeys import SESSION_S, Passkeys
from .policy import Permission, Principal

__all__ = ["console_router"]

COOKIE = "ww_session"


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<meta http-equiv='Content-Security-Policy' content=\"default-src 'self'; script-src 'self'\">"
            "</head><body>" + body + "<p id='status' role='status'></p>"
            "<script src='/console/app.js'></script></body></html>")  # fmt: skip


def _gate(q: dict[str, Any]) -> str:
    e = html.escape
    """What an approver must see of a release request: recipient, destination, the export gate's decision
    and, when the gate did not allow it, that approving overrides these reasons."""
    if q.get("action") != "release" or not q.get("gate"):
        return ""
    g = q["gate"]
    out = (
        f" to <b>{e(q.get('recipient') or '?')}</b> ({e(q.get('country') or 'no country')}); export gate: "
        f"<span class='gate' data-decision='{e(g['decision'])}'>{e(g['decision'].upper())}</span>"
    )
    if g["decision"] != "allow":
        out += f" <b class='override'>approving overrides: {e(', '.join(g['blocking']))}</b>"
    return out


def console_router(pk: Passkeys) -> Any:
    with extra_imports("server"):
        from fastapi import APIRouter, Cookie, Header, Request
        from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
        from pydantic import BaseModel, Field

    broker = pk.broker
    r = APIRouter(prefix="/console", include_in_schema=False)
    e = html.escape

    class Enroll(BaseModel):
        account: str = Field(min_length=1, max_length=128)
        code: str = Field(min_length=1, max_length=100)

    class Login(BaseModel):
        account: str = Field(min_length=1, max_length=128)

    class Finish(BaseModel):
        challenge_id: str = Field(min_length=1, max_length=64)
        credential: dict[str, Any]

    def guard(x_warden_console: str | None) -> None:
        if x_warden_console != "1":
            raise BrokerError("console calls must carry X-Warden-Console: 1")

    def who(ww_session: str | None) -> Principal:
        return pk.session(ww_session)

    js = resources.files(__package__).joinpath("console.js").read_text()

    @r.get("/app.js")
    def app_js() -> Response:
        return Response(js, media_type="application/javascript")

    @r.get("/login", response_class=HTMLResponse)
    def login_page() -> str:
        return _page("Sign in", "<h1>weightwarden</h1><label>Account <input id='account'></label>"
                     "<button id='login'>Sign in with passkey</button>"
                     "<p><a href='/console/enroll'>Register a passkey</a></p>")  # fmt: skip

    @r.get("/enroll", response_class=HTMLResponse)
    def enroll_page() -> str:
        return _page("Register a passkey", "<h1>Register a passkey</h1><label>Account <input id='account'></label>"
                     "<label>Enrolment code <input id='code'></label>"
                     "<button id='enroll'>Register</button>")  # fmt: skip

    @r.post("/api/enroll/options")
    def enroll_options(body: Enroll, x_warden_console: str | None = Header(None)) -> dict[str, Any]:
        guard(x_warden_console)
        return pk.registration_options(body.account, body.code)

    @r.post("/api/enroll/finish")
    def enroll_finish(body: Finish, x_warden_console: str | None = Header(None)) -> dict[str, Any]:
        guard(x_warden_console)
        pk.finish_registration(body.challenge_id, body.credential)
        return {"ok": True}

    @r.post("/api/login/options")
    def login_options(body: Login, x_warden_console: str | None = Header(None)) -> dict[str, Any]:
        guard(x_warden_console)
        return pk.login_options(body.account)

    @r.post("/api/login/finish")
    def login_finish(body: Finish, request: Request, x_warden_console: str | None = Header(None)) -> JSONResponse:
        guard(x_warden_console)
        token = pk.finish_login(body.challenge_id, body.credential)
        resp = JSONResponse({"ok": True})
        resp.set_cookie(COOKIE, token, max_age=SESSION_S, httponly=True, samesite="strict", path="/console",
                        secure=request.url.scheme == "https")  # fmt: skip
        return resp

    @r.post("/logout")
    def logout(ww_session: str | None = Cookie(None), x_warden_console: str | None = Header(None)) -> JSONResponse:
        guard(x_warden_console)
        if ww_session:
            pk.logout(ww_session)
        resp = JSONResponse({"ok": True})
        resp.delete_cookie(COOKIE, path="/console")
        return resp

    @r.get("", response_class=HTMLResponse)
    def dashboard(ww_session: str | None = Cookie(None)) -> Any:
        try:
            p = who(ww_session)
        except BrokerError:
            return RedirectResponse("/console/login", status_code=303)
        parts = [f"<h1>weightwarden</h1><p id='me'>Signed in as <b>{e(p.id)}</b> "
                 f"({e(', '.join(sorted(p.roles)) or 'no roles')})</p>"]  # fmt: skip
        reqs = broker.requests()
        pend = []
        for q in reqs:
            if q["status"] != "pending" or q["requester"] == p.id or p.id in q["approvals"]:
                continue
            if not broker.policy.decide(p, Permission.APPROVAL_REQUEST_APPROVE, q["model"],
                                        broker.model(q["model"])["team"]).allowed:  # fmt: skip
                continue
            pend.append(f"<li id='req-{e(q['id'])}' data-status='{e(q['status'])}'>{e(q['action'])} of "
                        f"<b>{e(q['model'])}</b> for {e(q['requester'])}{_gate(q)} ({len(q['approvals'])}/"
                        f"{q['approvals_needed']} approvals) <button class='approve' "
                        f"data-rid='{e(q['id'])}'>Approve with passkey</button></li>")  # fmt: skip
        parts.append("<h2>Pending approvals</h2><ul id='pending'>" + ("".join(pend) or "<li>none</li>") + "</ul>")
        mine = [q for q in reqs if q["requester"] == p.id]
        parts.append("<h2>Your requests</h2><ul>" + "".join(
            f"<li>{e(q['action'])} of {e(q['model'])}: {e(q['status'])}</li>" for q in mine) + "</ul>")  # fmt: skip
        rel = [
            q
            for q in reqs
            if q["action"] == "release"
            and (
                q["requester"] == p.id
                or broker.policy.decide(
                    p, Permission.APPROVAL_REQUEST_APPROVE, q["model"], broker.model(q["model"])["team"]
                ).allowed
            )
        ]
        parts.append("<h2>Releases</h2><ul id='releases'>" + ("".join(
            f"<li id='rel-{e(q['id'])}'>{e(q['model'])}{_gate(q)}: {e(q['status'])}"
            + (" (fingerprinted copy ready)" if q.get("artifact") else "") + "</li>" for q in rel)
            or "<li>none</li>") + "</ul>")  # fmt: skip
        models = "".join(f"<li>{e(m['name'])} (team {e(m['team'])}, {m['size']} bytes)</li>" for m in broker.models(p))
        parts.append("<h2>Models</h2><ul>" + models + "</ul>")
        if broker.policy.decide(p, Permission.AUDIT_LOG_READ).allowed:
            parts.append("<h2>Alerts</h2><ul id='alerts'>" + "".join(
                f"<li>{e(a['kind'])}: {e(a['principal'])}</li>" for a in broker.alerts()[-50:]) + "</ul>")  # fmt: skip
            rows = list(broker.log.export(max(0, broker.log.size() - 50)))
            parts.append("<h2>Audit log</h2><table id='audit'>" + "".join(
                f"<tr><td>{x['index']}</td><td>{e(x['event']['action'])}</td><td>{e(x['event']['outcome'])}</td>"
                f"<td>{e(str(x['event']['actor']))}</td><td>{e(str(x['event'].get('subject')))}</td>"
                f"<td><button class='proof' data-index='{x['index']}'>check proof</button>"
                f"<span id='proof-{x['index']}'></span></td></tr>" for x in rows) + "</table>")  # fmt: skip
        return _page("weightwarden console", "".join(parts))

    @r.post("/api/requests/{rid}/approve/options")
    def approve_options(rid: str, ww_session: str | None = Cookie(None),
                        x_warden_console: str | None = Header(None)) -> dict[str, Any]:  # fmt: skip
        guard(x_warden_console)
        return pk.approval_options(who(ww_session), rid)

    @r.post("/api/requests/{rid}/approve/finish")
    def approve_finish(rid: str, body: Finish, ww_session: str | None = Cookie(None),
                       x_warden_console: str | None = Header(None)) -> dict[str, Any]:  # fmt: skip
        guard(x_warden_console)
        return pk.finish_approval(who(ww_session), rid, body.challenge_id, body.credential)

    @r.post("/api/audit/{index}/check")
    def check(index: int, ww_session: str | None = Cookie(None),
              x_warden_console: str | None = Header(None)) -> dict[str, Any]:  # fmt: skip
        from ..errors import AuditLogError
        from ..merkle import check_inclusion

        guard(x_warden_console)
        broker.authorize(who(ww_session), Permission.AUDIT_LOG_READ)
        try:
            proof = broker.log.prove(index)
            key = broker.log.public_key
            if key is None:  # a log opened without its key cannot vouch for anything
                raise AuditLogError("the audit log has no public key to check heads against")
            check_inclusion(proof, key, broker.log.log_id)
        except AuditLogError:
            return {"ok": False}
        return {"ok": True, "head_size": proof.head.size}

    return r

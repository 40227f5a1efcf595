"""Phishing-resistant login for people: WebAuthn passkeys (``py_webauthn``), console sessions,
and approvals signed by the approver's authenticator.

* **Enrolment**: an administrator issues a one-time code (``warden broker enroll ID``, 15
  minutes); with it the person registers a passkey in the console.  Only the code's SHA-256 is kept.
  The code is consumed (atomically, in the shared database) by the first ceremony that starts; a
  second start fails, and so does the finish of any older registration challenge of the account.
* **Login**: a WebAuthn assertion over a fresh single-use challenge, bound to the relying party
  id and origin (a phishing site's origin fails), user verification required, signature counter
  checked; it opens a session of 15 minutes whose token is kept hashed.  The sign-in options are
  no oracle: an unknown account, or one without passkeys, gets a stable decoy credential id
  (HMAC-SHA256 of the account under a server secret kept in the shared database), shaped as a real one.
* **Approval**: the challenge is SHA-256 of the request's approval message, so the authenticator
  itself signs "approve request R for model M by requester Q"; the assertion is the recorded proof.
Every success and failure is an audit event.  Time-dependent calls take ``now``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .._extras import require
from ..audit import AuditAction
from .errors import BrokerError, Unauthorized
from .policy import Principal
from .service import Broker

__all__ = ["SESSION_S", "Passkeys"]

SESSION_S = 15 * 60
ENROLL_S = 15 * 60
CHALLENGE_S = 5 * 60
DECOY_ID_BYTES = 32  # the length of a decoy credential id (a CTAP2 authenticator's are typically 16-64)


def _b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _h(s: str) -> bytes:
    return hashlib.sha256(s.encode()).digest()


def _t(now: datetime | None) -> int:
    return int((now or datetime.now(UTC)).timestamp())


@dataclass
class Passkeys:
    broker: Broker
    rp_id: str = "localhost"
    rp_name: str = "weightwarden"
    origins: tuple[str, ...] = ("http://localhost:8443",)

    def __post_init__(self) -> None:
        import sqlalchemy as sa

        C = sa.Column
        md = sa.MetaData()
        self.t_enroll = sa.Table("ww_enrollments", md, C("account", sa.String(128), primary_key=True),
                                 C("code_hash", sa.LargeBinary(32)), C("expires", sa.BigInteger))  # fmt: skip
        self.t_keys = sa.Table("ww_passkeys", md, C("credential_id", sa.String(400), primary_key=True),
                               C("account", sa.String(128), index=True), C("public_key", sa.LargeBinary),
                               C("sign_count", sa.BigInteger))  # fmt: skip
        self.t_chal = sa.Table("ww_challenges", md, C("id", sa.String(64), primary_key=True),
                               C("account", sa.String(128)), C("purpose", sa.String(80)),
                               C("challenge", sa.LargeBinary), C("expires", sa.BigInteger))  # fmt: skip
        self.t_sess = sa.Table("ww_sessions", md, C("token_hash", sa.LargeBinary(32), primary_key=True),
                               C("account", sa.String(128)), C("expires", sa.BigInteger))  # fmt: skip
        self.t_secret = sa.Table("ww_passkey_secret", md, C("name", sa.String(40), primary_key=True),
                                 C("value", sa.LargeBinary(32)))  # fmt: skip
        md.create_all(self.broker.engine)
        self._decoy_key = self._secret("decoy-credential-ids")

    def _secret(self, name: str) -> bytes:
        """A random secret shared by every replica (first one in wins)."""
        import sqlalchemy as sa

        try:
            with self.broker._write() as c:
                c.execute(sa.insert(self.t_secret).values(name=name, value=secrets.token_bytes(32)))
        except sa.exc.IntegrityError:
            pass  # another replica made it
        with self.broker.engine.connect() as c:
            return bytes(c.execute(sa.select(self.t_secret.c.value).where(self.t_secret.c.name == name)).scalar_one())

    def _fail(self, account: str, what: str, why: str, now: datetime | None) -> Unauthorized:
        self.broker.audit(AuditAction.BROKER_AUTHENTICATE, "denied", account[:128], what, reason=why, now=now,
                          method="webauthn")  # fmt: skip
        return Unauthorized(why)

    # -- enrolment ----------------------------------------------------------------------------
    def enroll_code(self, account: str, *, actor: str, now: datetime | None = None) -> str:
        """A one-time code with which ``account`` (a human) registers a passkey."""
        import sqlalchemy as sa

        if self.broker.principal(account).kind != "human":
            raise BrokerError("passkeys are for human accounts")
        code = secrets.token_urlsafe(12)
        with self.broker._write() as c:
            c.execute(sa.delete(self.t_enroll).where(self.t_enroll.c.account == account))
            c.execute(sa.delete(self.t_chal).where(self.t_chal.c.account == account,
                                                   self.t_chal.c.purpose == "register"))  # fmt: skip
            c.execute(sa.insert(self.t_enroll).values(account=account, code_hash=_h(code), expires=_t(now) + ENROLL_S))
        self.broker.audit(AuditAction.BROKER_ACCOUNT, "ok", actor, account, now=now, enrolment="code issued")
        return code

    def _challenge(self, account: str, purpose: str, challenge: bytes, now: datetime | None) -> str:
        import sqlalchemy as sa

        cid = secrets.token_hex(16)
        with self.broker._write() as c:
            c.execute(sa.delete(self.t_chal).where(self.t_chal.c.expires < _t(now)))
            c.execute(sa.insert(self.t_chal).values(id=cid, account=account, purpose=purpose, challenge=challenge,
                                                    expires=_t(now) + CHALLENGE_S))  # fmt: skip
        return cid

    def _take_challenge(self, cid: str, purpose: str, now: datetime | None) -> tuple[str, bytes]:
        """Consume a challenge (single use); (account, challenge bytes)."""
        import sqlalchemy as sa

        with self.broker._write() as c:
            r = c.execute(sa.select(self.t_chal).where(self.t_chal.c.id == str(cid)[:64])).first()
            c.execute(sa.delete(self.t_chal).where(self.t_chal.c.id == str(cid)[:64]))
        if r is None or r.purpose != purpose or r.expires < _t(now):
            raise self._fail(r.account if r else "unknown", purpose, "unknown, used or expired challenge", now)
        return r.account, bytes(r.challenge)

    def registration_options(self, account: str, code: str, *, now: datetime | None = None) -> dict[str, Any]:
        import sqlalchemy as sa
        generate_registration_options, options_to_json = require("webauthn", "generate_registration_options",
                                                                 "options_to_json", extra="server")
        from webauthn.helpers.structs import (
            AuthenticatorSelectionCriteria,
            ResidentKeyRequirement,
            UserVerificationRequirement,
        )

        with self.broker.engine.connect() as c:
            r = c.execute(sa.select(self.t_enroll).where(self.t_enroll.c.account == account)).first()
        if r is None or r.expires < _t(now) or not hmac.compare_digest(bytes(r.code_hash), _h(code)):
            raise self._fail(account, "enroll", "no valid enrolment code for this account", now)
        opts = generate_registration_options(
            rp_id=self.rp_id, rp_name=self.rp_name, user_name=account, user_id=account.encode(),
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.PREFERRED, user_verification=UserVerificationRequirement.REQUIRED),
        )  # fmt: skip
        # the code is single use: consumed by the first ceremony that starts, atomically in the shared
        # database (one replica's DELETE wins); the new challenge replaces any older one of this account
        cid = secrets.token_hex(16)
        with self.broker._write() as c:
            en, ch = self.t_enroll, self.t_chal
            n = c.execute(sa.delete(en).where(en.c.account == account, en.c.code_hash == r.code_hash)).rowcount
            if n == 1:
                c.execute(sa.delete(ch).where((ch.c.expires < _t(now)) | ((ch.c.account == account)
                                                                          & (ch.c.purpose == "register"))))  # fmt: skip
                c.execute(sa.insert(ch).values(id=cid, account=account, purpose="register", challenge=opts.challenge,
                                               expires=_t(now) + CHALLENGE_S))  # fmt: skip
        if n != 1:
            raise self._fail(account, "enroll", "no valid enrolment code for this account (already used)", now)
        self.broker.audit(AuditAction.BROKER_ACCOUNT, "ok", account, account, now=now, enrolment="code used")
        return {"challenge_id": cid, "options": json.loads(options_to_json(opts))}

    def finish_registration(self, challenge_id: str, credential: dict[str, Any], *,
                            now: datetime | None = None) -> None:  # fmt: skip
        import sqlalchemy as sa
        verify_registration_response = require("webauthn", "verify_registration_response", extra="server")

        account, challenge = self._take_challenge(challenge_id, "register", now)
        try:
            v = verify_registration_response(credential=credential, expected_challenge=challenge,
                                             expected_rp_id=self.rp_id, expected_origin=list(self.origins),
                                             require_user_verification=True)  # fmt: skip
        except Exception as e:  # py_webauthn raises several types for a bad credential
            raise self._fail(account, "enroll", f"passkey registration rejected ({type(e).__name__})", now) from None
        with self.broker._write() as c:
            row = {"credential_id": _b64u(v.credential_id), "account": account,
                   "public_key": v.credential_public_key, "sign_count": v.sign_count}  # fmt: skip
            c.execute(sa.insert(self.t_keys).values(**row))
        self.broker.audit(AuditAction.BROKER_ACCOUNT, "ok", account, account, now=now, enrolment="passkey registered")

    # -- assertions (login and approvals) -----------------------------------------------------------
    def _assertion_options(self, account: str, purpose: str, challenge: bytes | None,
                           now: datetime | None, *, decoy: bool = False) -> dict[str, Any]:  # fmt: skip
        """``decoy``: an account without passkeys (or unknown) gets a decoy credential id, not an error."""
        import sqlalchemy as sa
        generate_authentication_options, options_to_json = require("webauthn", "generate_authentication_options",
                                                                   "options_to_json", extra="server")
        PublicKeyCredentialDescriptor, UserVerificationRequirement = require(
            "webauthn.helpers.structs", "PublicKeyCredentialDescriptor", "UserVerificationRequirement", extra="server"
        )

        with self.broker.engine.connect() as c:
            creds = list(c.execute(sa.select(self.t_keys.c.credential_id).where(self.t_keys.c.account == account))
                         .scalars())  # fmt: skip
        base64url_to_bytes = require("webauthn", "base64url_to_bytes", extra="server")

        ids = [base64url_to_bytes(x) for x in creds]
        if not ids and decoy:
            ids = [hmac.new(self._decoy_key, b"decoy\0" + account.encode(), "sha256").digest()[:DECOY_ID_BYTES]]
        if not ids:
            raise self._fail(account, purpose, "no passkey registered for this account", now)
        opts = generate_authentication_options(
            rp_id=self.rp_id, challenge=challenge,
            allow_credentials=[PublicKeyCredentialDescriptor(id=x) for x in ids],
            user_verification=UserVerificationRequirement.REQUIRED,
        )  # fmt: skip
        cid = self._challenge(account, purpose, opts.challenge, now)
        return {"challenge_id": cid, "options": json.loads(options_to_json(opts))}

    def _verify_assertion(self, challenge_id: str, purpose: str, credential: dict[str, Any],
                          now: datetime | None) -> str:  # fmt: skip
        import sqlalchemy as sa
        verify_authentication_response = require("webauthn", "verify_authentication_response", extra="server")

        account, challenge = self._take_challenge(challenge_id, purpose, now)
        cred_id = str(credential.get("id", ""))[:400] if isinstance(credential, dict) else ""
        with self.broker.engine.connect() as c:
            k = c.execute(sa.select(self.t_keys).where(self.t_keys.c.credential_id == cred_id)).first()
        if k is None or k.account != account:
            raise self._fail(account, purpose, "unknown passkey for this account", now)
        try:
            v = verify_authentication_response(credential=credential, expected_challenge=challenge,
                                               expected_rp_id=self.rp_id, expected_origin=list(self.origins),
                                               credential_public_key=bytes(k.public_key),
                                               credential_current_sign_count=int(k.sign_count),
                                               require_user_verification=True)  # fmt: skip
        except Exception as e:
            raise self._fail(account, purpose, f"passkey assertion rejected ({type(e).__name__})", now) from None
        with self.broker._write() as c:
            c.execute(sa.update(self.t_keys).where(self.t_keys.c.credential_id == cred_id)
                      .values(sign_count=v.new_sign_count))  # fmt: skip
        return account

    def login_options(self, account: str, *, now: datetime | None = None) -> dict[str, Any]:
        """Sign-in options; the same shape whether ``account`` exists, has passkeys or not (no oracle)."""
        return self._assertion_options(account[:128], "login", None, now, decoy=True)

    def finish_login(self, challenge_id: str, credential: dict[str, Any], *, now: datetime | None = None) -> str:
        """Verify the assertion and open a session; returns the session token (for a cookie)."""
        import sqlalchemy as sa

        account = self._verify_assertion(challenge_id, "login", credential, now)
        if self.broker.principal(account).suspended:
            raise self._fail(account, "login", "account suspended", now)
        token = secrets.token_urlsafe(32)
        with self.broker._write() as c:
            c.execute(sa.delete(self.t_sess).where(self.t_sess.c.expires < _t(now)))
            c.execute(sa.insert(self.t_sess).values(token_hash=_h(token), account=account,
                                                    expires=_t(now) + SESSION_S))  # fmt: skip
        self.broker.audit(AuditAction.BROKER_AUTHENTICATE, "ok", account, "console", now=now, method="webauthn")
        return token

    def session(self, token: str | None, *, now: datetime | None = None) -> Principal:
        import sqlalchemy as sa

        if not token or len(token) > 100:
            raise Unauthorized("sign in with your passkey")
        with self.broker.engine.connect() as c:
            r = c.execute(sa.select(self.t_sess).where(self.t_sess.c.token_hash == _h(token))).first()
        if r is None or r.expires < _t(now):
            raise Unauthorized("your session has ended: sign in again")
        p = self.broker.principal(r.account)
        if p.suspended:
            raise Unauthorized("account suspended")
        return p

    def logout(self, token: str) -> None:
        import sqlalchemy as sa

        with self.broker._write() as c:
            c.execute(sa.delete(self.t_sess).where(self.t_sess.c.token_hash == _h(token)))

    def approval_options(self, p: Principal, rid: str, *, now: datetime | None = None) -> dict[str, Any]:
        """Assertion options whose challenge is SHA-256 of the approval message of ``rid``."""
        req = self.broker.request(rid, now=now)
        chal = hashlib.sha256(self.broker.approval_message(req)).digest()
        return self._assertion_options(p.id, f"approve:{rid}", chal, now)

    def finish_approval(self, p: Principal, rid: str, challenge_id: str, credential: dict[str, Any], *,
                        now: datetime | None = None) -> dict[str, Any]:  # fmt: skip
        def check(req: dict[str, Any]) -> bytes:
            account = self._verify_assertion(challenge_id, f"approve:{rid}", credential, now)
            if account != p.id:
                raise Unauthorized("the passkey belongs to another account")
            return json.dumps(credential, sort_keys=True).encode()  # the assertion is the proof on record

        return self.broker.record_approval(p, rid, check, now=now)

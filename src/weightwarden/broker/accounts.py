"""Accounts and their keys, sign-in (request tokens) and authorization (the policy, audited)."""

from __future__ import annotations

import hmac
import json
import time
from datetime import datetime
from typing import Any

from ..audit import AuditAction
from .errors import BrokerError, Forbidden, NotFound, Unauthorized
from .policy import Decision, Permission, Principal
from .schema import BrokerState, _ts
from .storage import check_name
from .tokens import TokenError, verify

__all__ = ["Accounts"]

_GENERIC = "token signature or claims are invalid"


class Accounts(BrokerState):
    """Accounts, their suspension and token revocation; authenticating a request token; authorizing."""

    def add_account(self, account: str, kind: str, public_key: bytes, roles: set[str] | frozenset[str],
                    teams: set[str] | frozenset[str], *, actor: str = "admin") -> None:  # fmt: skip
        import sqlalchemy as sa

        from ..keys.provider import ed25519_key_id
        from .policy import ROLES

        if kind not in ("service", "workload", "human") or len(public_key) != 32:
            raise BrokerError("an account is a service, workload or human with a 32-byte Ed25519 key")
        if not set(roles) <= set(ROLES):
            raise BrokerError(f"unknown role(s): {sorted(set(roles) - set(ROLES))}")
        check_name(account)
        with self._write() as c:
            c.execute(sa.delete(self.t.accounts).where(self.t.accounts.c.id == account))
            c.execute(sa.insert(self.t.accounts).values(id=account, kind=kind, public_key=public_key,
                      key_id=ed25519_key_id(public_key), roles=json.dumps(sorted(roles)),
                      teams=json.dumps(sorted(teams)), suspended=False, revoked_before=0))  # fmt: skip
        self.audit(AuditAction.BROKER_ACCOUNT, "ok", actor, account, kind=kind, roles=sorted(roles),
                   teams=sorted(teams))  # fmt: skip

    def principal(self, account: str) -> Principal:
        r = self._account(account)
        return Principal(r.id, r.kind, frozenset(json.loads(r.roles)), frozenset(json.loads(r.teams)),
                         bool(r.suspended))  # fmt: skip

    def _account(self, account: str) -> Any:
        import sqlalchemy as sa

        with self.engine.connect() as c:
            r = c.execute(sa.select(self.t.accounts).where(self.t.accounts.c.id == account)).first()
        if r is None:
            raise Unauthorized("unknown account")
        return r

    def suspend(self, account: str, *, actor: str, reason: str, now: datetime | None = None) -> None:
        import sqlalchemy as sa

        with self._write() as c:
            c.execute(sa.update(self.t.accounts).where(self.t.accounts.c.id == account).values(suspended=True))
        self.audit(AuditAction.BROKER_SUSPEND, "ok", actor, account, reason=reason, now=now)

    def revoke_tokens(self, account: str, *, before: datetime, actor: str) -> None:
        """Refuse every token ``account`` issued before ``before``."""
        import sqlalchemy as sa

        with self._write() as c:
            c.execute(sa.update(self.t.accounts).where(self.t.accounts.c.id == account)
                      .values(revoked_before=int(before.timestamp())))  # fmt: skip
        self.audit(AuditAction.BROKER_REVOKE, "ok", actor, account, before=before.isoformat())

    # -- authentication -------------------------------------------------------------------
    def authenticate(self, token: str, method: str, path: str, *, network: str | None = None,
                     now: datetime | None = None) -> Principal:  # fmt: skip
        """Check a request token and record its id; raise :class:`Unauthorized` (audited) on any failure."""
        import sqlalchemy as sa

        from .tokens import parse_unverified

        who = "unknown"
        try:
            acct, kid = parse_unverified(token)
            who = acct[:128]
            r = self._account(acct)
            if not hmac.compare_digest(r.key_id.encode(), kid.encode()):
                raise TokenError("token is signed by a key this account does not hold")
            cl = verify(token, bytes(r.public_key), self.config.audience, method, path, now=now)
            if cl.iat < (r.revoked_before or 0):
                raise TokenError("token was revoked")
            t = int(_ts(now))
            self._jti_inserts += 1
            try:
                with self._write() as c:
                    if self._jti_inserts % 256 == 1:  # expired token ids are swept now and then, not per request
                        c.execute(sa.delete(self.t.jti).where(self.t.jti.c.exp < t - 60))
                    c.execute(sa.insert(self.t.jti).values(jti=f"{acct}:{cl.jti}", exp=cl.exp))
            except sa.exc.IntegrityError:
                raise TokenError("token was already used") from None
        except (TokenError, Unauthorized) as e:
            self.audit(AuditAction.BROKER_AUTHENTICATE, "denied", who, path[:200], reason=str(e), now=now,
                       method=method, network=network)  # fmt: skip
            # the log keeps the precise reason; the caller does not learn which accounts exist
            public = str(e) if isinstance(e, TokenError) and "key this account" not in str(e) else _GENERIC
            raise Unauthorized(public) from None
        p = Principal(r.id, r.kind, frozenset(json.loads(r.roles)), frozenset(json.loads(r.teams)), bool(r.suspended))
        if p.suspended:
            self.audit(AuditAction.BROKER_AUTHENTICATE, "denied", acct, path[:200], reason="account suspended",
                       now=now)  # fmt: skip
            raise Unauthorized("account suspended")
        return p

    # -- authorization --------------------------------------------------------------------
    def authorize(self, p: Principal, perm: Permission, model: str | None = None, *, team: str | None = None,
                  context: dict[str, Any] | None = None, now: datetime | None = None,
                  hide: bool = False) -> Decision:  # fmt: skip
        """Decide and audit; raise :class:`Forbidden` on deny.  ``team``: the model's, if already looked up.

        ``hide`` (the caller named the model): a model the caller may not see (no ``model:metadata:read``
        on it) is refused exactly as a model that does not exist, :class:`NotFound` (no oracle); both
        refusals are audited."""
        if model is not None and team is None:
            try:
                team = self.model(model)["team"]
            except NotFound:
                if not hide:
                    raise
                self.audit(AuditAction.BROKER_AUTHORIZE, "denied", p.id, model, now=now, permission=str(perm),
                           reason="no such model")  # fmt: skip
                raise
        t0 = time.perf_counter()
        d = self.policy.decide(p, perm, model, team, context)
        self._decisions.append(time.perf_counter() - t0)
        self.audit(AuditAction.BROKER_AUTHORIZE, "ok" if d.allowed else "denied", p.id, model, now=now,
                   permission=str(perm), policies=list(d.reasons))  # fmt: skip
        if not d.allowed:
            see = Permission.MODEL_METADATA_READ
            if hide and model is not None and (perm == see or not self.policy.decide(p, see, model, team).allowed):
                raise NotFound(f"no model {model!r}")
            raise Forbidden(f"{p.id} may not {perm}" + (f" on {model}" if model else ""))
        return d

"""Request tokens: short-lived, audience-bound, request-bound, single-use, signed by the caller.

There are no bearer secrets to steal.  Each service account or workload holds an Ed25519 private
key; the broker knows only the public key.  For every request the caller signs a JWT (EdDSA,
RFC 8037) with::

    iss = sub = its account id    aud = the broker's audience    kid = its key id
    iat, exp  (exp - iat <= 300 s)  jti = 128 random bits   nbf  (optional)
    htm, htu  = the HTTP method and path it is for (as DPoP binds a proof to a request)

The broker checks the signature, audience, lifetime, method and path, and records the ``jti``
until it expires: a token issued (``iat``) or valid from (``nbf``) more than ``SKEW_S`` in the
future is refused, and a replayed token is refused, on every replica (the ``jti`` is a primary key in
the shared database).  Revocation is immediate: suspend the account, replace its key, or set
``revoked_before`` to refuse every token issued before a time.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .._extras import require
from ..errors import WardenError

__all__ = ["MAX_LIFETIME_S", "SKEW_S", "TokenClaims", "TokenError", "mint", "parse_unverified", "verify"]

MAX_LIFETIME_S = 300
SKEW_S = 5  # clock skew tolerated on iat and nbf
_MAX_TOKEN = 4096


class TokenError(WardenError):
    """A request token is malformed, forged, expired, replayed, revoked or for another request."""


@dataclass(frozen=True)
class TokenClaims:
    account: str
    key_id: str
    jti: str
    iat: int
    exp: int
    method: str
    path: str


def mint(account: str, private_key: Any, key_id: str, audience: str, method: str, path: str, *,
         lifetime_s: int = 60, not_before: int | None = None, now: datetime | None = None) -> str:  # fmt: skip
    """A token for one request (client side); ``not_before``: an ``nbf`` claim (Unix seconds)."""
    jwt = require("jwt", extra="client")

    t = int((now or datetime.now(UTC)).timestamp())
    claims = {"iss": account, "sub": account, "aud": audience, "iat": t, "exp": t + lifetime_s,
              "jti": secrets.token_hex(16), "htm": method.upper(), "htu": path}  # fmt: skip
    if not_before is not None:
        claims["nbf"] = not_before
    return jwt.encode(claims, private_key, algorithm="EdDSA", headers={"kid": key_id})


def parse_unverified(token: str) -> tuple[str, str]:
    """(account, key id) named by a token, to look its key up; nothing here is trusted yet."""
    import base64
    import binascii
    import json

    if not isinstance(token, str) or len(token) > _MAX_TOKEN or token.count(".") != 2:
        raise TokenError("malformed token")
    head_b64, body_b64, _ = token.split(".")
    try:
        head = json.loads(base64.urlsafe_b64decode(head_b64 + "=" * (-len(head_b64) % 4)))
        body = json.loads(base64.urlsafe_b64decode(body_b64 + "=" * (-len(body_b64) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise TokenError("malformed token") from None
    if not isinstance(head, dict) or not isinstance(body, dict):
        raise TokenError("malformed token")
    acct, kid = body.get("iss"), head.get("kid")
    if not isinstance(acct, str) or not isinstance(kid, str) or not acct or not kid:
        raise TokenError("malformed token")
    return acct, kid


def verify(token: str, public_key: bytes, audience: str, method: str, path: str, *,
           now: datetime | None = None) -> TokenClaims:  # fmt: skip
    """Check signature, audience, lifetime and request binding; the caller then records the jti."""
    jwt = require("jwt", extra="server")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    acct, kid = parse_unverified(token)
    try:
        c = jwt.decode(token, Ed25519PublicKey.from_public_bytes(public_key), algorithms=["EdDSA"],
                       audience=audience, options={"verify_exp": False, "verify_iat": False, "verify_nbf": False,
                                                   "require": ["iss", "sub", "aud", "iat", "exp", "jti", "htm",
                                                               "htu"]})  # fmt: skip
    except jwt.InvalidAudienceError:
        raise TokenError("token is for another audience") from None
    except (jwt.PyJWTError, ValueError):
        raise TokenError("token signature or claims are invalid") from None
    t = int((now or datetime.now(UTC)).timestamp())
    iat, exp = c["iat"], c["exp"]
    if (
        not isinstance(iat, int)
        or not isinstance(exp, int)
        or isinstance(iat, bool)
        or isinstance(exp, bool)
        or c["sub"] != acct
    ):
        raise TokenError("token claims are invalid")
    if exp - iat > MAX_LIFETIME_S or exp <= iat:
        raise TokenError(f"token lifetime exceeds {MAX_LIFETIME_S} s")
    if t >= exp:
        raise TokenError("token expired")
    if iat > t + SKEW_S:
        raise TokenError("token issued in the future")
    nbf = c.get("nbf")
    if nbf is not None and (not isinstance(nbf, int) or isinstance(nbf, bool) or nbf >= exp):
        raise TokenError("token claims are invalid")
    if nbf is not None and nbf > t + SKEW_S:
        raise TokenError("token is not valid yet (nbf in the future)")
    if c["htm"] != method.upper() or c["htu"] != path:
        raise TokenError("token is for another request")
    jti = c["jti"]
    if not isinstance(jti, str) or not 16 <= len(jti) <= 64:
        raise TokenError("token id is invalid")
    return TokenClaims(acct, kid, jti, iat, exp, c["htm"], c["htu"])

"""Custody changes approved by a fresh quorum of custodians, for that exact change.

An unsealed agent serves key *use*; it does not let anyone *change custody* on its own.
Re-sharing (new custodians or threshold), destroying a key (shred, ``key destroy``),
exporting key material, changing the key-use policy and turning key-use auditing off each
go through three steps, like Vault's rekey:

1. **request** — the agent draws an operation id and a nonce and fixes a :class:`Statement`:
   operation, parameters, the custody record (split id, M) it is requested under,
   requested-by, requested-at and expiry.  Its SHA-256 digest names it.
2. **approve** — each custodian opens their share on their own terminal, derives their
   Ed25519 approval key from it (:func:`weightwarden.keys.custody.approval_key`; its public
   half is in ``custody.json``, bound into the wrapped root key) and signs an
   :class:`Approval` of that digest and op id, dated.  The share never leaves the terminal.
3. **execute** — with M valid approvals of that exact statement, given after it was
   requested and before it expired, the agent carries it out, once.

Approvals are single-use: an executed (or refused) operation id is spent, and a custodian
counts once per operation.  Everything here takes ``now``.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..canonical import canonical_json
from ..errors import CustodyError, QuorumError
from .custody import Custodian, CustodyDoc, Share, approval_key
from .provider import b64d, b64e

KINDS = ("reshare", "destroy", "export", "policy", "audit")
DEFAULT_TTL = timedelta(hours=1)
MAX_TTL = timedelta(days=7)
SKEW = timedelta(minutes=2)  # an approval may be dated this far ahead of the agent's clock
_FORMAT = "weightwarden-custody-op"
_PURPOSE = "weightwarden/v1/custody-approval"


def _ts(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="microseconds")


def _parse_ts(s: Any, what: str) -> datetime:
    try:
        t = datetime.fromisoformat(str(s))
    except ValueError:
        raise QuorumError(f"{what} is not an ISO 8601 time") from None
    if t.tzinfo is None:
        raise QuorumError(f"{what} has no time zone")
    return t


def check_params(kind: str, params: Any) -> dict[str, Any]:
    """The parameters of one kind of custody change, checked; a clear error naming the field otherwise."""
    if kind not in KINDS:
        raise QuorumError(f"unknown custody change {str(kind)[:32]!r}; one of {', '.join(KINDS)}")
    if not isinstance(params, dict):
        raise QuorumError("the parameters of a custody change are an object")
    p = dict(params)
    if kind == "reshare":
        if set(p) != {"threshold", "custodians"}:
            raise QuorumError("reshare takes exactly 'threshold' and 'custodians'")
        if not isinstance(p["threshold"], int) or isinstance(p["threshold"], bool):
            raise QuorumError("reshare: 'threshold' must be an integer")
        if not isinstance(p["custodians"], list) or not p["custodians"]:
            raise QuorumError("reshare: 'custodians' must be a non-empty list")
        try:
            cs = [Custodian(str(c["name"]), str(c["recipient"])) for c in p["custodians"]]
        except (KeyError, TypeError):
            raise QuorumError("reshare: each custodian is {name, recipient}") from None
        if len({c.name for c in cs}) != len(cs):
            raise QuorumError("reshare: custodian names must differ")
        for c in cs:  # every new share goes to a key the custodians see, in the statement they sign
            if c.recipient == "passphrase":
                raise QuorumError(
                    f"reshare: custodian {c.name} has recipient 'passphrase'; in a custody change each new share is "
                    "sealed to an age X25519 public key named in the approved statement, never to a passphrase the "
                    f"requester supplies: have {c.name} run `warden custody keygen -o {c.name}.agekey` (keep that "
                    f"file; --protect puts it under {c.name}'s own passphrase) and request {c.name}=age1..."
                )
        if not 1 <= p["threshold"] <= len(cs) or (p["threshold"] == 1 and len(cs) > 1):
            raise QuorumError("reshare: need 2 <= threshold <= custodians (or 1 of 1)")
        p["custodians"] = [{"name": c.name, "recipient": c.recipient} for c in cs]
    elif kind in ("destroy", "export"):
        need = {"key_id", "version"} | ({"recipient"} if kind == "export" else set())
        if set(p) != need:
            raise QuorumError(f"{kind} takes exactly {', '.join(sorted(need))}")
        if not isinstance(p["key_id"], str) or not 0 < len(p["key_id"]) <= 80:
            raise QuorumError(f"{kind}: 'key_id' must be a key id")
        v = p["version"]
        if not (v is None and kind == "destroy") and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise QuorumError(
                f"{kind}: 'version' must be a positive integer" + (" or null" if kind == "destroy" else "")
            )
        if kind == "export":
            Custodian("export", str(p["recipient"]))  # an age X25519 recipient, checked the same way
            if p["recipient"] == "passphrase":
                raise QuorumError("export: 'recipient' must be an age X25519 recipient (age1...)")
    elif kind == "policy":
        from .policy import Policy

        if set(p) != {"policy"}:
            raise QuorumError("policy takes exactly 'policy'")
        p["policy"] = Policy.from_json(p["policy"]).to_json()
    elif set(p) != {"key_use"} or not isinstance(p["key_use"], bool):  # audit
        raise QuorumError("audit takes exactly 'key_use': true or false")
    return p


@dataclass(frozen=True)
class Statement:
    """What custodians approve: one custody change, under one custody record, requested once."""

    op_id: str
    kind: str
    params: dict[str, Any]
    split_id: str
    threshold: int
    nonce: str
    requested_by: str
    requested_at: datetime
    expires_at: datetime
    claimed_by: str | None = None  # the name the request gave (unauthenticated); requested_by is the socket peer

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": 1,
            "op_id": self.op_id,
            "kind": self.kind,
            "params": self.params,
            "split_id": self.split_id,
            "threshold": self.threshold,
            "nonce": self.nonce,
            "requested_by": self.requested_by,
            "claimed_by": self.claimed_by,
            "requested_at": _ts(self.requested_at),
            "expires_at": _ts(self.expires_at),
        }

    @classmethod
    def from_json(cls, obj: Any) -> Statement:
        if not isinstance(obj, dict) or obj.get("format") != _FORMAT or obj.get("version") != 1:
            raise QuorumError("not a version-1 custody-change statement")
        try:
            st = cls(
                str(obj["op_id"]),
                str(obj["kind"]),
                check_params(str(obj["kind"]), obj["params"]),
                str(obj["split_id"]),
                int(obj["threshold"]),
                str(obj["nonce"]),
                str(obj["requested_by"]),
                _parse_ts(obj["requested_at"], "requested_at"),
                _parse_ts(obj["expires_at"], "expires_at"),
                None if obj.get("claimed_by") is None else str(obj["claimed_by"]),
            )
        except KeyError as e:
            raise QuorumError(f"the statement lacks {e.args[0]!r}") from None
        return st

    def canonical(self) -> bytes:
        return canonical_json(self.to_json())

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    @property
    def policy_digest(self) -> str | None:
        """A policy change's full digest (as ``Policy.digest`` and ``warden custody approve --policy-file``)."""
        return hashlib.sha256(canonical_json(self.params["policy"])).hexdigest() if self.kind == "policy" else None

    def details(self) -> list[str]:
        """Lines a custodian reads under :meth:`describe`: a policy change's rules in words."""
        if self.kind != "policy":
            return []
        from .policy import Policy

        return Policy.from_json(self.params["policy"]).describe()

    def check_policy_file(self, path: Any) -> None:
        """Refuse unless ``path`` holds exactly the policy this change would put in force."""
        from .policy import Policy

        if self.kind != "policy":
            raise QuorumError(f"--policy-file: {self.op_id} is a {self.kind} change, not a policy change")
        mine = Policy.load_file(path).digest
        if mine != self.policy_digest:
            raise QuorumError(
                f"{path}: this policy (digest {mine}) is not the one requested in {self.op_id} (digest "
                f"{self.policy_digest}): nothing approved; compare the rules shown with your file"
            )

    def describe(self) -> str:
        """One line for a custodian's terminal (callers escape it before printing)."""
        p = self.params
        if self.kind == "reshare":
            what = f"re-share {p['threshold']}-of-{len(p['custodians'])} to " + ", ".join(
                f"{c['name']}={c['recipient']}" for c in p["custodians"]
            )
        elif self.kind == "destroy":
            what = f"destroy key {p['key_id']} " + (
                "(every version: shred)" if p["version"] is None else f"version {p['version']}"
            )
        elif self.kind == "export":
            what = f"export key {p['key_id']} version {p['version']} sealed to {p['recipient']}"
        elif self.kind == "policy":
            n = len(p["policy"].get("rule", []))
            what = f"replace the key-use policy with the {n} rule(s) below (digest {self.policy_digest})"
        else:
            what = "turn key-use auditing " + ("on" if p["key_use"] else "OFF")
        who = self.requested_by + (f" (who says they are {self.claimed_by})" if self.claimed_by else "")
        return f"{what}; requested by {who} at {_ts(self.requested_at)}, expires {_ts(self.expires_at)}"


def make_statement(
    kind: str,
    params: dict[str, Any],
    doc: CustodyDoc,
    *,
    requested_by: str,
    claimed_by: str | None = None,
    now: datetime,
    ttl: timedelta = DEFAULT_TTL,
) -> Statement:
    if not timedelta(seconds=1) <= ttl <= MAX_TTL:
        raise QuorumError(f"the approval window must be between 1 second and {MAX_TTL.days} days")
    return Statement(
        op_id="op-" + secrets.token_hex(12),
        kind=kind,
        params=check_params(kind, params),
        split_id=doc.split_id,
        threshold=doc.threshold,
        nonce=secrets.token_hex(16),
        requested_by=requested_by[:128],
        requested_at=now,
        expires_at=now + ttl,
        claimed_by=None if claimed_by is None else claimed_by[:128],
    )


@dataclass(frozen=True)
class Approval:
    """One custodian's signature over one statement's digest and op id, dated."""

    op_id: str
    digest: str
    custodian: str
    approved_at: datetime
    signature: bytes

    def message(self) -> bytes:
        return canonical_json(
            {
                "purpose": _PURPOSE,
                "op_id": self.op_id,
                "digest": self.digest,
                "custodian": self.custodian,
                "approved_at": _ts(self.approved_at),
            }
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "op_id": self.op_id,
            "digest": self.digest,
            "custodian": self.custodian,
            "approved_at": _ts(self.approved_at),
            "signature": b64e(self.signature),
        }

    @classmethod
    def from_json(cls, obj: Any) -> Approval:
        if not isinstance(obj, dict):
            raise QuorumError("an approval is an object")
        try:
            return cls(
                str(obj["op_id"]),
                str(obj["digest"]),
                str(obj["custodian"]),
                _parse_ts(obj["approved_at"], "approved_at"),
                b64d(obj["signature"], "approval signature"),
            )
        except KeyError as e:
            raise QuorumError(f"the approval lacks {e.args[0]!r}") from None


def sign_approval(stmt: Statement, share: Share, *, now: datetime) -> Approval:
    """A custodian's approval of ``stmt``, signed with the approval key of their share."""
    if share.split_id != stmt.split_id:
        raise QuorumError("this share belongs to another custody record than the one the change was requested under")
    unsigned = Approval(stmt.op_id, stmt.digest, share.custodian, now, b"")
    return Approval(
        unsigned.op_id, unsigned.digest, unsigned.custodian, now, approval_key(share).sign(unsigned.message())
    )


@dataclass
class _Pending:
    stmt: Statement  # everything a change does is in its statement: a request carries no secrets
    approvals: dict[str, Approval] = field(default_factory=dict)


class QuorumBook:
    """Pending custody changes and the approvals gathered for each (the agent's memory)."""

    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}
        self._spent: dict[str, str] = {}  # op id -> "executed" | "refused" | "expired"

    def add(self, stmt: Statement) -> None:
        self._pending[stmt.op_id] = _Pending(stmt)

    def pending(self) -> list[Statement]:
        return [p.stmt for p in self._pending.values()]

    def progress(self, op_id: str) -> int:
        return len(self._get(op_id).approvals)

    def get(self, op_id: str) -> Statement:
        return self._get(op_id).stmt

    def _get(self, op_id: str) -> _Pending:
        p = self._pending.get(op_id)
        if p is None:
            spent = self._spent.get(op_id)
            if spent:
                raise QuorumError(f"custody change {op_id[:40]} was already {spent}: approvals are single-use")
            raise QuorumError(f"no pending custody change {op_id[:40]!r} (request it first)")
        return p

    def _expire(self, p: _Pending, now: datetime) -> None:
        if now > p.stmt.expires_at:
            self._pending.pop(p.stmt.op_id, None)
            self._spent[p.stmt.op_id] = "expired"
            raise QuorumError(f"custody change {p.stmt.op_id} expired at {_ts(p.stmt.expires_at)}; request it again")

    def approve(self, doc: CustodyDoc, appr: Approval, *, now: datetime) -> int:
        """Check and record one approval; returns how many the operation has."""
        p = self._get(appr.op_id)
        st = p.stmt
        self._expire(p, now)
        if appr.digest != st.digest:
            raise QuorumError("this approval is for another statement (a different change or request)")
        if st.split_id != doc.split_id:
            raise QuorumError("the change was requested under another custody record")
        try:
            Ed25519PublicKey.from_public_bytes(doc.approver(appr.custodian)).verify(appr.signature, appr.message())
        except InvalidSignature:
            raise QuorumError(f"the approval signature of {appr.custodian} does not verify") from None
        except CustodyError as e:
            raise QuorumError(str(e)) from None
        if appr.approved_at < st.requested_at:
            raise QuorumError("this approval was given before the change was requested")
        if appr.approved_at > now + SKEW or appr.approved_at > st.expires_at:
            raise QuorumError("this approval is dated after the request's window (or in the future)")
        if appr.custodian in p.approvals:
            raise QuorumError(f"custodian {appr.custodian} has already approved {st.op_id}: an approval counts once")
        p.approvals[appr.custodian] = appr
        return len(p.approvals)

    def take(self, op_id: str, doc: CustodyDoc, *, now: datetime) -> tuple[Statement, list[Approval]]:
        """Hand over an operation with its quorum, once; it is then spent."""
        p = self._get(op_id)
        self._expire(p, now)
        if p.stmt.split_id != doc.split_id:
            raise QuorumError("the change was requested under another custody record")
        if len(p.approvals) < doc.threshold:
            raise QuorumError(f"{len(p.approvals)} of {doc.threshold} custodians have approved {op_id}: nothing done")
        del self._pending[op_id]
        self._spent[op_id] = "executed"
        return p.stmt, sorted(p.approvals.values(), key=lambda a: a.custodian)

    def spend(self, op_id: str, how: str) -> None:
        if self._pending.pop(op_id, None) is not None:
            self._spent[op_id] = how

    def clear(self, how: str = "voided by a new custody record") -> None:
        for op_id in list(self._pending):
            self.spend(op_id, how)

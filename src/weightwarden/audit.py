"""Typed audit events for every use of key material.

Providers, the keyring, custody and every library operation emit :class:`AuditEvent`
records (who, what, when, why, outcome) to an :class:`AuditSink`.  The default is the
home's tamper-evident trail (:mod:`weightwarden.trail`: the Merkle log of
docs/AUDIT_LOG.md), the same log the broker appends to.  Events never carry key material.

``who`` and ``why`` come from :func:`context`::

    with audit.context(actor="alice", reason="release to partner 42"):
        ww.seal(...)
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import getpass
import json
import os
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any


class AuditAction(StrEnum):
    """``scope:action`` tags, one per kind of event."""

    KEY_CREATE = "key:create"
    KEY_WRAP = "key:wrap"
    KEY_UNWRAP = "key:unwrap"
    KEY_SIGN = "key:sign"
    KEY_ROTATE = "key:rotate"
    KEY_DISABLE = "key:disable"
    KEY_ENABLE = "key:enable"
    KEY_DESTROY = "key:destroy"
    KEY_REWRAP = "key:rewrap"
    MODEL_SHRED = "model:shred"
    CUSTODY_INIT = "custody:init"
    CUSTODY_SHARE = "custody:share"
    CUSTODY_UNSEAL = "custody:unseal"
    CUSTODY_SEAL = "custody:seal"
    CUSTODY_RESHARE = "custody:reshare"
    PROVENANCE_REGISTER = "provenance:register"
    PROVENANCE_REMOVE = "provenance:remove"
    PROVENANCE_SCAN = "provenance:scan"
    PROVENANCE_QUERY = "provenance:query"  # one query sent to a suspect endpoint (issue 21)
    PROVENANCE_PROBE = "provenance:probe"  # a probe of an endpoint: its p-value and decision, or its failure
    RELEASE_CREATE = "release:create"
    RELEASE_GATE = "release:gate"  # an export-control decision, with the rule-set version
    RELEASE_OVERRIDE = "release:override"  # a gate decision overridden by two-person approval
    RELEASE_LICENSE = "release:license"  # a license record filed
    TRACE_RUN = "trace:run"
    BROKER_ACCOUNT = "broker:account"
    BROKER_SUSPEND = "broker:suspend"
    BROKER_REVOKE = "broker:revoke"
    BROKER_AUTHENTICATE = "broker:authenticate"
    BROKER_AUTHORIZE = "broker:authorize"
    BROKER_REJECT = "broker:reject"  # a malformed request, refused before any decision
    BROKER_MODEL_ADD = "broker:model-add"
    BROKER_STREAM = "broker:stream"
    BROKER_ALERT = "broker:alert"
    APPROVAL_REQUEST = "approval:request"
    APPROVAL_GRANT = "approval:grant"
    CUSTODY_REQUEST = "custody:request"  # a custody change requested (operation, parameters, statement digest)
    CUSTODY_APPROVE = "custody:approve"  # one custodian's signed approval of that exact statement
    CUSTODY_CHANGE = "custody:change"  # a custody change executed (or refused) with its quorum of approvers
    KEY_EXPORT = "key:export"  # key material exported (sealed to a recipient) after a quorum
    POLICY_DENY = "policy:deny"  # a key use refused by the key-use policy
    POLICY_SET = "policy:set"  # the key-use policy or the key-use auditing changed after a quorum
    RELEASE_REFUSE = "release:refuse"  # a release refused before the gate or mid-way (bad input), nothing written
    RECIPIENT_ADD = "recipient:add"  # a release recipient enrolled with a public key
    MODEL_SEAL = "model:seal"
    MODEL_OPEN = "model:open"  # plaintext written to disk
    MODEL_VERIFY = "model:verify"
    PROVENANCE_COMPARE = "provenance:compare"
    PROVENANCE_IDENTIFY = "provenance:identify"
    RELEASE_CLASSIFY = "release:classify"
    RELEASE_SCREEN = "release:screen"
    RELEASE_SCREEN_LIST = "release:screen-list"  # a new restricted-party list loaded


@functools.cache
def default_actor() -> str:
    """The actor recorded when none is set: ``user@host`` of this process."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


_actor: contextvars.ContextVar[str | None] = contextvars.ContextVar("warden_actor", default=None)
_reason: contextvars.ContextVar[str] = contextvars.ContextVar("warden_reason", default="")


@contextlib.contextmanager
def context(*, actor: str | None = None, reason: str | None = None) -> Iterator[None]:
    """Set who acts and why for the events emitted inside the block."""
    t1 = _actor.set(actor) if actor is not None else None
    t2 = _reason.set(reason) if reason is not None else None
    try:
        yield
    finally:
        if t2 is not None:
            _reason.reset(t2)
        if t1 is not None:
            _actor.reset(t1)


def current_context() -> tuple[str | None, str]:
    """Who acts and why as :func:`context` set them here: (actor or None, reason or "")."""
    return _actor.get(), _reason.get()


@dataclass(frozen=True)
class AuditEvent:
    action: AuditAction
    outcome: str  # "ok" | "denied" | "error"
    actor: str
    reason: str
    at: datetime
    key_id: str | None = None
    key_version: int | None = None
    provider: str | None = None
    subject: str | None = None  # file id, model name, split id ...
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "action": str(self.action),
            "outcome": self.outcome,
            "actor": self.actor,
            "reason": self.reason,
            "at": self.at.isoformat(timespec="microseconds"),
            "key_id": self.key_id,
            "key_version": self.key_version,
            "provider": self.provider,
            "subject": self.subject,
            "detail": self.detail,
        }


def event(action: AuditAction, outcome: str = "ok", *, now: datetime | None = None, **kw: Any) -> AuditEvent:
    return AuditEvent(
        action=action,
        outcome=outcome,
        actor=_actor.get() or default_actor(),
        reason=_reason.get(),
        at=now or datetime.now(UTC),
        **kw,
    )


class AuditSink(ABC):
    @abstractmethod
    def emit(self, ev: AuditEvent) -> None: ...


class NullSink(AuditSink):
    def emit(self, ev: AuditEvent) -> None:
        return None


# the library operation in progress in this context (weightwarden.trail): (its trail, buffered events)
operation_batch: contextvars.ContextVar[tuple[AuditSink, list[AuditEvent]] | None] = contextvars.ContextVar(
    "warden_trail_batch", default=None
)


class _Ambient(AuditSink):
    """The default sink of key providers and signers: the trail of the library operation in
    progress (weightwarden.trail); outside one, a provider reports to the sink it is given."""

    def emit(self, ev: AuditEvent) -> None:
        b = operation_batch.get()
        if b is not None:
            b[1].append(ev)


AMBIENT = _Ambient()


class MemorySink(AuditSink):
    """Keeps events in a list (tests, and the broker before it persists them)."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self._lock = threading.Lock()

    def emit(self, ev: AuditEvent) -> None:
        with self._lock:
            self.events.append(ev)

    def actions(self) -> list[str]:
        return [str(e.action) for e in self.events]


class JsonlSink(AuditSink):
    """Appends one JSON object per line (a plain, editable file: a mirror at most, never the
    trail, which is :mod:`weightwarden.trail`); each line is one write(2) on an O_APPEND file,
    so lines from several processes never interleave."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = None

    def emit(self, ev: AuditEvent) -> None:
        line = (json.dumps(ev.to_json(), sort_keys=True, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.write(self._fd, line)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]

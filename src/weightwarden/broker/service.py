"""The broker's service layer: authentication, authorization, two-person approval, egress limits,
anomaly rules and weight streams, every step recorded in the tamper-evident audit log.

Routes (:mod:`.app`) call this and nothing else; this calls the policy, the token checks, the
weight store and the database.  State lives in one SQL database (SQLite embedded, PostgreSQL
shared by replicas): accounts, seen token ids, approval requests, token buckets, alerts.  Every
call that depends on time has a ``now`` parameter.

:class:`Broker` is the facade, composed of its parts, one module each: :mod:`.accounts` (accounts,
sign-in, authorization), :mod:`.catalog` (models), :mod:`.approvals` (the two-person rule, releases),
:mod:`.egress` (token buckets), :mod:`.anomaly` (anomaly rules, alerts, suspensions) and
:mod:`.streaming` (metered streams, ranges); the tables are in :mod:`.schema`, the settings in
:mod:`.config`, the errors in :mod:`.errors`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .. import db
from ..audit import AuditAction, AuditEvent
from ..merkle import AuditLog, MerkleLogSink
from .accounts import Accounts
from .anomaly import AnomalyRules
from .approvals import APPROVAL_CONTEXT, Approvals
from .catalog import Catalog
from .config import BrokerConfig, Limit
from .egress import Egress
from .errors import (
    BrokerError,
    Conflict,
    EgressLimitError,
    Forbidden,
    NotFound,
    PreconditionFailed,
    RangeError,
    RangeNotSatisfiable,
    StreamCut,
    Unauthorized,
)
from .policy import Policy
from .schema import _tables
from .storage import WeightStore
from .streaming import Streaming, WeightStream, parse_range

__all__ = ["APPROVAL_CONTEXT", "Broker", "BrokerConfig", "BrokerError", "Conflict", "EgressLimitError", "Forbidden",
           "Limit", "NotFound", "PreconditionFailed", "RangeError", "RangeNotSatisfiable", "StreamCut",
           "Unauthorized", "WeightStream", "parse_range"]  # fmt: skip


@dataclass
class Broker(Accounts, Catalog, Approvals, Streaming, AnomalyRules, Egress):
    """One broker replica.  Several replicas may share ``url`` (PostgreSQL) and one audit log."""

    url: str
    store: WeightStore
    log: AuditLog
    config: BrokerConfig = field(default_factory=BrokerConfig)
    policy: Policy = field(default_factory=Policy)
    gate: Any = None  # the export-control gate (release.gate.ReleaseGate); without one, releases are refused

    def __post_init__(self) -> None:
        import sqlalchemy as sa

        # the broker's own state (token ids, buckets) commits without waiting for fsync; the audit
        # log, even in the same file, keeps full fsync on its own connections
        self.engine = db.create_engine(self.url, synchronous="NORMAL")
        md = sa.MetaData()
        self.t = _tables(md)
        md.create_all(self.engine)
        self.sink = MerkleLogSink(self.log)
        self._decisions: deque[float] = deque(maxlen=100_000)  # seconds per policy decision, newest last
        self._jti_inserts = 0
        self._finishes = 0
        if self.gate is not None:  # issue 17: a rules file older than one this broker used is refused
            from ..release.rules_version import RulesReplaced, RulesRollback, check_database

            try:
                check_database(self.engine, self.gate.rules)
            except (RulesRollback, RulesReplaced) as e:
                self.audit(AuditAction.RELEASE_GATE, "denied", "broker", reason=str(e))
                self.close()
                raise

    def metrics(self) -> dict[str, Any]:
        """Policy-decision latency over the last 100,000 decisions (milliseconds)."""
        xs = sorted(self._decisions)
        if not xs:
            return {"decisions": 0}
        q = lambda f: round(1000 * xs[min(len(xs) - 1, int(f * len(xs)))], 3)
        return {"decisions": len(xs), "decision_ms_p50": q(0.5), "decision_ms_p99": q(0.99),
                "decision_ms_max": round(1000 * xs[-1], 3)}  # fmt: skip

    def close(self) -> None:
        self.sink.close()
        self.engine.dispose()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self) -> Any:
        return db.write(self.engine)

    # -- audit ----------------------------------------------------------------------------
    def audit(self, action: AuditAction, outcome: str, actor: str, subject: str | None = None, *,
              reason: str = "", now: datetime | None = None, **detail: Any) -> int:  # fmt: skip
        ev = AuditEvent(action, outcome, actor, reason, now or datetime.now(UTC), subject=subject, detail=detail)
        return self.sink.append(ev)

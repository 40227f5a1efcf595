"""The broker's tables, and what every part of the broker shares (:class:`BrokerState`).

State lives in one SQL database (SQLite embedded, PostgreSQL shared by replicas; engines and write
transactions: :mod:`weightwarden.db`): accounts, seen token ids, models, approval requests and
approvals, token buckets, alerts, egress records, networks, running streams and downloads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..audit import AuditAction
from .config import BrokerConfig, Limit
from .policy import Decision, Permission, Policy, Principal
from .storage import WeightStore

__all__ = ["BrokerState"]


@dataclass
class _Tables:
    accounts: Any
    jti: Any
    models: Any
    requests: Any
    approvals: Any
    buckets: Any
    alerts: Any
    egress: Any
    networks: Any
    streams: Any
    downloads: Any


def _tables(md: Any) -> _Tables:
    import sqlalchemy as sa

    C = sa.Column
    return _Tables(
        sa.Table("ww_accounts", md, C("id", sa.String(128), primary_key=True), C("kind", sa.String(16)),
                 C("public_key", sa.LargeBinary(32)), C("key_id", sa.String(80)), C("roles", sa.Text),
                 C("teams", sa.Text), C("suspended", sa.Boolean, default=False), C("revoked_before", sa.BigInteger,
                 default=0)),
        sa.Table("ww_seen_tokens", md, C("jti", sa.String(200), primary_key=True), C("exp", sa.BigInteger,
                 index=True)),
        sa.Table("ww_models", md, C("name", sa.String(128), primary_key=True), C("team", sa.String(128)),
                 C("size", sa.BigInteger), C("detail", sa.Text)),
        sa.Table("ww_requests", md, C("id", sa.String(40), primary_key=True), C("requester", sa.String(128)),
                 C("model", sa.String(128)), C("action", sa.String(40)), C("created", sa.BigInteger),
                 C("expires", sa.BigInteger), C("status", sa.String(16)), C("reason", sa.Text),
                 C("recipient", sa.String(256)), C("country", sa.String(2)), C("gate", sa.Text),
                 C("artifact", sa.String(160))),
        sa.Table("ww_approvals", md, C("request_id", sa.String(40), primary_key=True),
                 C("approver", sa.String(128), primary_key=True), C("signature", sa.LargeBinary),
                 C("at", sa.BigInteger)),
        sa.Table("ww_buckets", md, C("key", sa.String(200), primary_key=True), C("tokens", sa.Float),
                 C("updated", sa.Float)),
        sa.Table("ww_alerts", md, C("id", sa.Integer, primary_key=True, autoincrement=True), C("at", sa.BigInteger),
                 C("principal", sa.String(128)), C("kind", sa.String(40)), C("detail", sa.Text)),
        sa.Table("ww_egress", md, C("id", sa.Integer, primary_key=True, autoincrement=True),
                 C("principal", sa.String(128), index=True), C("model", sa.String(128)), C("at", sa.BigInteger),
                 C("bytes", sa.BigInteger)),
        sa.Table("ww_networks", md, C("principal", sa.String(128), primary_key=True),
                 C("network", sa.String(64), primary_key=True)),
        # running streams, registered at start with the bytes they may send (finished ones: ww_egress)
        sa.Table("ww_streams", md, C("id", sa.String(32), primary_key=True), C("principal", sa.String(128),
                 index=True), C("model", sa.String(128)), C("at", sa.BigInteger), C("bytes", sa.BigInteger)),
        # per download (principal, object, ETag): bytes charged and bytes sent; a resume is free for at
        # most charged - sent (what was paid for and not sent), anything else is charged again
        sa.Table("ww_downloads", md, C("download", sa.String(300), primary_key=True), C("charged", sa.BigInteger),
                 C("sent", sa.BigInteger), C("at", sa.BigInteger)),
    )  # fmt: skip


def _ts(now: datetime | None) -> float:
    return (now or datetime.now(UTC)).timestamp()


class BrokerState:
    """What the parts of the broker (accounts, catalog, approvals, egress, anomaly rules, streaming)
    share; :class:`~.service.Broker` composes the parts and sets these."""

    url: str
    store: WeightStore
    config: BrokerConfig
    policy: Policy
    gate: Any
    engine: Any
    t: _Tables
    _decisions: Any
    _jti_inserts: int
    _finishes: int

    def _write(self) -> Any:
        """``with self._write() as c``: one write transaction (:func:`weightwarden.db.write`)."""
        raise NotImplementedError

    def audit(self, action: AuditAction, outcome: str, actor: str, subject: str | None = None, *,
              reason: str = "", now: datetime | None = None, **detail: Any) -> int:  # fmt: skip
        raise NotImplementedError

    # -- what one part calls of another (the composed Broker has them all) -----------------------
    def authorize(self, p: Principal, perm: Permission, model: str | None = None, *, team: str | None = None,
                  context: dict[str, Any] | None = None, now: datetime | None = None,
                  hide: bool = False) -> Decision:  # fmt: skip
        """:class:`~.accounts.Accounts`."""
        raise NotImplementedError

    def _account(self, account: str) -> Any:
        """:class:`~.accounts.Accounts`."""
        raise NotImplementedError

    def suspend(self, account: str, *, actor: str, reason: str, now: datetime | None = None) -> None:
        """:class:`~.accounts.Accounts`."""
        raise NotImplementedError

    def model(self, name: str) -> dict[str, Any]:
        """:class:`~.catalog.Catalog`."""
        raise NotImplementedError

    def request(self, rid: str, *, now: datetime | None = None) -> dict[str, Any]:
        """:class:`~.approvals.Approvals`."""
        raise NotImplementedError

    def _admit(self, p: Principal, model: str, nbytes: int, network: str | None, now: datetime | None) -> str:
        """:class:`~.anomaly.AnomalyRules`."""
        raise NotImplementedError

    def _is_suspended(self, account: str) -> bool:
        """:class:`~.anomaly.AnomalyRules`."""
        raise NotImplementedError

    def alert(self, account: str, kind: str, detail: dict[str, Any], *, now: datetime | None = None) -> None:
        """:class:`~.anomaly.AnomalyRules`."""
        raise NotImplementedError

    def _volume_exceeded(self, sid: str, p: Principal, sent: int, now: datetime | None) -> int | None:
        """:class:`~.anomaly.AnomalyRules`."""
        raise NotImplementedError

    def _volume_cut(self, p: Principal, model: str, sent: int, vol: int, now: datetime | None) -> None:
        """:class:`~.anomaly.AnomalyRules`."""
        raise NotImplementedError

    def _take(self, keys: list[tuple[str, Limit]], n: int, now: datetime | None) -> str | None:
        """:class:`~.egress.Egress`."""
        raise NotImplementedError

    def _refund(self, keys: list[tuple[str, Limit]], n: int, now: datetime | None) -> None:
        """:class:`~.egress.Egress`."""
        raise NotImplementedError

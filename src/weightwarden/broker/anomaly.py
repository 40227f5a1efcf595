"""Anomaly rules (volume, time of day, many models, new network), their alerts and suspensions."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from typing import Any

from ..audit import AuditAction
from .errors import Forbidden
from .policy import Principal
from .schema import BrokerState, _ts

__all__ = ["AnomalyRules"]


class AnomalyRules(BrokerState):
    """Admitting a stream against the anomaly rules; alerts; the volume rule during a stream."""

    def _admit(self, p: Principal, model: str, nbytes: int, network: str | None, now: datetime | None) -> str:
        """Run the anomaly rules and register the stream, in one transaction serialised per principal
        (its account row locked; SQLite: BEGIN IMMEDIATE), so every rule sees the principal's running
        streams (bytes reserved) as well as its finished ones, and parallel fetches are judged as serial
        ones.  Returns the stream's id; raises :class:`Forbidden` (audited) when the principal is
        suspended or an ``auto_suspend`` rule fires (the stream is then not registered)."""
        import sqlalchemy as sa

        t = int(_ts(now))
        hour = datetime.fromtimestamp(t, UTC).hour
        found: list[tuple[str, dict[str, Any]]] = []
        lo, hi = self.config.allowed_hours_utc
        if not lo <= hour < hi:
            found.append(("time-of-day", {"hour": hour}))
        e, s, a, nw = self.t.egress, self.t.streams, self.t.accounts, self.t.networks
        sid = secrets.token_hex(16)
        suspend = already = False
        with self._write() as c:
            acct = c.execute(sa.select(a.c.suspended).where(a.c.id == p.id).with_for_update()).first()
            if acct is None or acct.suspended:
                already = True
            else:
                vol = 0
                models: set[str] = set()
                for tb in (e, s):
                    vol += c.execute(sa.select(sa.func.coalesce(sa.func.sum(tb.c.bytes), 0))
                                     .where(tb.c.principal == p.id, tb.c.at > t - 3600)).scalar_one()  # fmt: skip
                    models |= set(c.execute(sa.select(tb.c.model).where(tb.c.principal == p.id, tb.c.at > t - 3600))
                                  .scalars())  # fmt: skip
                if vol + nbytes > self.config.volume_bytes_per_hour:  # the new stream's own size counts too
                    found.append(("volume", {"bytes_last_hour": int(vol), "stream": nbytes}))
                if len(models | {model}) > self.config.max_models_per_hour:
                    found.append(("many-models", {"models_last_hour": len(models | {model})}))
                if network is not None:  # the first network an account uses is its own; any later new one alerts
                    known = {r for r in c.execute(sa.select(nw.c.network).where(nw.c.principal == p.id)).scalars()}
                    if network[:64] not in known:
                        c.execute(sa.insert(nw).values(principal=p.id, network=network[:64]))
                        if known:
                            found.append(("new-network", {"network": network[:64]}))
                for kind, detail in found:
                    c.execute(sa.insert(self.t.alerts).values(at=t, principal=p.id, kind=kind,
                                                              detail=json.dumps(detail)))  # fmt: skip
                suspend = any(k in self.config.auto_suspend for k, _ in found)
                if suspend:
                    c.execute(sa.update(a).where(a.c.id == p.id).values(suspended=True))
                else:
                    c.execute(sa.insert(s).values(id=sid, principal=p.id, model=model, at=t, bytes=nbytes))
        if already:
            self.audit(AuditAction.BROKER_STREAM, "denied", p.id, model, now=now, phase="refused",
                       reason="account suspended")  # fmt: skip
            raise Forbidden("account suspended")
        for kind, detail in found:
            self.audit(AuditAction.BROKER_ALERT, "ok", "broker", p.id, now=now, kind=kind, **detail)
        if suspend:
            reason = "anomaly: " + ",".join(k for k, _ in found)
            self.audit(AuditAction.BROKER_SUSPEND, "ok", "broker", p.id, reason=reason, now=now)
            raise Forbidden("suspended by an anomaly rule")
        return sid

    def _is_suspended(self, account: str) -> bool:
        import sqlalchemy as sa

        with self.engine.connect() as c:
            r = c.execute(sa.select(self.t.accounts.c.suspended).where(self.t.accounts.c.id == account)).first()
        return r is None or bool(r.suspended)

    def alert(self, account: str, kind: str, detail: dict[str, Any], *, now: datetime | None = None) -> None:
        import sqlalchemy as sa

        with self._write() as c:
            c.execute(sa.insert(self.t.alerts).values(at=int(_ts(now)), principal=account, kind=kind,
                                                      detail=json.dumps(detail)))  # fmt: skip
        self.audit(AuditAction.BROKER_ALERT, "ok", "broker", account, now=now, kind=kind, **detail)

    def alerts(self) -> list[dict[str, Any]]:
        import sqlalchemy as sa

        with self.engine.connect() as c:
            rows = c.execute(sa.select(self.t.alerts).order_by(self.t.alerts.c.id)).all()
        return [{"id": r.id, "at": r.at, "principal": r.principal, "kind": r.kind, "detail": json.loads(r.detail)}
                for r in rows]  # fmt: skip

    def _volume_exceeded(self, sid: str, p: Principal, sent: int, now: datetime | None) -> int | None:
        """The volume rule re-checked during a stream: bytes sent in the last hour by the principal's
        finished streams, plus those its other running streams may send, plus what this one has sent;
        the total when it is over ``volume_bytes_per_hour``, else None."""
        import sqlalchemy as sa

        t = int(_ts(now))
        e, s = self.t.egress, self.t.streams
        with self.engine.connect() as c:
            vol = int(c.execute(sa.select(sa.func.coalesce(sa.func.sum(e.c.bytes), 0))
                                .where(e.c.principal == p.id, e.c.at > t - 3600)).scalar_one())  # fmt: skip
            others = sa.select(sa.func.coalesce(sa.func.sum(s.c.bytes), 0)).where(
                s.c.principal == p.id, s.c.id != sid, s.c.at > t - 3600)
            vol += int(c.execute(others).scalar_one())
        vol += sent
        return vol if vol > self.config.volume_bytes_per_hour else None

    def _volume_cut(self, p: Principal, model: str, sent: int, vol: int, now: datetime | None) -> None:
        """The volume rule fired during a stream: alert, suspend if the rule is in ``auto_suspend``."""
        self.alert(p.id, "volume", {"bytes_last_hour": vol, "model": model}, now=now)
        if "volume" in self.config.auto_suspend:
            self.suspend(p.id, actor="broker", reason="anomaly: volume", now=now)
        self.audit(AuditAction.BROKER_STREAM, "denied", p.id, model, now=now, phase="cut", bytes=sent,
                   reason="hourly volume exceeded")  # fmt: skip

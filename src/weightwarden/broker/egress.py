"""Egress limits: token buckets (per principal, per model, global) debited atomically across replicas."""

from __future__ import annotations

from datetime import datetime

from .config import Limit
from .schema import BrokerState, _ts

__all__ = ["Egress"]


class Egress(BrokerState):
    """Debiting and refunding the token buckets."""

    def _take(self, keys: list[tuple[str, Limit]], n: int, now: datetime | None) -> str | None:
        """Debit ``n`` bytes from every bucket atomically; the name of the first short bucket, or None."""
        import sqlalchemy as sa

        t = _ts(now)
        b = self.t.buckets
        for attempt in range(3):
            try:
                with self._write() as c:
                    rows = {r.key: r for r in c.execute(sa.select(b).where(b.c.key.in_([k for k, _ in keys]))
                                                        .with_for_update())}  # fmt: skip
                    new = {}
                    for k, lim in keys:
                        r = rows.get(k)
                        tokens = (
                            lim.burst if r is None else min(lim.burst, r.tokens + lim.rate * max(0.0, t - r.updated))
                        )
                        if tokens < n:
                            return k
                        new[k] = tokens - n
                    for k, _ in keys:
                        if k in rows:
                            c.execute(sa.update(b).where(b.c.key == k).values(tokens=new[k], updated=t))
                        else:
                            c.execute(sa.insert(b).values(key=k, tokens=new[k], updated=t))
                return None
            except sa.exc.IntegrityError:  # another replica created the bucket first: retry on its row
                if attempt == 2:
                    raise
        return None
    def _refund(self, keys: list[tuple[str, Limit]], n: int, now: datetime | None) -> None:
        import sqlalchemy as sa

        b = self.t.buckets
        t = _ts(now)
        with self._write() as c:
            for k, lim in keys:
                r = c.execute(sa.select(b).where(b.c.key == k).with_for_update()).first()
                if r is not None:
                    tokens = min(lim.burst, r.tokens + lim.rate * max(0.0, t - r.updated) + n)
                    c.execute(sa.update(b).where(b.c.key == k).values(tokens=tokens, updated=t))

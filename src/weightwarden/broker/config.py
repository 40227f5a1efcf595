"""The broker's settings: egress limits (token buckets), the two-person rule, anomaly rules, streaming."""

from __future__ import annotations

from dataclasses import dataclass

from .storage import CHUNK

__all__ = ["BrokerConfig", "Limit"]


@dataclass(frozen=True)
class Limit:
    rate: float  # bytes per second refilled
    burst: float  # bucket size in bytes


@dataclass(frozen=True)
class BrokerConfig:
    audience: str = "weightwarden-broker"
    approvals_needed: int = 2
    approval_window_s: int = 3600
    per_principal: Limit = Limit(rate=50e6, burst=20e9)
    per_model: Limit = Limit(rate=100e6, burst=50e9)
    global_: Limit = Limit(rate=200e6, burst=100e9)
    # anomaly rules: each raises an alert; those in auto_suspend also suspend the principal
    volume_bytes_per_hour: float = 50e9
    allowed_hours_utc: tuple[int, int] = (0, 24)
    max_models_per_hour: int = 5
    auto_suspend: frozenset[str] = frozenset({"volume", "many-models"})
    chunk: int = 4 * CHUNK  # bytes read and sent at a time
    lease: int = 64 * CHUNK  # bytes reserved from the buckets per database transaction
    # a ranged request (a resumed download) is not charged again, within this window, for bytes of the
    # same file (ETag) that the same principal paid for and was not sent (a cut stream's reserved tail)
    resume_window_s: int = 24 * 3600
    zero_copy_span: int = 16 * CHUNK  # bytes metered (and checked for suspension) at a time on the sendfile path
    # meter the next span (debit it, check the principal's suspension) while the current one goes out, so the
    # socket does not run dry at each span's bookkeeping; a suspension then cuts a zero-copy stream within two
    # spans rather than one (False: one, and a pause at every span)
    zero_copy_ahead: bool = True

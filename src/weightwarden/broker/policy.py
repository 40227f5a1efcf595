"""Authorization: permissions named ``scope:resource:action``, roles, and Cedar policies.

Decisions are made by the Cedar policy engine (``cedarpy``, the Rust engine), deny by default:
nothing is allowed unless a ``permit`` matches and no ``forbid`` does.  The shipped policy
(``policies.cedar`` beside this file) gives each role its permissions; a deployment may pass
its own policy text.  Principals carry their roles as Cedar parents (``Role::"releaser"``) and
their teams as an attribute; a model belongs to one team, and every model permission requires
the principal to be on that team (least privilege).  Suspension is a ``forbid`` over everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources
from typing import Any

from .._extras import require

__all__ = ["ROLES", "Decision", "Permission", "Policy", "Principal"]


class Permission(StrEnum):
    MODEL_METADATA_READ = "model:metadata:read"
    MODEL_WEIGHTS_STREAM = "model:weights:stream"  # sealed bytes to a registered workload
    MODEL_WEIGHTS_COPY = "model:weights:copy"  # a full copy: two-person approval
    RELEASE_COPY_CREATE = "release:copy:create"  # a fingerprinted release: two-person approval
    APPROVAL_REQUEST_APPROVE = "approval:request:approve"
    CUSTODY_KEY_UNSEAL = "custody:key:unseal"
    AUDIT_LOG_READ = "audit:log:read"
    ALERT_PRINCIPAL_SUSPEND = "alert:principal:suspend"


ROLES = ("reader", "inference-loader", "releaser", "approver", "custodian", "auditor")
# Permissions that act on a model (the resource is the model); the others act on the organisation.
MODEL_PERMISSIONS = frozenset(
    {
        Permission.MODEL_METADATA_READ,
        Permission.MODEL_WEIGHTS_STREAM,
        Permission.MODEL_WEIGHTS_COPY,
        Permission.RELEASE_COPY_CREATE,
        Permission.APPROVAL_REQUEST_APPROVE,
    }
)


@dataclass(frozen=True)
class Principal:
    id: str
    kind: str  # "service" | "workload" | "human"
    roles: frozenset[str] = frozenset()
    teams: frozenset[str] = frozenset()
    suspended: bool = False


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reasons: tuple[str, ...] = ()  # ids of the policies that decided
    errors: tuple[str, ...] = ()


@dataclass
class Policy:
    """A Cedar policy set, parsed once."""

    text: str = field(default_factory=lambda: resources.files(__package__).joinpath("policies.cedar").read_text())

    def __post_init__(self) -> None:
        cedarpy = require("cedarpy", extra="server")

        self._set = cedarpy.PolicySet.from_str(self.text)
        self._cache: dict[tuple[Principal, str | None, str | None], Any] = {}

    def _entities(self, p: Principal, model: str | None, team: str | None) -> Any:
        """The entity graph of one decision, parsed once per distinct (principal, model, team)."""
        import json

        cedarpy = require("cedarpy", extra="server")

        key = (p, model, team)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        ents: list[dict[str, Any]] = [
            {"uid": {"type": "Principal", "id": p.id}, "parents": [{"type": "Role", "id": r} for r in sorted(p.roles)],
             "attrs": {"kind": p.kind, "suspended": p.suspended,
                       "teams": [{"__entity": {"type": "Team", "id": t}} for t in sorted(p.teams)]}},
        ]  # fmt: skip
        ents += [{"uid": {"type": "Role", "id": r}, "parents": [], "attrs": {}} for r in sorted(p.roles)]
        if model is not None and team is not None:
            ents.append({"uid": {"type": "Model", "id": model}, "parents": [],
                         "attrs": {"team": {"__entity": {"type": "Team", "id": team}}}})  # fmt: skip
        ents.append({"uid": {"type": "Org", "id": "org"}, "parents": [], "attrs": {}})
        parsed = cedarpy.Entities.from_json_str(json.dumps(ents))
        if len(self._cache) >= 4096:
            self._cache.clear()
        self._cache[key] = parsed
        return parsed

    def decide(self, p: Principal, perm: Permission, model: str | None = None, team: str | None = None,
               context: dict[str, Any] | None = None) -> Decision:  # fmt: skip
        """Is ``p`` allowed ``perm`` on ``model`` (of ``team``), given ``context``?  Deny by default."""
        cedarpy = require("cedarpy", extra="server")

        if perm in MODEL_PERMISSIONS:
            if model is None or team is None:
                return Decision(False, errors=("a model permission needs the model and its team",))
            res = {"type": "Model", "id": model}
        else:
            res = {"type": "Org", "id": "org"}
        ctx = {"approved": False, "workload": p.kind == "workload", **(context or {})}
        req = {"principal": {"type": "Principal", "id": p.id}, "action": {"type": "Action", "id": str(perm)},
               "resource": res, "context": ctx}  # fmt: skip
        r = cedarpy.is_authorized(req, self._set, self._entities(p, model, team))
        allowed = r.decision == cedarpy.Decision.Allow
        diag = r.diagnostics
        return Decision(allowed, tuple(diag.reasons), tuple(str(e) for e in diag.errors))

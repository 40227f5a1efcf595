"""The models a broker serves: admitted sealed files, their team, size and classification."""

from __future__ import annotations

import json
from typing import Any

from ..audit import AuditAction
from .errors import NotFound
from .policy import Permission, Principal
from .schema import BrokerState
from .storage import check_name

__all__ = ["Catalog"]


class Catalog(BrokerState):
    """Admitting sealed files and listing them (what a principal may see)."""

    def add_model(self, name: str, team: str, path: Any, *, trust: Any = None, actor: str = "admin",
                  classification: Any = None) -> int:  # fmt: skip
        """Admit a sealed file: its structure and chunk digests are checked (and its signature against
        ``trust``, a TrustStore, when given); plaintext is refused.  ``classification`` (a
        :class:`~weightwarden.release.classify.Classification`) is what the export-control gate decides
        releases of this model on; without one, every release of it needs review."""
        import sqlalchemy as sa

        from ..sealed.reader import SealedFile

        check_name(name)
        with SealedFile(path) as sf:
            sf.verify_digests()
            signer = sf.check_signature(trust) if trust is not None else None
            detail = {"signer_public_key": sf.public_key.hex(), "trusted_signer": signer,
                      "file_id": sf.context.file_id.hex()}  # fmt: skip
        if classification is not None:
            detail["classification"] = classification.to_json()
        size = self.store.put(name, path)
        with self._write() as c:
            c.execute(sa.delete(self.t.models).where(self.t.models.c.name == name))
            c.execute(sa.insert(self.t.models).values(name=name, team=team, size=size, detail=json.dumps(detail)))
        cls = {}
        if classification is not None:  # issue 17: figures entered by this account are audited with their source
            comp = classification.compute
            cls = {"compute_flop": comp.flop if comp else None, "compute_method": comp.method if comp else None,
                   "compute_source": classification.source, "doubts": list(classification.doubts)}  # fmt: skip
        self.audit(AuditAction.BROKER_MODEL_ADD, "ok", actor, name, team=team, bytes=size, **cls)
        return size

    def model(self, name: str) -> dict[str, Any]:
        import sqlalchemy as sa

        check_name(name)
        with self.engine.connect() as c:
            r = c.execute(sa.select(self.t.models).where(self.t.models.c.name == name)).first()
        if r is None:
            raise NotFound(f"no model {name!r}")
        return {"name": r.name, "team": r.team, "size": int(r.size), "detail": json.loads(r.detail or "{}")}

    def models(self, p: Principal) -> list[dict[str, Any]]:
        import sqlalchemy as sa

        with self.engine.connect() as c:
            rows = c.execute(sa.select(self.t.models).order_by(self.t.models.c.name)).all()
        out = []
        for r in rows:
            if self.policy.decide(p, Permission.MODEL_METADATA_READ, r.name, r.team).allowed:
                out.append({"name": r.name, "team": r.team, "size": int(r.size)})
        return out

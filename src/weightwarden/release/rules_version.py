"""Rules cannot be rolled back (issue 17): once a signed rules file of some version has been used, an
older one is refused, even though its signature verifies.

A rules file's ``version`` must be ``YYYY-MM-DD.N`` (``^\\d{4}-\\d{2}-\\d{2}\\.\\d+$``) where versions are
remembered, and is compared as its numbers (``2026-11-28.1`` -> 2026, 11, 28, 1); anything else
(``2026-12-1.2``, ``v2026-12-01.2-rc0``) is refused, so one version has one spelling.  The SHA-256 of
each version's file is remembered with it: the same version with other bytes is refused
(:class:`RulesReplaced`; issue 17 red team).  The highest version used is remembered in the
home (``release/rules-version.json``, replaced atomically) for ``warden release``, and in the broker's
database (tables ``ww_rules_version`` and ``ww_rules_digest``) for the broker, whichever is used.
The signature check itself stays in :mod:`.rules`.
"""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .rules import RulesError

__all__ = ["RulesReplaced", "RulesRollback", "check_database", "check_home", "version_key"]


class RulesRollback(RulesError):
    """A rules file older than one already used here."""


class RulesReplaced(RulesError):
    """A rules file whose version was already used here with other bytes."""


_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}\.\d+")


def version_key(version: str) -> tuple[int, ...]:
    nums = tuple(int(n) for n in re.findall(r"\d+", version or ""))
    if not nums:
        raise RulesError(f"rules version {version[:40]!r} has no number: versions are compared as numbers "
                         "(use YYYY-MM-DD.N)")  # fmt: skip
    if not _VERSION.fullmatch(version):
        raise RulesError(f"rules version {version[:40]!r} is not of the form YYYY-MM-DD.N (e.g. 2026-12-01.2): "
                         "give the rules file such a version")  # fmt: skip
    return nums


def _replaced(rules: Any, sha: str, where: str) -> RulesReplaced:
    return RulesReplaced(f"rules version {rules.version!r} was already used {where} with other contents (sha256 "
                         f"{sha[:16]}..., this file {rules.sha256[:16]}...): a changed rules file needs a new "
                         "version")  # fmt: skip


def _refuse(rules: Any, seen: str, where: str) -> RulesRollback:
    return RulesRollback(f"rules version {rules.version!r} is older than version {seen!r} already used {where}: "
                         "a rules file cannot be rolled back (install the newer file, or one with a higher version)")


def check_home(home: str | os.PathLike[str], rules: Any) -> None:
    """Refuse ``rules`` if a newer version was used under ``home``; remember it if it is the newest."""
    from .._atomic import atomic_write_bytes

    f = Path(home) / "release" / "rules-version.json"
    key = version_key(rules.version)
    seen, rec = None, None
    if f.exists():
        try:
            rec = json.loads(f.read_text())
            seen = rec["version"]
            old = version_key(seen)
            digests = dict(rec.get("sha256s") or {})
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RulesError):
            raise RulesError(f"{f} is unreadable: remove it only if you know which rules were in use") from None
        if key < old:
            raise _refuse(rules, seen, "in this home")
        known = digests.get(rules.version)
        if known and rules.sha256 and known != rules.sha256:
            raise _replaced(rules, known, "in this home")
        if key == old and (known or not rules.sha256):
            return
    f.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    digests = dict((rec or {}).get("sha256s") or {})
    if rules.sha256:
        digests[rules.version] = rules.sha256
    new = {"version": rules.version, "signed_by": rules.signed_by,
           "first_used": datetime.now(UTC).isoformat(timespec="seconds"), "sha256s": digests}  # fmt: skip
    if rec is not None and key == version_key(str(rec["version"])):
        new["first_used"] = rec.get("first_used", new["first_used"])
    atomic_write_bytes(f, json.dumps(new).encode() + b"\n", force=True)


def check_database(engine: Any, rules: Any) -> None:
    """As :func:`check_home`, in the broker's database (one row, updated in one transaction)."""
    import sqlalchemy as sa

    md = sa.MetaData()
    C = sa.Column
    t = sa.Table("ww_rules_version", md, C("id", sa.String(16), primary_key=True), C("version", sa.Text),
                 C("signed_by", sa.String(80)), C("at", sa.Text))  # fmt: skip
    dg = sa.Table("ww_rules_digest", md, C("version", sa.String(64), primary_key=True), C("sha256", sa.String(64)))
    md.create_all(engine)
    key = version_key(rules.version)
    with engine.begin() as c:
        row = c.execute(sa.select(t).where(t.c.id == "highest").with_for_update()).first()
        if row is not None and key < version_key(row.version):
            raise _refuse(rules, row.version, "by this broker")
        if rules.sha256:
            known = c.execute(sa.select(dg.c.sha256).where(dg.c.version == rules.version)).scalar()
            if known is None:
                c.execute(sa.insert(dg).values(version=rules.version, sha256=rules.sha256))
            elif known != rules.sha256:
                raise _replaced(rules, known, "by this broker")
        if row is not None:
            if key == version_key(row.version):
                return
            c.execute(sa.delete(t).where(t.c.id == "highest"))
        c.execute(sa.insert(t).values(id="highest", version=rules.version, signed_by=rules.signed_by,
                                      at=datetime.now(UTC).isoformat(timespec="seconds")))  # fmt: skip

"""Rules cannot be rolled back (issue 17): once a signed rules file of some version has been used, an
older one is refused, even though its signature verifies.

A rules file's ``version`` is compared as the sequence of the numbers in it (``2026-11-28.1`` ->
2026, 11, 28, 1; more numbers after equal ones is newer); a version without a number cannot be
ordered and is refused where versions are remembered.  The highest version used is remembered in the
home (``release/rules-version.json``, replaced atomically) for ``warden release``, and in the broker's
database (table ``ww_rules_version``) for the broker, whichever is used.  The signature check itself
stays in :mod:`.rules`.
"""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .rules import RulesError

__all__ = ["RulesRollback", "check_database", "check_home", "version_key"]


class RulesRollback(RulesError):
    """A rules file older than one already used here."""


def version_key(version: str) -> tuple[int, ...]:
    nums = tuple(int(n) for n in re.findall(r"\d+", version or ""))
    if not nums:
        raise RulesError(f"rules version {version[:40]!r} has no number: versions are compared as numbers "
                         "(use YYYY-MM-DD.N)")  # fmt: skip
    return nums


def _refuse(rules: Any, seen: str, where: str) -> RulesRollback:
    return RulesRollback(f"rules version {rules.version!r} is older than version {seen!r} already used {where}: "
                         "a rules file cannot be rolled back (install the newer file, or one with a higher version)")


def check_home(home: str | os.PathLike[str], rules: Any) -> None:
    """Refuse ``rules`` if a newer version was used under ``home``; remember it if it is the newest."""
    from .._atomic import atomic_write_bytes

    f = Path(home) / "release" / "rules-version.json"
    key = version_key(rules.version)
    seen = None
    if f.exists():
        try:
            seen = json.loads(f.read_text())["version"]
            old = version_key(seen)
        except (OSError, ValueError, KeyError, TypeError):
            raise RulesError(f"{f} is unreadable: remove it only if you know which rules were in use") from None
        if key < old:
            raise _refuse(rules, seen, "in this home")
        if key == old:
            return
    f.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    rec = {"version": rules.version, "signed_by": rules.signed_by,
           "first_used": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
    atomic_write_bytes(f, json.dumps(rec).encode() + b"\n", force=True)


def check_database(engine: Any, rules: Any) -> None:
    """As :func:`check_home`, in the broker's database (one row, updated in one transaction)."""
    import sqlalchemy as sa

    md = sa.MetaData()
    C = sa.Column
    t = sa.Table("ww_rules_version", md, C("id", sa.String(16), primary_key=True), C("version", sa.Text),
                 C("signed_by", sa.String(80)), C("at", sa.Text))  # fmt: skip
    md.create_all(engine)
    key = version_key(rules.version)
    with engine.begin() as c:
        row = c.execute(sa.select(t).where(t.c.id == "highest").with_for_update()).first()
        if row is not None:
            if key < version_key(row.version):
                raise _refuse(rules, row.version, "by this broker")
            if key == version_key(row.version):
                return
            c.execute(sa.delete(t).where(t.c.id == "highest"))
        c.execute(sa.insert(t).values(id="highest", version=rules.version, signed_by=rules.signed_by,
                                      at=datetime.now(UTC).isoformat(timespec="seconds")))  # fmt: skip

"""Database engines, pragmas and write transactions, in one place.

Every SQL database weightwarden keeps (the broker's state, the Merkle audit log, the trace store's
releases) is opened here: SQLite is the embedded default, PostgreSQL the one several processes or
replicas share.

- :func:`create_engine`: a SQLAlchemy engine for a URL.  On SQLite: a 30-second busy timeout, a
  write-ahead log, the ``synchronous`` level asked for (``FULL`` fsyncs every commit; the broker's own
  state uses ``NORMAL``) and SQLAlchemy's implicit transactions off, so that :func:`write` can take
  the write lock itself.
- :func:`write`: ``with write(engine) as c:`` one write transaction, committed when the block ends and
  rolled back when it raises.  On SQLite it starts with ``BEGIN IMMEDIATE`` (two writers serialise on
  the lock instead of failing on upgrade); on PostgreSQL it is a plain transaction, and writers
  serialise on the rows they lock (``SELECT ... FOR UPDATE``).  Reads use ``engine.connect()`` as usual
  (SQLite: a plain ``BEGIN``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["WRITE_OPTION", "create_engine", "is_sqlite", "sqlite_pragmas", "write"]

#: the execution option that marks a connection's transaction as a write (SQLite: BEGIN IMMEDIATE)
WRITE_OPTION = "ww_write"
BUSY_TIMEOUT_S = 30


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def create_engine(url: str, *, synchronous: str = "FULL", threads: bool = True) -> Any:
    """A SQLAlchemy engine for ``url`` with this project's pragmas (see the module's notes).

    ``threads``: SQLite connections may be used from other threads than the one that opened them (a
    server's worker threads, the audit log's writer thread).  Raises what ``sqlalchemy.create_engine``
    raises (``ArgumentError`` for a bad URL, ``ImportError`` for a missing driver)."""
    import sqlalchemy as sa

    kw: dict[str, Any] = {}
    if is_sqlite(url):
        args: dict[str, Any] = {"timeout": BUSY_TIMEOUT_S}
        if threads:
            args["check_same_thread"] = False
        kw["connect_args"] = args
    engine = sa.create_engine(url, **kw)
    if is_sqlite(url):
        sqlite_pragmas(engine, synchronous)
    return engine


def sqlite_pragmas(engine: Any, synchronous: str = "FULL") -> None:
    """SQLite: take the write lock at BEGIN for a :func:`write` transaction (so two writers serialise
    instead of failing) and keep a write-ahead log (``synchronous``: FULL fsyncs every commit)."""
    from sqlalchemy import event

    if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ValueError(f"synchronous is OFF, NORMAL, FULL or EXTRA, not {synchronous!r}")

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _rec: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION) else "BEGIN")


@contextlib.contextmanager
def write(engine: Any) -> Iterator[Any]:
    """``with write(engine) as c:`` one write transaction on a connection of its own (BEGIN IMMEDIATE on
    SQLite): committed at the end of the block, rolled back if it raises; the connection is closed."""
    with engine.connect() as c, c.execution_options(**{WRITE_OPTION: True}).begin():
        yield c

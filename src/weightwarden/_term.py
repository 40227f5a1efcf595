"""Terminal-safe text: what comes from a file, a request or a list is shown, never obeyed.

:func:`safe` is the one escaping helper; the CLI's consoles (:class:`SafeConsole`) and tables
(:class:`SafeTable`) apply it to every string they print, and its error lines go through it too.
Control characters (C0, DEL, C1: ESC, newline, carriage return, backspace ...) are shown as
``\\x1b``-style escapes, bidirectional and other format or separator characters (U+202E, U+2066,
U+200B, U+2028 ...) as ``\\u202e``, and a backslash as ``\\\\`` so that an escape shown is never
ambiguous.  Rich markup (``[green]...``) and emoji codes are never interpreted: the consoles are
created with ``markup=False, emoji=False, highlight=False``.  JSON output is left to ``json.dumps``
(ASCII, already escaped).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["SafeConsole", "SafeTable", "safe"]


def _esc(ch: str) -> str:
    o = ord(ch)
    if ch == "\\":
        return "\\\\"
    if o <= 0xFF:
        return f"\\x{o:02x}"
    return f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}"


def safe(x: object) -> str:
    """``x`` as text that cannot move the cursor, recolour, reorder or split a terminal line."""
    s = x if isinstance(x, str) else str(x)
    if s.isprintable() and "\\" not in s:
        return s  # the common case: one C-level scan
    return "".join(ch if (ch.isprintable() or ch == " ") and ch != "\\" else _esc(ch) for ch in s)


class SafeTable(Table):
    """A rich table whose string cells are escaped with :func:`safe` (headers are ours)."""

    def add_row(self, *renderables: Any, **kw: Any) -> None:
        super().add_row(*(safe(r) if isinstance(r, str) else r for r in renderables), **kw)


class SafeConsole(Console):
    """A rich console without markup, emoji or highlighting whose string arguments are escaped."""

    def __init__(self, **kw: Any):
        super().__init__(markup=False, emoji=False, highlight=False, **kw)

    def print(self, *objects: Any, **kw: Any) -> None:
        super().print(*(safe(o) if isinstance(o, str) else o for o in objects), **kw)

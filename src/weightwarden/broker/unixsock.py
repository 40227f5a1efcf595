"""The broker on a Unix domain socket (``warden serve --uds PATH``).

Where the client or a TLS-terminating proxy runs on the broker's own host, a Unix socket is the faster
door: a weight stream leaves by ``sendfile`` into the socket without a TCP stack (on a 2-core machine,
loopback TCP caps one stream near 1.4 GB/s; a Unix socket carries ~5 GB/s, see ``bench/broker.py``).
Authentication is unchanged: every request still carries a signed single-use token.  The socket
itself is one more gate: it is created with mode ``0o600`` (or the ``mode`` asked, never any bit for
others), bound under a umask that leaves no window in which another user could connect, and never
replaces anything that is not a stale socket of ours.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

from ..errors import WardenError

__all__ = ["UnixSocketError", "bind_unix"]


class UnixSocketError(WardenError):
    """The socket path cannot be used (taken, not a socket, too long, or a mode that opens it to others)."""


_MAX_PATH = 107  # sun_path is 108 bytes with the terminating NUL


def _stale(path: Path) -> bool:
    """True when ``path`` is a socket nobody listens on (left by a broker that died)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    else:
        return False
    finally:
        probe.close()


def bind_unix(path: str | os.PathLike[str], *, mode: int = 0o600, backlog: int = 2048) -> socket.socket:
    """A listening Unix stream socket at ``path`` with permissions ``mode`` (owner and group bits only).

    Refuses a path that exists and is not a socket (a planted file or link is never removed), a socket
    another process is listening on, and a mode with any bit for others."""
    p = Path(path)
    if mode & 0o007 or mode & ~0o777:
        raise UnixSocketError(f"--uds-mode {mode:o}: give owner and group bits only (e.g. 600 or 660)")
    if len(os.fsencode(p)) > _MAX_PATH:
        raise UnixSocketError(f"--uds {p}: a Unix socket path is at most {_MAX_PATH} bytes; choose a shorter one")
    try:  # a folder others may write without the sticky bit: they could move our socket away and put theirs
        d = os.stat(p.parent)  # there, and clients would hand their signed tokens to them
    except OSError as e:
        raise UnixSocketError(f"--uds {p}: its folder cannot be used ({e.strerror}); choose another path") from None
    if d.st_uid not in (0, os.geteuid()) or (d.st_mode & 0o022 and not d.st_mode & stat.S_ISVTX):
        raise UnixSocketError(f"--uds {p}: its folder is another user's or writable by others (mode "
                              f"{stat.S_IMODE(d.st_mode):o}); use a folder only you can write")  # fmt: skip
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise UnixSocketError(f"--uds {p}: exists and is not a socket; remove it or choose another path")
        if st.st_uid != os.geteuid():
            raise UnixSocketError(f"--uds {p}: a socket owned by uid {st.st_uid} is there; choose another path")
        if not _stale(p):
            raise UnixSocketError(f"--uds {p}: another process is listening there; stop it or choose another path")
        p.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)  # the socket is born with at most `mode`: no window for others
    try:
        sock.bind(str(p))
    except OSError as e:
        sock.close()
        hint = "it appeared meanwhile" if e.errno == errno.EADDRINUSE else e.strerror
        raise UnixSocketError(f"--uds {p}: cannot bind ({hint}); choose another path") from e
    finally:
        os.umask(old)
    # no chmod by path afterwards: the umask gave it `mode`, and a path can be swapped for a link meanwhile
    sock.listen(backlog)
    return sock

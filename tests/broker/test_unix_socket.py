"""The broker on a Unix socket (`warden serve --uds PATH`, issue 18's faster door).

The socket is one more gate in front of the signed tokens: born with mode 0600 (never a bit for others),
and binding never removes or follows anything that is not a stale socket of ours.  Streams over it go
out by sendfile and are metered exactly as on TCP."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import make_broker, serving
from weightwarden.broker.unixsock import UnixSocketError, bind_unix

pytest.importorskip("uvicorn", reason="the server extra")


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_the_socket_is_born_closed_to_others(tmp_path: Path) -> None:
    s = bind_unix(tmp_path / "b.sock")
    try:
        assert stat.S_ISSOCK(os.lstat(tmp_path / "b.sock").st_mode) and _mode(tmp_path / "b.sock") == 0o600
    finally:
        s.close()
    s = bind_unix(tmp_path / "g.sock", mode=0o660)
    s.close()
    assert _mode(tmp_path / "g.sock") == 0o660
    for bad in (0o666, 0o604, 0o1600):  # any bit for others, or beyond rwx: refused before anything is made
        with pytest.raises(UnixSocketError, match="owner and group bits"):
            bind_unix(tmp_path / "o.sock", mode=bad)
    assert not (tmp_path / "o.sock").exists()


def test_a_planted_file_or_link_is_never_replaced(tmp_path: Path) -> None:
    victim = tmp_path / "keyring.json"
    victim.write_text("secret")
    planted = tmp_path / "planted.sock"
    planted.write_text("x")
    with pytest.raises(UnixSocketError, match="not a socket"):
        bind_unix(planted)
    assert planted.read_text() == "x"
    link = tmp_path / "link.sock"
    link.symlink_to(victim)  # an attacker points the socket path at a file the broker can write
    with pytest.raises(UnixSocketError, match="not a socket"):
        bind_unix(link)
    assert link.is_symlink() and victim.read_text() == "secret"
    dangling = tmp_path / "dangling.sock"
    dangling.symlink_to(tmp_path / "elsewhere.sock")  # ... or at a path of its choosing
    with pytest.raises(UnixSocketError):
        bind_unix(dangling)
    assert not (tmp_path / "elsewhere.sock").exists()


def test_a_live_socket_is_not_taken_over_and_a_stale_one_is(tmp_path: Path) -> None:
    p = tmp_path / "b.sock"
    live = bind_unix(p)
    with pytest.raises(UnixSocketError, match="listening"):
        bind_unix(p)
    live.close()  # the process died: its socket file stays, nobody listens
    again = bind_unix(p)
    try:
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(p))
        c.close()
    finally:
        again.close()


def test_a_pull_over_the_unix_socket_is_zero_copy_metered_and_verified(tmp_path: Path, sealed: Path,
                                                                       keyring: Any) -> None:  # fmt: skip
    import httpx

    from weightwarden.broker.client import BrokerClient

    b, a = make_broker(f"sqlite:///{tmp_path / 'b.db'}", tmp_path, sealed)
    ld = a["loader"]
    out = tmp_path / "got.wws"
    with serving(b, tmp_path / "b.sock") as url:
        with BrokerClient(url, ld.name, ld.key) as c:
            c.pull("m1", out, trust=keyring.trust)
        # without a token the socket answers as TCP does: the socket is a gate in front of the tokens, not instead
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(tmp_path / "b.sock"))) as h:
            assert h.get("http://localhost/v1/models/m1/weights").status_code == 401
    assert out.read_bytes() == sealed.read_bytes()
    starts = [e["event"]["detail"] for e in b.log.export() if e["event"]["action"] == "broker:stream"
              and e["event"]["detail"]["phase"] == "start"]  # fmt: skip
    assert len(starts) == 1 and starts[0]["zero_copy"]
    b.close()


def test_a_unix_url_without_a_path_is_one_clear_error() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from weightwarden.broker.client import BrokerClient
    from weightwarden.errors import WardenError

    with pytest.raises(WardenError, match="unix:/path"):
        BrokerClient("unix:", "a", Ed25519PrivateKey.generate())


def test_attack_a_folder_others_may_write_is_refused(tmp_path: Path) -> None:
    """ATTACK: in a folder another user may write (without the sticky bit), they could rename the broker's
    socket away and bind their own in its place: clients would hand them their signed tokens.  Refused before
    anything is made; a sticky shared folder (/tmp's 1777) is accepted, as is one only we write."""
    for mode, ok in ((0o777, False), (0o775, False), (0o1777, True), (0o700, True)):
        d = tmp_path / f"d{mode:o}"
        d.mkdir()
        os.chmod(d, mode)
        if ok:
            bind_unix(d / "b.sock").close()
            continue
        with pytest.raises(UnixSocketError, match="writable by others"):
            bind_unix(d / "b.sock")
        assert not (d / "b.sock").exists()

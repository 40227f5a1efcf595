"""The custody agent as a process: the socket server (:func:`serve`, in the foreground), and
:func:`start` / :func:`stop` for a background agent (``python -m weightwarden.keys.agent``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .. import audit
from .._harden import minimal_env
from ..errors import CustodyError, ProviderUnavailableError, WardenError
from ..home import Home
from .agent_client import AgentClient
from .agent_server import DEFAULT_IDLE_SEAL, AgentState, Caller
from .custody import CustodyDoc

__all__ = ["MAX_LINE", "SOCKET", "AgentRequestHandler", "AgentServer", "main", "serve", "start", "stop"]

SOCKET = Home(Path()).agent_socket.name  # "agent.sock"; the path is Home(h).agent_socket
MAX_LINE = 1 << 20


class AgentRequestHandler(socketserver.StreamRequestHandler):
    server: AgentServer

    def handle(self) -> None:
        creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        line = self.rfile.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            self._reply({"error": "FormatError", "message": "request too large"})
            return
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError
        except ValueError:
            self._reply({"error": "FormatError", "message": "request is not a JSON object"})
            return
        try:
            with audit.context(actor=str(req.get("actor") or f"uid{uid}"), reason=str(req.get("reason") or "")):
                self._reply(self.server.state.handle(req, Caller(uid, pid)))
        except WardenError as e:
            self._reply({"error": type(e).__name__, "message": str(e)})
        except (KeyError, TypeError, ValueError) as e:
            self._reply({"error": "FormatError", "message": f"malformed request ({type(e).__name__})"})
        if self.server.state.stop.is_set():
            threading.Thread(target=self.server.shutdown, daemon=True).start()

    def _reply(self, obj: dict[str, Any]) -> None:
        self.wfile.write(json.dumps(obj).encode() + b"\n")


class AgentServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    state: AgentState


def serve(home: Path, idle_seal: float = DEFAULT_IDLE_SEAL) -> None:
    """Run the agent in the foreground until `shutdown` or SIGTERM.  First it makes itself
    non-dumpable, with no core file and its memory locked where the OS allows (notices to stderr)."""
    from .._harden import harden_process

    hard = harden_process(lock_memory=True)
    for n in hard["notices"]:
        sys.stderr.write(f"notice: {n}\n")
    sys.stderr.flush()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home, 0o700)
    path = Home(home).agent_socket
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old = os.umask(0o177)
    try:
        server = AgentServer(str(path), AgentRequestHandler)
    finally:
        os.umask(old)
    server.state = AgentState(home, idle_seal)
    server.state.hardening = {"core_limit": hard["core_limit"], "memory_locked": hard["memory_locked"],
                              "notices": hard["notices"]}  # fmt: skip

    def watch_idle() -> None:
        while not server.state.stop.wait(min(1.0, idle_seal / 4 if idle_seal else 1.0)):
            server.state.seal_if_idle()

    threading.Thread(target=watch_idle, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        server.state.stop.set()
        if server.state.keyring is not None:
            server.state.keyring.close()


def start(home: Path, *, idle_seal: float = DEFAULT_IDLE_SEAL, timeout: float = 15.0) -> int:
    """Start the agent in the background (a new session) with a minimal environment (no passphrase,
    no token: only paths, locale and user); returns its pid."""
    from ..trail import trail_env

    client = AgentClient(home)
    if client.running():
        raise CustodyError("the agent is already running")
    CustodyDoc.load(home)  # fail early, in the caller, if there is no custody record
    log = open(Home(home).agent_log, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "weightwarden.keys.agent", "--home", str(home), "--idle-seal", str(idle_seal)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
        env=minimal_env() | trail_env(),  # where its events go: the home's trail (no secret: a file's path)
        close_fds=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.running():
            Home(home).agent_pid.write_text(str(proc.pid))
            return proc.pid
        if proc.poll() is not None:
            raise ProviderUnavailableError(f"the agent exited at start; see {Home(home).agent_log}")
        time.sleep(0.05)
    proc.kill()
    raise ProviderUnavailableError("the agent did not start in time")


def stop(home: Path) -> None:
    AgentClient(home).call("shutdown")
    for _ in range(100):
        if not Home(home).agent_socket.exists():
            break
        time.sleep(0.05)
    with contextlib.suppress(FileNotFoundError):
        Home(home).agent_pid.unlink()


def main() -> None:  # pragma: no cover - run as a process by `start`
    ap = argparse.ArgumentParser(prog="weightwarden.keys.agent")
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--idle-seal", type=float, default=DEFAULT_IDLE_SEAL)
    a = ap.parse_args()
    serve(a.home, a.idle_seal)

"""The demo's plumbing: the hosts' environments, running `warden`, checks and their report."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console()
PARTNER = "Northwind Research Ltd"
LISTED = "Sergei I. Petrov"  # "Sergei Ivanovich Petrov" on the shipped (fictitious) sample list
CUSTODIANS = ("ada", "grace", "alan", "barbara", "edsger")
STEPS, BATCH = 250, 256  # base model training: 64,000 tokens seen


class DemoFailure(Exception):
    pass


class DemoBase:
    """Two hosts (the key host and the broker host), each with its home and environment; the checks made."""

    def __init__(self, root: Path, plot: bool, figures: Path):
        self.root = root
        self.home = root / "home"
        self.plot = plot
        self.figures = figures
        self.checks: list[tuple[str, bool, str]] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("WARDEN_")}
        self.env |= {"WARDEN_HOME": str(self.home), "WARDEN_PASSPHRASE": "demo passphrase, use a real one",
                     "COLUMNS": "140", "RAY_DISABLE_USAGE_STATS": "1", "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
        for c in CUSTODIANS:
            self.env[f"WARDEN_CUSTODIAN_PASSPHRASE_{c.upper()}"] = f"{c}'s own passphrase"
        self.server: subprocess.Popen[bytes] | None = None
        # the broker host: a home of its own, an environment with no keyring passphrase or custodian's variable
        self.bhome = root / "broker-home"
        self.benv = {k: v for k, v in self.env.items() if not k.startswith(("WARDEN_PASSPHRASE", "WARDEN_CUSTODIAN"))}
        self.benv["WARDEN_HOME"] = str(self.bhome)

    # -- plumbing ---------------------------------------------------------------------------
    def warden(self, *args: str, expect: int | None = 0, timeout: float = 300,
               broker: bool = False) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """``warden ARGS`` on the key host, or (``broker``) on the broker host, in the broker's own home."""
        shown = " ".join(shlex.quote(a.replace(str(self.root) + "/", "")) for a in args)
        console.print(f"  [dim]{'broker-host' if broker else 'key-host'}$ warden {shown}[/dim]")
        r = subprocess.run([sys.executable, "-m", "weightwarden", *args], env=self.benv if broker else self.env,
                           capture_output=True, text=True, timeout=timeout, cwd=self.root)  # fmt: skip
        if expect is not None and r.returncode != expect:
            raise DemoFailure(f"`warden {args[0]}` exited {r.returncode}: {(r.stderr or r.stdout).strip()[-400:]}")
        return r

    def wjson(self, *args: str, broker: bool = False) -> Any:
        return json.loads(self.warden(*args, "--json", broker=broker).stdout)

    def check(self, name: str, fn: Callable[[], tuple[bool, str]]) -> bool:
        t = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as e:  # a step that raises has failed; the demo goes on to report the rest
            ok, detail = False, f"{type(e).__name__}: {str(e)[:300]}"
        self.checks.append((name, ok, f"{detail} ({time.perf_counter() - t:.1f}s)"))
        console.print(("[green]✔[/green] " if ok else "[red]✘[/red] ") + name + f"  [dim]{detail}[/dim]")
        return ok

    @contextlib.contextmanager
    def key_host_env(self) -> Iterator[None]:
        """The key host's WARDEN_* variables in this process (a library call that writes to its trail)."""
        saved = {k: v for k, v in os.environ.items() if k.startswith("WARDEN_")}
        for k in saved:
            del os.environ[k]
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("WARDEN_")})
        try:
            yield
        finally:
            for k in [k for k in os.environ if k.startswith("WARDEN_")]:
                del os.environ[k]
            os.environ.update(saved)

    def act(self, title: str) -> None:
        console.rule(f"[bold]{title}")

    def keyring(self) -> Any:
        from weightwarden.keys.agent import AgentKeyring

        return AgentKeyring(self.home)

    def close(self) -> None:
        if self.server is not None:
            self.server.terminate()
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                self.server.kill()
        if (self.home / "custody.json").exists():
            self.warden("custody", "seal", expect=None)
            self.warden("agent", "stop", expect=None)



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


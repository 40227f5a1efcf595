"""Keeping secrets out of environments, core dumps and swap.

* :func:`read_secret_file` reads a passphrase from a file or a file descriptor (``/dev/fd/N``):
  passphrases come from a prompt, a descriptor or a file, not from another process's environment.
* :func:`scrubbed_env` / :func:`minimal_env`: the environment a long-lived process (the custody
  agent, ``warden serve``) starts with; :func:`reexec_scrubbed` replaces the current process with
  itself under a scrubbed environment (``/proc/<pid>/environ`` shows the environment a process was
  *started* with: removing a variable from ``os.environ`` does not erase it there).
* :func:`harden_process`: not dumpable (``prctl(PR_SET_DUMPABLE, 0)``: no core dump, and
  ``/proc/<pid>/{mem,environ,maps}`` and ptrace closed to other processes of the same user),
  ``RLIMIT_CORE`` 0, and, where asked and allowed, every page locked in RAM (``mlockall``) so no key
  reaches swap.  What the OS refuses is reported, never fatal.

What Python cannot promise (docs/CUSTODY.md): ``bytes`` and ``str`` objects are immutable, so
copies of a key or passphrase made along the way (base64 text, JSON, slices) are not wiped; freed
memory is not zeroed by the allocator or the garbage collector.  Non-dumpable, no core file and
locked pages keep those copies from leaving the process; root on the host can still read them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import KeyringError

#: variables that hold secrets; removed before any long-lived process starts
SECRET_VARS = ("WARDEN_PASSPHRASE", "VAULT_TOKEN")
SECRET_PREFIXES = ("WARDEN_CUSTODIAN_PASSPHRASE_",)
#: what the custody agent inherits (nothing else)
_MINIMAL = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "HOME", "USER", "LOGNAME", "PYTHONPATH",
            "PYTHONUNBUFFERED", "PYTHONHASHSEED", "VIRTUAL_ENV")  # fmt: skip
#: what `warden serve` inherits besides _MINIMAL (an allowlist: everything else is dropped, the HSM PIN,
#: workload tokens, keyring passphrase files and Vault tokens included).  The AWS variables are the
#: store's credentials, which the broker holds (docs/BROKER.md); WARDEN_KDF_MEMORY_KIB is a cost, not a secret.
_BROKER = ("WARDEN_HOME", "WARDEN_BROKER_DB", "WARDEN_BROKER_STORE", "WARDEN_LOG_KEY", "WARDEN_LOG_KEY_PASSPHRASE_FILE",
           "WARDEN_KDF_MEMORY_KIB", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
           "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE")  # fmt: skip

PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
MCL_CURRENT, MCL_FUTURE = 1, 2
MAX_SECRET_FILE = 4096


def read_secret_file(path: str | Path, what: str) -> str:
    """A passphrase from ``path`` (a file or ``/dev/fd/N``): its first line, without the newline."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SECRET_FILE + 1)
    except OSError as e:
        raise KeyringError(f"cannot read {what} from {Path(path).name} ({e.strerror or type(e).__name__})") from None
    if len(raw) > MAX_SECRET_FILE:
        raise KeyringError(f"{what} file {Path(path).name} is over {MAX_SECRET_FILE} bytes: it holds one passphrase")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyringError(f"{what} file {Path(path).name} is not UTF-8 text") from None
    line = text.split("\n", 1)[0].rstrip("\r")
    if not line:
        raise KeyringError(f"{what} file {Path(path).name} is empty: write the passphrase on its first line")
    return line


def is_secret_var(name: str) -> bool:
    return name in SECRET_VARS or name.startswith(SECRET_PREFIXES)


def scrubbed_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) without any variable that holds a secret."""
    src = os.environ if env is None else env
    return {k: v for k, v in src.items() if not is_secret_var(k)}


def minimal_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Only what a Python process needs to start (paths, locale, user): for the custody agent."""
    src = os.environ if env is None else env
    return {k: src[k] for k in _MINIMAL if k in src}


def broker_env(log_key: str | None = None, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment `warden serve` runs with: :func:`minimal_env`, what the broker itself needs
    (its home, database, store credentials, log key and the *path* of its passphrase file), and,
    when ``log_key`` is a ``pkcs11:`` URI, ``SOFTHSM2_CONF`` and the variable its ``pin-source=env:VAR``
    names.  Nothing else: not ``WARDEN_PKCS11_PIN`` (unless the log key's URI names it), not
    ``WARDEN_WORKLOAD_TOKEN``, ``WARDEN_PASSPHRASE(_FILE)``, ``VAULT_*`` or a custodian's variable."""
    src = os.environ if env is None else env
    keep = set(_MINIMAL) | set(_BROKER)
    if log_key and log_key.startswith("pkcs11:"):
        from urllib.parse import parse_qs

        keep.add("SOFTHSM2_CONF")
        query = parse_qs(log_key.partition("?")[2]).get("pin-source")  # as keys/pkcs11.py reads it
        source = query[-1] if query else "env:WARDEN_PKCS11_PIN"
        if source.startswith("env:"):
            keep.add(source[4:])
    return {k: v for k, v in src.items() if k in keep and not is_secret_var(k)}


def agent_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment `warden agent run` runs with: :func:`minimal_env` and ``WARDEN_HOME``."""
    src = os.environ if env is None else env
    return minimal_env(src) | ({"WARDEN_HOME": src["WARDEN_HOME"]} if "WARDEN_HOME" in src else {})


def reexec_with(env: dict[str, str]) -> None:
    """Replace this process with itself (same interpreter, same arguments) under exactly ``env``,
    unless its environment already holds nothing outside ``env`` (so this happens once).  Call it
    first thing: nothing read before survives, and ``/proc/<pid>/environ`` then shows ``env`` only."""
    if all(k in env and env[k] == v for k, v in os.environ.items()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


def reexec_scrubbed() -> None:
    """If this process's environment holds a secret, replace the process with itself under a
    scrubbed environment (same interpreter, same arguments; the new image has no secret, so this
    happens once).  Call it first thing: nothing read before survives."""
    if not any(is_secret_var(k) for k in os.environ):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    os.execve(sys.executable, [sys.executable, *argv[1:]], scrubbed_env())


def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def dumpable() -> int:
    """``prctl(PR_GET_DUMPABLE)`` of this process (0: not dumpable), or -1 where there is no prctl."""
    try:
        return int(_libc().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
    except (OSError, AttributeError):
        return -1


def _can_lock_everything() -> bool:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return True
    try:  # CAP_IPC_LOCK (bit 14) lifts the limit
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 14 & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def lock_pages(*, future: bool) -> tuple[bool, str | None]:
    """``mlockall``: every page mapped now (and, with ``future``, every page mapped later) stays in
    RAM.  Returns (locked, a notice when the OS did not allow it)."""
    try:
        libc = _libc()
    except OSError:
        libc = None
    if libc is None or not hasattr(libc, "mlockall"):
        return False, "mlockall unavailable: key pages may be swapped (use encrypted swap or none)"
    if not _can_lock_everything():
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        return False, (f"memory not locked: RLIMIT_MEMLOCK is {soft} bytes (raise it, e.g. systemd "
                       "LimitMEMLOCK=infinity, or grant CAP_IPC_LOCK); key pages may be swapped")  # fmt: skip
    if libc.mlockall(MCL_CURRENT | (MCL_FUTURE if future else 0)) != 0:
        return False, f"mlockall failed ({os.strerror(ctypes.get_errno())}): key pages may be swapped"
    return True, None


def harden_process(*, lock_memory: bool) -> dict[str, Any]:
    """Make this process non-dumpable, with no core file, and (``lock_memory``) its pages locked in
    RAM, now and later.  Returns what holds, with a ``notices`` list of what the OS did not allow."""
    notices: list[str] = []
    libc = None
    try:
        libc = _libc()
    except OSError:
        notices.append("no C library reachable: the process stays dumpable")
    if libc is not None and sys.platform.startswith("linux"):
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            notices.append(f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(ctypes.get_errno())}")
    elif libc is not None:
        notices.append("prctl is Linux-only: the process stays dumpable (core files are still off)")
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as e:
        notices.append(f"RLIMIT_CORE not set to 0: {e}")
    locked = False
    if lock_memory:
        locked, notice = lock_pages(future=True)
        if notice:
            notices.append(notice)
    core = resource.getrlimit(resource.RLIMIT_CORE)
    return {"dumpable": dumpable(), "core_limit": core[0], "memory_locked": locked, "notices": notices}


__all__ = [
    "agent_env",
    "broker_env",
    "dumpable",
    "harden_process",
    "lock_pages",
    "minimal_env",
    "read_secret_file",
    "reexec_scrubbed",
    "reexec_with",
    "scrubbed_env",
]

"""Who may use which key: the custody agent's key-use policy (docs/CUSTODY.md, "Key-use policy").

A caller is an OS user (the peer credentials of the agent's Unix socket, ``SO_PEERCRED``) and,
optionally, a **workload**: a name and a secret token the caller presents
(``WARDEN_WORKLOAD`` / ``WARDEN_WORKLOAD_TOKEN``); the policy holds only the token's SHA-256.
A rule lets some users (and, if it names any, only those workloads) do some operations with
some keys:

```toml
version = 1

[workloads]
inference = "sha256 hex of the inference node's token"

[[rule]]                      # the operators: everything, as today
users = ["warden"]            # OS user names or numeric uids
ops = ["*"]
keys = ["*"]

[[rule]]                      # the inference nodes: unwrap the production models' data keys
users = ["infer"]
workloads = ["inference"]
ops = ["unwrap"]
keys = ["prod-*"]             # KEK ids or signing key ids (fnmatch patterns)
```

Operations: ``wrap`` (seal), ``unwrap`` (open, load), ``sign`` (sign manifests), ``manage``
(new key, rotate, disable, enable).  Custody changes (re-share, destroy, export, this
policy, auditing) are never policy: they need a quorum (keys/quorum.py).  The policy lives
inside the keyring (encrypted and authenticated under the root key); replacing it is a
custody change.  With no policy set, the agent's own OS user may do everything and no one
else anything.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import pwd
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..canonical import canonical_json
from ..errors import PolicyDeniedError, QuorumError

OPS = ("wrap", "unwrap", "sign", "manage")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_RULES = 256


def token_digest(token: str) -> str:
    return hashlib.sha256(b"weightwarden/v1/workload\0" + token.encode()).hexdigest()


@dataclass(frozen=True)
class Rule:
    users: tuple[int | str, ...]
    ops: tuple[str, ...]
    keys: tuple[str, ...]
    workloads: tuple[str, ...] | None = None  # None: any caller of these users, with or without a workload

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"users": list(self.users), "ops": list(self.ops), "keys": list(self.keys)}
        if self.workloads is not None:
            d["workloads"] = list(self.workloads)
        return d

    def admits(self, uid: int, user: str | None, workload: str | None) -> bool:
        if uid not in self.users and (user is None or user not in self.users):
            return False
        return self.workloads is None or (workload is not None and workload in self.workloads)


def _strs(v: Any, where: str, check: re.Pattern[str] | None = None) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and 0 < len(x) <= 80 for x in v):
        raise QuorumError(f"policy: {where} must be a non-empty list of short strings")
    if check is not None:
        bad = [x for x in v if not check.match(x)]
        if bad:
            raise QuorumError(f"policy: {where} has a bad name {bad[0][:40]!r}")
    return tuple(v)


class Policy:
    def __init__(self, rules: list[Rule], workloads: dict[str, str] | None = None):
        self.rules = rules
        self.workloads = dict(workloads or {})

    @classmethod
    def default(cls, uid: int) -> Policy:
        """Only the agent's own OS user, every key, every operation (the behaviour before policies)."""
        return cls([Rule((uid,), ("*",), ("*",))])

    @classmethod
    def from_json(cls, obj: Any) -> Policy:
        if not isinstance(obj, dict) or obj.get("version") != 1:
            raise QuorumError("policy: 'version = 1' is required")
        extra = set(obj) - {"version", "workloads", "rule"}
        if extra:
            raise QuorumError(f"policy: unknown field {sorted(extra)[0][:40]!r}")
        wl = obj.get("workloads", {})
        if not isinstance(wl, dict) or len(wl) > MAX_RULES:
            raise QuorumError("policy: 'workloads' is a table of name = token digest")
        for name, dig in wl.items():
            if not _NAME.match(name) or not isinstance(dig, str) or not _HEX64.match(dig):
                raise QuorumError(f"policy: workload {str(name)[:40]!r} needs a 64-hex-digit token digest")
        rules_in = obj.get("rule", [])
        if not isinstance(rules_in, list) or len(rules_in) > MAX_RULES:
            raise QuorumError(f"policy: 'rule' is a list of at most {MAX_RULES} rules")
        rules = []
        for i, r in enumerate(rules_in):
            where = f"rule {i + 1}"
            if not isinstance(r, dict) or set(r) - {"users", "ops", "keys", "workloads"}:
                raise QuorumError(f"policy: {where} takes users, ops, keys and workloads only")
            users = r.get("users")
            if not isinstance(users, list) or not users:
                raise QuorumError(f"policy: {where}: 'users' must be a non-empty list")
            for u in users:
                ok_uid = isinstance(u, int) and not isinstance(u, bool) and 0 <= u < 2**32
                if not ok_uid and not (isinstance(u, str) and _NAME.match(u)):
                    raise QuorumError(f"policy: {where}: a user is an OS user name or a numeric uid, not {u!r:.40}")
            ops = _strs(r.get("ops"), f"{where}: 'ops'")
            if any(o not in (*OPS, "*") for o in ops):
                raise QuorumError(f"policy: {where}: ops are {', '.join(OPS)} or '*'")
            keys = _strs(r.get("keys"), f"{where}: 'keys'")
            wls = r.get("workloads")
            if wls is not None:
                wls = _strs(wls, f"{where}: 'workloads'", _NAME)
                unknown = [w for w in wls if w not in wl]
                if unknown:
                    raise QuorumError(f"policy: {where}: workload {unknown[0]!r} is not declared in [workloads]")
            rules.append(Rule(tuple(users), ops, keys, wls))
        return cls(rules, wl)

    @classmethod
    def load_file(cls, path: Path) -> Policy:
        """A policy file (TOML, or JSON if it ends in .json); errors name the file."""
        try:
            raw = path.read_bytes()
            obj = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode())
        except OSError as e:
            raise QuorumError(f"{path}: cannot read the policy file ({e.strerror or e})") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise QuorumError(f"{path}: not a valid policy file ({str(e)[:120]})") from None
        try:
            return cls.from_json(obj)
        except QuorumError as e:
            raise QuorumError(f"{path}: {e}") from None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"version": 1, "rule": [r.to_json() for r in self.rules]}
        if self.workloads:
            d["workloads"] = dict(self.workloads)
        return d

    def describe(self) -> list[str]:
        """The policy in words, one line per rule and workload (callers escape them before printing)."""
        out = []
        for i, r in enumerate(self.rules, 1):
            users = ", ".join(f"uid {u}" if isinstance(u, int) else f"user {u}" for u in r.users)
            wl = "" if r.workloads is None else " running as workload " + " or ".join(r.workloads)
            ops = "every operation" if "*" in r.ops else " or ".join(r.ops)
            keys = "every key" if r.keys == ("*",) else "keys matching " + ", ".join(r.keys)
            out.append(f"rule {i}: {users}{wl} may {ops} with {keys}")
        if not self.rules:
            out.append("no rules: no one, the agent's own user included, may use any key")
        for name, dig in sorted(self.workloads.items()):
            out.append(f"workload {name}: token digest {dig}")
        return out

    @property
    def digest(self) -> str:
        return hashlib.sha256(canonical_json(self.to_json())).hexdigest()

    # -- decisions ------------------------------------------------------------------------
    def workload(self, name: str | None, token: str | None) -> str | None:
        """The workload a caller proved (None if they claimed none); a wrong token is refused."""
        if name is None and token is None:
            return None
        want = self.workloads.get(str(name))
        if want is None or token is None or not hmac.compare_digest(token_digest(str(token)), want):
            raise PolicyDeniedError(f"workload {str(name)[:40]!r} is not declared in the policy, or its token is wrong")
        return str(name)

    def admits(self, uid: int, workload: str | None) -> bool:
        """May this caller use the agent at all (list keys, read public keys)?"""
        user = _user(uid)
        return any(r.admits(uid, user, workload) for r in self.rules)

    def allows(self, uid: int, workload: str | None, op: str, key_id: str) -> bool:
        user = _user(uid)
        for r in self.rules:
            if not r.admits(uid, user, workload):
                continue
            if ("*" in r.ops or op in r.ops) and any(fnmatch.fnmatchcase(key_id, k) for k in r.keys):
                return True
        return False


def _user(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None

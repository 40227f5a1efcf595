"""``warden scan --endpoints FILE``: probe many OpenAI-compatible endpoints against our model, on Ray,
resumably (issue 21; docs/PROVENANCE.md).

FILE lists the endpoints, as JSON lines (one object a line; blank lines and ``#`` comments skipped), a JSON
list of objects, or TOML (a ``.toml`` file of ``[[endpoint]]`` tables).  Fields: ``url`` (required),
``name`` (its row's label, unique; default the URL), ``mode`` (logprobs | chat | text), ``model`` (the
model name to ask for), ``api_key_env`` (the variable holding its API key: never the key itself),
``budget`` (most queries sent to it this run), ``rate`` (most queries per second), ``retries`` and
``timeout`` (seconds).  Every field of every entry is checked before anything starts.

Each endpoint is one Ray task running :func:`~weightwarden.provenance.probe.probe` against our model and
the references: the same null, statistic and p-value as ``warden provenance probe``.  The state folder
holds ``scan.json`` (the models, prompts and settings the results belong to: a rerun with others is
refused), ``results.jsonl`` (one line per finished endpoint, one write + fsync; a torn last line is cut)
and ``cache/KEY/`` (each endpoint's answer cache).  A rerun skips the endpoints that have a p-value and
probes the others again (a failed one, one never finished) through their caches: no query is sent twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .._extras import require
from ..errors import ProbeError, ScanError, WardenError
from ..netguard import PrivateAddressError, check_public_host, host_of, public_only_transport
from .compare import DEFAULT_ALPHA
from .probe import MODES
from .scan import _drop_torn_tail, _read_state, ray_start

__all__ = ["EndpointScanReport", "EndpointSpec", "probe_endpoint", "read_endpoints", "scan_endpoints"]

FIELDS = ("url", "name", "mode", "model", "api_key_env", "budget", "rate", "retries", "timeout")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: variables an endpoints file may not name as an API key: warden's own secrets and the usual cloud / CI
#: credentials (a hostile file would send them, as a bearer token, to the URL it chooses)
_SECRET_ENV = re.compile(r"(WARDEN_|AWS_|AZURE_|GOOGLE_|GCP_|GCLOUD_|CLOUDSDK_|GITHUB_|GH_|ACTIONS_|CI_|VAULT_|"
                         r"KUBE|SSH_|GPG_|RAY_)", re.IGNORECASE)  # fmt: skip
MAX_BUDGET = 10_000_000


@dataclass(frozen=True)
class EndpointSpec:
    """One endpoint of the file, checked."""

    url: str
    name: str
    mode: str
    budget: int
    model: str | None = None
    api_key_env: str | None = None
    rate: float | None = None
    retries: int = 4
    timeout: float = 60.0
    where: str = ""  # "line N" (JSON) or "[[endpoint]] table N" (TOML)

    @property
    def key(self) -> str:
        """What identifies its results and answer cache across runs (not the budget, rate or timeouts)."""
        doc = json.dumps([self.url.rstrip("/"), self.model, self.mode, self.name])
        return hashlib.sha256(doc.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("where")
        return d


# -- the endpoints file -----------------------------------------------------------------------------------------
def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _json_list(path: Path, text: str) -> list[tuple[str, Any]]:
    """The entries of a JSON list, each with the line it starts on."""
    dec, out = json.JSONDecoder(), []
    i, n = text.index("[") + 1, len(text)

    def skip(j: int) -> int:
        while j < n and text[j] in " \t\r\n":
            j += 1
        return j

    i = skip(i)
    closed = i < n and text[i] == "]"
    i = i + 1 if closed else i
    while not closed:
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise ScanError(f"{path} line {_line(text, e.pos)}: not valid JSON ({e.msg}); nothing was started") \
                from None  # fmt: skip
        except RecursionError:  # "[[[[..." nested past the stack
            raise ScanError(f"{path} line {_line(text, i)}: nested too deep to be an endpoint; nothing was started") \
                from None  # fmt: skip
        out.append((f"line {_line(text, i)}", obj))
        i = skip(end)
        if i < n and text[i] in ",]":
            closed = text[i] == "]"
            i = skip(i + 1)
            continue
        raise ScanError(f"{path} line {_line(text, i)}: expected ',' or ']' after an endpoint; nothing was started")
    if skip(i) != n:
        raise ScanError(f"{path} line {_line(text, skip(i))}: text after the list of endpoints; nothing was started")
    return out


def _entries(path: Path, text: str) -> list[tuple[str, Any]]:
    if path.suffix.lower() == ".toml":
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ScanError(f"{path}: not valid TOML ({e}); nothing was started") from None
        extra = sorted(set(doc) - {"endpoint"})
        if extra or not isinstance(doc.get("endpoint"), list):
            what = f"unknown key {extra[0][:40]!r}" if extra else "no [[endpoint]] table"
            raise ScanError(f"{path}: {what}: list the endpoints as [[endpoint]] tables; nothing was started")
        return [(f"[[endpoint]] table {i}", t) for i, t in enumerate(doc["endpoint"], 1)]
    if text.lstrip().startswith("["):
        return _json_list(path, text)
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            out.append((f"line {n}", json.loads(line)))
        except RecursionError:  # "[[[[..." nested past the stack
            raise ScanError(f"{path} line {n}: nested too deep to be an endpoint; nothing was started") from None
        except json.JSONDecodeError as e:
            raise ScanError(f'{path} line {n}: not a JSON object ({e.msg}); write one endpoint a line, e.g. '
                            '{"url": "https://host/v1"}; nothing was started') from None  # fmt: skip
    return out


def _printable(v: Any) -> bool:
    return isinstance(v, str) and v.isprintable()


def _spec(path: Path, where: str, e: Any, mode: str, budget: int, allow_private: bool) -> EndpointSpec:
    def bad(name: str, what: str) -> ScanError:
        return ScanError(f"{path} {where}, field {name!r}: {what}; fix the file (nothing was started)")

    if not isinstance(e, dict):
        raise ScanError(f'{path} {where}: an endpoint must be an object such as {{"url": "https://host/v1"}}, '
                        f"not {type(e).__name__}; nothing was started")  # fmt: skip
    for k in e:
        if k not in FIELDS:
            raise bad(str(k)[:40], f"unknown field (known: {', '.join(FIELDS)})")
    url = e.get("url")
    if url is None:
        raise bad("url", "missing: every endpoint needs its URL")
    try:
        u = urlsplit(url) if _printable(url) and " " not in url and len(url) <= 2000 else None
        if u is not None:
            u.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise bad("url", "is not a URL (a bracketed host or the port is malformed)") from None
    if u is None or u.scheme not in ("http", "https") or not u.hostname:
        raise bad("url", "must be an http:// or https:// URL with a host, without spaces or control characters")
    if u.username is not None or u.password is not None or u.query or u.fragment:
        raise bad("url", "must hold no user, password, query or fragment (give the API key through api_key_env)")
    if not u.hostname.isascii():
        raise bad("url", "the host must be ASCII: write an internationalised name in its xn-- (punycode) form")
    if not allow_private:
        try:
            host, port = host_of(url)
            check_public_host(host, port, f"{path} {where}, field 'url'", unresolved_ok=True)
        except PrivateAddressError as err:
            raise ScanError(f"{err}; nothing was started") from None
        except Exception as err:  # httpx refuses the URL: the same one line
            raise bad("url", f"is not a URL the HTTP client accepts ({type(err).__name__})") from None
    name = e.get("name", url)
    if not isinstance(name, str) or not name.isprintable() or not 0 < len(name) <= 200:
        raise bad("name", "must be 1 to 200 printable characters")
    m = e.get("mode", mode)
    if m not in MODES:
        raise bad("mode", f"must be one of {', '.join(MODES)}")
    model = e.get("model")
    if model is not None and (not isinstance(model, str) or not model.isprintable() or not 0 < len(model) <= 200):
        raise bad("model", "must be 1 to 200 printable characters (the model name the endpoint serves)")
    env = e.get("api_key_env")
    if env is not None and (not isinstance(env, str) or not _ENV_NAME.match(env)):
        raise bad("api_key_env", "must be the NAME of an environment variable (letters, digits, _), not a key")
    if env is not None and _SECRET_ENV.match(env):
        raise bad("api_key_env", f"{env} holds warden's or a cloud's secret, never an endpoint's API key: export the "
                                 "endpoint's key under a name of its own (e.g. SUSPECT_API_KEY)")  # fmt: skip
    if env is not None and not os.environ.get(env):
        raise bad("api_key_env", f"the variable {env} is not set: export it before the scan")
    b = e.get("budget", budget)
    if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= MAX_BUDGET:
        raise bad("budget", f"must be a whole number of queries from 0 to {MAX_BUDGET}")
    rate = e.get("rate")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float)
                             or not (math.isfinite(rate) and rate > 0)):  # fmt: skip
        raise bad("rate", "must be a positive number of queries per second")
    retries = e.get("retries", 4)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 20:
        raise bad("retries", "must be a whole number from 0 to 20")
    timeout = e.get("timeout", 60.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (0 < timeout <= 3600):
        raise bad("timeout", "must be a number of seconds above 0, at most 3600")
    return EndpointSpec(url=url, name=name, mode=m, budget=b, model=model, api_key_env=env,
                        rate=None if rate is None else float(rate), retries=retries, timeout=float(timeout),
                        where=where)  # fmt: skip


def read_endpoints(path: str | os.PathLike[str], *, mode: str = "logprobs", budget: int = 1000,
                   allow_private: bool = False) -> list[EndpointSpec]:  # fmt: skip
    """The endpoints listed in ``path``, every field checked (``mode`` and ``budget``: the defaults); every
    host must resolve to public addresses only unless ``allow_private`` (:mod:`weightwarden.netguard`)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ScanError(f"--endpoints {p}: cannot read it ({why}): give a JSON-lines, JSON or TOML file") from None
    specs = [_spec(p, where, e, mode, budget, allow_private) for where, e in _entries(p, text)]
    if not specs:
        raise ScanError(f'--endpoints {p} lists no endpoint: give one object with a "url" per line')
    seen: dict[str, str] = {}
    for s in specs:
        if s.name in seen:
            raise ScanError(f"{p} {s.where}, field 'name': {s.name[:80]!r} is also the name of the endpoint at "
                            f"{seen[s.name]}: give each endpoint its own name; nothing was started")  # fmt: skip
        seen[s.name] = s.where
    return specs


# -- one endpoint, on a Ray worker ------------------------------------------------------------------------------
_POOLS: dict[tuple[str, ...], tuple[Any, list[Any]]] = {}  # the models a worker has loaded, kept for its next task


def _pool(paths: Sequence[str]) -> tuple[Any, list[Any]]:
    from .probe import HFScorer

    k = tuple(paths)
    if k not in _POOLS:
        _POOLS.clear()
        scorers = [HFScorer(p, name=Path(p).name) for p in paths]
        _POOLS[k] = (scorers[0], scorers[1:])
    return _POOLS[k]


def probe_endpoint(spec: dict[str, Any], cfg: dict[str, Any], prompts: list[str] | None, cache: str,
                   home: str, allow_private: bool = False) -> dict[str, Any]:  # fmt: skip
    """Probe one endpoint; its failure is its row's ``error``, not an exception."""
    from .endpoint import Endpoint
    from .probe import probe

    row: dict[str, Any] = {"name": spec["name"], "url": spec["url"], "mode": spec["mode"]}
    ep = None
    try:
        key = None
        if spec["api_key_env"]:
            key = os.environ.get(spec["api_key_env"])
            if not key:
                raise ProbeError(f"{spec['api_key_env']} is not set where the probe runs: set it on the Ray workers")
        if not allow_private:  # again where the request leaves: the name may resolve otherwise now
            host, port = host_of(spec["url"])
            check_public_host(host, port, f"endpoint {spec['name'][:80]!r}")
        ours, refs = _pool([cfg["model"], *cfg["references"]])
        # every connection is checked again as it is dialled, to the address checked (DNS rebinding)
        transport = None if allow_private else public_only_transport(f"endpoint {spec['name'][:80]!r}")
        ep = Endpoint(spec["url"], model=spec["model"], api_key=key, budget=spec["budget"], rate=spec["rate"],
                      retries=spec["retries"], timeout=spec["timeout"], cache=cache, home=home,
                      transport=transport)  # fmt: skip
        rep = probe(ep, ours, refs, mode=spec["mode"], prompts=prompts, alpha=cfg["alpha"], n_items=cfg["items"],
                    samples=cfg["samples"], new_tokens=cfg["new_tokens"], seed=cfg["seed"], home=home)  # fmt: skip
    except (WardenError, OSError, ValueError, RuntimeError) as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        row["cache"] = cache  # its answers so far (delete it to start that endpoint over, e.g. after a model change)
    else:
        j = rep.to_json()
        row.update({k: j[k] for k in ("decision", "p_value", "log10_p_value", "rank_p_value", "served_model")})
    finally:
        if ep is not None:
            row["queries"] = {"used": ep.used, "cached": ep.cached, "budget": ep.budget}
            ep.close()
    return row


# -- the scan ---------------------------------------------------------------------------------------------------
@dataclass
class EndpointScanReport:
    alpha: float
    rows: list[dict[str, Any]] = field(default_factory=list)  # in the file's order
    resumed: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        derived = [r["name"] for r in self.rows if r.get("decision") == "derived"]
        return {"endpoints": len(self.rows), "resumed_from_state": self.resumed,
                "probed_this_run": len(self.rows) - self.resumed, "alpha": self.alpha, "derived": derived,
                "errors": sum("error" in r for r in self.rows), "rows": self.rows,
                "queries_sent_this_run": sum(r.get("queries", {}).get("used", 0) for r in self.rows
                                             if not r.get("resumed")),
                "seconds": round(self.seconds, 2)}  # fmt: skip


def _pool_paths(model: str | os.PathLike[str], references: Sequence[str | os.PathLike[str]]) -> list[str]:
    from ..sealed import is_sealed_path

    if len(references) < 3:
        raise ProbeError(f"at least 3 reference models are needed (got {len(references)}): give --reference "
                         "three times or more")  # fmt: skip
    paths = [Path(p).resolve() for p in (model, *references)]
    for p in paths:
        if not p.is_dir():
            raise ScanError(f"{p}: no such model folder (--model and --reference take transformers folders)")
        if is_sealed_path(p):
            raise ScanError(f"{p} is sealed: a scan of endpoints loads the models on Ray workers, which hold no "
                            "keyring; give plain folders (or use `warden provenance probe`)")  # fmt: skip
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise ScanError("--model and each --reference need folders of distinct names (the report names them)")
    return [str(p) for p in paths]


def _open_state(state: Path, cfg: dict[str, Any]) -> None:
    from .._atomic import atomic_write_bytes

    try:
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise ScanError(f"--state {state}: cannot create it ({e.strerror}): give another --state") from None
    st = os.lstat(state)  # its results decide which endpoints are probed: no one else may write them
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        why = ("a link or not a folder" if not stat.S_ISDIR(st.st_mode) else f"owned by uid {st.st_uid}"
               if st.st_uid != os.geteuid() else f"writable by others (mode {stat.S_IMODE(st.st_mode):o})")  # fmt: skip
        raise ScanError(f"--state {state} is {why}: another user could plant its results; give a folder of "
                        "your own that only you can write")  # fmt: skip
    f = state / "scan.json"
    if not f.exists():
        atomic_write_bytes(f, (json.dumps(cfg, indent=1, sort_keys=True) + "\n").encode())
        return
    try:
        old = json.loads(f.read_text())
        if not isinstance(old, dict):
            raise ValueError
    except (OSError, ValueError):
        raise ScanError(f"{f} is damaged (not written by warden scan --endpoints?): give another --state") from None
    diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
    if diff:
        raise ScanError(f"--state {state} holds a scan with other {', '.join(diff)}: its results do not apply; "
                        "give another --state (or delete that one to start over)")  # fmt: skip


def scan_endpoints(
    endpoints: str | os.PathLike[str],
    model: str | os.PathLike[str],
    references: Sequence[str | os.PathLike[str]],
    *,
    prompts: Sequence[str] | None = None,
    state: str | os.PathLike[str] | None = None,
    mode: str = "logprobs",
    budget: int = 1000,
    alpha: float = DEFAULT_ALPHA,
    n_items: int = 32,
    samples: int = 2,
    new_tokens: int = 16,
    seed: int = 0,
    ray_address: str | None = None,
    workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    home: str | os.PathLike[str] | None = None,
    allow_private: bool = False,
) -> EndpointScanReport:
    """Probe every endpoint of the file ``endpoints`` (one Ray task each) against ``model`` with
    ``references``; resumable through ``state`` (see the module's docstring).  One ``provenance:scan``
    event in ``home``'s trail, besides each probe's own events.  Hosts that resolve to loopback, private,
    link-local or reserved addresses are refused before anything starts unless ``allow_private``."""
    require("ray", extra="cluster")
    from .. import trail
    from ..audit import AuditAction
    from ..home import resolve_home

    t0 = time.monotonic()
    if mode not in MODES:
        raise ProbeError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    if not 0 < alpha < 1:
        raise ProbeError(f"--alpha must be between 0 and 1, not {alpha}")
    specs = read_endpoints(endpoints, mode=mode, budget=budget, allow_private=allow_private)
    paths = _pool_paths(model, references)
    texts = list(prompts) if prompts else None
    digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest() if texts else None
    cfg = {"model": paths[0], "references": paths[1:], "alpha": alpha, "items": n_items, "samples": samples,
           "new_tokens": new_tokens, "seed": seed, "prompts": digest}  # fmt: skip
    root = resolve_home(home).root.absolute()
    if state is None:
        h = hashlib.sha256(json.dumps([str(Path(endpoints).resolve()), cfg], sort_keys=True).encode()).hexdigest()
        state = root / "scan" / f"endpoints-{h[:16]}"
    sdir = Path(state)
    _open_state(sdir, cfg)
    results = sdir / "results.jsonl"
    done = {k: v for k, v in _read_state(results).items() if "error" not in v}
    _drop_torn_tail(results)
    report = EndpointScanReport(alpha)
    rows: dict[str, dict[str, Any]] = {s.key: {**done[s.key], "resumed": True} for s in specs if s.key in done}
    report.resumed = len(rows)
    todo = [s for s in specs if s.key not in done]
    if on_progress:
        on_progress(len(rows), len(specs))
    if todo:
        ray, started = ray_start(ray_address, workers)
        try:
            task = ray.remote(num_cpus=1, max_retries=1)(probe_endpoint)
            pref = ray.put(texts)
            pending = {task.remote({**s.to_json()}, cfg, pref, str(sdir / "cache" / s.key), str(root),
                                   allow_private): s
                       for s in todo}  # fmt: skip
            fd = os.open(results, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    for ref in ready:
                        s = pending.pop(ref)
                        try:
                            row = ray.get(ref)
                        except Exception as e:  # a worker died for good: its row says so, the others go on
                            row = {"name": s.name, "url": s.url, "mode": s.mode,
                                   "error": f"worker failed: {type(e).__name__}"}  # fmt: skip
                        os.write(fd, (json.dumps({"item": s.key, "result": row}, sort_keys=True) + "\n").encode())
                        os.fsync(fd)
                        rows[s.key] = row
                        if on_progress:
                            on_progress(len(rows), len(specs))
            finally:
                os.close(fd)
        finally:
            if started:
                ray.shutdown()
    report.rows = [rows[s.key] for s in specs]
    report.seconds = time.monotonic() - t0
    j = report.to_json()
    trail.record(AuditAction.PROVENANCE_SCAN, home=home, subject=str(endpoints)[:200], kind="endpoints",
                 endpoints=j["endpoints"], derived=j["derived"][:100], errors=j["errors"])  # fmt: skip
    return report

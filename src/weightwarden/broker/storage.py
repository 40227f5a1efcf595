"""Where the broker keeps sealed weights: a local directory (default) or an S3-compatible bucket.

Only sealed files are stored and served; the broker never holds plaintext weights.  Object names
are checked before use: a model name is 1-128 characters of ``[A-Za-z0-9._-]``, not starting with
a dot, so no name can reach outside the store (``../``, absolute paths, NUL, separators).
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._extras import require
from ..errors import WardenError

__all__ = ["CHUNK", "BadNameError", "LocalWeightStore", "S3WeightStore", "StorageError", "WeightStore", "check_name"]

CHUNK = 1 << 20
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


class StorageError(WardenError):
    """A stored model is missing or unreadable."""


class BadNameError(StorageError):
    """A name is not a safe model or account name."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise BadNameError("a model name is 1-128 characters of letters, digits, '.', '_' and '-'")
    return name


class WeightStore(ABC):
    @abstractmethod
    def size(self, name: str) -> int: ...

    @abstractmethod
    def read(self, name: str, chunk: int = CHUNK, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The bytes ``[start, end)`` of a stored file (``end``: its size), ``chunk`` at a time."""

    @abstractmethod
    def etag(self, name: str) -> str:
        """A strong entity tag that changes whenever the stored file's bytes may have (resumes check it)."""

    @abstractmethod
    def put(self, name: str, path: Path) -> int: ...


class LocalWeightStore(WeightStore):
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def _path(self, name: str) -> Path:
        return self.root / f"{check_name(name)}.wws"

    def size(self, name: str) -> int:
        try:
            return self._path(name).stat().st_size
        except FileNotFoundError:
            raise StorageError(f"no sealed weights for {name!r}") from None

    def read(self, name: str, chunk: int = CHUNK, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        try:
            fh = open(self._path(name), "rb")
        except FileNotFoundError:
            raise StorageError(f"no sealed weights for {name!r}") from None
        if start:
            fh.seek(start)
        return _chunks(fh, chunk, None if end is None else end - start)

    def path(self, name: str) -> Path:
        """The stored file (for zero-copy sends)."""
        return self._path(name)

    def etag(self, name: str) -> str:
        """From the file's inode, size and modification time: every put (an atomic rename: a new inode)
        or in-place rewrap changes it."""
        import hashlib

        try:
            st = self._path(name).stat()
        except FileNotFoundError:
            raise StorageError(f"no sealed weights for {name!r}") from None
        return '"' + hashlib.sha256(f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:32] + '"'

    def put(self, name: str, path: Path) -> int:
        import shutil

        from .._atomic import atomic_output

        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_output(self._path(name), force=True) as fd, open(path, "rb") as src:
            dst = os.fdopen(os.dup(fd), "wb")
            with dst:
                shutil.copyfileobj(src, dst, CHUNK)
        return self._path(name).stat().st_size


def _chunks(fh: Any, chunk: int, limit: int | None = None) -> Iterator[bytes]:
    """The file's bytes ``chunk`` at a time (at most ``limit`` in all), the next chunk read by a helper
    thread while this one is sent (a stream from a cold disk overlaps its reads with the network; reads
    release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    left = [limit]

    def rd() -> bytes:
        n = chunk if left[0] is None else min(chunk, left[0])
        b = fh.read(n) if n > 0 else b""
        if left[0] is not None:
            left[0] -= len(b)
        return b

    with fh, ThreadPoolExecutor(1, thread_name_prefix="warden-readahead") as pool:
        nxt = pool.submit(rd)
        while b := nxt.result():
            nxt = pool.submit(rd)
            yield b


class S3WeightStore(WeightStore):
    """Sealed weights as objects ``<prefix><name>.wws`` in an S3-compatible bucket (SeaweedFS, MinIO, AWS)."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, **client_kw: Any):
        boto3 = require("boto3", extra="server")

        self.bucket, self.prefix = bucket, prefix
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, **client_kw)

    def _key(self, name: str) -> str:
        return f"{self.prefix}{check_name(name)}.wws"

    def size(self, name: str) -> int:
        ClientError = require("botocore.exceptions", "ClientError", extra="server")

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(name))["ContentLength"])
        except ClientError:
            raise StorageError(f"no sealed weights for {name!r}") from None

    def read(self, name: str, chunk: int = CHUNK, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        ClientError = require("botocore.exceptions", "ClientError", extra="server")

        kw = {}
        if start or end is not None:
            if end is not None and end <= start:
                return iter(())
            kw["Range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(name), **kw)["Body"]
        except ClientError:
            raise StorageError(f"no sealed weights for {name!r}") from None
        return _s3_chunks(body, chunk)

    def etag(self, name: str) -> str:
        ClientError = require("botocore.exceptions", "ClientError", extra="server")

        try:
            tag = str(self.client.head_object(Bucket=self.bucket, Key=self._key(name))["ETag"])
        except ClientError:
            raise StorageError(f"no sealed weights for {name!r}") from None
        return tag if tag.startswith('"') else f'"{tag}"'

    def put(self, name: str, path: Path) -> int:
        self.client.upload_file(str(path), self.bucket, self._key(name))
        return path.stat().st_size


def _s3_chunks(body: Any, chunk: int) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(chunk)
    finally:
        body.close()

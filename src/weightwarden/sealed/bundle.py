"""Sealed bundles: a whole model directory (sharded weights, config, tokenizer).

A bundle is a directory holding one sealed file per original file plus a signed
``BUNDLE.wwb`` manifest that lists every member by file id and context hash, so
members cannot be dropped, added, swapped or moved between bundles.
"""

from __future__ import annotations

import hmac
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .._atomic import TMP_PREFIX, atomic_write_bytes, fsync_dir
from ..errors import FormatError, IntegrityError, OutputExistsError, SignatureError, UntrustedSignerError
from ..keys.provider import KeyProvider, Signer, b64d, b64e, ed25519_key_id
from . import format as F
from .decrypt import SealedReader
from .detect import BUNDLE_MANIFEST, is_bundle
from .reader import SealedFile
from .signature import SIG_FIELDS_V2, Trust, check_manifest_signature, sig_purpose, verify_manifest_signature
from .writer import MemorySource, Progress, SealResult, seal_file

MANIFEST = BUNDLE_MANIFEST
BUNDLE_DOMAIN = b"weightwarden/v1/bundle\x00"
MAX_MEMBERS = 100_000
MAX_MANIFEST = 64 * 1024 * 1024


def _member_files(src: Path) -> list[str]:
    """The folder's regular files (relative POSIX paths), walked without following links: a link or a
    special file anywhere refuses the whole folder, naming each (nothing is sealed)."""
    from .walk import refuse, walk

    w = walk(src)
    refuse(w.problems, f"{src} cannot be sealed as it is (nothing was written)")
    if not w.files:
        raise FormatError(f"{src} holds no files to seal")
    if len(w.files) > MAX_MEMBERS:
        raise FormatError(f"{src} holds more than {MAX_MEMBERS} files")
    return w.files


def seal_dir(
    src: Path,
    dst: Path,
    *,
    provider: KeyProvider,
    signer: Signer,
    chunk_size: int = F.DEFAULT_CHUNK,
    hide_header: bool = False,
    force: bool = False,
    durable: bool = True,
    progress: Progress | None = None,
    replace: dict[str, MemorySource] | None = None,
) -> list[SealResult]:
    """Seal every file of ``src`` into the bundle ``dst``; ``replace`` maps a member's relative path to
    in-memory contents sealed instead of the file on disk (a fingerprinted copy is never written in
    plaintext)."""
    signer.require("sealing")
    if not force and os.path.lexists(dst):
        raise OutputExistsError(f"{dst} exists; pass force=True (--force) to overwrite")
    items = [(rel, (replace or {}).get(rel, src / rel)) for rel in _member_files(src)]
    return seal_members(items, dst, provider=provider, signer=signer, chunk_size=chunk_size, hide_header=hide_header,
                        force=force, durable=durable, progress=progress)  # fmt: skip


def seal_members(
    items: Sequence[tuple[str, Path | MemorySource]],
    dst: Path,
    *,
    provider: KeyProvider,
    signer: Signer,
    chunk_size: int = F.DEFAULT_CHUNK,
    hide_header: bool = False,
    force: bool = False,
    durable: bool = True,
    progress: Progress | None = None,
) -> list[SealResult]:
    """Seal ``items`` (relative path, file on disk or contents in memory) into the bundle ``dst``."""
    if not force and os.path.lexists(dst):
        raise OutputExistsError(f"{dst} exists; pass force=True (--force) to overwrite")
    if not items:
        raise FormatError("a bundle needs at least one member")
    bundle_id = secrets.token_bytes(16)
    parent = dst.parent if str(dst.parent) else Path(".")
    tmp = parent / f"{TMP_PREFIX}{dst.name}.{secrets.token_hex(6)}"
    tmp.mkdir(mode=0o755)
    try:
        results, members = [], []
        for i, (rel, source) in enumerate(items):
            out_name = f"{i:05d}.wws" if hide_header else rel.replace("/", "__") + ".wws"
            res = seal_file(
                source, tmp / out_name, provider=provider, signer=signer, chunk_size=chunk_size,
                hide_header=hide_header, name=rel, bundle={"id": bundle_id.hex(), "member": i},
                durable=durable, progress=progress,
            )  # fmt: skip
            with SealedFile(tmp / out_name) as sf:
                members.append({"file": out_name, "file_id": res.file_id, "context_sha256": sf.context.sha256.hex()})
            results.append(res)
        body = {"format": "weightwarden-bundle", "version": 1, "bundle_id": bundle_id.hex(), "members": members}
        raw = F.canon(body)
        sig = signer.sign(BUNDLE_DOMAIN + raw)
        doc = {
            "body": body,
            "signature": {
                "alg": F.SIG_ID,
                "key_id": signer.key_id,
                "public_key": b64e(signer.public_key),
                "purpose": signer.purpose,
                "signature": b64e(sig),
            },
        }
        atomic_write_bytes(tmp / MANIFEST, F.canon(doc), mode=0o644)
        if durable:
            fsync_dir(tmp)
        trash = None
        if os.path.lexists(dst):
            trash = parent / f"{TMP_PREFIX}{dst.name}.old.{secrets.token_hex(6)}"
            os.replace(dst, trash)
        os.replace(tmp, dst)
        if durable:
            fsync_dir(parent)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return results
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = [
    "MANIFEST", "BundleReader", "SealedBundle", "is_bundle", "safe_relpath", "seal_dir",
]  # fmt: skip


def safe_relpath(name: str) -> PurePosixPath:
    """A bundle member's name as a relative path that stays inside the folder it is written to."""
    p = PurePosixPath(name)
    if p.is_absolute() or not p.parts or any(part in ("", ".", "..") or "\\" in part for part in p.parts):
        raise FormatError(f"member name {name[:80]!r} is not a safe relative path")
    return p


class SealedBundle:
    """A sealed bundle, parsed and cross-checked.  Nothing here needs a key."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        try:
            if mpath.stat().st_size > MAX_MANIFEST:
                raise FormatError("bundle manifest is too large")
            raw = mpath.read_bytes()
        except FileNotFoundError:
            raise FormatError(f"{self.path} is not a sealed bundle (no {MANIFEST})") from None
        doc = F.strict_json(raw, "bundle manifest", MAX_MANIFEST)
        if not isinstance(doc, dict) or set(doc) != {"body", "signature"}:
            raise FormatError("bundle manifest is malformed")
        body, sig = doc["body"], doc["signature"]
        if not isinstance(body, dict) or body.get("format") != "weightwarden-bundle" or body.get("version") != 1:
            raise FormatError("not a version-1 bundle manifest")
        if not isinstance(sig, dict) or sig.get("alg") != F.SIG_ID or not set(sig) <= SIG_FIELDS_V2:
            raise FormatError("bundle signature block is malformed")
        self.sig_purpose = sig_purpose(sig, "bundle signature block")
        self._body_raw = F.canon(body)
        self.public_key = b64d(sig.get("public_key"), "public key")
        self.signature = b64d(sig.get("signature"), "signature")
        if len(self.public_key) != 32 or sig.get("key_id") != ed25519_key_id(self.public_key):
            raise SignatureError("bundle signer key id does not match its public key")
        self.signer_id: str = sig["key_id"]
        members = body.get("members")
        if not isinstance(members, list) or not 0 < len(members) <= MAX_MEMBERS:
            raise FormatError("bundle member list is malformed")
        self.bundle_id = str(body.get("bundle_id"))
        self.members: list[SealedFile] = []
        try:
            for i, m in enumerate(members):
                if not isinstance(m, dict) or set(m) != {"file", "file_id", "context_sha256"}:
                    raise FormatError("bundle member entry is malformed")
                name = m["file"]
                if not isinstance(name, str) or "/" in name or "\\" in name or name in (".", "..") or not name:
                    raise FormatError("bundle member file name is not a plain file name")
                if not (self.path / name).is_file():
                    raise IntegrityError(f"bundle member {name} is missing")
                sf = SealedFile(self.path / name)
                self.members.append(sf)
                ctx = sf.context
                if ctx.bundle != {"id": self.bundle_id, "member": i}:
                    raise IntegrityError(f"{name} does not belong at position {i} of this bundle")
                if ctx.file_id.hex() != m["file_id"] or not hmac.compare_digest(
                    ctx.sha256.hex(), str(m["context_sha256"])
                ):
                    raise IntegrityError(f"{name} is not the file the bundle manifest lists")
                if sf.signer_id != self.signer_id:
                    raise IntegrityError(f"{name} is signed by another key than the bundle")
        except BaseException:
            self.close()
            raise
        listed = {m.path.name for m in self.members} | {MANIFEST}
        extra = sorted(p.name for p in self.path.iterdir() if p.name not in listed)
        if extra:
            self.close()
            raise IntegrityError(f"bundle holds files its manifest does not list: {extra[:3]}")

    def check_signature(self, trust: Trust) -> str:
        """The manifest's and every member's signature, each by a signer ``trust`` trusts for sealing."""
        check_manifest_signature(self.public_key, self.signature, self.sig_purpose, BUNDLE_DOMAIN + self._body_raw,
                                 self.signer_id, trust, "bundle manifest signature")  # fmt: skip
        for m in self.members:
            m.check_signature(trust)
        if not self.members:
            raise UntrustedSignerError("empty bundle")
        return self.signer_id

    def check_self_consistent(self) -> str:
        """The manifest's and every member's signature under the key each names, with no trust decision."""
        verify_manifest_signature(self.public_key, self.signature, self.sig_purpose, BUNDLE_DOMAIN + self._body_raw,
                                  self.signer_id, "bundle manifest signature")  # fmt: skip
        for m in self.members:
            m.check_self_consistent()
        return self.signer_id

    def verify_digests(self, *, threads: int = 2, progress: Progress | None = None) -> None:
        for m in self.members:
            m.verify_digests(threads=threads, progress=progress)

    def unlock(self, providers: Sequence[KeyProvider]) -> BundleReader:
        readers = []
        try:
            for m in self.members:
                readers.append(m.unlock(providers))
        except BaseException:
            for r in readers:
                r._aead = None
            raise
        return BundleReader(self, readers)

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": "weightwarden-bundle",
            "bundle_id": self.bundle_id,
            "signer": self.signer_id,
            "members": [m.describe() for m in self.members],
        }

    @property
    def data_len(self) -> int:
        return sum(m.context.data_len for m in self.members)

    def close(self) -> None:
        for m in self.members:
            m.close()

    def __enter__(self) -> SealedBundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BundleReader:
    """Decrypting view of a whole bundle: files by name and tensors of every shard."""

    def __init__(self, bundle: SealedBundle, readers: list[SealedReader]):
        self._bundle = bundle
        self._readers = readers
        self._by_name = {r.name: r for r in readers}
        self._tensor_owner: dict[str, SealedReader] = {}
        for r in readers:
            for k in r.keys():  # noqa: SIM118 (a reader, not a dict)
                if k in self._tensor_owner:
                    raise FormatError(f"tensor {k[:64]!r} appears in two shards")
                self._tensor_owner[k] = r

    def files(self) -> list[str]:
        return sorted(self._by_name)

    def read_file(self, name: str) -> bytes:
        """The original bytes of one member file, in memory."""
        r = self._by_name.get(name)
        if r is None:
            raise FileNotFoundError(name)
        body = r.read_all()
        if r.kind == "safetensors":
            return r.safetensors_header_bytes() + body.tobytes()
        return body.tobytes()

    def member(self, name: str) -> SealedReader:
        return self._by_name[name]

    def keys(self) -> list[str]:
        return sorted(self._tensor_owner)

    def metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for r in self._readers:
            out.update(r.metadata())
        return out

    def get_tensor(self, name: str) -> np.ndarray:
        try:
            return self._tensor_owner[name].get_tensor(name)
        except KeyError:
            from ..errors import NoSuchTensorError

            raise NoSuchTensorError(name) from None

    def tensor_reader(self, name: str) -> SealedReader:
        """The member (shard) that holds tensor ``name``."""
        try:
            return self._tensor_owner[name]
        except KeyError:
            from ..errors import NoSuchTensorError

            raise NoSuchTensorError(name) from None

    def tensor_readers(self) -> list[SealedReader]:
        return [r for r in self._readers if r.kind == "safetensors"]

    def load_numpy(self, *, check_digests: bool = True, threads: int | None = None) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for r in self.tensor_readers():
            out.update(r.load_numpy(check_digests=check_digests, threads=threads))
        return out

    def close(self) -> None:
        for r in self._readers:
            r._aead = None
        self._bundle.close()

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The library API: seal, open, verify and inspect sealed checkpoints."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import trail as _trail
from ._atomic import TMP_PREFIX, atomic_output, check_target, fsync_dir, write_all
from .audit import AuditAction
from .audit import event as audit_event
from .errors import IntegrityError, KeyManagementError, KeyringError, OutputExistsError
from .home import default_home
from .keys.protocols import KeyringLike
from .keys.provider import KeyProvider, Signer
from .keys.truststore import TrustStore
from .sealed import format as F
from .sealed.bundle import SealedBundle, safe_relpath, seal_dir
from .sealed.decrypt import Progress, SealedReader, resolve_threads
from .sealed.opening import default_keyring, open_reader, open_sealed, resolve_providers, resolve_trust
from .sealed.signature import Trust
from .sealed.writer import SealResult, seal_file

__all__ = [
    "Trust", "VerifyReport", "default_keyring", "inspect", "load", "open_sealed", "safe_open", "seal", "unseal",
    "verify",
]  # fmt: skip

STREAM_BLOCK = 16 * F.DEFAULT_CHUNK


def _home(home: str | os.PathLike[str] | None, keyring: KeyringLike | None, trust: Any = None) -> Path:
    """Whose trail an operation is logged in: ``home``, else the keyring's, else the trust store's."""
    if home is not None:
        return Path(home)
    if keyring is not None and getattr(keyring, "home", None) is not None:
        return Path(keyring.home)
    if isinstance(trust, TrustStore) and trust.path is not None:
        return trust.path.parent
    return default_home()


def _logged(home: Path, action: AuditAction, subject: str, detail: dict[str, Any]) -> Any:
    """One operation, one append: its own event plus the key use inside it (ok, or the error)."""
    import contextlib

    @contextlib.contextmanager
    def cm() -> Iterator[dict[str, Any]]:
        with _trail.operation(home) as t:
            try:
                yield detail
            except Exception as e:
                outcome = "denied" if isinstance(e, (IntegrityError, KeyringError, KeyManagementError)) else "error"
                t.emit(audit_event(action, outcome, subject=subject, detail={**detail, "error": type(e).__name__}))
                raise
            t.emit(audit_event(action, "ok", subject=subject, detail=detail))

    return cm()


# -- sealing ----------------------------------------------------------------------------
def seal(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    keyring: KeyringLike | None = None,
    key: str | None = None,
    provider: KeyProvider | None = None,
    signer: Signer | None = None,
    hide_header: bool = False,
    chunk_size: int = F.DEFAULT_CHUNK,
    force: bool = False,
    progress: Progress | None = None,
    home: str | os.PathLike[str] | None = None,
) -> list[SealResult]:
    """Seal a safetensors file, any single file, or a whole model directory.

    ``key`` names the keyring's KEK to wrap under (one per model lets you shred a model).  The seal
    (with the wraps and signatures in it) is one event of ``home``'s trail (default: the keyring's).
    """
    src, dst = Path(src), Path(dst)
    if provider is None or signer is None:
        kr = keyring or default_keyring()
        keyring = kr
        provider = provider or kr.provider(key)
        signer = signer or kr.signer()
    kw: dict[str, Any] = {"provider": provider, "signer": signer, "chunk_size": chunk_size}
    kw |= {"hide_header": hide_header, "force": force, "progress": progress}
    with _logged(_home(home, keyring), AuditAction.MODEL_SEAL, str(dst), {"source": str(src)}) as detail:
        res = seal_dir(src, dst, **kw) if src.is_dir() else [seal_file(src, dst, **kw)]
        detail["files"] = [{"path": str(r.path), "file_id": r.file_id, "bytes": r.data_len} for r in res]
        detail["signer"] = res[0].signer if res else None
        detail["key_id"] = getattr(provider, "key_id", None)
    return res


# -- reading ------------------------------------------------------------------------------
def safe_open(
    path: str | os.PathLike[str],
    framework: str | None = None,
    device: Any = "cpu",
    *,
    keyring: KeyringLike | None = None,
    providers: Sequence[KeyProvider] | None = None,
    trust: Trust | None = None,
) -> Any:
    """Open a sealed file or bundle for reading tensors, like ``safetensors.safe_open``.

    The manifest signature is checked against ``trust`` (default: the trust
    store under ``$WARDEN_HOME``) before any key is used; tensors are decrypted on
    demand, chunk by chunk, into memory only.

    Without ``framework`` this returns weightwarden's reader (numpy tensors, files of a
    bundle by name); with one (``"pt"``, ``"np"``, ``"flax"``, ...) it returns
    :class:`weightwarden.safetensors.safe_open`, which behaves as ``safetensors`` does
    (``get_slice``, torch tensors on ``device``).
    """
    if framework is not None:
        from .safetensors import safe_open as st_open

        return st_open(path, framework, device, keyring=keyring, providers=providers, trust=trust)
    return open_reader(path, keyring=keyring, providers=providers, trust=trust)


def load(
    path: str | os.PathLike[str],
    *,
    keyring: KeyringLike | None = None,
    providers: Sequence[KeyProvider] | None = None,
    trust: Trust | None = None,
    check_digests: bool = True,
    threads: int | None = None,
) -> dict[str, np.ndarray]:
    """Decrypt every tensor of a sealed file or bundle into memory, on ``threads`` threads (None: all cores)."""
    with open_reader(path, keyring=keyring, providers=providers, trust=trust) as r:
        return r.load_numpy(check_digests=check_digests, threads=threads)


def _iter_plain(r: SealedReader, block: int = STREAM_BLOCK, threads: int | None = 1) -> Iterator[memoryview]:
    n = r.data_len
    t = resolve_threads(threads)
    block *= t  # a piece of 16 chunks per thread
    buf = np.empty(min(block, max(n, 1)), dtype=np.uint8)
    mv = buf.data
    if n == 0:
        r.read_all()  # authenticates the empty final chunk
    for s in range(0, n, block):
        e = min(n, s + block)
        r.read_into(s, e, mv[: e - s], threads=t)
        yield mv[: e - s]


def _write_plain(
    r: SealedReader, dst: Path, *, force: bool, progress: Progress | None, threads: int | None = 1
) -> None:
    with atomic_output(dst, force=force) as fd:
        os.fchmod(fd, 0o600)
        if r.kind == "safetensors":
            write_all(fd, r.safetensors_header_bytes())
        for piece in _iter_plain(r, threads=threads):
            write_all(fd, piece)
            if progress is not None:
                progress(len(piece))


def unseal(
    path: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    keyring: KeyringLike | None = None,
    providers: Sequence[KeyProvider] | None = None,
    trust: Trust | None = None,
    force: bool = False,
    progress: Progress | None = None,
    threads: int | None = None,
    home: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """Write the plaintext of a sealed file (or bundle, as a directory) to ``dst``.

    The only call that puts plaintext on disk; it refuses to overwrite unless
    ``force``.  The result is byte-identical to what was sealed.  Decrypts on
    ``threads`` threads (None: every core).  Logged as one event.
    """
    dst = Path(dst)
    check_target(dst, force)
    with _logged(_home(home, keyring, trust), AuditAction.MODEL_OPEN, str(path), {"output": str(dst)}):
        return _unseal(path, dst, keyring=keyring, providers=providers, trust=trust, force=force, progress=progress,
                       threads=threads)


def _unseal(path: str | os.PathLike[str], dst: Path, *, keyring: KeyringLike | None,
            providers: Sequence[KeyProvider] | None, trust: Trust | None, force: bool,
            progress: Progress | None, threads: int | None) -> list[Path]:  # fmt: skip
    with open_reader(path, keyring=keyring, providers=providers, trust=trust) as r:
        if isinstance(r, SealedReader):
            _write_plain(r, dst, force=force, progress=progress, threads=threads)
            return [dst]
        parent = dst.parent if str(dst.parent) else Path(".")
        tmp = parent / f"{TMP_PREFIX}{dst.name}.{secrets.token_hex(6)}"
        tmp.mkdir(mode=0o700)
        try:
            written = []
            for name in r.files():
                rel = safe_relpath(name)
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                _write_plain(r.member(name), tmp / rel, force=False, progress=progress, threads=threads)
                written.append(dst / rel)
            if os.path.lexists(dst):
                if not force:
                    raise OutputExistsError(f"{dst} exists; pass force=True (--force) to overwrite")
                shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
            os.replace(tmp, dst)
            fsync_dir(parent)
            return written
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# -- checking ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifyReport:
    path: str
    signer: str
    files: int
    chunks: int
    bytes: int
    deep: bool

    def to_json(self) -> dict[str, Any]:
        return {"ok": True, **self.__dict__}


def verify(
    path: str | os.PathLike[str],
    *,
    trust: Trust | None = None,
    deep: bool = False,
    keyring: KeyringLike | None = None,
    providers: Sequence[KeyProvider] | None = None,
    progress: Progress | None = None,
    threads: int | None = None,
    home: str | os.PathLike[str] | None = None,
) -> VerifyReport:
    """Check signature and every chunk digest with no key; ``deep`` also checks every GCM tag.

    Writes nothing but its event in ``home``'s trail.  Raises a typed error on the first problem found.
    Runs on ``threads`` threads (None: every core).
    """
    with _logged(_home(home, keyring, trust), AuditAction.MODEL_VERIFY, str(path), {"deep": deep}) as detail:
        rep = _verify(path, trust=trust, deep=deep, keyring=keyring, providers=providers, progress=progress,
                      threads=threads)
        detail |= {"signer": rep.signer, "files": rep.files, "chunks": rep.chunks}
        return rep


def _verify(path: str | os.PathLike[str], *, trust: Trust | None, deep: bool, keyring: KeyringLike | None,
            providers: Sequence[KeyProvider] | None, progress: Progress | None,
            threads: int | None) -> VerifyReport:  # fmt: skip
    with open_sealed(path) as sealed:
        signer = sealed.check_signature(resolve_trust(trust, keyring))
        sealed.verify_digests(threads=resolve_threads(threads), progress=progress)
        members = sealed.members if isinstance(sealed, SealedBundle) else [sealed]
        chunks = sum(m.context.n_chunks for m in members)
        nbytes = sum(m.context.data_len for m in members)
        if deep:
            provs = resolve_providers(keyring, providers)
            for m in members:
                r = m.unlock(provs)
                for _ in _iter_plain(r, threads=threads):
                    pass
        return VerifyReport(str(path), signer, len(members), chunks, nbytes, deep)


def inspect(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything visible without a key.  The signature is checked for consistency, not trust."""
    with open_sealed(path) as sealed:
        sealed.check_self_consistent()
        return sealed.describe()

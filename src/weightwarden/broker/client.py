"""A small client for the broker: signs a fresh request token per call with the account's key, and
pulls sealed weights resumably, verifying them before they are put in place.

    c = BrokerClient("https://broker:8443", "loader", key)        # key: an Ed25519 private key
    c.pull("llama-8b", "llama-8b.wws")                            # or request_id=... for a copy

A pull writes ``FILE.part`` and a sidecar ``FILE.part.json`` that records what the part is of (broker,
model or request, the file's ETag and size).  After a cut it resumes with one ``Range`` request and
``If-Match: ETAG``: if the broker's file changed, or the sidecar is for another download, the pull is
refused (:class:`ResumeMismatchError`) and nothing is touched.  The finished part is checked with
:func:`weightwarden.verify` (signature and every chunk digest) before it is renamed into place.

Needs ``httpx`` and ``pyjwt`` (the ``client`` extra).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._extras import require
from ..errors import WardenError

__all__ = ["BrokerClient", "BrokerHTTPError", "PullResult", "ResumeMismatchError", "WrongFileError",
           "load_account_key"]

_MAX_TRIES = 5


class BrokerHTTPError(WardenError):
    """The broker refused a call (4xx/5xx); ``status`` and the broker's one-line ``error``."""

    def __init__(self, status: int, msg: str):
        super().__init__(f"broker answered {status}: {msg}")
        self.status = status


class ResumeMismatchError(WardenError):
    """A partial download cannot be resumed: it is of another file, model or broker."""


class WrongFileError(WardenError):
    """The file that arrived is not the one asked for (its sealed header's file id differs from the one
    the broker names for the model, or from the stream's ``X-Warden-File-Id``): nothing is put in place."""


@dataclass(frozen=True)
class PullResult:
    path: str
    bytes: int
    resumed_from: int  # bytes already on disk when this pull started
    attempts: int  # HTTP requests made for the body
    signer: str  # who signed the sealed file (from verify)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _need() -> Any:
    require("jwt", extra="client")  # tokens.mint needs it
    return require("httpx", extra="client")


def load_account_key(path: str | os.PathLike[str]) -> Any:
    """An account's Ed25519 private key from a file: PEM (PKCS#8, unencrypted), or the 32-byte seed
    raw or as 64 hex characters."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise WardenError(f"{p}: cannot read the account key ({e.strerror})") from None
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            k = load_pem_private_key(data, password=None)
        elif len(data.strip()) == 64:
            k = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(data.strip().decode()))
        elif len(data) == 32:
            k = Ed25519PrivateKey.from_private_bytes(data)
        else:
            raise ValueError
    except (ValueError, TypeError, UnicodeDecodeError):
        raise WardenError(f"{p}: not an Ed25519 private key (PEM, 32 raw bytes or 64 hex characters)") from None
    if not isinstance(k, Ed25519PrivateKey):
        raise WardenError(f"{p}: not an Ed25519 private key")
    return k


class BrokerClient:
    """Calls to one broker as one account.  ``transport``: an httpx transport (tests)."""

    def __init__(self, url: str, account: str, private_key: Any, *, audience: str = "weightwarden-broker",
                 timeout: float = 60.0, transport: Any = None):  # fmt: skip
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        from ..keys.provider import ed25519_key_id

        httpx = _need()
        self.url, self.account, self.audience = url.rstrip("/"), account, audience
        self._key = private_key
        self.key_id = ed25519_key_id(private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
        base = self.url
        if self.url.startswith("unix:"):  # a broker on a Unix socket (`warden serve --uds PATH`)
            sock = self.url[len("unix:"):]
            if not sock or transport is not None:
                raise WardenError(f"--broker {self.url}: write a Unix socket as unix:/path/to/broker.sock")
            transport, base = httpx.HTTPTransport(uds=sock), "http://localhost"
        self._http = httpx.Client(base_url=base, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _headers(self, method: str, path: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        from .tokens import mint

        tok = mint(self.account, self._key, self.key_id, self.audience, method, path.split("?", 1)[0])
        return {"authorization": f"Bearer {tok}", **(extra or {})}

    def request(self, method: str, path: str, **kw: Any) -> Any:
        """One signed call; raises :class:`BrokerHTTPError` on a 4xx/5xx."""
        r = self._http.request(method, path, headers=self._headers(method, path, kw.pop("headers", None)), **kw)
        if r.status_code >= 400:
            raise BrokerHTTPError(r.status_code, _error(r))
        return r

    def models(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/models").json()["models"])

    def model(self, name: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/models/{name}").json())

    # -- pulls ----------------------------------------------------------------------------------
    def pull(self, model: str, out: str | os.PathLike[str], *, request_id: str | None = None, trust: Any = None,
             force: bool = False, max_tries: int = _MAX_TRIES) -> PullResult:  # fmt: skip
        """Download ``model``'s sealed weights (or the copy of approved request ``request_id``) to ``out``,
        resuming ``out.part`` if a sidecar shows it is of this very file; verify, then rename into place.

        ``trust``: what :func:`weightwarden.verify` checks the signer against (a TrustStore or public
        keys; None: the trust store of ``$WARDEN_HOME``, as ``warden verify``)."""
        from .. import api
        from .._atomic import check_target, fsync_dir
        from .storage import check_name

        httpx = _need()
        check_name(model)  # a name cannot reach another path of the broker
        if request_id is not None and not (len(request_id) == 32 and all(c in "0123456789abcdef" for c in request_id)):
            raise WardenError("--request is a request id: 32 hexadecimal digits")
        out = Path(out)
        check_target(out, force)
        part, side = out.with_name(out.name + ".part"), out.with_name(out.name + ".part.json")
        path = f"/v1/requests/{request_id}/download" if request_id else f"/v1/models/{model}/weights"
        want = {"broker": self.url, "model": model, "request": request_id}
        state = self._resume_state(part, side, want)
        # the file id the broker's metadata names for the model: what arrives must be that file (issue 18)
        expect = None if request_id else self.model(model).get("detail", {}).get("file_id")
        if request_id is None and not isinstance(expect, str):
            raise WrongFileError(f"the broker names no file id for model {model!r}: cannot check what arrives")
        resumed_from = part.stat().st_size if state else 0
        attempts = 0
        while True:
            have = part.stat().st_size if state and part.exists() else 0
            if state and have >= state["size"]:
                break
            attempts += 1
            extra = {"range": f"bytes={have}-", "if-match": state["etag"]} if state else {}
            try:
                with self._http.stream("GET", path, headers=self._headers("GET", path, extra)) as r:
                    if r.status_code >= 400:
                        r.read()
                        if r.status_code == 412:
                            msg = f"the broker's file changed since this partial copy: delete it and {side.name}"
                            raise ResumeMismatchError(f"{part}: {msg}")
                        raise BrokerHTTPError(r.status_code, _error(r))
                    served = r.headers.get("x-warden-file-id")
                    if (expect is not None and served != expect) or (state and state.get("file_id") != served):
                        r.close()
                        raise WrongFileError(f"{out}: the broker streamed another file than {model!r} "
                                             f"(X-Warden-File-Id differs): nothing put in place")  # fmt: skip
                    if state is None:
                        if r.status_code != 200:
                            raise BrokerHTTPError(r.status_code, "expected the whole file")
                        state = {**want, "etag": r.headers.get("etag", ""), "size": int(r.headers["content-length"]),
                                 "file_id": served}  # fmt: skip
                        _write_json(side, state)
                        mode = "wb"
                    else:
                        if r.status_code != 206 or r.headers.get("etag") != state["etag"]:
                            raise ResumeMismatchError(f"{part}: the broker did not resume the same file")
                        if not r.headers.get("content-range", "").startswith(f"bytes {have}-"):
                            raise BrokerHTTPError(r.status_code, "the broker resumed at another offset")
                        mode = "ab"
                    with open(part, mode) as f:
                        for b in r.iter_bytes():
                            f.write(b)
                        f.flush()
                        os.fsync(f.fileno())
            except (httpx.TransportError, httpx.StreamError) as e:  # a cut: resume from what is on disk
                if attempts >= max_tries:
                    msg = f"the download from {self.url} failed {attempts} times ({type(e).__name__}): run it again"
                    raise BrokerHTTPError(0, msg + (f" to resume {part.name}" if part.exists() else "")) from None
                continue
            if state is not None and part.exists() and part.stat().st_size < state["size"] and attempts >= max_tries:
                raise BrokerHTTPError(0, f"the download ended short {attempts} times")
        if part.stat().st_size != state["size"]:
            raise ResumeMismatchError(f"{part}: longer than the file it is a copy of: delete it and start again")
        try:
            rep = api.verify(part, trust=trust)  # signature and every chunk digest, before it is put in place
            got = _file_id(part)
            if (state.get("file_id") is not None and got != state["file_id"]) or (expect is not None and got != expect):
                raise WrongFileError(f"{part}: the sealed file that arrived (file id {got[:16]}...) is not "
                                     f"the one asked for ({model!r}): deleted, nothing put in place")  # fmt: skip
        except WardenError:
            part.unlink(missing_ok=True)  # a copy that does not verify is never resumed nor put in place
            side.unlink(missing_ok=True)
            raise
        os.replace(part, out)
        side.unlink(missing_ok=True)
        fsync_dir(out.parent)
        return PullResult(str(out), state["size"], resumed_from, attempts, rep.signer)

    @staticmethod
    def _resume_state(part: Path, side: Path, want: dict[str, Any]) -> dict[str, Any] | None:
        if not part.exists():
            side.unlink(missing_ok=True)
            return None
        try:
            state = json.loads(side.read_text())
            ok = isinstance(state, dict) and isinstance(state.get("etag"), str) and isinstance(state.get("size"), int)
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise ResumeMismatchError(f"{part} exists without a readable {side.name}: delete it to start again")
        if {k: state.get(k) for k in want} != want:
            what = f"{state.get('model')!r} from {state.get('broker')!r}"
            raise ResumeMismatchError(f"{part} is a partial copy of another download ({what}): delete it and "
                                      f"{side.name} to start again")  # fmt: skip
        return state


def _file_id(path: Path) -> str:
    """The file id in a sealed file's header, hex."""
    from ..sealed.reader import SealedFile

    with SealedFile(path) as sf:
        return str(sf.context.file_id.hex())


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True))
    os.replace(tmp, path)


def _error(r: Any) -> str:
    """The broker's one-line error, with anything unprintable (terminal escapes) replaced."""
    try:
        j = r.json()
        msg = str(j.get("error", "")) if isinstance(j, dict) else ""
    except ValueError:
        msg = r.text
    return "".join(ch if ch.isprintable() else "?" for ch in msg[:300])

"""The HTTP layer: FastAPI routes over :class:`.service.Broker`, nothing more.

routes -> ``principal`` dependency (request token) -> service (policy, approvals, limits, audit) ->
storage.  Every refusal is a JSON ``{"error": ...}`` with a 4xx status and an audit event; the
OpenAPI document is at ``/openapi.json``.
"""

# no `from __future__ import annotations`: FastAPI reads the route annotations at run time, and
# they name types local to create_app
import contextlib
import ipaddress
import json
from typing import Annotated, Any

from .._extras import extra_imports
from ..audit import AuditAction
from .errors import BrokerError, EgressLimitError, StreamCut
from .service import Broker
from .storage import BadNameError, StorageError

__all__ = ["MAX_BODY", "create_app"]

MAX_BODY = 64 * 1024


def _network(host: str | None) -> str | None:
    """The /24 (IPv4) or /48 (IPv6) a client connects from: the unit of the new-network rule."""
    if not host:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return str(ipaddress.ip_network(f"{ip}/{24 if ip.version == 4 else 48}", strict=False))


class _BodyLimit:
    """Pure ASGI middleware: refuse bodies over ``MAX_BODY`` (declared or streamed) with 413."""

    def __init__(self, app: Any, broker: Broker):
        self.app, self.broker = app, broker

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
            await self._refuse(scope, send)
            return
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > MAX_BODY:
                    raise _TooLarge
            return msg

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(scope, send)

    async def _refuse(self, scope: Any, send: Any) -> None:
        self.broker.audit(AuditAction.BROKER_REJECT, "denied", "unknown", scope.get("path", "")[:200],
                          reason="body too large")  # fmt: skip
        body = json.dumps({"error": f"request body exceeds {MAX_BODY} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(broker: Broker, passkeys: Any = None, *, threads: int = 8) -> Any:
    """The broker's ASGI app; with ``passkeys`` (a :class:`.passkeys.Passkeys`), the web console too.

    ``threads``: worker threads for the (blocking) service calls.  Few: the work holds the GIL
    most of the time, and fewer runnable threads keep a policy decision from queueing behind them."""
    with extra_imports("server"):
        import anyio
        from fastapi import Depends, FastAPI, Header, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, StreamingResponse
        from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
        from pydantic import BaseModel, Field

    from .policy import Permission, Principal

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> Any:
        anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        yield

    app = FastAPI(title="weightwarden broker", version="1", description="One guarded door to the weights.",
                  lifespan=lifespan)  # fmt: skip
    bearer = HTTPBearer(auto_error=False, description="a request token (see docs/BROKER.md): EdDSA JWT, single use")

    def err(status: int, msg: str) -> JSONResponse:
        return JSONResponse({"error": msg}, status_code=status)

    @app.exception_handler(BrokerError)
    async def _broker_error(_: Request, e: BrokerError) -> JSONResponse:
        r = err(e.status, str(e))
        if e.status == 401:
            r.headers["www-authenticate"] = 'Bearer realm="weightwarden"'
        for k, v in getattr(e, "headers", {}).items():
            r.headers[k] = v
        return r

    @app.exception_handler(BadNameError)
    async def _bad_name(req: Request, e: BadNameError) -> JSONResponse:
        broker.audit(AuditAction.BROKER_REJECT, "denied", "unknown", req.url.path[:200], reason=str(e))
        return err(400, str(e))

    @app.exception_handler(StorageError)
    async def _storage(_: Request, e: StorageError) -> JSONResponse:
        return err(404, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(req: Request, e: RequestValidationError) -> JSONResponse:
        broker.audit(AuditAction.BROKER_REJECT, "denied", "unknown", req.url.path[:200], reason="malformed request")
        return err(400, "malformed request: " + "; ".join(str(x.get("msg", ""))[:100] for x in e.errors()[:3]))

    def principal(request: Request, cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
                  ) -> Principal:  # fmt: skip
        if cred is None:
            broker.audit(AuditAction.BROKER_AUTHENTICATE, "denied", "unknown", request.url.path[:200],
                         reason="no token")  # fmt: skip
            raise BrokerErrorHTTP(401, "a request token is required")
        host = request.client.host if request.client else None
        # the token binds the path as the client sent it (percent-encoding and all)
        raw = request.scope.get("raw_path")
        path = raw.decode("latin-1").split("?", 1)[0] if raw else request.url.path
        return broker.authenticate(cred.credentials, request.method, path, network=_network(host))

    Who = Annotated[Principal, Depends(principal)]

    class CopyRequest(BaseModel):
        model: str = Field(min_length=1, max_length=128)
        action: str = Field(default="copy", pattern="^(copy|release)$")
        reason: str = Field(default="", max_length=500)
        recipient: str | None = Field(
            default=None,
            min_length=1,
            max_length=256,
            description="a release: the end user, screened by the export-control gate",
        )
        country: str | None = Field(default=None, pattern="^[A-Za-z]{2}$", description="a release: destination")
        aliases: list[str] = Field(default_factory=list, max_length=10)

    class Approval(BaseModel):
        signature: str = Field(pattern="^[0-9a-f]{128}$", description="Ed25519 signature (hex) of the request")

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/v1/models")
    def list_models(p: Who) -> dict[str, Any]:
        return {"models": broker.models(p)}

    @app.get("/v1/models/{name}")
    def get_model(name: str, p: Who) -> dict[str, Any]:
        broker.authorize(p, Permission.MODEL_METADATA_READ, name, hide=True)  # another team's model: 404
        return broker.model(name)

    def _stream(it: Any, name: str) -> Any:
        try:
            first = next(it)  # the first chunk is debited before any header goes out
        except StopIteration:
            first = b""
        except EgressLimitError as e:
            it.close()
            raise BrokerErrorHTTP(429, str(e)) from None
        except BaseException:
            it.close()
            raise
        headers = {"content-disposition": f'attachment; filename="{name}.wws"', "content-length": str(it.size),
                   "accept-ranges": "bytes", "etag": it.etag}  # fmt: skip
        if it.file_id:  # which sealed file this is (its header's file id): the client checks what arrived
            headers["x-warden-file-id"] = it.file_id
        if it.partial:
            headers["content-range"] = f"bytes {it.start}-{it.start + it.size - 1}/{it.total}"
        return _WeightResponse(it, first, 206 if it.partial else 200, headers, ahead=broker.config.zero_copy_ahead)

    RangeH = Annotated[str | None, Header(alias="range", description="one byte range: bytes=A-B, A- or -N",
                                          max_length=200)]  # fmt: skip
    IfMatch = Annotated[str | None, Header(alias="if-match", description="the ETag a resumed copy came from",
                                           max_length=200)]  # fmt: skip

    @app.get("/v1/models/{name}/weights", response_class=StreamingResponse)
    def stream_weights(name: str, p: Who, request: Request, range_: RangeH = None,
                       if_match: IfMatch = None) -> Any:  # fmt: skip
        host = request.client.host if request.client else None
        return _stream(broker.stream(p, name, network=_network(host), range_=range_, if_match=if_match,
                                     zero_copy=_zero_copy(request)), name)  # fmt: skip

    @app.post("/v1/requests", status_code=201)
    def open_request(body: CopyRequest, p: Who) -> dict[str, Any]:
        return broker.request_copy(
            p,
            body.model,
            body.action,
            reason=body.reason,
            recipient=body.recipient,
            country=body.country,
            aliases=tuple(a[:256] for a in body.aliases),
        )

    @app.get("/v1/requests/{rid}")
    def get_request(rid: str, p: Who) -> dict[str, Any]:
        req = broker.request(rid)
        if p.id != req["requester"]:
            broker.authorize(p, Permission.APPROVAL_REQUEST_APPROVE, req["model"])
        return {**req, "message_to_sign": broker.approval_message(req).hex()}

    @app.post("/v1/requests/{rid}/approvals")
    def approve(rid: str, body: Approval, p: Who) -> dict[str, Any]:
        return broker.approve(p, rid, bytes.fromhex(body.signature))

    @app.get("/v1/requests/{rid}/download", response_class=StreamingResponse)
    def download(rid: str, p: Who, request: Request, range_: RangeH = None,
                 if_match: IfMatch = None) -> Any:  # fmt: skip
        req = broker.request(rid)
        host = request.client.host if request.client else None
        it = broker.stream(p, req["model"], request_id=rid, network=_network(host), range_=range_, if_match=if_match,
                           zero_copy=_zero_copy(request))  # fmt: skip
        return _stream(it, req["model"])

    @app.get("/v1/audit/head")
    def audit_head(p: Who) -> dict[str, Any]:
        broker.authorize(p, Permission.AUDIT_LOG_READ)
        return broker.log.head().to_json()

    @app.get("/v1/audit/proof/{index}")
    def audit_proof(index: int, p: Who) -> dict[str, Any]:
        broker.authorize(p, Permission.AUDIT_LOG_READ)
        from ..errors import AuditLogError

        try:
            return broker.log.prove(index).to_json()
        except AuditLogError as e:
            raise BrokerErrorHTTP(404, str(e)) from None

    @app.get("/v1/metrics")
    def metrics(p: Who) -> dict[str, Any]:
        broker.authorize(p, Permission.AUDIT_LOG_READ)
        return {**broker.metrics(), "audit_events": broker.log.size()}

    @app.get("/v1/alerts")
    def alerts(p: Who) -> dict[str, Any]:
        broker.authorize(p, Permission.AUDIT_LOG_READ)
        return {"alerts": broker.alerts()}

    if passkeys is not None:
        from .console import console_router

        app.include_router(console_router(passkeys))
    app.add_middleware(_BodyLimit, broker=broker)
    return app


def _zero_copy(request: Any) -> bool:
    from .zerocopy import EXTENSION

    return EXTENSION in (request.scope.get("extensions") or {})


def _next_chunk(it: Any) -> bytes | None:
    try:
        return next(it)
    except StopIteration:
        return None


def _weight_response_base() -> Any:
    from starlette.responses import Response

    return Response


class _WeightResponse(_weight_response_base()):  # type: ignore[misc]
    """A metered weight stream as an ASGI response: chunks are produced in a worker thread, the client's
    disconnect stops the stream (what it was not sent is not charged), and the stream is always closed
    explicitly in a worker thread (its bookkeeping never runs from a garbage collector's whim).  A stream
    cut mid-way (budget, suspension) ends the connection short of its Content-Length."""

    def __init__(self, it: Any, first: bytes, status: int, headers: dict[str, str], *, ahead: bool = True):
        self.it, self.first, self.status_code, self.meter_ahead = it, first, status, ahead
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self.raw_headers.append((b"content-type", b"application/octet-stream"))
        self.background = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        import asyncio

        import anyio

        it = self.it

        from .zerocopy import EXTENSION, FileSpan

        zc = EXTENSION in (scope.get("extensions") or {})
        # zero-copy: the next span is metered (debited, its principal's suspension checked) in a worker thread
        # while this one goes out, so that the socket does not run dry during each span's bookkeeping.  A span
        # metered ahead and never handed to the server is given back as unsent (it stays charged: a resume's
        # credit).  Never ahead of the last span (``FileSpan.last``): the end of the spans closes the file that
        # span is sent from (were it ahead, a file shorter than its record could be closed mid-send).
        ahead: list[Any] = []

        async def pump(done: Any) -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            b: Any = self.first
            try:
                while b is not None:
                    if isinstance(b, FileSpan):
                        if zc:
                            if self.meter_ahead and not b.last:
                                ahead.append(asyncio.ensure_future(anyio.to_thread.run_sync(_next_chunk, it)))
                            await send({"type": EXTENSION, "file": b.file, "offset": b.offset, "count": b.count,
                                        "more_body": True})  # fmt: skip
                            if ahead:
                                try:
                                    b = await asyncio.shield(ahead[0])
                                except (EgressLimitError, StreamCut):
                                    break  # audited by the service; the body ends short
                                finally:
                                    if ahead[0].done():
                                        ahead.clear()
                                continue
                        else:
                            await send({"type": "http.response.body", "body": await anyio.to_thread.run_sync(b.read),
                                        "more_body": True})  # fmt: skip
                    elif b:
                        await send({"type": "http.response.body", "body": b, "more_body": True})
                    try:
                        b = await anyio.to_thread.run_sync(_next_chunk, it)
                    except (EgressLimitError, StreamCut):
                        break  # audited by the service; the body ends short
                else:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass  # the client went away (ASGI 2.4 servers raise it from send)
            done.cancel()

        async def watch(done: Any) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            done.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch, tg.cancel_scope)
                await pump(tg.cancel_scope)
        finally:
            with anyio.CancelScope(shield=True):
                for fut in ahead:  # a span metered ahead and not sent: the stream must not count it as sent
                    with contextlib.suppress(Exception):
                        left = await fut
                        if left is not None:
                            it.unsent(len(left))
                await anyio.to_thread.run_sync(it.close)
        # cut: returning without the final body message makes the server drop the connection, so the
        # client sees a broken transfer


class BrokerErrorHTTP(BrokerError):
    def __init__(self, status: int, msg: str):
        super().__init__(msg)
        self.status = status

"""The HTTP layer: FastAPI routes over :class:`.service.Broker`, nothing more.

routes -> ``principal`` dependency (request token) -> service (policy, approvals, limits, audit) ->
storage.  Every refusal is a JSON ``{"error": ...}`` with a 4xx status and an audit event; the
OpenAPI document is at ``/openapi.json``.
"""

# no `from __future__ import annotations`: FastAPI reads the route annotations at run time, and
# they name types local to create_app
import ipaddress
import json
from typing import Annotated, Any

from ..audit import AuditAction
from .service import Broker, BrokerError, EgressLimitError, StreamCut
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
    import contextlib

    import anyio
    from fastapi import Depends, FastAPI, Request
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

    def _stream(it: Any, name: str) -> StreamingResponse:
        try:
            first = next(it)  # the first chunk is debited before any header goes out
        except StopIteration:
            first = b""
        except EgressLimitError as e:
            raise BrokerErrorHTTP(429, str(e)) from None

        def rest() -> Any:
            yield first
            try:
                yield from it
            except (EgressLimitError, StreamCut):
                return  # suspended mid-stream: the body ends short of its Content-Length, so the client
                # sees a broken transfer (and a sealed file cut short never opens); the event is logged

        size = it.size if hasattr(it, "size") else broker.model(name)["size"]
        return StreamingResponse(rest(), media_type="application/octet-stream",
                                 headers={"content-disposition": f'attachment; filename="{name}.wws"',
                                          "content-length": str(size)})  # fmt: skip

    @app.get("/v1/models/{name}/weights", response_class=StreamingResponse)
    def stream_weights(name: str, p: Who, request: Request) -> StreamingResponse:
        host = request.client.host if request.client else None
        return _stream(broker.stream(p, name, network=_network(host)), name)

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
    def download(rid: str, p: Who, request: Request) -> StreamingResponse:
        req = broker.request(rid)
        host = request.client.host if request.client else None
        return _stream(broker.stream(p, req["model"], request_id=rid, network=_network(host)), req["model"])

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


class BrokerErrorHTTP(BrokerError):
    def __init__(self, status: int, msg: str):
        super().__init__(msg)
        self.status = status

"""The FastAPI application: routes, middleware (request ids, body limit, metrics), errors in one shape."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.manifest import CAVEAT_VERSION
from service.deps import DISCONNECTED
from service.errors import ServiceError, error_body
from service.openapi import allowed_methods, document
from service.routes import adapters, feedback, health, oip, predict, repository
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger("caveat.serve")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a client's X-Request-ID is echoed only if it looks like one


def create_app(settings: Settings, shared: Path | None = None) -> FastAPI:
    """An app for ``settings``; the base model loads in the background once the app starts. ``shared``: the run
    directory of ``caveat-serve --workers`` (``service.workers``), where this worker's state meets the others'."""
    state = ServiceState(settings, shared)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        yield
        await state.stop()

    app = FastAPI(
        title="Caveat",
        version=CAVEAT_VERSION,
        description="Calibrated predictions with their uncertainty from Bayesian LoRA-XS adapters.",
        lifespan=lifespan,
    )
    app.state.caveat = state
    for router in (predict.router, feedback.router, adapters.router, health.router, oip.router, repository.router):
        app.include_router(router)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_middleware(Observe)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # outermost: added last
    app.openapi = lambda: document(app, settings)  # type: ignore[method-assign]
    return app


# -------------------------------------------------------------------------------------------- middleware


class Observe:
    """Request id (the client's X-Request-ID when it is a plain token, else a new one); OPTIONS and the Allow
    header of 405s; unexpected errors answered in the error shape; request count and latency per endpoint.

    Plain ASGI (no ``BaseHTTPMiddleware``: that one runs every request in a task group with memory streams)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given = request.headers.get("x-request-id", "")
        request.state.request_id = request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        request.state.adapter = ""
        start = time.perf_counter()
        status, started = 500, False

        async def observed(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = MutableHeaders(scope=message)
                if status == 405:
                    headers["Allow"] = ", ".join(allowed_methods(scope["app"], request))
                headers["X-Request-ID"] = request_id
            await send(message)

        allowed = allowed_methods(scope["app"], request) if scope["method"] == "OPTIONS" else []
        if len(allowed) > 1:  # a path some route serves: its methods (an unknown path goes on to 404)
            await Response(status_code=204, headers={"Allow": ", ".join(allowed)})(scope, receive, observed)
        else:
            try:
                await self.app(scope, receive, observed)
            except Exception as exc:  # answered here, so the connection stays usable (uvicorn drops it otherwise)
                if started:  # nothing more can be sent
                    raise
                await (await _unexpected_error(request, exc))(scope, receive, observed)
        endpoint = _endpoint(scope["path"])
        if endpoint is not None:
            state = scope["app"].state.caveat
            adapter = request.state.adapter
            if state.registry is None or adapter not in state.registry:
                adapter = ""  # never a label per unknown name a client sends
            state.metrics.requests.labels(endpoint, adapter, str(status)).inc()
            state.metrics.latency.labels(endpoint, adapter).observe(time.perf_counter() - start)


def _endpoint(path: str) -> str | None:
    if path == "/v1/predict":
        return "predict"
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return "v2_infer"
    if path.startswith("/v1/adapters"):
        return "adapters"
    return None


class BodyLimit:
    """413 for a body over ``max_bytes`` (declared or actually sent), before any route parses it. Once the body
    is read, the client's going away sets the event at ``scope[DISCONNECTED]`` (a waiting request then
    abandons its job)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._refuse(scope, send)
                return
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        gone = scope[DISCONNECTED] = asyncio.Event()

        async def watch() -> None:
            if (await receive())["type"] == "http.disconnect":
                gone.set()

        watcher = asyncio.create_task(watch())
        try:
            await self.app(scope, replay, send)
        finally:
            watcher.cancel()

    async def _refuse(self, scope: Scope, send: Send) -> None:
        await body_too_large(self.max_bytes)(scope, _drain, send)


async def _drain() -> Message:
    return {"type": "http.disconnect"}


# ------------------------------------------------------------------------------------------------ errors


def body_too_large(max_bytes: int) -> JSONResponse:
    """The 413 of a body over ``max_bytes``, before any route (or the Ray ingress) has read it."""
    message = f"request body larger than this server's limit of {max_bytes} bytes"
    return JSONResponse(error_body(413, "PayloadTooLargeError", message, None), status_code=413)


def error_response(request: Request, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
    """An error in the one shape of its route: the Open Inference Protocol's under ``/v2/``, Caveat's elsewhere."""
    if request.url.path.startswith("/v2/"):  # the Open Inference Protocol's own error shape
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    request_id = getattr(request.state, "request_id", None)
    return JSONResponse(error_body(status, kind, message, request_id), status_code=status, headers=headers)


async def _service_error(request: Request, exc: ServiceError):
    return error_response(request, exc.status, type(exc).__name__, exc.message, exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError):
    return error_response(request, 422, "ValidationError", "; ".join(_problem(e) for e in exc.errors()[:5]))


def _problem(error: dict) -> str:
    if error.get("type") == "json_invalid":  # loc is ("body", <character offset>) when the parser knows it
        where = next((f" at character {p}" for p in error.get("loc", ()) if isinstance(p, int)), "")
        return f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'decode error')}{where})"
    return f"{'.'.join(str(p) for p in error['loc'] if p != 'body') or 'body'}: {error['msg']}"


async def _http_error(request: Request, exc: StarletteHTTPException):
    return error_response(request, exc.status_code, "HTTPError", str(exc.detail), getattr(exc, "headers", None))


async def _unexpected_error(request: Request, exc: Exception):
    log.exception("unexpected error on %s", request.url.path)
    return error_response(request, 500, "InternalError", f"internal error ({type(exc).__name__}); see the server log")

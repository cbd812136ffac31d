"""Caveat on Ray Serve: an ingress that sends each request to a worker replica holding its adapter.

Two deployments (``caveat-serve --engine ray``, or ``serve run service.ray_serve:build`` with the settings as
``CAVEAT_*`` variables or ``key=value`` arguments):

- **CaveatWorker**, ``--replicas`` of them (autoscaled on ongoing requests up to ``--max-replicas``): the whole
  Caveat app of :func:`service.app.create_app` — every route, its engine and cross-adapter micro-batching — in the
  replica. A request reaches it as raw HTTP (:class:`RawRequest`) and the app answers it. Adapters are Ray Serve
  *multiplexed models*: the first request for an adapter on a replica loads it from the bundle store (the registry's
  load on miss), Ray routes later requests for it to the replicas that hold it, and a replica holding more than
  ``--adapters-per-replica`` drops its least recently used (:meth:`AdapterRegistry.release`). Replicas load no
  adapter at start.
- **CaveatIngress**: takes HTTP from Ray's proxy, finds the adapter a request is for (the ``adapter`` of a
  ``/v1/predict`` body, the name in ``/v2/models/{name}/...``, ``/v1/adapters/{name}`` and the V2 repository's
  ``load``/``unload``) and forwards the request with that multiplexed model id; other routes go to any replica.
  Multiplexing sits on the worker, not on the ingress (Ray is disallowing it there), and each replica keeps
  Caveat's own batching (``@serve.batch`` would split batches per adapter).

A hot swap reaches every replica through the store (each syncs every ``--store-poll-s``). On one node the replicas
share, as ``--workers`` processes do, a run directory: the Prometheus series (``/metrics`` of any replica renders
every replica's) and the answers kept for feedback. Across nodes each node has its own (see docs/deploy.md).
"""

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import ray
from fastapi import FastAPI, Request, Response
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from adapters.store import NAME_PATTERN
from service.app import body_too_large, create_app, error_response
from service.errors import ServiceError
from service.metrics import MULTIPROCESS_DIR
from service.registry import AdapterRegistry
from service.settings import Settings, settings_from

log = logging.getLogger("caveat.serve")
# the routes about one adapter: V2 inference and metadata, the admin API, the V2 repository's load and unload
ADAPTER_PATH = re.compile(r"/(?:v2/models|v1/adapters|v2/repository/models)/([^/]+)")
METHODS = ["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH"]
READY_POLL_S = 0.2


@dataclass
class RawRequest:
    """An HTTP request as the ingress received it (what crosses from the ingress to a worker replica)."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


async def call_app(app: Any, request: RawRequest) -> RawResponse:
    """Run ``request`` through the ASGI ``app`` in this process; its whole answer."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http", "root_path": "",
        "method": request.method, "path": request.path, "raw_path": request.path.encode(),
        "query_string": request.query, "headers": request.headers, "client": request.client, "server": None,
    }  # fmt: skip
    answered = asyncio.Event()
    body_sent = False
    status, headers, chunks = 500, [], []

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await answered.wait()  # the client of a forwarded request never goes away before its answer
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await app(scope, receive, send)
    finally:
        answered.set()
    return RawResponse(status, headers, b"".join(chunks))


def adapter_of(method: str, path: str, body: bytes) -> str:
    """The adapter a request is for ('' when none or when it cannot be one: the worker's app answers those)."""
    name = ""
    if method == "POST" and path == "/v1/predict":
        with contextlib.suppress(ValueError):
            value = orjson.loads(body)
            if isinstance(value, dict) and isinstance(value.get("adapter"), str):
                name = value["adapter"].partition("@")[0]
    elif match := ADAPTER_PATH.match(path):
        name = match.group(1)
    return name if NAME_PATTERN.match(name) else ""


class _Held:
    """What Ray's multiplexer keeps per adapter of a replica: when it drops one (least recently used beyond the
    bound) it awaits the instance's ``__del__``, which releases the adapter from the registry. Set per instance, so
    that Python's own finaliser (which looks at the class) never calls it."""

    def __init__(self, registry: AdapterRegistry, name: str) -> None:
        async def release() -> None:
            await registry.release(name)

        self.__del__ = release


def worker_deployment(adapters_per_replica: int) -> serve.Deployment:
    """The worker deployment, holding at most ``adapters_per_replica`` adapters per replica."""

    @serve.deployment(name="CaveatWorker")
    class CaveatWorker:
        async def __init__(self, settings: Settings, shared: str) -> None:
            Path(shared, "metrics").mkdir(parents=True, exist_ok=True)
            self.app = create_app(settings, shared=Path(shared))
            self.state = self.app.state.caveat
            self._lifespan = contextlib.AsyncExitStack()
            await self._lifespan.enter_async_context(self.app.router.lifespan_context(self.app))
            while not self.state.ready and not self.state.failed:  # Ray routes to it once the constructor returns
                await asyncio.sleep(READY_POLL_S)
            if self.state.failed:
                raise RuntimeError(self.state.status)

        @serve.multiplexed(max_num_models_per_replica=adapters_per_replica)
        async def adapter(self, name: str) -> _Held:
            registry, _ = self.state.require_ready()
            await registry.acquire(name)
            return _Held(registry, name)

        async def __call__(self, request: RawRequest) -> RawResponse:
            name = serve.get_multiplexed_model_id()
            if name:
                with contextlib.suppress(ServiceError):  # an unknown adapter, a load that fails: the app says so
                    await self.adapter(name)
            return await call_app(self.app, request)

        def check_health(self) -> None:
            if self.state.failed:
                raise RuntimeError(self.state.status)

    return CaveatWorker


proxy = FastAPI(title="Caveat on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(name="CaveatIngress")
@serve.ingress(proxy)
class CaveatIngress:
    def __init__(self, worker: DeploymentHandle, max_body_bytes: int) -> None:
        self.worker = worker
        self.max_body_bytes = max_body_bytes

    @proxy.api_route("/{path:path}", methods=METHODS, include_in_schema=False)
    async def forward(self, request: Request) -> Response:
        body = await self._body(request)
        if body is None:  # the worker's app would refuse it too; the ingress does not hold it to find out
            return body_too_large(self.max_body_bytes)
        name = adapter_of(request.method, request.url.path, body)
        handle = self.worker.options(multiplexed_model_id=name) if name else self.worker
        client = (request.client.host, request.client.port) if request.client else None
        raw = RawRequest(request.method, request.url.path, request.scope["query_string"], request.scope["headers"],
                         body, client)  # fmt: skip
        try:
            answer: RawResponse = await handle.remote(raw)
        except Exception as exc:  # the replica died with the request, or none is up: the client may retry
            log.warning("%s %s: no worker replica answered (%s)", request.method, request.url.path, exc)
            message = f"no worker replica could answer ({type(exc).__name__}); retry shortly"
            return error_response(request, 503, "ReplicaUnavailableError", message, {"Retry-After": "1"})
        response = Response(answer.body, status_code=answer.status)
        # the app's own headers, content-length included; Ray's proxy adds the request id it gave the app
        response.raw_headers = [(k, v) for k, v in answer.headers if k.lower() != b"x-request-id"]
        return response

    async def _body(self, request: Request) -> bytes | None:
        """The body, or ``None`` once it is larger than ``max_body_bytes`` (declared or sent)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)


def application(settings: Settings, shared: Path) -> Application:
    """The ingress bound to ``settings.replicas`` workers (autoscaled up to ``max_replicas`` when set)."""
    scaling: dict[str, Any] = {"num_replicas": settings.replicas}
    if settings.max_replicas is not None and settings.max_replicas > settings.replicas:
        scaling = {"autoscaling_config": {
            "min_replicas": settings.replicas, "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests,
        }}  # fmt: skip
    threads = settings.torch_threads or max(1, len(os.sched_getaffinity(0)) // settings.replicas)
    worker_settings = settings.model_copy(update={"torch_threads": threads, "preload_adapters": False})
    env = {MULTIPROCESS_DIR: str(shared / "metrics"), "TOKENIZERS_PARALLELISM": "false"}
    worker = (
        worker_deployment(settings.adapters_per_replica)
        .options(
            **scaling,
            max_ongoing_requests=settings.queue_size,  # Caveat's engine admits, batches and refuses (429) itself
            ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": env}},
        )
        .bind(worker_settings, str(shared))
    )
    ingress = CaveatIngress.options(max_ongoing_requests=settings.queue_size * settings.replicas)
    return ingress.bind(worker, settings.max_body_bytes)


def build(args: dict[str, str]) -> Application:
    """``serve run service.ray_serve:build [key=value ...]``: settings from ``CAVEAT_*`` variables and the
    arguments (flag names with underscores); the run directory under the temporary directory, per settings."""
    settings = settings_from([f"--{key.replace('_', '-')}={value}" for key, value in args.items()], os.environ)
    digest = hashlib.sha256(settings.model_dump_json().encode()).hexdigest()[:12]
    return application(settings, Path(tempfile.gettempdir()) / f"caveat-ray-{digest}")


def run(settings: Settings) -> int:
    """``caveat-serve --engine ray``: a local Ray cluster, the application on ``host:port``, until SIGTERM/SIGINT."""
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="caveat-ray-") as shared:
        ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=True)
        for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own (an abort)
            signal.signal(sig, lambda *_: stop.set())
        try:
            serve.start(http_options={"host": settings.host, "port": settings.port})
            serve.run(application(settings, Path(shared)), name="caveat", route_prefix="/")
            log.info("serving on http://%s:%d with %d Ray worker replicas", settings.host, settings.port,
                     settings.replicas)  # fmt: skip
            stop.wait()
        finally:
            serve.shutdown()
            ray.shutdown()
    return 0

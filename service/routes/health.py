"""Health probes, server information and Prometheus metrics."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from adapters.manifest import CAVEAT_VERSION
from service.deps import State
from service.schemas import Health, Info

router = APIRouter(tags=["health"])


def public_name(base_model: str) -> str:
    """A hub id as given; a local model directory by its last component only (no server paths to clients)."""
    path = Path(base_model)
    return path.name if path.is_absolute() or path.exists() else base_model


@router.get("/health/live", response_model=Health)
async def live() -> Health:
    return Health(status="live")


@router.get("/health/ready", response_model=Health, responses={503: {"model": Health}})
async def ready(state: State):
    if state.ready:
        return Health(status="ready")
    return JSONResponse(Health(status="not ready", reason=state.not_ready_reason()).model_dump(), status_code=503)


@router.get("/v1/info", response_model=Info)
async def info(state: State) -> Info:
    settings, host = state.settings, state.host
    return Info(
        caveat_version=CAVEAT_VERSION,
        base_model=public_name(settings.base_model),
        device=str(host.device) if host else "(loading)",
        dtype=settings.dtype,
        pooling=host.pooling if host else "(loading)",
        adapters=len(state.registry.entries()) if state.registry else 0,
        batching=settings.batching,
        max_batch_rows=settings.max_batch_rows,
        max_wait_ms=settings.max_wait_ms,
        queue_size=settings.queue_size,
        step_tokens=state.engine.config.step_tokens if state.engine else None,
        split_padding=host.split_padding if host else None,
        startup_problems=state.startup_problems,
        workers=settings.replicas if settings.engine == "ray" else settings.workers,
        worker_pid=os.getpid(),
    )


@router.get("/metrics", include_in_schema=False)
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

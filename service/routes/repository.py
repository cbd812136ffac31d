"""The Open Inference Protocol's model repository extension, as Triton and MLServer serve it: the index of the
bundle store's adapters with their state on this server, and load / unload of one (admin token).

``load`` serves the store's current version (loading it, or re-reading it when loaded); ``unload`` drops the adapter
from this server only (the store keeps serving it to other replicas; a request for it here is refused until it is
loaded again).
"""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import Admin, State
from service.schemas import RepositoryIndexEntry, RepositoryIndexRequest

router = APIRouter(prefix="/v2/repository", tags=["open inference protocol"])


@router.post("/index", response_model=list[RepositoryIndexEntry])
async def index(state: State, body: RepositoryIndexRequest | None = None) -> list[RepositoryIndexEntry]:
    registry, _ = state.require_ready()
    entries = await registry.repository_index()
    if body is not None and body.ready:
        entries = [e for e in entries if e.state == "READY"]
    return entries


@router.post("/models/{model}/load", dependencies=[Admin])
async def load(model: str, state: State) -> dict:
    registry, _ = state.require_ready()
    await registry.load(model)
    return {}


@router.post("/models/{model}/unload", dependencies=[Admin])
async def unload(model: str, state: State) -> dict:
    registry, _ = state.require_ready()
    await registry.unload(model)
    return {}

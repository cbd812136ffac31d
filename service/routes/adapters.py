"""Adapter registry routes: list and inspect (anyone); load, replace and remove (admin token)."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import Admin, State
from service.registry import AdapterEntry
from service.schemas import (
    AdapterChange,
    AdapterDetail,
    AdapterList,
    AdapterSummary,
    LoadAdapterRequest,
    ReplaceAdapterRequest,
)

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


def summary(entry: AdapterEntry) -> AdapterSummary:
    manifest = entry.manifest
    return AdapterSummary(
        name=entry.name,
        version=manifest.version,
        sha256=entry.sha256,
        state=entry.state,
        pinned=entry.pinned,
        labels=manifest.task.labels,
        posterior=manifest.posterior.family,
        default_num_samples=manifest.posterior.default_num_samples,
        path=entry.path.name,
        own_bytes=entry.resident.own_bytes if entry.resident is not None else 0,
    )


@router.get("", response_model=AdapterList)
async def list_adapters(state: State) -> AdapterList:
    registry, _ = state.require_ready()
    return AdapterList(
        adapters=[summary(e) for e in registry.entries()],
        memory_bytes=registry.used_bytes(),
        memory_budget_bytes=registry.budget_bytes,
    )


@router.get("/{name}", response_model=AdapterDetail)
async def get_adapter(name: str, state: State) -> AdapterDetail:
    registry, _ = state.require_ready()
    entry = registry.entry(name)
    return AdapterDetail(**summary(entry).model_dump(), manifest=entry.manifest.model_dump(mode="json"))


@router.post("", status_code=201, response_model=AdapterChange, dependencies=[Admin])
async def load_adapter(body: LoadAdapterRequest, state: State) -> AdapterChange:
    """Load a bundle from inside the adapter directory and publish it to the bundle store as the adapter's current
    version: every replica serving the store sees it (persisted: a restart serves it too)."""
    registry, _ = state.require_ready()
    entry = await registry.add(body.path, name=body.name, pin=body.pin)
    return AdapterChange(adapter=summary(entry))


@router.put("/{name}", response_model=AdapterChange, dependencies=[Admin])
async def replace_adapter(name: str, state: State, body: ReplaceAdapterRequest | None = None) -> AdapterChange:
    """Atomically serve ``name`` from another bundle (requests in flight finish on the old one): a bundle directory
    (published to the store as its new current version), a version already in the store, or (no body) the store's
    current version re-read. Written to the store: every replica swaps within its store poll interval."""
    registry, _ = state.require_ready()
    path, version = (body.path, body.version) if body is not None else (None, None)
    previous, entry = await registry.replace(name, path, version)
    return AdapterChange(adapter=summary(entry), previous_version=previous)


@router.delete("/{name}", response_model=AdapterChange, dependencies=[Admin])
async def remove_adapter(name: str, state: State) -> AdapterChange:
    """Stop serving (requests in flight finish): withdrawn from the store (its versions stay), so every replica
    drops it. A legacy bundle directory cannot be withdrawn: this server forgets it until it is added again."""
    registry, _ = state.require_ready()
    entry = await registry.remove(name)
    return AdapterChange(adapter=summary(entry))

"""What a running server holds: settings, metrics, and — once started — the model host, registry and engine.

Startup runs in the background so that the health routes answer (503, with the reason) while the base
model loads; ``ready`` turns true after the warm-up forward and the bundle store's adapters have been loaded. A
background task then checks the store every ``store_poll_s`` (:meth:`AdapterRegistry.sync`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import torch

from adapters.store import BundleStore
from service.engine import BatchingConfig, Engine
from service.errors import NotReadyError
from service.feedback import Feedback
from service.host import ModelHost
from service.metrics import MULTIPROCESS_DIR, Metrics
from service.registry import AdapterRegistry
from service.settings import Settings

log = logging.getLogger("caveat.serve")


class ServiceState:
    def __init__(self, settings: Settings, shared: Path | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.admin_token = settings.resolved_admin_token()
        self.feedback = Feedback.from_settings(
            settings.feedback_store_size, settings.feedback_ttl_s, settings.feedback_dir,
            int(settings.feedback_log_max_mb * 2**20), self.metrics,
            shared=None if shared is None else shared / "answers.sqlite",
        )  # fmt: skip
        self.host: ModelHost | None = None
        self.registry: AdapterRegistry | None = None
        self.engine: Engine | None = None
        self.status = "loading base model"
        self.failed = False
        self.draining = False
        self.startup_problems: list[str] = []
        self._startup: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self._resident_series: set[str] = set()  # adapters with a caveat_adapter_own_bytes series

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining and not self.failed

    def not_ready_reason(self) -> str:
        return "draining: the server is shutting down" if self.draining else self.status

    def require_ready(self) -> tuple[AdapterRegistry, Engine]:
        """Registry and engine, or 503. While draining, requests are still served until the listener closes
        (the load balancer has ``drain_s`` to notice the failing readiness probe)."""
        if self.failed or self.registry is None or self.engine is None:
            raise NotReadyError(f"not ready: {self.not_ready_reason()}")
        return self.registry, self.engine

    def start(self) -> None:
        self._startup = asyncio.create_task(self._start(), name="caveat-startup")

    async def _start(self) -> None:
        settings = self.settings
        try:
            if settings.torch_threads:
                torch.set_num_threads(settings.torch_threads)
            host = await asyncio.to_thread(
                ModelHost, settings.base_model, settings.device, settings.dtype, settings.token_budget
            )
            log.info("base model %s on %s (%s) in %.1f s", settings.base_model, host.device, settings.dtype,
                     host.load_seconds)  # fmt: skip
            step_tokens = settings.step_tokens or host.default_step_tokens
            if settings.warmup:
                self.status = "warming up"
                log.info("warm-up forward %.3f s", await asyncio.to_thread(host.warm_up))
                step_ms = settings.step_ms or host.default_step_ms
                calibration = await asyncio.to_thread(host.calibrate, step_ms)
                step_tokens = settings.step_tokens or calibration.step_tokens
                log.info("engine step: %d rows × tokens (%.1f µs per token, %.2f ms per forward, %g ms per step; "
                         "a forward takes up to %d rows × tokens of padding)", step_tokens,
                         calibration.seconds_per_token * 1e6, calibration.seconds_per_forward * 1e3, step_ms,
                         calibration.split_padding)  # fmt: skip
            self.status = "loading adapters"
            registry = AdapterRegistry(
                host,
                BundleStore(settings.store or settings.adapter_dir),
                int(settings.memory_budget_mb * 2**20),
                pinned=set(settings.pinned),
                on_change=self._count_adapters,
                on_load=self._count_load,
                adapter_dir=settings.adapter_dir,
                miss_wait_s=settings.miss_wait_ms / 1000,
            )
            self.host, self.registry = host, registry
            if settings.preload_adapters:
                self.startup_problems = await registry.load_store()
            self._watch = asyncio.create_task(self._watch_store(registry), name="caveat-store-watch")
            config = BatchingConfig(
                settings.batching, settings.max_batch_rows, settings.max_wait_ms, settings.queue_size,
                step_tokens=step_tokens, queue_tokens=settings.queue_tokens,
            )  # fmt: skip
            engine = Engine(host, config, self.metrics)
            engine.start()
            self.engine = engine
            self.status = "ready"
            log.info("ready: %d adapters", len(registry.entries()))
        except Exception as exc:  # the process stays up and says why it is not ready
            self.failed = True
            self.status = f"startup failed: {type(exc).__name__}: {exc}"
            log.exception("startup failed")

    async def _watch_store(self, registry: AdapterRegistry) -> None:
        """Every ``store_poll_s``: swap in the store's new current versions, drop withdrawn adapters."""
        while True:
            await asyncio.sleep(self.settings.store_poll_s)
            try:
                await registry.sync()
            except Exception:  # the loop outlives any one failed check
                log.exception("store sync failed")

    async def stop(self) -> None:
        self.draining = True
        for task in (self._startup, self._watch):
            if task is not None and not task.done():
                task.cancel()
        if self.engine is not None:
            await self.engine.close()

    def _count_adapters(self) -> None:
        if self.registry is None:
            return
        entries = self.registry.entries()
        for state in ("ready", "evicted"):
            self.metrics.adapters.labels(state).set(sum(e.state == state for e in entries))
        self.metrics.adapter_bytes.set(self.registry.used_bytes())
        own = {e.name: e.resident.own_bytes for e in entries if e.resident is not None}
        for name in self._resident_series - own.keys():  # evicted or removed adapters lose their series
            if MULTIPROCESS_DIR in os.environ:  # the workers' values live in files, where a removed series lingers
                self.metrics.adapter_own_bytes.labels(name).set(0)
            else:
                self.metrics.adapter_own_bytes.remove(name)
        for name, size in own.items():
            self.metrics.adapter_own_bytes.labels(name).set(size)
        self._resident_series = set(own)

    def _count_load(self, seconds: float | None, ok: bool) -> None:
        if seconds is not None:
            self.metrics.load_seconds.observe(seconds)
        if not ok:
            self.metrics.load_failures.inc()

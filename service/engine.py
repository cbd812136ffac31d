"""Dynamic micro-batching: concurrent requests, for any adapters, with all their posterior samples, run as
one batched-rows forward in a worker thread while the event loop stays free.

A request is a :class:`Job`: ``n`` inputs of one adapter version under ``S`` samples, i.e. one
:class:`~adapters.batching.RowBlock`. The engine takes every job waiting (up to ``max_batch_rows`` rows,
waiting at most ``max_wait_ms`` for more once one arrived), tokenises the unique inputs once, runs one
forward and resolves each job's future. The queue is bounded: a full queue is refused at once (429).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from adapters.batching import RowBlock
from adapters.defaults import PredictiveMode
from adapters.posteriors.base import make_generator
from adapters.predictive import AbstentionRule, Predictive, abstain, glm_predictive, predictive
from adapters.tasks import mask_choices
from service.errors import NotReadyError, QueueFullError
from service.host import ModelHost, TextInput
from service.metrics import Metrics
from service.registry import AdapterVersion

log = logging.getLogger("caveat.serve")


@dataclass(eq=False)
class Job:
    """One admitted prediction request, pinned to the adapter version it was admitted with."""

    adapter: AdapterVersion
    inputs: list[TextInput]
    num_samples: int
    method: str
    seed: int
    rules: list[AbstentionRule]
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    admitted: float = field(default_factory=time.perf_counter)

    @property
    def rows(self) -> int:
        """Rows of the network forward: the GLM runs each input once (its draws are in logit space)."""
        return len(self.inputs) * (1 if self.method == PredictiveMode.GLM else self.num_samples)


@dataclass
class JobResult:
    """A job's predictive (on the CPU), abstention flags and where its time went."""

    pred: Predictive
    abstain: list[bool]
    reasons: list[str | None]
    queue_seconds: float
    compute_seconds: float
    batch_requests: int
    batch_rows: int


@dataclass(frozen=True)
class BatchingConfig:
    enabled: bool = True
    max_batch_rows: int = 512
    max_wait_ms: float = 2.0
    queue_size: int = 256


class Engine:
    """Collects jobs into batches and runs them on the host model, one batch at a time."""

    def __init__(self, host: ModelHost, config: BatchingConfig, metrics: Metrics) -> None:
        self.host = host
        self.config = config
        self.metrics = metrics
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=config.queue_size)
        self._held: Job | None = None  # taken from the queue but left for the next batch (row limit)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caveat-model")
        self._task: asyncio.Task | None = None
        self._busy = False
        self._closing = False

    @property
    def pending(self) -> int:
        return self._queue.qsize() + (self._held is not None)

    def start(self) -> None:
        self._task = asyncio.create_task(self._serve(), name="caveat-engine")

    async def submit(self, job: Job) -> JobResult:
        """Admit a job (or refuse it at once) and wait for its result."""
        if self._closing:
            raise NotReadyError("the server is shutting down")
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFullError(
                f"the prediction queue is full ({self.config.queue_size} requests waiting); retry shortly"
            ) from None
        self.metrics.queue_depth.set(self.pending)
        return await job.future

    async def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new jobs, finish the admitted ones (up to ``timeout_s``), then stop the worker."""
        self._closing = True
        deadline = time.monotonic() + timeout_s
        while (self.pending or self._busy) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=True)

    # ----------------------------------------------------------------------------------------- the loop

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            self._busy = True
            self.metrics.queue_depth.set(self.pending)
            started = time.perf_counter()
            try:
                outcomes = await loop.run_in_executor(self._executor, self._run_isolated, jobs)
            finally:
                self._busy = False
            self._finish(jobs, outcomes, started)

    async def _collect(self) -> list[Job]:
        """The next batch: every waiting job up to the row limit, waiting ``max_wait_ms`` for company.
        Jobs whose client has already given up (timed out) are dropped unrun."""
        first = self._held if self._held is not None else await self._queue.get()
        self._held = None
        while first.future.done():
            first = await self._queue.get()
        jobs, rows = [first], first.rows
        if not self.config.enabled:
            return jobs
        deadline = time.perf_counter() + self.config.max_wait_ms / 1000
        while rows < self.config.max_batch_rows:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if job.future.done():
                continue
            if rows + job.rows > self.config.max_batch_rows:
                self._held = job
                break
            jobs.append(job)
            rows += job.rows
        return jobs

    def _finish(self, jobs: list[Job], outcomes: list[JobResult | BaseException], started: float) -> None:
        rows = sum(job.rows for job in jobs)
        self.metrics.batch_rows.observe(rows)
        self.metrics.batch_requests.observe(len(jobs))
        self.metrics.forward_seconds.observe(time.perf_counter() - started)
        for job, outcome in zip(jobs, outcomes, strict=True):
            self.metrics.queue_wait.observe(started - job.admitted)
            if job.future.done():  # the client gave up (timeout): nothing to deliver
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
                continue
            outcome.queue_seconds = started - job.admitted
            job.future.set_result(outcome)
            self.metrics.samples.observe(job.num_samples)
            self.metrics.observe_predictions(job.adapter.name, outcome.pred, outcome.reasons)

    # ------------------------------------------------------------------------------ the worker thread

    def _run_isolated(self, jobs: list[Job]) -> list[JobResult | BaseException]:
        """Run the batch; if it fails, run each job alone so one bad job cannot fail the others."""
        try:
            return list(self._run(jobs))
        except Exception as exc:
            if len(jobs) == 1:
                log.exception("prediction failed")
                return [exc]
        outcomes: list[JobResult | BaseException] = []
        for job in jobs:
            try:
                outcomes.extend(self._run([job]))
            except Exception as exc:
                log.exception("prediction failed")
                outcomes.append(exc)
        return outcomes

    def _run(self, jobs: list[Job]) -> list[JobResult]:
        """Sampled and MAP jobs in one batched-rows forward, GLM jobs in one batched linearisation."""
        start = time.perf_counter()
        device = self.host.device
        unique: dict[TextInput, int] = {}
        blocks = []
        for job in jobs:
            indices = [unique.setdefault(item, len(unique)) for item in job.inputs]
            samples = job.adapter.draw(job.num_samples, job.seed, job.method)
            blocks.append(RowBlock(job.adapter.weights, samples, torch.tensor(indices, device=device)))
        batch = self.host.encode(list(unique))
        sampled = [i for i, job in enumerate(jobs) if job.method != PredictiveMode.GLM]
        linearised = [i for i, job in enumerate(jobs) if job.method == PredictiveMode.GLM]
        preds: dict[int, Predictive] = {}
        if sampled:
            logits = self.host.forward(batch, [blocks[i] for i in sampled])
            for i, block_logits in zip(sampled, logits, strict=True):
                preds[i] = predictive(_masked(jobs[i], block_logits), jobs[i].adapter.temperature)
        if linearised:
            outputs = self.host.linearise(batch, [blocks[i] for i in linearised])
            for i, (logits, jacobians) in zip(linearised, outputs, strict=True):
                preds[i] = _glm(jobs[i], _masked(jobs[i], logits), jacobians)
        rows = sum(job.rows for job in jobs)
        results = []
        for i, job in enumerate(jobs):
            pred = _to_cpu(preds[i])
            flags, reasons = abstain(pred, job.rules)
            results.append(JobResult(pred, flags.tolist(), reasons, 0.0, 0.0, len(jobs), rows))
        seconds = time.perf_counter() - start
        for result in results:
            result.compute_seconds = seconds
        return results


def _masked(job: Job, logits: torch.Tensor) -> torch.Tensor:
    """Multiple choice: the letters an input lacks get ``-inf`` (logits ``(..., n, C)``)."""
    return mask_choices(logits, [item.num_choices for item in job.inputs])


def _glm(job: Job, logits: torch.Tensor, jacobians: dict[str, torch.Tensor]) -> Predictive:
    posterior = job.adapter.bundle.posterior
    covariance = posterior.jacobian_covariance({k: v.to(posterior.dtype) for k, v in jacobians.items()})
    generator = make_generator(job.seed, covariance.device)
    return glm_predictive(logits, covariance, job.num_samples, generator, job.adapter.temperature)


def _to_cpu(pred: Predictive) -> Predictive:
    return Predictive(**{f.name: getattr(pred, f.name).cpu() for f in dataclasses.fields(pred)})

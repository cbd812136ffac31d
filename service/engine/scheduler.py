"""Admission and scheduling: which jobs the engine admits, and which pieces of them each step runs.

The engine works in *steps* of at most ``step_tokens`` rows × tokens. A job's work is cut into pieces (sample
slices, and input slices within one sample when one sample alone is too big); each step takes every waiting
job that fits whole (small requests first, in arrival order), then pieces of the oldest unfinished job while
the step has room (a step with nothing else runs one piece at least). So a big request progresses whenever
small ones leave room, and never holds the worker for longer than a step; a job passed over for
``MAX_PASSED_OVER`` steps in a row goes first, so a steady stream of small requests cannot starve it. Between
steps a job whose client gave up (timed out, or the request was abandoned) is dropped: it stops consuming the
worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from service.engine.answers import JobResult
from service.engine.jobs import Job, Piece
from service.engine.worker import Outcomes, Worker
from service.errors import NonFiniteOutputError, NotReadyError, PredictionTimeoutError, QueueFullError
from service.host import ModelHost
from service.metrics import Metrics

log = logging.getLogger("caveat.serve")

MAX_PASSED_OVER = 2  # steps a job may wait while smaller jobs fill them; then its pieces go first


@dataclass(frozen=True)
class BatchingConfig:
    """How the engine batches and admits.

    Attributes:
        step_tokens: rows × tokens of one step (a step with nothing else runs one piece of a job at least).
        queue_tokens: estimated rows × tokens of all admitted jobs together; beyond, 429.
    """

    enabled: bool = True
    max_batch_rows: int = 512
    max_wait_ms: float = 2.0
    queue_size: int = 256
    step_tokens: int = 1024
    queue_tokens: int = 1 << 20


class Step:
    """The pieces of one step being formed, within its budget of rows × tokens and rows."""

    def __init__(self, budget: int, max_rows: int) -> None:
        self.budget, self.max_rows = budget, max_rows
        self.rows = 0
        self.pieces: list[Piece] = []
        self.taken: set[int] = set()  # ids of the jobs with a piece in the step

    def has(self, job: Job) -> bool:
        return id(job) in self.taken

    def take_whole(self, job: Job) -> None:
        """All the job's remaining pieces if they fit, else none."""
        remaining = job.progress.remaining
        cost, rows = job.progress.remaining_cost(), sum(p.rows for p in remaining)
        if cost <= self.budget and self.rows + rows <= self.max_rows:
            self._add(job, remaining, cost, rows)

    def take_pieces(self, job: Job) -> None:
        """As many of the job's remaining pieces as the step has room for (one at least in an empty step)."""
        for piece in job.progress.remaining:
            cost = job.progress.piece_cost(piece)
            if self.pieces and (cost > self.budget or self.rows + piece.rows > self.max_rows):
                break
            self._add(job, [piece], cost, piece.rows)

    def _add(self, job: Job, pieces: list[Piece], cost: int, rows: int) -> None:
        self.pieces.extend(pieces)
        self.taken.add(id(job))
        self.budget, self.rows = self.budget - cost, self.rows + rows


class Engine:
    """Collects jobs into steps and runs them on the host model, one step at a time in a worker thread."""

    def __init__(self, host: ModelHost, config: BatchingConfig, metrics: Metrics) -> None:
        self.host = host
        self.config = config
        self.metrics = metrics
        self.worker = Worker(host)
        self._jobs: list[Job] = []  # admitted and unfinished, in arrival order
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caveat-model")
        self._task: asyncio.Task | None = None
        self._busy = False
        self._closing = False
        self._had_company = False  # whether the last step had other jobs beside it (then waiting pays)
        self._admitted_cost: int | None = None  # sum of the jobs' remaining costs; None: count again

    @property
    def pending(self) -> int:
        return len(self._jobs)

    @property
    def admitted_cost(self) -> int:
        """Estimated cost of what the admitted jobs have left. Counted once after each step or drop, then kept
        up by admission (a sum over all waiting jobs per admission is quadratic under a long queue); during
        a step it still includes the pieces that step runs."""
        if self._admitted_cost is None:
            self._admitted_cost = sum(job.progress.remaining_cost() for job in self._jobs)
        return self._admitted_cost

    def start(self) -> None:
        self._task = asyncio.create_task(self._serve(), name="caveat-engine")

    async def submit(self, job: Job) -> JobResult:
        """Admit a job (or refuse it at once) and wait for its result."""
        if self._closing:
            raise NotReadyError("the server is shutting down")
        if len(self._jobs) >= self.config.queue_size:
            raise QueueFullError(
                f"the prediction queue is full ({self.config.queue_size} requests waiting); retry shortly"
            )
        if self._jobs and self.admitted_cost + job.cost > self.config.queue_tokens:
            raise QueueFullError(
                f"the requests admitted already hold the model for their estimated cost ({self.admitted_cost} of "
                f"{self.config.queue_tokens} rows × tokens); retry shortly"
            )
        job.progress.plan(self.config.step_tokens)
        self._admitted_cost = self.admitted_cost + job.progress.remaining_cost()
        self._jobs.append(job)
        self._arrived.set()
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
            pieces = await self._collect()
            if not pieces:
                continue
            self._busy = True
            started = time.perf_counter()
            try:
                outcomes = await loop.run_in_executor(self._executor, self.worker.run_isolated, pieces)
            finally:
                self._busy = False
            self._finish(pieces, outcomes, started)

    async def _collect(self) -> list[Piece]:
        """The next step: waiting jobs that fit whole first, then pieces of the oldest unfinished job."""
        while not self._jobs:
            self._arrived.clear()
            await self._arrived.wait()
        if self.config.enabled and self.config.max_wait_ms > 0 and len(self._jobs) == 1 and self._had_company:
            await asyncio.sleep(self.config.max_wait_ms / 1000)  # a moment for company, when some is likely
        for job in [j for j in self._jobs if j.abandoned]:
            self._drop(job)
        jobs = self._jobs if self.config.enabled else self._jobs[:1]
        step = Step(self.config.step_tokens, self.config.max_batch_rows)
        overdue = next((job for job in jobs if job.progress.passed_over >= MAX_PASSED_OVER), None)
        if overdue is not None:  # passed over by smaller jobs too often: first, so that no job starves
            step.take_pieces(overdue)
        for job in jobs:  # small jobs whole, in arrival order
            if not step.has(job):
                step.take_whole(job)
        big = next((job for job in jobs if not step.has(job) and job.progress.remaining), None)
        if big is not None:  # the oldest job left out: its pieces while the step has room
            step.take_pieces(big)
        for job in jobs:
            job.progress.passed_over = 0 if step.has(job) else job.progress.passed_over + 1
        self._had_company = len({id(p.job) for p in step.pieces}) > 1 or len(self._jobs) > 1
        self.metrics.queue_depth.set(self.pending)
        return step.pieces

    def _drop(self, job: Job) -> None:
        """Stop working for a job nobody waits for (the request timed out or was abandoned)."""
        self._jobs.remove(job)
        self._admitted_cost = None
        timed_out = time.perf_counter() > job.deadline
        self.metrics.dropped.labels("timeout" if timed_out else "abandoned").inc()
        if not job.future.done():
            job.future.set_exception(PredictionTimeoutError("no answer before the request's deadline"))
        log.warning("dropped a request nobody waits for any more (%d of %d pieces run)", job.progress.next,
                    len(job.progress.pieces))  # fmt: skip

    def _finish(self, pieces: list[Piece], outcomes: Outcomes, started: float) -> None:
        jobs = list(dict.fromkeys(p.job for p in pieces))
        rows = sum(p.rows for p in pieces)
        self._admitted_cost = None  # the step ran pieces: count again
        self.metrics.batch_rows.observe(rows)
        self.metrics.batch_requests.observe(len(jobs))
        self.metrics.forward_seconds.observe(time.perf_counter() - started)
        for job in jobs:
            outcome = outcomes.get(id(job))
            if outcome is None:  # more pieces to come
                continue
            self._jobs.remove(job)
            if job.future.done():  # the client gave up: nothing to deliver
                continue
            if isinstance(outcome, BaseException):
                if isinstance(outcome, NonFiniteOutputError):
                    self.metrics.prediction_failures.labels("non_finite").inc()
                job.future.set_exception(outcome)
                continue
            self.metrics.queue_wait.observe(outcome.queue_seconds)
            job.future.set_result(outcome)
            self.metrics.samples.observe(job.num_samples)
            self.metrics.observe_predictions(job.adapter.name, outcome.values, outcome.reasons, outcome.ood_pvalue)
        self.metrics.queue_depth.set(self.pending)

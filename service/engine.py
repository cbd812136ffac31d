"""Cost-bounded dynamic micro-batching: concurrent requests, for any adapters, with all their posterior samples,
run as batched-rows forwards in a worker thread while the event loop stays free.

A request is a :class:`Job`: ``n`` inputs of one adapter version under ``S`` samples. Its estimated cost is
rows × tokens (its inputs counted by the tokenizer, capped at the adapter's max length). Admission is by cost: a
job is refused at once (429) when the admitted jobs or their cost would exceed the queue's bounds.

The engine works in *steps* of at most ``step_tokens`` rows × tokens. A job's work is cut into pieces (sample
slices, and input slices within one sample when one sample alone is too big); each step takes every waiting
job that fits whole (small requests first, in arrival order), then pieces of the oldest unfinished job while
the step has room (a step with nothing else runs one piece at least). So a big request progresses whenever
small ones leave room, and never holds the worker for longer than a step. Between steps a job whose client
gave up (timed out, or the request was abandoned) is dropped: it stops consuming the worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from adapters.batching import RowBlock
from adapters.defaults import PredictiveMode
from adapters.ood.features import BaseFeatureTap
from adapters.posteriors.base import make_generator
from adapters.predictive import AbstentionRule, Predictive, abstain, glm_predictive, predictive
from adapters.tasks import mask_choices
from service.errors import NonFiniteOutputError, NotReadyError, PredictionTimeoutError, QueueFullError
from service.host import ModelHost, TextInput
from service.metrics import Metrics
from service.registry import AdapterVersion

log = logging.getLogger("caveat.serve")


@dataclass(eq=False)
class Job:
    """One admitted prediction request, pinned to the adapter version it was admitted with.

    Attributes:
        tokens: tokens of the longest input after truncation (every row of a forward pays for its width).
        deadline: ``time.perf_counter()`` value after which nobody waits for the answer.
    """

    adapter: AdapterVersion
    inputs: list[TextInput]
    num_samples: int
    method: str
    seed: int
    rules: list[AbstentionRule]
    tokens: int
    deadline: float = float("inf")
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    admitted: float = field(default_factory=time.perf_counter)
    progress: _Progress = field(init=False)

    def __post_init__(self) -> None:
        self.progress = _Progress(self)

    @property
    def rows(self) -> int:
        """Rows of the network forward: the GLM runs each input once (its draws are in logit space)."""
        return len(self.inputs) * (1 if self.method == PredictiveMode.GLM else self.num_samples)

    @property
    def cost(self) -> int:
        """Estimated rows × tokens; the GLM's Jacobian pays one backward pass per class on top of its forward."""
        passes = 1 + len(self.adapter.labels) if self.method == PredictiveMode.GLM else 1
        return self.rows * self.tokens * passes

    @property
    def abandoned(self) -> bool:
        return self.future.done() or time.perf_counter() > self.deadline


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
    ood_score: list[float] | None = None
    ood_pvalue: list[float] | None = None


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


@dataclass(eq=False)
class _Piece:
    """Samples ``samples`` × inputs ``inputs`` of one job."""

    job: Job
    samples: slice
    inputs: slice

    @property
    def rows(self) -> int:
        return (self.samples.stop - self.samples.start) * (self.inputs.stop - self.inputs.start)


class _Progress:
    """Which pieces of a job are done, and what they produced (on the CPU, in the worker thread)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.next = 0  # index of the first piece not yet run
        self.pieces: list[_Piece] = []
        self.samples: dict[str, Tensor] | None = None
        self.logits: list[Tensor] = []
        self.jacobians: list[dict[str, Tensor]] = []
        self.ood_features: dict[int, Tensor] = {}  # input position → its frozen-base OOD features
        self.started: float | None = None
        self.compute_seconds = 0.0
        self.batch_requests = 0
        self.batch_rows = 0

    def plan(self, step_tokens: int) -> None:
        """Cut the job into pieces of at most ``step_tokens`` (one row at least): whole-input sample slices, or
        input slices of one sample when one sample over all inputs is too big."""
        job = self.job
        n, S = len(job.inputs), 1 if job.method == PredictiveMode.GLM else job.num_samples
        rows = max(1, step_tokens * job.rows // max(job.cost, 1))
        if rows >= n:
            per = rows // n
            self.pieces = [_Piece(job, slice(s, min(s + per, S)), slice(0, n)) for s in range(0, S, per)]
        else:
            self.pieces = [
                _Piece(job, slice(s, s + 1), slice(i, min(i + rows, n))) for s in range(S) for i in range(0, n, rows)
            ]

    @property
    def remaining(self) -> list[_Piece]:
        return self.pieces[self.next :]

    def remaining_cost(self) -> int:
        job = self.job
        return sum(p.rows for p in self.remaining) * job.cost // max(job.rows, 1)


class Engine:
    """Collects jobs into steps and runs them on the host model, one step at a time."""

    def __init__(self, host: ModelHost, config: BatchingConfig, metrics: Metrics) -> None:
        self.host = host
        self.config = config
        self.metrics = metrics
        self._jobs: list[Job] = []  # admitted and unfinished, in arrival order
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caveat-model")
        self._task: asyncio.Task | None = None
        self._busy = False
        self._closing = False

    @property
    def pending(self) -> int:
        return len(self._jobs)

    @property
    def admitted_cost(self) -> int:
        return sum(job.progress.remaining_cost() if job.progress.pieces else job.cost for job in self._jobs)

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
                outcomes = await loop.run_in_executor(self._executor, self._run_isolated, pieces)
            finally:
                self._busy = False
            self._finish(pieces, outcomes, started)

    async def _collect(self) -> list[_Piece]:
        """The next step: waiting jobs that fit whole first, then pieces of the oldest unfinished job."""
        while not self._jobs:
            self._arrived.clear()
            await self._arrived.wait()
        if self.config.enabled and self.config.max_wait_ms > 0 and len(self._jobs) == 1:
            await asyncio.sleep(self.config.max_wait_ms / 1000)  # a moment for company
        for job in [j for j in self._jobs if j.abandoned]:
            self._drop(job)
        jobs = self._jobs if self.config.enabled else self._jobs[:1]
        budget, rows, pieces, whole = self.config.step_tokens, 0, [], set()
        for job in jobs:  # small jobs whole, in arrival order
            cost, remaining = job.progress.remaining_cost(), job.progress.remaining
            job_rows = sum(p.rows for p in remaining)
            if remaining and cost <= budget and rows + job_rows <= self.config.max_batch_rows:
                pieces += remaining
                whole.add(id(job))
                budget, rows = budget - cost, rows + job_rows
        big = next((job for job in jobs if id(job) not in whole and job.progress.remaining), None)
        for piece in big.progress.remaining if big is not None else []:
            piece_cost = piece.rows * big.cost // max(big.rows, 1)
            if pieces and (piece_cost > budget or rows + piece.rows > self.config.max_batch_rows):
                break  # a step of small requests takes the big one's pieces only while it has room
            pieces.append(piece)
            budget, rows = budget - piece_cost, rows + piece.rows
        self.metrics.queue_depth.set(self.pending)
        return pieces

    def _drop(self, job: Job) -> None:
        """Stop working for a job nobody waits for (the request timed out or was abandoned)."""
        self._jobs.remove(job)
        timed_out = time.perf_counter() > job.deadline
        self.metrics.dropped.labels("timeout" if timed_out else "abandoned").inc()
        if not job.future.done():
            job.future.set_exception(PredictionTimeoutError("no answer before the request's deadline"))
        log.warning("dropped a request nobody waits for any more (%d of %d pieces run)", job.progress.next,
                    len(job.progress.pieces))  # fmt: skip

    def _finish(self, pieces: list[_Piece], outcomes: dict[int, JobResult | BaseException | None], started: float):
        jobs = list(dict.fromkeys(p.job for p in pieces))
        rows = sum(p.rows for p in pieces)
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
            self.metrics.observe_predictions(job.adapter.name, outcome.pred, outcome.reasons, outcome.ood_pvalue)
        self.metrics.queue_depth.set(self.pending)

    # ------------------------------------------------------------------------------ the worker thread

    def _run_isolated(self, pieces: list[_Piece]) -> dict[int, JobResult | BaseException | None]:
        """Run the step; if it fails, run each job's pieces alone so one bad job cannot fail the others.
        Returns, per job (by id), its result when its last piece ran, its error, or ``None``."""
        try:
            return self._run(pieces)
        except Exception as exc:
            jobs = list(dict.fromkeys(p.job for p in pieces))
            if len(jobs) == 1:
                log.exception("prediction failed")
                return {id(jobs[0]): exc}
        outcomes: dict[int, JobResult | BaseException | None] = {}
        for job in jobs:
            try:
                outcomes.update(self._run([p for p in pieces if p.job is job]))
            except Exception as exc:
                log.exception("prediction failed")
                outcomes[id(job)] = exc
        return outcomes

    def _run(self, pieces: list[_Piece]) -> dict[int, JobResult | BaseException | None]:
        """Sampled and MAP pieces in one batched-rows forward, GLM pieces in one batched linearisation."""
        start = time.perf_counter()
        device = self.host.device
        unique: dict[TextInput, int] = {}
        blocks = []
        for piece in pieces:
            job, progress = piece.job, piece.job.progress
            if progress.samples is None:
                progress.started = start
                progress.samples = job.adapter.draw(job.num_samples, job.seed, job.method)
            indices = [unique.setdefault(item, len(unique)) for item in job.inputs[piece.inputs]]
            samples = {k: v[piece.samples] for k, v in progress.samples.items()}
            blocks.append(RowBlock(job.adapter.weights, samples, torch.tensor(indices, device=device)))
        batch = self.host.encode(list(unique))
        tap = self._feature_tap(pieces, unique)
        sampled = [i for i, piece in enumerate(pieces) if piece.job.method != PredictiveMode.GLM]
        linearised = [i for i, piece in enumerate(pieces) if piece.job.method == PredictiveMode.GLM]
        logits: dict[int, Tensor] = {}
        jacobians: dict[int, dict[str, Tensor]] = {}
        if sampled:
            for i, out in zip(sampled, self.host.forward(batch, [blocks[i] for i in sampled], tap), strict=True):
                logits[i] = out.float().cpu()
        if linearised:
            outputs = self.host.linearise(batch, [blocks[i] for i in linearised], tap)
            for i, (out, jacobian) in zip(linearised, outputs, strict=True):
                logits[i], jacobians[i] = out.cpu(), {k: v.cpu() for k, v in jacobian.items()}
        for i, piece in enumerate(pieces):  # only now, so that a failed step leaves no partial output behind
            piece.job.progress.logits.append(logits[i])
            if i in jacobians:
                piece.job.progress.jacobians.append(jacobians[i])
            if tap is not None and piece.job.adapter.ood_layers is not None:
                _keep_features(piece, tap, unique)
        seconds = time.perf_counter() - start
        jobs = list(dict.fromkeys(p.job for p in pieces))
        rows = sum(p.rows for p in pieces)
        outcomes: dict[int, JobResult | BaseException | None] = {}
        for job in jobs:
            progress = job.progress
            progress.next += sum(p.job is job for p in pieces)
            progress.compute_seconds += seconds
            progress.batch_requests = max(progress.batch_requests, len(jobs))
            progress.batch_rows = max(progress.batch_rows, rows)
            try:
                outcomes[id(job)] = _result(job) if not progress.remaining else None
            except Exception as exc:  # this job's answer alone fails
                outcomes[id(job)] = exc
        return outcomes

    def _feature_tap(self, pieces: list[_Piece], unique: dict[TextInput, int]) -> BaseFeatureTap | None:
        """A tap for the inputs of pieces whose adapter has an OOD score and whose features no earlier step of
        its job produced: one base row each, shared by every adapter and request that reads the input."""
        wanted, layers = set(), set()
        for piece in pieces:
            job = piece.job
            if job.adapter.ood_layers is None:
                continue
            layers.update(job.adapter.ood_layers)
            positions = range(len(job.inputs))[piece.inputs]
            wanted.update(unique[job.inputs[p]] for p in positions if p not in job.progress.ood_features)
        return self.host.feature_tap(sorted(layers), sorted(wanted)) if wanted else None


def _keep_features(piece: _Piece, tap: BaseFeatureTap, unique: dict[TextInput, int]) -> None:
    """The piece's inputs' OOD features (the layers its adapter reads), kept with its job."""
    job = piece.job
    positions = [p for p in range(len(job.inputs))[piece.inputs] if p not in job.progress.ood_features]
    if positions:
        features = tap.select(job.adapter.ood_layers, [unique[job.inputs[p]] for p in positions])
        job.progress.ood_features.update(zip(positions, features, strict=True))


def _ood(job: Job) -> tuple[Tensor, Tensor] | None:
    """``(n,)`` OOD scores and p-values of a finished job, or ``None`` for a bundle without a score."""
    score = job.adapter.bundle.ood
    if score is None:
        return None
    features = torch.stack([job.progress.ood_features[p] for p in range(len(job.inputs))])
    values = score.score(features)
    return values, score.pvalue(values)


def _result(job: Job) -> JobResult:
    """The predictive of a job whose pieces have all run; non-finite probabilities are an error, never an
    answer."""
    progress = job.progress
    logits = _assemble(job, progress.logits)
    if job.method == PredictiveMode.GLM:
        jacobians = {k: torch.cat([j[k] for j in progress.jacobians]) for k in progress.jacobians[0]}
        pred = _glm(job, _masked(job, logits), jacobians)
    else:
        pred = predictive(_masked(job, logits), job.adapter.temperature)
    pred = _to_cpu(pred)
    if not bool(torch.isfinite(pred.probs).all()):
        log.error("adapter %s version %s gave non-finite probabilities", job.adapter.name, job.adapter.version)
        raise NonFiniteOutputError(
            f"adapter {job.adapter.name!r} (version {job.adapter.version}) produced non-finite probabilities; "
            "the answer is withheld"
        )
    ood = _ood(job)
    flags, reasons = abstain(pred, job.rules, None if ood is None else ood[1])
    queue_seconds = (progress.started or job.admitted) - job.admitted
    return JobResult(
        pred, flags.tolist(), reasons, queue_seconds, progress.compute_seconds, progress.batch_requests,
        progress.batch_rows, *((ood[0].tolist(), ood[1].tolist()) if ood is not None else ()),
    )  # fmt: skip


def _assemble(job: Job, parts: list[Tensor]) -> Tensor:
    """The pieces' logits (``(s, i, C)`` each, or ``(i, C)`` for the GLM) back into ``(S, n, C)`` / ``(n, C)``."""
    if job.method == PredictiveMode.GLM:
        return torch.cat(parts)
    pieces = job.progress.pieces
    S, n, C = job.num_samples, len(job.inputs), parts[0].shape[-1]
    logits = torch.empty(S, n, C)
    for piece, part in zip(pieces, parts, strict=True):
        logits[piece.samples, piece.inputs] = part
    return logits


def _masked(job: Job, logits: torch.Tensor) -> torch.Tensor:
    """Multiple choice: the letters an input lacks get ``-inf`` (logits ``(..., n, C)``)."""
    return mask_choices(logits, [item.num_choices for item in job.inputs])


def _glm(job: Job, logits: torch.Tensor, jacobians: dict[str, torch.Tensor]) -> Predictive:
    posterior = job.adapter.bundle.posterior
    covariance = posterior.jacobian_covariance(
        {k: v.to(device=posterior.device, dtype=posterior.dtype) for k, v in jacobians.items()}
    )
    generator = make_generator(job.seed, covariance.device)
    return glm_predictive(logits.to(covariance.device), covariance, job.num_samples, generator, job.adapter.temperature)


def _to_cpu(pred: Predictive) -> Predictive:
    return Predictive(**{f.name: getattr(pred, f.name).cpu() for f in dataclasses.fields(pred)})

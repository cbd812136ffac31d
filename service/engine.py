"""Cost-bounded dynamic micro-batching: concurrent requests, for any adapters, with all their posterior samples,
run as batched-rows forwards in a worker thread while the event loop stays free.

A request is a :class:`Job`: ``n`` inputs of one adapter version under ``S`` samples. Its estimated cost is
rows × tokens (its inputs counted by the tokenizer, capped at the adapter's max length). Admission is by cost: a
job is refused at once (429) when the admitted jobs or their cost would exceed the queue's bounds.

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
import dataclasses
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from itertools import accumulate

import torch
from torch import Tensor

from adapters.batching import RowBlock
from adapters.ood.features import BaseFeatureTap
from adapters.posteriors.base import make_generator
from adapters.predictive import AbstentionRule, Predictive, abstain, glm_logits_from_noise, predictive
from adapters.tasks import mask_choices
from adapters.vocab import PredictiveMode
from service.errors import NonFiniteOutputError, NotReadyError, PredictionTimeoutError, QueueFullError
from service.host import ModelHost, TextInput
from service.metrics import Metrics
from service.registry import AdapterVersion

log = logging.getLogger("caveat.serve")

MAX_PASSED_OVER = 2  # steps a job may wait while smaller jobs fill them; then its pieces go first


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

    @cached_property
    def rows(self) -> int:
        """Rows of the network forward: the GLM runs each input once (its draws are in logit space)."""
        return len(self.inputs) * (1 if self.method == PredictiveMode.GLM else self.num_samples)

    @cached_property
    def cost(self) -> int:
        """Estimated rows × tokens; the GLM's Jacobian pays one backward pass per class on top of its forward."""
        passes = 1 + len(self.adapter.labels) if self.method == PredictiveMode.GLM else 1
        return self.rows * self.tokens * passes

    @property
    def abandoned(self) -> bool:
        return self.future.done() or time.perf_counter() > self.deadline


@dataclass
class JobResult:
    """A job's predictive (on the CPU), its answer's fields as host lists, abstention flags and where its time
    went.

    Attributes:
        values: :data:`ANSWER_FIELDS` → one value per input (``probs``: a list per input), read by the routes
            and the metrics without touching a tensor.
    """

    pred: Predictive
    values: dict[str, list]
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
        self.passed_over = 0  # steps formed since this job's last piece ran (or its admission)
        self._cost_at = (-1, 0)  # (next, remaining cost) when last computed

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
        self._cost_at = (-1, 0)

    @property
    def remaining(self) -> list[_Piece]:
        return self.pieces[self.next :]

    def piece_cost(self, piece: _Piece) -> int:
        """Estimated cost of one of the job's pieces."""
        return piece.rows * self.job.cost // max(self.job.rows, 1)

    def remaining_cost(self) -> int:
        """Estimated cost of the pieces not yet run (kept per ``next``: the engine asks for it on every step and
        admission)."""
        if self._cost_at[0] != self.next:
            job = self.job
            self._cost_at = (self.next, sum(p.rows for p in self.remaining) * job.cost // max(job.rows, 1))
        return self._cost_at[1]


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
                outcomes = await loop.run_in_executor(self._executor, self._run_isolated, pieces)
            finally:
                self._busy = False
            self._finish(pieces, outcomes, started)

    async def _collect(self) -> list[_Piece]:
        """The next step: waiting jobs that fit whole first, then pieces of the oldest unfinished job."""
        while not self._jobs:
            self._arrived.clear()
            await self._arrived.wait()
        if self.config.enabled and self.config.max_wait_ms > 0 and len(self._jobs) == 1 and self._had_company:
            await asyncio.sleep(self.config.max_wait_ms / 1000)  # a moment for company, when some is likely
        for job in [j for j in self._jobs if j.abandoned]:
            self._drop(job)
        jobs = self._jobs if self.config.enabled else self._jobs[:1]
        budget, rows, pieces, taken = self.config.step_tokens, 0, [], set()

        def take(job: Job, whole: bool) -> None:
            """The job's remaining pieces: all or none (``whole``), or as many as the step has room for (one at
            least in an empty step)."""
            nonlocal budget, rows
            remaining = job.progress.remaining
            if whole:
                cost, job_rows = job.progress.remaining_cost(), sum(p.rows for p in remaining)
                if cost <= budget and rows + job_rows <= self.config.max_batch_rows:
                    pieces.extend(remaining)
                    taken.add(id(job))
                    budget, rows = budget - cost, rows + job_rows
                return
            for piece in remaining:
                piece_cost = job.progress.piece_cost(piece)
                if pieces and (piece_cost > budget or rows + piece.rows > self.config.max_batch_rows):
                    break
                pieces.append(piece)
                taken.add(id(job))
                budget, rows = budget - piece_cost, rows + piece.rows

        overdue = next((job for job in jobs if job.progress.passed_over >= MAX_PASSED_OVER), None)
        if overdue is not None:  # passed over by smaller jobs too often: first, so that no job starves
            take(overdue, whole=False)
        for job in jobs:  # small jobs whole, in arrival order
            if id(job) not in taken:
                take(job, whole=True)
        big = next((job for job in jobs if id(job) not in taken and job.progress.remaining), None)
        if big is not None:  # the oldest job left out: its pieces while the step has room
            take(big, whole=False)
        for job in jobs:
            job.progress.passed_over = 0 if id(job) in taken else job.progress.passed_over + 1
        self._had_company = len({id(p.job) for p in pieces}) > 1 or len(self._jobs) > 1
        self.metrics.queue_depth.set(self.pending)
        return pieces

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

    def _finish(self, pieces: list[_Piece], outcomes: dict[int, JobResult | BaseException | None], started: float):
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
        """Sampled and MAP pieces in one batched-rows forward, GLM pieces in one batched linearisation; the
        results of the jobs it finishes computed together (:func:`_results`)."""
        start = time.perf_counter()
        device = self.host.device
        _draw([piece.job for piece in pieces], start)
        unique: dict[TextInput, int] = {}
        blocks = []
        for piece in pieces:
            job = piece.job
            indices = [unique.setdefault(item, len(unique)) for item in job.inputs[piece.inputs]]
            samples = job.progress.samples
            if piece.samples != slice(0, next(iter(samples.values())).shape[0]):
                samples = {k: v[piece.samples] for k, v in samples.items()}  # whole: the drawn dict itself
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
            outcomes[id(job)] = None
        outcomes.update(_results([job for job in jobs if not job.progress.remaining]))
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


def _draw(jobs: list[Job], start: float) -> None:
    """Samples for the jobs that have none yet: one ``draw_many`` per adapter version and method (each job's
    noise from its own seeded generator, so a seed gives the same samples whatever else is drawn with it)."""
    waiting: dict[tuple[int, str], list[Job]] = {}
    for job in dict.fromkeys(jobs):
        if job.progress.samples is None:
            job.progress.started = start
            waiting.setdefault((id(job.adapter), job.method), []).append(job)
    for group in waiting.values():
        drawn = group[0].adapter.draw_many([(job.num_samples, job.seed) for job in group], group[0].method)
        for job, samples in zip(group, drawn, strict=True):
            job.progress.samples = samples


ANSWER_FIELDS = (
    "probs", "label", "confidence", "entropy", "entropy_normalized", "expected_entropy", "mutual_information",
    "mc_stderr",
)  # fmt: skip


def _results(jobs: list[Job]) -> dict[int, JobResult | BaseException]:
    """The results of jobs whose pieces have all run. Alike jobs (the same predictive, samples, classes and
    temperature; for the GLM the same posterior) get one predictive over all their inputs, moved to the host
    once; a group that fails is answered job by job, so that one job's failure stays its own."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        glm = job.method == PredictiveMode.GLM
        key = (glm, id(job.adapter.bundle.posterior) if glm else 0, job.num_samples, len(job.adapter.labels),
               job.adapter.temperature)  # fmt: skip
        groups.setdefault(key, []).append(job)
    outcomes: dict[int, JobResult | BaseException] = {}
    for group in groups.values():
        try:
            outcomes.update(_group_results(group))
        except Exception:
            for job in group:
                try:
                    outcomes.update(_group_results([job]))
                except Exception as exc:  # this job's answer alone fails
                    log.exception("prediction failed")
                    outcomes[id(job)] = exc
    return outcomes


def _group_results(jobs: list[Job]) -> dict[int, JobResult | BaseException]:
    """One predictive for alike jobs; non-finite probabilities are an error of their job, never an answer."""
    logits = [_masked(job, _assemble(job, job.progress.logits)) for job in jobs]
    if jobs[0].method == PredictiveMode.GLM:
        pred = _to_cpu(_glm(jobs, logits))
    else:
        pred = _to_cpu(predictive(torch.cat(logits, dim=-2), jobs[0].adapter.temperature))
    bounds = list(accumulate((len(job.inputs) for job in jobs), initial=0))
    ood = _ood(jobs, bounds)
    flags, reasons = _abstain(jobs, bounds, pred, None if ood is None else ood[1])
    values = {name: getattr(pred, name).tolist() for name in ANSWER_FIELDS}
    finite = torch.isfinite(pred.probs).all(dim=-1).tolist()
    ood_lists = [] if ood is None else [ood[0].tolist(), ood[1].tolist()]
    outcomes: dict[int, JobResult | BaseException] = {}
    for job, a, b in zip(jobs, bounds, bounds[1:], strict=False):
        if not all(finite[a:b]):
            log.error("adapter %s version %s gave non-finite probabilities", job.adapter.name, job.adapter.version)
            outcomes[id(job)] = NonFiniteOutputError(
                f"adapter {job.adapter.name!r} (version {job.adapter.version}) produced non-finite probabilities; "
                "the answer is withheld"
            )
            continue
        progress = job.progress
        queue_seconds = (progress.started or job.admitted) - job.admitted
        scores = [values[a:b] for values in ood_lists] if job.adapter.bundle.ood is not None else []
        outcomes[id(job)] = JobResult(
            _slice(pred, a, b), {name: v[a:b] for name, v in values.items()}, flags[a:b], reasons[a:b],
            queue_seconds, progress.compute_seconds, progress.batch_requests, progress.batch_rows, *scores,
        )  # fmt: skip
    return outcomes


def _ood(jobs: list[Job], bounds: list[int]) -> tuple[Tensor, Tensor] | None:
    """``(N,)`` OOD scores and p-values of the jobs' inputs, each adapter's score run once over all its jobs'
    inputs (NaN for jobs whose bundle has no score); ``None`` when none has one."""
    by_score: dict[int, list[int]] = {}
    for index, job in enumerate(jobs):
        if job.adapter.bundle.ood is not None:
            by_score.setdefault(id(job.adapter.bundle.ood), []).append(index)
    if not by_score:
        return None
    scores, pvalues = torch.full((bounds[-1],), math.nan), torch.full((bounds[-1],), math.nan)
    for members in by_score.values():
        score = jobs[members[0]].adapter.bundle.ood
        features = [jobs[i].progress.ood_features[p] for i in members for p in range(len(jobs[i].inputs))]
        values = score.score(torch.stack(features))
        rows = torch.cat([torch.arange(bounds[i], bounds[i + 1]) for i in members])
        scores[rows], pvalues[rows] = values.float().cpu(), score.pvalue(values).float().cpu()
    return scores, pvalues


def _abstain(
    jobs: list[Job], bounds: list[int], pred: Predictive, pvalues: Tensor | None
) -> tuple[list[bool], list[str | None]]:
    """Abstention flags and reasons of every input, the rules of alike jobs applied once (``pvalues`` NaN: no
    OOD score, so the ``ood`` rule never fires)."""
    by_rules: dict[tuple[AbstentionRule, ...], list[int]] = {}
    for index, job in enumerate(jobs):
        by_rules.setdefault(tuple(job.rules), []).append(index)
    flags: list[bool] = [False] * bounds[-1]
    reasons: list[str | None] = [None] * bounds[-1]
    for rules, members in by_rules.items():
        rows = [r for i in members for r in range(bounds[i], bounds[i + 1])]
        whole = len(rows) == bounds[-1]
        index = torch.tensor(rows)
        part = pred if whole else _select(pred, index)
        part_pvalues = None if pvalues is None else pvalues if whole else pvalues[index]
        fired, why = abstain(part, list(rules), part_pvalues)
        for row, flag, reason in zip(rows, fired.tolist(), why, strict=True):
            flags[row], reasons[row] = flag, reason
    return flags, reasons


def _slice(pred: Predictive, start: int, stop: int) -> Predictive:
    """Inputs ``start:stop`` of a predictive (views)."""
    fields = {f.name: getattr(pred, f.name)[start:stop] for f in dataclasses.fields(pred)}
    fields["sample_probs"] = pred.sample_probs[:, start:stop]
    return Predictive(**fields)


def _select(pred: Predictive, index: Tensor) -> Predictive:
    """Inputs ``index`` of a predictive."""
    fields = {f.name: getattr(pred, f.name).index_select(0, index) for f in dataclasses.fields(pred)}
    fields["sample_probs"] = pred.sample_probs.index_select(1, index)
    return Predictive(**fields)


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


def _glm(jobs: list[Job], logits: list[Tensor]) -> Predictive:
    """The GLM predictive of jobs sharing one posterior: ``J Σ Jᵀ`` of all their inputs at once, each job's logit
    draws from its own seeded generator (the draws it gets alone), one predictive over all."""
    posterior = jobs[0].adapter.bundle.posterior
    parts = [part for job in jobs for part in job.progress.jacobians]  # in input order, job after job
    jacobians = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
    covariance = posterior.jacobian_covariance(
        {k: v.to(device=posterior.device, dtype=posterior.dtype) for k, v in jacobians.items()}
    )
    device = covariance.device
    noise = torch.cat([
        torch.randn(job.num_samples, *out.shape, generator=make_generator(job.seed, device), device=device,
                    dtype=torch.float64)
        for job, out in zip(jobs, logits, strict=True)
    ], dim=1)  # fmt: skip
    draws = glm_logits_from_noise(torch.cat(logits).to(device), covariance, noise)
    return predictive(draws, jobs[0].adapter.temperature)


def _to_cpu(pred: Predictive) -> Predictive:
    return Predictive(**{f.name: getattr(pred, f.name).cpu() for f in dataclasses.fields(pred)})

"""A request as the engine sees it: a :class:`Job`, cut into :class:`Piece` s, and its :class:`Progress`."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from adapters.predictive import AbstentionRule
from adapters.predictives import Predictor, get_predictor
from service.host import TextInput
from service.registry import AdapterVersion


@dataclass(eq=False)
class Job:
    """One admitted prediction request, pinned to the adapter version it was admitted with.

    Attributes:
        method: the predictive mode (:mod:`adapters.predictives`), resolved for the adapter already.
        tokens: tokens of the longest input after truncation (every row of a forward pays for its width).
        deadline: ``time.perf_counter()`` value after which nobody waits for the answer.
        coverage: the level its request asked of the conformal prediction sets (``None``: the bundle's).
        lengths: each input's tokens after truncation (length-aware OOD p-values read them).
    """

    adapter: AdapterVersion
    inputs: list[TextInput]
    num_samples: int
    method: str
    seed: int
    rules: list[AbstentionRule]
    tokens: int
    deadline: float = float("inf")
    coverage: float | None = None
    lengths: tuple[int, ...] | None = None
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    admitted: float = field(default_factory=time.perf_counter)
    progress: Progress = field(init=False)

    def __post_init__(self) -> None:
        self.progress = Progress(self)

    @cached_property
    def predictor(self) -> Predictor:
        return get_predictor(self.method)

    @cached_property
    def network_samples(self) -> int:
        """Network rows per input (the GLM runs each input once: its draws are in logit space)."""
        return self.predictor.network_samples(self.num_samples)

    @cached_property
    def rows(self) -> int:
        """Rows of the network forward."""
        return len(self.inputs) * self.network_samples

    @cached_property
    def cost(self) -> int:
        """Estimated rows × tokens × the passes each row costs (the GLM's Jacobian: a backward pass per class)."""
        return self.rows * self.tokens * self.predictor.passes(len(self.adapter.labels))

    @property
    def conformal_alpha(self) -> float | None:
        """The miscoverage its prediction sets are made at: one minus the request's coverage, else its bundle's
        level; ``None`` for an adapter without conformal calibration."""
        spec = self.adapter.manifest.conformal
        if spec is None:
            return None
        return spec.alpha if self.coverage is None else 1 - self.coverage

    @property
    def conformal_coverage(self) -> float | None:
        """The coverage its prediction sets are made for (the request's, else one minus the bundle's level)."""
        spec = self.adapter.manifest.conformal
        if spec is None:
            return None
        return 1 - spec.alpha if self.coverage is None else self.coverage

    @property
    def abandoned(self) -> bool:
        return self.future.done() or time.perf_counter() > self.deadline


@dataclass(eq=False)
class Piece:
    """Network samples ``samples`` × inputs ``inputs`` of one job."""

    job: Job
    samples: slice
    inputs: slice

    @property
    def rows(self) -> int:
        return (self.samples.stop - self.samples.start) * (self.inputs.stop - self.inputs.start)


class Progress:
    """Which pieces of a job are done, and what they produced (on the CPU, in the worker thread)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.next = 0  # index of the first piece not yet run
        self.pieces: list[Piece] = []
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
        n, S = len(job.inputs), job.network_samples
        rows = max(1, step_tokens * job.rows // max(job.cost, 1))
        if rows >= n:
            per = rows // n
            self.pieces = [Piece(job, slice(s, min(s + per, S)), slice(0, n)) for s in range(0, S, per)]
        else:
            self.pieces = [
                Piece(job, slice(s, s + 1), slice(i, min(i + rows, n))) for s in range(S) for i in range(0, n, rows)
            ]
        self._cost_at = (-1, 0)

    @property
    def remaining(self) -> list[Piece]:
        return self.pieces[self.next :]

    def piece_cost(self, piece: Piece) -> int:
        """Estimated cost of one of the job's pieces."""
        return piece.rows * self.job.cost // max(self.job.rows, 1)

    def remaining_cost(self) -> int:
        """Estimated cost of the pieces not yet run (kept per ``next``: the engine asks for it on every step and
        admission)."""
        if self._cost_at[0] != self.next:
            job = self.job
            self._cost_at = (self.next, sum(p.rows for p in self.remaining) * job.cost // max(job.rows, 1))
        return self._cost_at[1]

    def network_logits(self) -> Tensor:
        """The pieces' logits (``(s, i, C)`` each) back into ``(S_rows, n, C)``."""
        job, parts = self.job, self.logits
        logits = parts[0].new_empty(job.network_samples, len(job.inputs), parts[0].shape[-1])
        for piece, part in zip(self.pieces, parts, strict=True):
            logits[piece.samples, piece.inputs] = part
        return logits

    def network_jacobians(self) -> dict[str, Tensor] | None:
        """The pieces' Jacobians (input slices in order) as one dict, ``None`` when the forward gives none."""
        parts = self.jacobians
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

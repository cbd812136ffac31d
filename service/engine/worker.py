"""The worker thread's part of a step: draw the jobs' cores, run their rows in batched forwards, keep what
each piece produced, and answer the jobs the step finishes."""

from __future__ import annotations

import logging
import time

import torch

from adapters.batching import RowBlock
from adapters.ood.features import BaseFeatureTap
from adapters.predictives import forward_kinds
from service.engine.answers import JobResult, answer_jobs
from service.engine.jobs import Job, Piece
from service.host import ModelHost, TextInput

log = logging.getLogger("caveat.serve")

Outcomes = dict[int, JobResult | BaseException | None]  # per job id: its result, its error, or None (more to come)


class Worker:
    """Runs steps on the host model (one at a time, in the engine's worker thread)."""

    def __init__(self, host: ModelHost) -> None:
        self.host = host

    def run_isolated(self, pieces: list[Piece]) -> Outcomes:
        """Run the step; if it fails, run each job's pieces alone so one bad job cannot fail the others."""
        try:
            return self.run(pieces)
        except Exception as exc:
            jobs = list(dict.fromkeys(p.job for p in pieces))
            if len(jobs) == 1:
                log.exception("prediction failed")
                return {id(jobs[0]): exc}
        outcomes: Outcomes = {}
        for job in jobs:
            try:
                outcomes.update(self.run([p for p in pieces if p.job is job]))
            except Exception as exc:
                log.exception("prediction failed")
                outcomes[id(job)] = exc
        return outcomes

    def run(self, pieces: list[Piece]) -> Outcomes:
        """The pieces in one batched forward per forward kind of their predictive modes (sampled and MAP rows
        together, GLM rows in one linearisation); the results of the jobs it finishes computed together."""
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
        outputs = {}
        for kind in forward_kinds():  # in a fixed order: the first forward carries the OOD base rows
            members = [i for i, piece in enumerate(pieces) if piece.job.predictor.forward_kind == kind]
            if members:
                predictor = pieces[members[0]].job.predictor
                rows = self.host.run(predictor, batch, [blocks[i] for i in members], tap)
                for i, (logits, jacobians) in zip(members, rows, strict=True):
                    outputs[i] = (
                        logits.float().cpu(),
                        None if jacobians is None else {k: v.cpu() for k, v in jacobians.items()},
                    )
        for i, piece in enumerate(pieces):  # only now, so that a failed step leaves no partial output behind
            logits, jacobians = outputs[i]
            piece.job.progress.logits.append(logits)
            if jacobians is not None:
                piece.job.progress.jacobians.append(jacobians)
            if tap is not None and piece.job.adapter.ood_layers is not None:
                _keep_features(piece, tap, unique)
        seconds = time.perf_counter() - start
        jobs = list(dict.fromkeys(p.job for p in pieces))
        rows = sum(p.rows for p in pieces)
        outcomes: Outcomes = {}
        for job in jobs:
            progress = job.progress
            progress.next += sum(p.job is job for p in pieces)
            progress.compute_seconds += seconds
            progress.batch_requests = max(progress.batch_requests, len(jobs))
            progress.batch_rows = max(progress.batch_rows, rows)
            outcomes[id(job)] = None
        outcomes.update(answer_jobs([job for job in jobs if not job.progress.remaining]))
        return outcomes

    def _feature_tap(self, pieces: list[Piece], unique: dict[TextInput, int]) -> BaseFeatureTap | None:
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


def _keep_features(piece: Piece, tap: BaseFeatureTap, unique: dict[TextInput, int]) -> None:
    """The piece's inputs' OOD features (the layers its adapter reads), kept with its job."""
    job = piece.job
    positions = [p for p in range(len(job.inputs))[piece.inputs] if p not in job.progress.ood_features]
    if positions:
        features = tap.select(job.adapter.ood_layers, [unique[job.inputs[p]] for p in positions])
        job.progress.ood_features.update(zip(positions, features, strict=True))


def _draw(jobs: list[Job], start: float) -> None:
    """Cores for the jobs that have none yet: one ``draw_many`` per adapter version and mode (each job's noise
    from its own seeded generator, so a seed gives the same samples whatever else is drawn with it)."""
    waiting: dict[tuple[int, str], list[Job]] = {}
    for job in dict.fromkeys(jobs):
        if job.progress.samples is None:
            job.progress.started = start
            waiting.setdefault((id(job.adapter), job.method), []).append(job)
    for group in waiting.values():
        drawn = group[0].adapter.draw_many([(job.num_samples, job.seed) for job in group], group[0].predictor)
        for job, samples in zip(group, drawn, strict=True):
            job.progress.samples = samples

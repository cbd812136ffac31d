"""The answers of finished jobs: one predictive per group of alike jobs, their OOD scores and abstention flags.

Alike jobs (the same predictive mode's summary, draws, classes and temperature; for the GLM the same posterior)
get one predictive over all their inputs, moved to the host once; a group that fails is answered job by job, so
that one job's failure stays its own.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor

from adapters.conformal import ConformalCalibration
from adapters.manifest import FarTemperature
from adapters.predictive import AbstentionRule, InputSignals, Predictive, abstain, predictive
from adapters.tasks import mask_choices, valid_labels
from service.engine.jobs import Job
from service.errors import NonFiniteOutputError
from service.fields import ANSWER_FIELDS, PREDICTIVE_FIELDS

OPTIONAL_FIELDS = tuple(field for field in ANSWER_FIELDS if field.optional)

log = logging.getLogger("caveat.serve")


@dataclass
class JobResult:
    """A job's predictive (on the CPU), its answer's fields as host lists, abstention flags and where its time
    went.

    Attributes:
        values: field name (``service.fields.ANSWER_FIELDS``) → one value per input (``probs``: a list per
            input; ``prediction_set``: label indices), read by the encoders and the metrics without touching a
            tensor; the OOD fields only for an adapter with an OOD score, the prediction set for one with conformal
            calibration.
    """

    pred: Predictive
    values: dict[str, list]
    queue_seconds: float
    compute_seconds: float
    batch_requests: int
    batch_rows: int

    @property
    def abstain(self) -> list[bool]:
        return self.values["abstain"]

    @property
    def reasons(self) -> list[str | None]:
        return self.values["abstain_reason"]

    @property
    def ood_score(self) -> list[float] | None:
        """``None`` for an adapter without an OOD score."""
        return self.values.get("ood_score")

    @property
    def ood_pvalue(self) -> list[float] | None:
        return self.values.get("ood_pvalue")


def answer_jobs(jobs: list[Job]) -> dict[int, JobResult | BaseException]:
    """The results of jobs whose pieces have all run, by job id (an exception for a job whose answer failed)."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        adapter = job.adapter
        key = (job.predictor.summary_key(adapter.bundle.posterior), job.num_samples, len(adapter.labels),
               adapter.temperature, _far_key(adapter.far_temperature))  # fmt: skip
        groups.setdefault(key, []).append(job)
    outcomes: dict[int, JobResult | BaseException] = {}
    for group in groups.values():
        try:
            outcomes.update(AnswerGroup(group).results())
        except Exception:
            for job in group:
                try:
                    outcomes.update(AnswerGroup([job]).results())
                except Exception as exc:  # this job's answer alone fails
                    log.exception("prediction failed")
                    outcomes[id(job)] = exc
    return outcomes


def _far_key(far: FarTemperature | None) -> tuple[float, float] | None:
    return None if far is None else (far.pvalue_below, far.temperature)


class AnswerGroup:
    """Alike jobs answered together; inputs ``bounds[k]:bounds[k+1]`` are job ``k``'s."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self.bounds = list(accumulate((len(job.inputs) for job in jobs), initial=0))

    def predictive(self, pvalues: Tensor | None = None) -> Predictive:
        """One predictive of all the jobs' inputs (multiple-choice letters an item lacks masked to ``-inf``); with a
        far temperature (``calibration.far_temperature``), the inputs whose OOD p-value ``pvalues`` ``(N,)`` is
        below its level are served at it."""
        jobs, first = self.jobs, self.jobs[0]
        logits = [
            mask_choices(job.progress.network_logits(), [item.num_choices for item in job.inputs]) for job in jobs
        ]
        jacobians = [job.progress.network_jacobians() for job in jobs]
        draws = first.predictor.logit_draws(logits, jacobians, first.adapter.bundle.posterior, jobs)
        far = first.adapter.far_temperature
        if far is None or pvalues is None:
            return predictive(draws, first.adapter.temperature).cpu()
        temperature = torch.where(pvalues < far.pvalue_below, far.temperature, first.adapter.temperature)
        return predictive(draws / temperature.to(draws.device, draws.dtype).view(1, -1, 1)).cpu()

    def ood(self) -> tuple[Tensor, Tensor] | None:
        """``(N,)`` OOD scores and p-values of the jobs' inputs, each adapter's score run once over all its jobs'
        inputs (NaN for jobs whose bundle has no score); ``None`` when none has one."""
        by_score: dict[int, list[int]] = {}
        for index, job in enumerate(self.jobs):
            if job.adapter.bundle.ood is not None:
                by_score.setdefault(id(job.adapter.bundle.ood), []).append(index)
        if not by_score:
            return None
        jobs, bounds = self.jobs, self.bounds
        scores, pvalues = torch.full((bounds[-1],), math.nan), torch.full((bounds[-1],), math.nan)
        for members in by_score.values():
            score = jobs[members[0]].adapter.bundle.ood
            features = [jobs[i].progress.ood_features[p] for i in members for p in range(len(jobs[i].inputs))]
            values = score.score(torch.stack(features))
            rows = torch.cat([torch.arange(bounds[i], bounds[i + 1]) for i in members])
            lengths = None
            if score.length_aware:  # each input against the validation inputs of its own length too
                if any(jobs[i].lengths is None for i in members):
                    raise ValueError("a length-aware OOD score needs each input's token count (Job.lengths)")
                lengths = torch.tensor([n for i in members for n in jobs[i].lengths])
            scores[rows], pvalues[rows] = values.float().cpu(), score.pvalue(values, lengths).float().cpu()
        return scores, pvalues

    def prediction_sets(self, pred: Predictive, pvalues: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """``(N, C)`` the inputs' conformal prediction sets, each at its job's level, and ``(N,)`` their sizes (a job
        without calibration: an empty set, no answer field, size NaN so the ``ambiguous`` rule never fires); the
        inputs a far temperature serves (OOD p-value ``pvalues`` ``(N,)`` below its level) take their sets from the
        far-out calibration when the bundle has one; one computation per calibration and level; ``None`` when no
        job's adapter has one."""
        groups: dict[tuple[int, float], tuple[ConformalCalibration, list[Tensor]]] = {}
        for index, job in enumerate(self.jobs):
            alpha = job.conformal_alpha
            if alpha is None:
                continue
            for calibration, rows in self._calibrated_rows(index, pvalues):
                groups.setdefault((id(calibration), alpha), (calibration, []))[1].append(rows)
        if not groups:
            return None
        counts = [item.num_choices for job in self.jobs for item in job.inputs]
        valid = valid_labels(counts, pred.probs.shape[-1])
        sets = torch.zeros(pred.probs.shape, dtype=torch.bool)
        sizes = torch.full((self.bounds[-1],), math.nan, dtype=torch.float64)
        for (_, alpha), (calibration, parts) in groups.items():
            rows = torch.cat(parts)
            sets[rows] = calibration.sets(pred.probs[rows], alpha, None if valid is None else valid[rows])
            sizes[rows] = sets[rows].sum(dim=-1).double()
        return sets, sizes

    def _calibrated_rows(self, index: int, pvalues: Tensor | None) -> list[tuple[ConformalCalibration, Tensor]]:
        """Job ``index``'s rows by the calibration that gives their sets: far-out ones (p-value below the far
        temperature's level) by the bundle's far-out calibration, when it has one, the others by its own."""
        job, rows = self.jobs[index], torch.arange(self.bounds[index], self.bounds[index + 1])
        bundle, far = job.adapter.bundle, job.adapter.far_temperature
        if far is None or bundle.far_conformal is None or pvalues is None:
            return [(bundle.conformal, rows)]
        is_far = pvalues[rows] < far.pvalue_below
        parts = [(bundle.far_conformal, rows[is_far]), (bundle.conformal, rows[~is_far])]
        return [(calibration, part) for calibration, part in parts if part.numel()]

    def abstentions(self, pred: Predictive, signals: InputSignals) -> tuple[list[bool], list[str | None]]:
        """Abstention flags and reasons of every input, the rules of alike jobs applied once (a signal NaN for an
        input: its adapter lacks it, so the rule that reads it never fires)."""
        by_rules: dict[tuple[AbstentionRule, ...], list[int]] = {}
        for index, job in enumerate(self.jobs):
            by_rules.setdefault(tuple(job.rules), []).append(index)
        total = self.bounds[-1]
        flags: list[bool] = [False] * total
        reasons: list[str | None] = [None] * total
        for rules, members in by_rules.items():
            rows = [r for i in members for r in range(self.bounds[i], self.bounds[i + 1])]
            whole = len(rows) == total
            index = torch.tensor(rows)
            part, part_signals = (pred, signals) if whole else (pred.select(index), signals.select(index))
            fired, why = abstain(part, list(rules), part_signals)
            for row, flag, reason in zip(rows, fired.tolist(), why, strict=True):
                flags[row], reasons[row] = flag, reason
        return flags, reasons

    def results(self) -> dict[int, JobResult | BaseException]:
        """Each job's result; non-finite probabilities are an error of their job, never an answer."""
        ood = self.ood()
        pred = self.predictive(None if ood is None else ood[1])
        sets = self.prediction_sets(pred, None if ood is None else ood[1])
        signals = InputSignals(None if ood is None else ood[1], None if sets is None else sets[1])
        flags, reasons = self.abstentions(pred, signals)
        values = {name: getattr(pred, name).tolist() for name in PREDICTIVE_FIELDS}
        values["abstain"], values["abstain_reason"] = flags, reasons
        finite = torch.isfinite(pred.probs).all(dim=-1).tolist()
        if ood is not None:
            values["ood_score"], values["ood_pvalue"] = ood[0].tolist(), ood[1].tolist()
        if sets is not None:
            values["prediction_set"] = [row.nonzero().flatten().tolist() for row in sets[0]]
        outcomes: dict[int, JobResult | BaseException] = {}
        for job, a, b in zip(self.jobs, self.bounds, self.bounds[1:], strict=False):
            if not all(finite[a:b]):
                log.error("adapter %s version %s gave non-finite probabilities", job.adapter.name, job.adapter.version)
                outcomes[id(job)] = NonFiniteOutputError(
                    f"adapter {job.adapter.name!r} (version {job.adapter.version}) produced non-finite probabilities; "
                    "the answer is withheld"
                )
                continue
            progress = job.progress
            queue_seconds = (progress.started or job.admitted) - job.admitted
            own = {name: column[a:b] for name, column in values.items()}
            for field in OPTIONAL_FIELDS:  # another job's adapter computes it: not this one's answer
                if not field.available(job.adapter.manifest):
                    own.pop(field.name, None)
            outcomes[id(job)] = JobResult(
                pred.slice(a, b), own, queue_seconds, progress.compute_seconds, progress.batch_requests,
                progress.batch_rows,
            )  # fmt: skip
        return outcomes

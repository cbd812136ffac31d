"""Calibration fitted on the validation split: temperature scaling and abstention thresholds."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from adapters.manifest import AbstentionSpec
from adapters.predictive import AbstentionKind, AbstentionRule, Predictive, predictive
from training.metrics import accuracy, ece, risk_coverage

ABOVE_ANY_PROBABILITY = math.nextafter(1.0, 2.0)  # a max_prob threshold that abstains on every input
# A rule that answers less than this fraction of validation has not reached a usable target: warn.
LOW_COVERAGE = 0.5


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 200) -> float:
    """The temperature minimising the NLL of the sample-averaged predictive; logits ``(S, N, C)``."""
    logits = logits.detach().double()
    masked = torch.isneginf(logits)  # multiple-choice items' missing choices
    finite = logits.masked_fill(masked, 0.0)  # so that no -inf / T reaches the gradient (inf · 0 = NaN)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")
    log_s = torch.log(torch.tensor(float(logits.shape[0]), dtype=torch.float64))

    def closure() -> Tensor:
        optimizer.zero_grad()
        scaled = (finite / log_t.exp()).masked_fill(masked, float("-inf"))
        log_probs = torch.log_softmax(scaled, dim=-1)
        # the label's log-probability per draw, then their average: gathered first, so that the masked
        # choices' -inf never enter the logsumexp (its gradient there is NaN)
        picked = log_probs.gather(-1, labels.reshape(1, -1, 1).expand(log_probs.shape[0], -1, 1)).squeeze(-1)
        loss = -(torch.logsumexp(picked, dim=0) - log_s).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def _keep_scores(pred: Predictive, kind: AbstentionKind) -> Tensor:
    """Higher = more willing to answer."""
    score = AbstentionRule(kind, 0.0).score(pred)
    return score if kind == "max_prob" else -score


def fit_abstention(
    pred: Predictive,
    labels: Tensor,
    kind: AbstentionKind,
    *,
    target_risk: float | None = None,
    target_coverage: float | None = None,
) -> AbstentionSpec:
    """Threshold for one rule on validation predictions.

    ``target_risk``: the largest coverage whose selective risk is at most the target. ``target_coverage``:
    answer (at least) that fraction. Exactly one target must be given.
    """
    if (target_risk is None) == (target_coverage is None):
        raise ValueError("give exactly one of target_risk and target_coverage")
    keep = _keep_scores(pred, kind).double()
    correct = pred.label == labels
    coverage, risk = risk_coverage(keep, correct)
    ordered = torch.sort(keep, descending=True).values
    if target_risk is not None:
        ok = torch.nonzero(risk <= target_risk + 1e-12).flatten()
        index = int(ok.max()) if len(ok) else -1
    else:
        index = int(torch.searchsorted(coverage, torch.tensor(target_coverage - 1e-12, dtype=torch.float64)))
        index = min(index, len(coverage) - 1)
    if index < 0:  # no coverage reaches the target risk: abstain on everything (finite, so JSON keeps it)
        threshold, fitted_coverage, fitted_risk = (ABOVE_ANY_PROBABILITY if kind == "max_prob" else -1.0), 0.0, 0.0
    else:
        fitted_coverage, fitted_risk = float(coverage[index]), float(risk[index])
        cut = float(ordered[round(fitted_coverage * len(ordered)) - 1])  # keep scores >= cut
        # rules abstain strictly below (max_prob) or strictly above (others): the kept examples stay answered
        threshold = cut if kind == "max_prob" else -cut
    target = {"risk": target_risk} if target_risk is not None else {"coverage": target_coverage}
    target.update(validation_coverage=fitted_coverage, validation_risk=fitted_risk)
    return AbstentionSpec(kind=kind, threshold=threshold, target=target)


def abstention_warning(spec: AbstentionSpec) -> str | None:
    """A sentence for the end of the run and report.md when a rule's target is out of reach on validation:
    no threshold meets the target risk, or only one that answers under half of the validation inputs."""
    target = spec.target or {}
    coverage = target.get("validation_coverage", 1.0)
    if "risk" not in target or coverage >= LOW_COVERAGE:
        return None
    reached = "is not reached at any coverage" if coverage == 0 else f"is reached only at coverage {coverage:.1%}"
    return (
        f"abstention rule {spec.kind}: target risk {target['risk']:g} {reached} on the validation split, so the "
        f"rule abstains on {1 - coverage:.1%} of in-distribution inputs; fit it for a coverage instead "
        "(--target-coverage) or relax --target-risk"
    )


# The predictives the default calibration chooses among, simplest first: a candidate replaces the one chosen so
# far only when it beats it on validation by more than its noise (:func:`choose_predictive`).
CANDIDATES = ("map", "map+temperature", "posterior", "posterior+temperature")
MARGIN_STANDARD_ERRORS = 2.0  # one-sided: a mean NLL gain this many standard errors above zero
FOLDS = 2  # a temperature is scored on the validation half it was not fitted on


@dataclass(frozen=True)
class PredictiveChoice:
    """What the validation rule chose, and every candidate's validation figures.

    Attributes:
        choice: one of :data:`CANDIDATES`.
        candidates: candidate → ``nll`` (per example, temperatures cross-fitted), ``ece``, ``accuracy``,
            ``gain`` (mean NLL gain over the candidate chosen before it was considered) and ``standard_error``.
    """

    choice: str
    candidates: dict[str, dict[str, float]]

    @property
    def uses_posterior(self) -> bool:
        return self.choice.startswith("posterior")


def example_nll(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-example NLL ``(N,)`` of the sample-averaged predictive of logits ``(S, N, C)`` at ``temperature``."""
    log_probs = torch.log_softmax(logits.double() / temperature, dim=-1)
    mixture = torch.logsumexp(log_probs, dim=0) - math.log(logits.shape[0])
    return -mixture.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def cross_fitted_nll(logits: Tensor, labels: Tensor, folds: int = FOLDS, seed: int = 0) -> Tensor:
    """Per-example NLL ``(N,)`` under a temperature fitted on the other folds: an honest validation score for
    temperature scaling (fitted and scored on the same examples, a temperature never loses)."""
    order = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(seed))
    out = torch.empty(labels.shape[0], dtype=torch.float64)
    for part in order.chunk(folds):
        rest = order[~torch.isin(order, part)]
        temperature = fit_temperature(logits[:, rest], labels[rest])
        out[part] = example_nll(logits[:, part], labels[part], temperature)
    return out


def choose_predictive(
    map_logits: Tensor, posterior_logits: Tensor | None, labels: Tensor, seed: int = 0
) -> PredictiveChoice:
    """The validation rule of the default calibration (docs/design.md, calibration).

    Candidates, simplest first: the MAP, the MAP with a temperature, the posterior predictive, the posterior
    with a temperature (without ``posterior_logits``, the MAP's two only). Each is scored by its per-example
    validation NLL (a temperature cross-fitted over :data:`FOLDS` halves); walking the list, a candidate
    replaces the one chosen so far when its mean NLL gain is more than :data:`MARGIN_STANDARD_ERRORS` standard
    errors of the paired difference — so a small validation set keeps the simpler predictive unless the
    evidence is clear.

    Args:
        map_logits: ``(1, N, C)`` the MAP's validation logits; posterior_logits: ``(S, N, C)`` the posterior
            predictive's draws; labels: ``(N,)``.
    """
    logits = {"map": map_logits, "posterior": posterior_logits}
    chosen, records = "map", {}
    nll: dict[str, Tensor] = {}
    for name in CANDIDATES:
        base = logits[name.split("+")[0]]
        if base is None:
            continue
        scaled = name.endswith("temperature")
        nll[name] = cross_fitted_nll(base, labels, seed=seed) if scaled else example_nll(base, labels)
        difference = nll[chosen] - nll[name]  # > 0 where the candidate is better
        error = float(difference.std() / math.sqrt(len(difference))) if len(difference) > 1 else math.inf
        temperature = fit_temperature(base, labels) if scaled else 1.0  # the one the bundle would keep
        probs = predictive(base, temperature).probs
        records[name] = {
            "nll": float(nll[name].mean()), "ece": ece(probs, labels), "accuracy": accuracy(probs, labels),
            "temperature": temperature, "gain": float(difference.mean()), "standard_error": error,
        }  # fmt: skip
        if name != chosen and records[name]["gain"] > MARGIN_STANDARD_ERRORS * error:
            chosen = name
    return PredictiveChoice(chosen, records)

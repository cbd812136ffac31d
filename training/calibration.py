"""Calibration fitted on the validation split: temperature scaling and abstention thresholds."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from adapters.manifest import AbstentionSpec
from adapters.predictive import AbstentionKind, AbstentionRule, Predictive
from training.metrics import risk_coverage

ABOVE_ANY_PROBABILITY = math.nextafter(1.0, 2.0)  # a max_prob threshold that abstains on every input
# A rule that answers less than this fraction of validation has not reached a usable target: warn.
LOW_COVERAGE = 0.5


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 200) -> float:
    """The temperature minimising the NLL of the sample-averaged predictive; logits ``(S, N, C)``."""
    logits = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")
    log_s = torch.log(torch.tensor(float(logits.shape[0]), dtype=torch.float64))

    def closure() -> Tensor:
        optimizer.zero_grad()
        log_probs = torch.log_softmax(logits / log_t.exp(), dim=-1)
        mixture = torch.logsumexp(log_probs, dim=0) - log_s  # log of the averaged probabilities
        loss = -mixture.gather(-1, labels.unsqueeze(-1)).mean()
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

"""Evaluation metrics with the project's fixed definitions (docs/methods.md, metrics).

All functions take predictive probabilities ``probs (N, C)`` and integer labels ``(N,)``.
ECE uses 15 equal-width bins on [0, 1] with bins ``(lo, hi]`` (the first includes 0), reported as a fraction.
"""

from __future__ import annotations

import torch
from scipy.stats import rankdata
from torch import Tensor

from adapters.bins import NLL_FLOOR, NUM_BINS, calibration_bins


def accuracy(probs: Tensor, labels: Tensor) -> float:
    return (probs.argmax(dim=-1) == labels).double().mean().item()


def ece(probs: Tensor, labels: Tensor, num_bins: int = NUM_BINS) -> float:
    """Expected calibration error: ``Σ_b (n_b / N) |acc_b − conf_b|``."""
    count, acc, conf = calibration_bins(probs, labels, num_bins)
    return ((count / count.sum()) * (acc - conf).abs()).sum().item()


def mce(probs: Tensor, labels: Tensor, num_bins: int = NUM_BINS) -> float:
    """Maximum calibration error over non-empty bins."""
    count, acc, conf = calibration_bins(probs, labels, num_bins)
    return (acc - conf).abs()[count > 0].max().item()


def nll(probs: Tensor, labels: Tensor) -> float:
    """Mean ``−log p̄_y`` (probabilities clamped at 1e-12)."""
    picked = probs.double().gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return -picked.clamp_min(NLL_FLOOR).log().mean().item()


def brier(probs: Tensor, labels: Tensor) -> float:
    """Mean over examples of ``Σ_c (p̄_c − 1[c = y])²`` (0 to 2)."""
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).double()
    return (probs.double() - onehot).square().sum(dim=-1).mean().item()


def risk_coverage(confidence: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
    """Risk (error rate among kept) at each coverage ``k/N``, keeping the k most confident examples.

    Ties in confidence are kept together (the curve is evaluated only where the confidence changes), so the
    result does not depend on the order of tied examples.
    """
    order = torch.argsort(confidence.double(), descending=True, stable=True)
    sorted_conf = confidence.double()[order]
    errors = torch.cumsum(1.0 - correct.double()[order], dim=0)
    kept = torch.arange(1, len(order) + 1, dtype=torch.float64)
    last_of_tie = torch.ones_like(sorted_conf, dtype=torch.bool)
    last_of_tie[:-1] = sorted_conf[1:] != sorted_conf[:-1]
    return kept[last_of_tie] / len(order), errors[last_of_tie] / kept[last_of_tie]


def aurc(confidence: Tensor, correct: Tensor) -> float:
    """Area under the risk–coverage curve: mean of the selective risk over coverages 1/N … 1 (ties grouped)."""
    coverage, risk = risk_coverage(confidence, correct)
    widths = torch.diff(coverage, prepend=torch.zeros(1, dtype=torch.float64))
    return (widths * risk).sum().item()


def risk_at_coverage(confidence: Tensor, correct: Tensor, coverage: float = 0.8) -> float:
    """Selective risk when keeping (at least) the given fraction of the most confident examples."""
    covered, risk = risk_coverage(confidence, correct)
    return risk[torch.searchsorted(covered, torch.tensor(coverage - 1e-12, dtype=torch.float64))].item()


def coverage_at_risk(confidence: Tensor, correct: Tensor, max_risk: float = 0.05) -> float:
    """Largest coverage whose selective risk is at most ``max_risk`` (0 when none is)."""
    covered, risk = risk_coverage(confidence, correct)
    ok = risk <= max_risk + 1e-12
    return covered[ok].max().item() if bool(ok.any()) else 0.0


def auroc(scores_negative: Tensor, scores_positive: Tensor) -> float:
    """Probability that a positive scores above a negative (ties count half): the ROC AUC."""
    scores = torch.cat([scores_negative, scores_positive]).double()
    ranks = rankdata(scores.numpy(), method="average")  # ties get their average rank
    n_neg, n_pos = len(scores_negative), len(scores_positive)
    rank_sum = float(ranks[n_neg:].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def fpr_at_tpr(scores_negative: Tensor, scores_positive: Tensor, tpr: float = 0.95) -> float:
    """False-positive rate at the threshold that catches ``tpr`` of the positives."""
    threshold = torch.quantile(scores_positive.double(), 1 - tpr)
    return (scores_negative.double() >= threshold).double().mean().item()


def classification_metrics(probs: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy, ECE, MCE, NLL, Brier, AURC, risk at 80% coverage, coverage at 5% risk."""
    confidence, predicted = probs.max(dim=-1)
    correct = predicted == labels
    return {
        "accuracy": accuracy(probs, labels),
        "ece": ece(probs, labels),
        "mce": mce(probs, labels),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
        "aurc": aurc(confidence, correct),
        "risk_at_80_coverage": risk_at_coverage(confidence, correct, 0.8),
        "coverage_at_5_risk": coverage_at_risk(confidence, correct, 0.05),
    }

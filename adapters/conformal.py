"""Split-conformal prediction sets over a bundle's served predictive (docs/methods.md, conformal prediction).

A nonconformity score ``s(x, y)`` says how unusual label ``y`` is for input ``x`` under the predictive ``p̄``:

- LAC: ``s(x, y) = 1 − p̄_y``;
- APS: ``s(x, y) = Σ_{c ranked at or above y} p̄_c`` (labels ranked by decreasing probability, ties by index).

On ``n`` calibration examples ``(x_i, y_i)`` (the validation split) the threshold at miscoverage ``α`` is the
``k``-th smallest of their scores ``s(x_i, y_i)``, ``k = ⌈(n + 1)(1 − α)⌉`` (infinite when ``k > n``), and the set
of a new input is ``{y : s(x, y) ≤ q̂}``. If the new input and the calibration examples are exchangeable, the set
holds the true label with probability at least ``1 − α``. Class-conditional (Mondrian) sets take one threshold per
label from the calibration examples of that label, and so cover each label's inputs at ``1 − α``. An APS set always
holds the top label (a set that would be empty takes it), as the non-randomised APS of MAPIE does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from adapters.vocab import ConformalScore

DEFAULT_ALPHA = 0.1


def nonconformity(probs: Tensor, score: ConformalScore) -> Tensor:
    """``s(x, y)`` of every label, ``(N, C)`` float64, from predictive probabilities ``(N, C)``."""
    probs = probs.double()
    if score == ConformalScore.LAC:
        return 1.0 - probs
    if score == ConformalScore.APS:
        order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
        cumulative = torch.cumsum(probs.gather(-1, order), dim=-1)
        return torch.empty_like(probs).scatter_(-1, order, cumulative)
    raise ValueError(f"unknown conformal score {score!r}; choose one of {[str(s) for s in ConformalScore]}")


def label_nonconformity(probs: Tensor, labels: Tensor, score: ConformalScore) -> Tensor:
    """``s(x_i, y_i)`` ``(N,)`` of each input's own label."""
    return nonconformity(probs, score).gather(-1, labels.long().reshape(-1, 1)).squeeze(-1)


def conformal_quantile(scores: Tensor, alpha: float) -> float:
    """The split-conformal threshold: the ``⌈(n + 1)(1 − α)⌉``-th smallest score, ``inf`` when there are too few
    scores for that level (every label is then in the set)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    n = scores.numel()
    rank = math.ceil((n + 1) * (1 - alpha))
    if rank > n:
        return math.inf
    return float(torch.sort(scores.double().flatten()).values[rank - 1])


@dataclass(frozen=True)
class ConformalCalibration:
    """Calibration scores of a predictive, and the prediction sets they give at any level.

    Attributes:
        score: LAC or APS.
        scores: ``(n,)`` float64 ``s(x_i, y_i)`` of the calibration examples.
        labels: ``(n,)`` int64 their labels.
        num_labels: ``C``.
        class_conditional: one threshold per label (Mondrian), from that label's examples alone.
    """

    score: ConformalScore
    scores: Tensor
    labels: Tensor
    num_labels: int
    class_conditional: bool = False
    _thresholds: dict[float, Tensor] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def fit(
        cls, probs: Tensor, labels: Tensor, score: ConformalScore, class_conditional: bool = False
    ) -> ConformalCalibration:
        """From the calibration split's predictive ``(n, C)`` and labels ``(n,)``."""
        if probs.ndim != 2 or labels.shape != probs.shape[:1]:
            raise ValueError(f"probs must be (n, C) and labels (n,), got {tuple(probs.shape)}, {tuple(labels.shape)}")
        scores = label_nonconformity(probs, labels, score)
        return cls(ConformalScore(score), scores, labels.long().cpu(), probs.shape[-1], class_conditional)

    def thresholds(self, alpha: float) -> Tensor:
        """``(C,)`` float64 per-label thresholds ``q̂`` at miscoverage ``alpha`` (one value for all labels unless
        class-conditional); cached per level."""
        cached = self._thresholds.get(alpha)
        if cached is not None:
            return cached
        if self.class_conditional:
            values = [conformal_quantile(self.scores[self.labels == c], alpha) for c in range(self.num_labels)]
        else:
            values = [conformal_quantile(self.scores, alpha)] * self.num_labels
        thresholds = torch.tensor(values, dtype=torch.float64)
        if len(self._thresholds) < 64:  # requests choose levels; keep the cache bounded
            self._thresholds[alpha] = thresholds
        return thresholds

    def sets(self, probs: Tensor, alpha: float, valid: Tensor | None = None) -> Tensor:
        """``(N, C)`` bool: label ``c`` is in input ``n``'s set at miscoverage ``alpha``.

        ``valid``: ``(N, C)`` bool, the labels an input can take (multiple choice: its choices); others are never
        in its set.
        """
        included = nonconformity(probs, self.score) <= self.thresholds(alpha).to(probs.device)
        if self.score == ConformalScore.APS:  # the top label always: MAPIE's non-randomised APS
            masked = probs if valid is None else probs.masked_fill(~valid, -1.0)
            included.scatter_(-1, masked.argmax(dim=-1, keepdim=True), True)
        return included if valid is None else included & valid

    def state(self) -> dict[str, Tensor]:
        """The tensors a bundle stores (``conformal.safetensors``)."""
        return {"scores": self.scores.double().contiguous(), "labels": self.labels.long().contiguous()}


def set_sizes(sets: Tensor) -> Tensor:
    """``(N,)`` labels in each set."""
    return sets.sum(dim=-1)


def coverage(sets: Tensor, labels: Tensor) -> float:
    """The fraction of inputs whose set holds their label."""
    return float(sets.gather(-1, labels.long().reshape(-1, 1)).float().mean())


def set_metrics(sets: Tensor, labels: Tensor, alpha: float) -> dict[str, float]:
    """Empirical coverage against its target, mean set size and the share of singleton and empty sets."""
    sizes = set_sizes(sets).double()
    return {
        "target_coverage": 1 - alpha,
        "coverage": coverage(sets, labels),
        "mean_set_size": float(sizes.mean()),
        "singleton": float((sizes == 1).double().mean()),
        "empty": float((sizes == 0).double().mean()),
    }

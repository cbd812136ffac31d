"""p-values of OOD scores against validation scores, and the threshold of the ``ood`` abstention rule.

A raw score's scale depends on the model, the features and the method; its p-value does not: it is the
fraction of validation inputs (in distribution, never trained on) whose score is at least as extreme. We use
the conformal form ``p(s) = (1 + #{v ≥ s}) / (n + 1)``: for a new input exchangeable with the validation
inputs, ``P(p ≤ α) ≤ α`` holds exactly, and a p-value is never 0 (an input stranger than every validation
input reads ``1 / (n + 1)``, not "impossible").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DEFAULT_FRACTION = 0.01  # validation inputs the default ``ood`` rule abstains on


def sorted_reference(scores: Tensor) -> Tensor:
    """Validation scores ``(n,)`` → float64, sorted ascending, checked finite and non-empty."""
    if scores.ndim != 1 or scores.numel() == 0:
        raise ValueError(f"reference scores must be a non-empty vector, got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("reference scores must be finite")
    return scores.double().sort().values.contiguous()


def ood_pvalue(scores: Tensor, reference: Tensor) -> Tensor:
    """``(1 + #{v ≥ s}) / (n + 1)`` for each score; non-increasing in ``s``.

    Args:
        scores: any shape; a NaN score gives a NaN p-value (never a confident-looking number).
        reference: validation scores ``(n,)``, sorted ascending (:func:`sorted_reference`).

    Returns:
        ``scores``' shape, in ``[1 / (n + 1), 1]``, in the reference's dtype.
    """
    n = reference.numel()
    scores = scores.to(device=reference.device, dtype=reference.dtype)
    below = torch.searchsorted(reference, scores.reshape(-1).contiguous(), side="left").reshape(scores.shape)
    pvalues = (1 + n - below).to(reference.dtype) / (n + 1)
    return torch.where(torch.isnan(scores), torch.nan, pvalues)


def pvalue_threshold(reference: Tensor, fraction: float = DEFAULT_FRACTION) -> float:
    """The threshold ``τ`` of the rule "abstain when p < τ" that abstains on ``⌊fraction · n⌋`` validation inputs.

    Scored against the reference they belong to, the ``j``-th highest validation input has
    ``p = (1 + j) / (n + 1)`` (without ties), so ``τ`` lies halfway between the p-values of the last input
    that abstains (``j = m``) and the first that does not (``j = m + 1``): safe from rounding. Ties in the
    scores only make fewer inputs abstain. A new in-distribution input abstains with probability
    ``(m + 1) / (n + 1)``.

    Args:
        reference: validation scores ``(n,)``, sorted ascending.
        fraction: in ``[0, 1)``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the fraction of validation inputs to abstain on must be in [0, 1), got {fraction}")
    n = reference.numel()
    abstaining = math.floor(fraction * n + 1e-9)
    return (abstaining + 1.5) / (n + 1)

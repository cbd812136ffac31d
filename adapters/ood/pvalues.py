"""p-values of OOD scores against validation scores, and the threshold of the ``ood`` abstention rule.

A raw score's scale depends on the model, the features and the method; its p-value does not: it is the
fraction of validation inputs (in distribution, never trained on) whose score is at least as extreme. We use
the conformal form ``p(s) = (1 + #{v ≥ s}) / (n + 1)``: for a new input exchangeable with the validation
inputs, ``P(p ≤ α) ≤ α`` holds exactly, and a p-value is never 0 (an input stranger than every validation
input reads ``1 / (n + 1)``, not "impossible").

Length-aware p-values (:func:`length_edges`): short texts of any domain pool to features unlike long ones, so
an input can also be compared with the validation inputs of its own token-length bucket (Mondrian); the
decision then reads the smaller of the pooled and the per-length p-value, and its threshold is taken on the
validation inputs' own smaller p-values (:func:`threshold_of`), which keeps the share of in-distribution
inputs that abstain at the rule's fraction.
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


def length_edges(lengths: Tensor, buckets: int, min_count: int = 20) -> Tensor:
    """Bucket edges ``(B − 1,)`` float64 at the quantiles of validation token counts ``lengths`` (n,): ``buckets``
    buckets of about equal size, an edge dropped where a bucket would hold fewer than ``min_count`` inputs
    (``torch.bucketize(x, edges)`` gives an input's bucket: ``(edges[b − 1], edges[b]]``)."""
    if buckets < 2:
        raise ValueError(f"length buckets must be at least 2, got {buckets}")
    lengths = lengths.double()
    quantiles = torch.linspace(0, 1, buckets + 1, dtype=torch.float64)[1:-1]
    kept: list[float] = []
    for edge in torch.quantile(lengths, quantiles).round().unique().tolist():
        low = kept[-1] if kept else -math.inf
        if int(((lengths > low) & (lengths <= edge)).sum()) >= min_count and int((lengths > edge).sum()) >= min_count:
            kept.append(edge)
    return torch.tensor(kept, dtype=torch.float64)


def bucket_pvalue(scores: Tensor, buckets: Tensor, references: list[Tensor]) -> Tensor:
    """Each score's p-value against the reference of its bucket: ``scores`` and ``buckets`` ``(n,)``."""
    out = torch.empty(scores.shape, dtype=references[0].dtype, device=references[0].device)
    for index, reference in enumerate(references):
        mine = buckets == index
        out[mine] = ood_pvalue(scores[mine], reference)
    return out


def threshold_of(pvalues: Tensor, fraction: float) -> float:
    """The threshold ``τ`` of "abstain when p < τ" that abstains on ``⌊fraction · n⌋`` of the validation inputs'
    own p-values ``pvalues`` (n,): halfway between the last that abstains and the first that does not (ties
    only make fewer abstain)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the fraction of validation inputs to abstain on must be in [0, 1), got {fraction}")
    ordered = pvalues.double().sort().values
    abstaining = math.floor(fraction * ordered.numel() + 1e-9)
    if abstaining == 0:
        return float(ordered[0])
    return float((ordered[abstaining - 1] + ordered[abstaining]) / 2)

"""Feature-space out-of-distribution scores: fitted on training features, carried by a bundle as tensors,
computed per input from the pooled features the server's forward already produces.

Typical use::

    from adapters.ood import OodMethod, fit_ood_score, OodScore

    score = fit_ood_score(OodMethod.MAHALANOBIS, train_features, train_labels).calibrate(validation_features)
    tensors, params = score.state()                   # safetensors + JSON
    score = OodScore.from_state(tensors, params)      # checked; OodStateError when damaged
    s = score.score(features)                         # (n,), higher = further from the training data
    abstain = score.pvalue(s) < score.threshold()     # 1% of validation inputs abstain
"""

from typing import Any

from torch import Tensor

from adapters.ood.base import (
    DEFAULT_BUDGET_BYTES,
    FeatureNorm,
    OodMethod,
    OodScore,
    prepare_features,
)
from adapters.ood.knn import KnnScore
from adapters.ood.mahalanobis import MahalanobisScore, RelativeMahalanobisScore
from adapters.ood.pvalues import DEFAULT_FRACTION, ood_pvalue, pvalue_threshold, sorted_reference

DEFAULT_METHOD = OodMethod.MAHALANOBIS


def fit_ood_score(method: OodMethod | str, features: Tensor, labels: Tensor | None = None, **options: Any) -> OodScore:
    """Fit ``method`` on training features ``(N, D)`` and labels ``(N,)``; ``options`` go to its ``fit``.

    Raises:
        ValueError: ``method`` is unknown.
        OodFitError: the features cannot support the score (too few examples, a class missing, ...).
    """
    try:
        method = OodMethod(method)
    except ValueError:
        raise ValueError(f"unknown OOD method {method!r}; choose one of {[str(m) for m in OodMethod]}") from None
    return OodScore.registry[method].fit(features, labels, **options)


__all__ = [
    "DEFAULT_BUDGET_BYTES",
    "DEFAULT_FRACTION",
    "DEFAULT_METHOD",
    "FeatureNorm",
    "KnnScore",
    "MahalanobisScore",
    "OodMethod",
    "OodScore",
    "RelativeMahalanobisScore",
    "fit_ood_score",
    "ood_pvalue",
    "prepare_features",
    "pvalue_threshold",
    "sorted_reference",
]

"""k-nearest-neighbour distance (Sun et al. 2022): the Euclidean distance from an input's (normalised)
feature to its k-th nearest training feature. No distributional assumption; the price is a bank of
training features, subsampled to the size budget (Sun et al. report that a random fraction of the bank keeps
most of the detection quality).
"""

from __future__ import annotations

from typing import Any, Self

import torch
from torch import Tensor

from adapters.errors import OodFitError, OodStateError
from adapters.ood.base import (
    DEFAULT_BUDGET_BYTES,
    REFERENCE_RESERVE_BYTES,
    FeatureNorm,
    OodMethod,
    OodScore,
    TensorDict,
    checked_training_features,
    no_extra,
    prepare_features,
    require,
)

DEFAULT_K = 10
UNIT_NORM_TOL = 1e-3


class KnnScore(OodScore):
    """Distance to the ``k``-th nearest of the bank's features ``(M, D)``."""

    method = OodMethod.KNN
    fit_options = ("k", "budget_bytes", "seed")

    def __init__(self, bank: Tensor, k: int, norm: FeatureNorm, reference: Tensor | None = None) -> None:
        super().__init__(norm, reference)
        self.bank = bank
        self.k = k
        self._bank = bank.double()  # scores in float64 (see OodScore.score)

    @classmethod
    def fit(
        cls,
        features: Tensor,
        labels: Tensor | None = None,
        *,
        norm: FeatureNorm = FeatureNorm.L2,
        k: int = DEFAULT_K,
        bank_size: int | None = None,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> Self:
        """Keep (a seeded random subset of) the training features ``(N, D)``; labels are not used.

        Args:
            k: which neighbour's distance is the score.
            bank_size: features kept; ``None``: as many as fit ``budget_bytes`` beside the validation reference's
                reserve (all when they fit).
        """
        features, _ = checked_training_features(features, labels)
        num_examples, dim = features.shape
        element_size = torch.empty((), dtype=dtype).element_size()
        room = max(budget_bytes - REFERENCE_RESERVE_BYTES, 0) // (element_size * dim)
        bank_size = min(num_examples, room) if bank_size is None else bank_size
        if not 1 <= k <= bank_size <= num_examples:
            raise OodFitError(
                f"too few training examples for the {k}-nearest-neighbour score: need 1 ≤ k ≤ bank size ≤ "
                f"examples, got k={k}, bank size {bank_size}, {num_examples} examples"
            )
        generator = torch.Generator().manual_seed(seed)
        kept = torch.randperm(num_examples, generator=generator)[:bank_size].sort().values.to(features.device)
        bank = prepare_features(features[kept], FeatureNorm(norm)).to(dtype).contiguous()
        return cls(bank, k, norm)

    def _score(self, features: Tensor) -> Tensor:
        distances = torch.cdist(features, self._bank)  # (n, M)
        return distances.kthvalue(self.k, dim=1).values

    @property
    def dim(self) -> int:
        return self.bank.shape[1]

    @property
    def _anchor(self) -> Tensor:
        return self.bank

    def _state_tensors(self) -> TensorDict:
        return {"bank": self.bank}

    def _state_params(self) -> dict[str, Any]:
        return {"k": self.k}

    @classmethod
    def _from_state(cls, tensors: TensorDict, params: dict[str, Any], norm: FeatureNorm) -> Self:
        bank = require(tensors, "bank", (None, None))
        no_extra(tensors, {"bank"})
        k = params.get("k")
        if not isinstance(k, int) or not 1 <= k <= bank.shape[0]:
            raise OodStateError(f"OOD parameter k={k!r} does not fit a bank of {bank.shape[0]} features")
        if norm is FeatureNorm.L2 and ((bank.double().norm(dim=1) - 1).abs() > UNIT_NORM_TOL).any():
            raise OodStateError("OOD tensor 'bank' should hold unit-length features (norm l2) but does not")
        return cls(bank, k, norm)

"""Mahalanobis scores: distance to the nearest class under a tied, shrunk Gaussian (Lee et al. 2018; the
class-conditional density of DDU, Mukhoti et al. 2021), and its relative form (Ren et al. 2021), which
subtracts the distance under one background Gaussian fitted on all training features so that directions
every input varies along (length, register) count less than those that separate the classes' data from
the rest.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

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
)
from adapters.ood.gaussian import TiedGaussian, fit_tied_gaussian


def budget_rank(dim: int, num_means: int, num_gaussians: int, budget_bytes: int, element_size: int = 4) -> int:
    """The largest covariance rank whose tensors fit ``budget_bytes`` beside the validation reference's
    reserve: ``D`` (dense) when it fits.

    Each Gaussian stores ``D·r`` eigenvector and ``r + 1`` eigenvalue/residual numbers; ``num_means`` means
    of ``D`` numbers are stored in all.
    """
    free = (budget_bytes - REFERENCE_RESERVE_BYTES) // element_size - dim * num_means - num_gaussians
    rank = free // (num_gaussians * (dim + 1))
    if rank < 1:
        raise OodFitError(f"a {budget_bytes}-byte budget cannot hold a Gaussian score of {dim}-wide features")
    return min(rank, dim)


class MahalanobisScore(OodScore):
    """``min_c (x - μ_c)ᵀ Σ⁻¹ (x - μ_c)`` with a tied, shrunk ``Σ`` (:mod:`adapters.ood.gaussian`)."""

    method = OodMethod.MAHALANOBIS
    fit_options = ("shrinkage", "rank", "budget_bytes")
    relative: ClassVar[bool] = False  # subtract a background Gaussian's distance (RelativeMahalanobisScore)

    def __init__(
        self,
        gaussian: TiedGaussian,
        shrinkage: float,
        norm: FeatureNorm,
        reference: Tensor | None = None,
        background: TiedGaussian | None = None,
    ) -> None:
        super().__init__(norm, reference)
        if self.relative != (background is not None):
            raise ValueError(f"{type(self).__name__} {'needs' if self.relative else 'takes no'} background Gaussian")
        self.gaussian = gaussian
        self.shrinkage = shrinkage
        self.background = background

    @classmethod
    def fit(
        cls,
        features: Tensor,
        labels: Tensor | None = None,
        *,
        norm: FeatureNorm = FeatureNorm.L2,
        shrinkage: float | None = None,
        rank: int | None = None,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        dtype: torch.dtype = torch.float32,
    ) -> Self:
        """Fit on ``(N, D)`` features and ``(N,)`` labels.

        Args:
            shrinkage: ``α`` in ``[0, 1]``; ``None``: the Ledoit–Wolf estimate (fitted separately for the
                background Gaussian of the relative form).
            rank: covariance eigenpairs kept; ``None``: dense when it fits ``budget_bytes``, else the largest
                rank that does (low rank + isotropic residual). The budget holds every Gaussian.
            dtype: of the stored tensors.
        """
        features, labels = checked_training_features(features, labels)
        x = prepare_features(features, FeatureNorm(norm))
        gaussians = 1 + int(cls.relative)
        if rank is None:
            rank = budget_rank(x.shape[1], int(labels.max()) + gaussians, gaussians, budget_bytes)
        gaussian, alpha = fit_tied_gaussian(x, labels, shrinkage, rank, dtype)
        background = None
        if cls.relative:  # one Gaussian around all training features
            background, _ = fit_tied_gaussian(x, torch.zeros_like(labels), shrinkage, rank, dtype)
        return cls(gaussian, alpha, norm, background=background)

    def _score(self, features: Tensor) -> Tensor:
        score = self.gaussian.squared_distances(features).min(dim=1).values
        if self.background is None:
            return score
        return score - self.background.squared_distances(features)[:, 0]

    @property
    def dim(self) -> int:
        return self.gaussian.dim

    @property
    def _anchor(self) -> Tensor:
        return self.gaussian.means

    def _state_tensors(self) -> TensorDict:
        tensors = self.gaussian.state("class")
        return tensors if self.background is None else {**tensors, **self.background.state("background")}

    def _state_params(self) -> dict[str, Any]:
        return {"shrinkage": self.shrinkage, "rank": self.gaussian.rank, "classes": self.gaussian.means.shape[0]}

    @classmethod
    def _from_state(cls, tensors: TensorDict, params: dict[str, Any], norm: FeatureNorm) -> Self:
        gaussian = TiedGaussian.from_state(tensors, "class")
        expected = set(gaussian.state("class"))
        background = None
        if cls.relative:
            background = TiedGaussian.from_state(tensors, "background")
            if background.means.shape != (1, gaussian.dim):
                shape = tuple(background.means.shape)
                raise OodStateError(f"OOD tensor 'background.means' has shape {shape}, expected (1, {gaussian.dim})")
            expected |= set(background.state("background"))
        no_extra(tensors, expected)
        return cls(gaussian, float(params.get("shrinkage", 0.0)), norm, background=background)


class RelativeMahalanobisScore(MahalanobisScore):
    """``min_c MD_c(x) - MD_0(x)``: :class:`MahalanobisScore` minus the squared distance under one background
    Gaussian fitted on all training features (same shrinkage rule, same rank)."""

    method = OodMethod.RELATIVE_MAHALANOBIS
    relative = True

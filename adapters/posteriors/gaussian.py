"""Gaussian families over the flat θ: ``diag``, ``full`` (Cholesky) and ``lowrank_diag`` (SWAG)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from adapters.posteriors.base import KEY_SEP, Posterior, TensorDict, check_vector, flatten, require, split_samples
from adapters.vocab import PosteriorFamily


class DiagPosterior(Posterior):
    """``N(μ, diag(σ²))``: Laplace-diag ``σ² = 1 / (N·diag(H) + δ)`` or a mean-field variational posterior.

    Args:
        mean: block name → μ.
        variance: block name → σ², same shapes as ``mean``.
    """

    family = PosteriorFamily.DIAG

    def __init__(self, mean: Mapping[str, Tensor], variance: Mapping[str, Tensor]) -> None:
        super().__init__(mean)
        if set(variance) != set(mean) or any(variance[n].shape != t.shape for n, t in mean.items()):
            raise ValueError("variance blocks must match the mean blocks in names and shapes")
        require(not any(bool((v < 0).any()) for v in variance.values()), "variances must be non-negative")
        self.variance: TensorDict = {name: variance[name].detach() for name in mean}
        self._std = flatten(self.variance).sqrt()

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> TensorDict:
        noise = self._normal(num_samples, self.num_params, generator=generator)
        return self._unflatten(self.flat_mean() + noise * self._std)

    def sample_many(self, requests: Sequence[tuple[int, torch.Generator | None]]) -> list[TensorDict]:
        noise = torch.cat([self._normal(num_samples, self.num_params, generator=g) for num_samples, g in requests])
        joined = self._unflatten(self.flat_mean() + noise * self._std)
        return split_samples(joined, [num_samples for num_samples, _ in requests])

    def covariance(self) -> Tensor:
        return torch.diag(self._std.square())

    def jacobian_covariance(self, jacobians: Mapping[str, Tensor]) -> Tensor:
        flat = self._flat_jacobians(jacobians)
        return (flat * self._std.square().to(flat.dtype)) @ flat.transpose(1, 2)

    def _state_tensors(self) -> TensorDict:
        return {f"{name}{KEY_SEP}variance": t for name, t in self.variance.items()}

    @classmethod
    def _from_state(cls, mean: TensorDict, tensors: TensorDict, params: dict[str, Any]) -> DiagPosterior:
        return cls(mean, {name: tensors[f"{name}{KEY_SEP}variance"] for name in mean})


class FullPosterior(Posterior):
    """``N(μ, L Lᵀ)`` with a dense lower-triangular ``L (P×P)``: exact and affordable for LoRA-XS cores.

    Args:
        mean: block name → μ.
        scale_tril: Cholesky factor of the covariance of θ.
    """

    family = PosteriorFamily.FULL
    mean_is_map = True  # the exact-GGN Laplace posterior around the MAP

    def __init__(self, mean: Mapping[str, Tensor], scale_tril: Tensor) -> None:
        super().__init__(mean)
        P = self.num_params
        if scale_tril.shape != (P, P):
            raise ValueError(f"scale_tril must be ({P}, {P}), got {tuple(scale_tril.shape)}")
        self.scale_tril = torch.tril(scale_tril.detach())

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> TensorDict:
        noise = self._normal(num_samples, self.num_params, generator=generator)
        return self._unflatten(self.flat_mean() + noise @ self.scale_tril.T)

    def covariance(self) -> Tensor:
        return self.scale_tril @ self.scale_tril.T

    def jacobian_covariance(self, jacobians: Mapping[str, Tensor]) -> Tensor:
        projected = self._flat_jacobians(jacobians) @ self.scale_tril.to(next(iter(jacobians.values())).dtype)
        return projected @ projected.transpose(1, 2)

    def _state_tensors(self) -> TensorDict:
        return {"scale_tril": self.scale_tril}

    @classmethod
    def _from_state(cls, mean: TensorDict, tensors: TensorDict, params: dict[str, Any]) -> FullPosterior:
        return cls(mean, tensors["scale_tril"])


class LowRankDiagPosterior(Posterior):
    """SWAG: ``θ = θ̄ + √λ (σ ⊙ z₁ + D̂ᵀ z₂ / √(K−1))``, covariance ``λ (diag σ² + D̂ᵀD̂ / (K−1))``.

    Args:
        mean: block name → θ̄ (the SWA mean).
        variance: ``(P,)`` diagonal ``max(θ²̄ − θ̄², 1e-30)``.
        deviations: ``(K, P)`` the last K deviations ``θ_i − θ̄``.
        scale: λ (0.5 in the original SWAG).
    """

    family = PosteriorFamily.LOWRANK_DIAG

    def __init__(self, mean: Mapping[str, Tensor], variance: Tensor, deviations: Tensor, scale: float = 0.5) -> None:
        super().__init__(mean)
        check_vector("variance", variance, self.num_params)
        if deviations.ndim != 2 or deviations.shape[1] != self.num_params or deviations.shape[0] < 2:
            raise ValueError(f"deviations must be (K>=2, {self.num_params}), got {tuple(deviations.shape)}")
        self.variance = variance.detach()
        self.deviations = deviations.detach()
        self.scale = float(scale)

    def _check_values(self) -> None:
        require(bool((self.variance >= 0).all()), "SWAG variances must be non-negative")
        require(self.scale >= 0, f"SWAG scale must be non-negative, got {self.scale}")

    @property
    def rank(self) -> int:
        return self.deviations.shape[0]

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> TensorDict:
        z_diag = self._normal(num_samples, self.num_params, generator=generator)
        z_low = self._normal(num_samples, self.rank, generator=generator)
        spread = z_diag * self.variance.sqrt() + z_low @ self.deviations / (self.rank - 1) ** 0.5
        return self._unflatten(self.flat_mean() + self.scale**0.5 * spread)

    def covariance(self) -> Tensor:
        low_rank = self.deviations.T @ self.deviations / (self.rank - 1)
        return self.scale * (torch.diag(self.variance) + low_rank)

    def jacobian_covariance(self, jacobians: Mapping[str, Tensor]) -> Tensor:
        flat = self._flat_jacobians(jacobians)
        diagonal = (flat * self.variance.to(flat.dtype)) @ flat.transpose(1, 2)
        low = flat @ self.deviations.T.to(flat.dtype)  # (N, C, K)
        return self.scale * (diagonal + low @ low.transpose(1, 2) / (self.rank - 1))

    def _state_tensors(self) -> TensorDict:
        return {"variance": self.variance, "deviations": self.deviations}

    def _state_params(self) -> dict[str, Any]:
        return {"scale": self.scale}

    @classmethod
    def _from_state(cls, mean: TensorDict, tensors: TensorDict, params: dict[str, Any]) -> LowRankDiagPosterior:
        return cls(mean, tensors["variance"], tensors["deviations"], params["scale"])

"""Kronecker-factored Laplace (KFAC) posterior, stored in eigenbases.

For a weight block ``W (out×in)`` with curvature factors ``F_G = Q_G Λ_G Q_Gᵀ`` (output gradients) and
``F_A = Q_A Λ_A Q_Aᵀ`` (inputs), the posterior precision of ``vec(W)`` (row-major) is
``(Q_G ⊗ Q_A) diag(N λ_g ⊗ λ_a + δ) (Q_G ⊗ Q_A)ᵀ``. A sample costs two small matmuls:
``W = Ŵ + Q_G (E ⊙ D^{-1/2}) Q_Aᵀ`` with ``E`` standard normal and ``D = N λ_g λ_aᵀ + δ`` (docs/methods.md,
Laplace).
A 1-D block (a bias) has a single factor: ``b = b̂ + Q (e ⊙ D^{-1/2})`` with ``D = N λ + δ``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from adapters.posteriors.base import KEY_SEP, Posterior, TensorDict, inv_sqrt_clamped, require, split_samples
from adapters.vocab import PosteriorFamily

FACTOR_FIELDS = (("eigvecs_out", "eigvals_out"), ("eigvecs_in", "eigvals_in"))
SINGLE_FIELDS = ("eigvecs", "eigvals")


@dataclass
class KronFactors:
    """Eigendecomposed curvature factors of one block: ``(Q_G, Q_A)`` / ``(λ_G, λ_A)`` for a matrix block,
    one ``Q`` / ``λ`` for a vector block."""

    eigvecs: tuple[Tensor, ...]
    eigvals: tuple[Tensor, ...]

    @classmethod
    def from_matrices(cls, *factors: Tensor) -> KronFactors:
        """Eigendecompose symmetric PSD factors (``F_G, F_A`` or a single ``F``); tiny negatives clamp to 0."""
        eigvals, eigvecs = zip(*(torch.linalg.eigh(f) for f in factors), strict=True)
        return cls(tuple(eigvecs), tuple(v.clamp_min(0) for v in eigvals))

    def precision_eigvals(self, scale: float, prior_precision: float) -> Tensor:
        """``D``: the posterior precision's eigenvalues, shaped like the block."""
        if len(self.eigvals) == 1:
            return scale * self.eigvals[0] + prior_precision
        return scale * torch.outer(self.eigvals[0], self.eigvals[1]) + prior_precision


class KronPosterior(Posterior):
    """Laplace posterior with a Kronecker-factored precision per block.

    Args:
        mean: block name → MAP value (``(out, in)`` or ``(n,)``).
        factors: block name → :class:`KronFactors` (two factors for a matrix, one for a vector).
        scale: ``N``, the multiplier of the factors' product (1 when the factors already include it).
        prior_precision: δ, one value or one per block (in ``mean`` order).
    """

    family = PosteriorFamily.KRON
    mean_is_map = True

    def __init__(
        self,
        mean: Mapping[str, Tensor],
        factors: Mapping[str, KronFactors],
        scale: float,
        prior_precision: float | Sequence[float],
    ) -> None:
        super().__init__(mean)
        self.factors = {name: factors[name] for name in self.names}
        self.scale = float(scale)
        deltas = [float(prior_precision)] * len(self.names) if _is_scalar(prior_precision) else list(prior_precision)
        if len(deltas) != len(self.names):
            raise ValueError(f"prior_precision has {len(deltas)} values for {len(self.names)} blocks")
        self.prior_precision = deltas
        for name, t in self._mean.items():
            self._check_block(name, t.shape, self.factors[name])
        self._inv_sqrt = {
            name: inv_sqrt_clamped(self.factors[name].precision_eigvals(self.scale, delta))
            for name, delta in zip(self.names, self.prior_precision, strict=True)
        }

    def _check_values(self) -> None:
        """Curvature eigenvalues and N are non-negative and δ positive, so every precision eigenvalue is ≥ δ."""
        require(self.scale >= 0, f"kron scale N must be non-negative, got {self.scale}")
        require(all(d > 0 for d in self.prior_precision), f"prior precisions must be positive: {self.prior_precision}")
        for name, factors in self.factors.items():
            require(all(bool((v >= 0).all()) for v in factors.eigvals), f"kron eigenvalues of {name!r} are negative")

    @staticmethod
    def _check_block(name: str, shape: torch.Size, factors: KronFactors) -> None:
        expected = tuple((n, n) for n in shape)
        got = tuple(tuple(q.shape) for q in factors.eigvecs)
        if got != expected or tuple(len(v) for v in factors.eigvals) != tuple(shape):
            raise ValueError(f"kron factors of {name!r} do not fit a block of shape {tuple(shape)}: eigvecs {got}")

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> TensorDict:
        return self._spread(self._noise(num_samples, generator))

    def sample_many(self, requests: Sequence[tuple[int, torch.Generator | None]]) -> list[TensorDict]:
        noises = [self._noise(num_samples, generator) for num_samples, generator in requests]
        joined = {name: torch.cat([noise[name] for noise in noises]) for name in self._mean}
        return split_samples(self._spread(joined), [num_samples for num_samples, _ in requests])

    def _noise(self, num_samples: int, generator: torch.Generator | None) -> TensorDict:
        """Standard-normal ``(S, *shape)`` per block, drawn in block order."""
        return {name: self._normal(num_samples, *mean.shape, generator=generator) for name, mean in self._mean.items()}

    def _spread(self, noise: TensorDict) -> TensorDict:
        """``μ + Q_G (D^{-1/2} ⊙ E) Q_Aᵀ`` per block, for noise ``E`` of any leading size."""
        samples = {}
        for name, mean in self._mean.items():
            eigvecs = self.factors[name].eigvecs
            scaled = noise[name] * self._inv_sqrt[name]
            if len(eigvecs) == 1:
                samples[name] = mean + scaled @ eigvecs[0].T
            else:
                samples[name] = mean + eigvecs[0] @ scaled @ eigvecs[1].T
        return samples

    def covariance(self) -> Tensor:
        blocks = []
        for name in self.names:
            eigvecs = self.factors[name].eigvecs
            basis = eigvecs[0] if len(eigvecs) == 1 else torch.kron(eigvecs[0], eigvecs[1])
            blocks.append(basis @ torch.diag(self._inv_sqrt[name].reshape(-1).square()) @ basis.T)
        return torch.block_diag(*blocks)

    def jacobian_covariance(self, jacobians: Mapping[str, Tensor]) -> Tensor:
        """Per block, rotate the Jacobian into the eigenbasis (``Q_Gᵀ J Q_A``) and weight by ``D⁻¹``."""
        total = None
        for name in self.names:
            if name not in jacobians:
                raise ValueError(f"no Jacobian for posterior block {name!r}")
            jac, eigvecs = jacobians[name], self.factors[name].eigvecs
            rotated = (
                jac @ eigvecs[0].to(jac.dtype)
                if len(eigvecs) == 1
                else (eigvecs[0].T.to(jac.dtype) @ jac @ eigvecs[1].to(jac.dtype))
            )
            weighted = (rotated * self._inv_sqrt[name].to(jac.dtype)).flatten(start_dim=2)  # (N, C, size)
            block = weighted @ weighted.transpose(1, 2)
            total = block if total is None else total + block
        return total

    def _state_tensors(self) -> TensorDict:
        tensors = {}
        for name, factors in self.factors.items():
            fields = [SINGLE_FIELDS] if len(factors.eigvecs) == 1 else FACTOR_FIELDS
            for (vec_field, val_field), vecs, vals in zip(fields, factors.eigvecs, factors.eigvals, strict=True):
                tensors[f"{name}{KEY_SEP}{vec_field}"] = vecs
                tensors[f"{name}{KEY_SEP}{val_field}"] = vals
        return tensors

    def _state_params(self) -> dict[str, Any]:
        return {"scale": self.scale, "prior_precision": self.prior_precision}

    @classmethod
    def _from_state(cls, mean: TensorDict, tensors: TensorDict, params: dict[str, Any]) -> KronPosterior:
        factors = {}
        for name, t in mean.items():
            fields = [SINGLE_FIELDS] if t.ndim == 1 else FACTOR_FIELDS
            factors[name] = KronFactors(
                tuple(tensors[f"{name}{KEY_SEP}{vec}"] for vec, _ in fields),
                tuple(tensors[f"{name}{KEY_SEP}{val}"] for _, val in fields),
            )
        return cls(mean, factors, params["scale"], params["prior_precision"])


def _is_scalar(value: float | Sequence[float]) -> bool:
    return isinstance(value, int | float) or (isinstance(value, Tensor) and value.ndim == 0)

"""Matrix-normal posterior per block (family ``matrix_normal``): Bayesian-LoRA on LoRA-XS cores.

Bayesian-LoRA (Lin et al., arXiv 2601.21003) puts a Kronecker-factored, sparse-GP-style posterior on LoRA's
factors: inducing weights with row and column covariance factors plus a learned isotropic noise scale λ.
On an ``r×r`` LoRA-XS core inducing points compress nothing (m ≈ r), so the port is exact and dense:

    q(R) = MN(M, Σ_row, Σ_col) ⊕ N(0, λ² I),   Σ_row = L_row L_rowᵀ (out×out),  Σ_col = L_col L_colᵀ (in×in)

**Vec convention.** θ flattens blocks row-major (entry ``R_ij`` at ``i·in + j``), so
``Cov(R_ij, R_kl) = Σ_row[i,k] Σ_col[j,l] + λ² δ_ik δ_jl`` is, over θ, ``Σ_row ⊗ Σ_col + λ² I``. With
column stacking ``vec(R)`` (the matrix-normal literature's convention) the same covariance reads
``Σ_col ⊗ Σ_row + λ² I``; the two differ only by the commutation permutation.

**Sampling** is exact and direct (no Matheron update is needed without inducing points):
``R = M + L_row E L_colᵀ + λ E'`` with ``E, E'`` standard normal: two ``r×r`` matmuls per sample.

**KL** to the zero-mean prior ``N(0, σ_p² I)`` over the ``d = out·in`` entries of one block:
``KL = ½ [ (tr Σ + ‖M‖²_F) / σ_p² − d + d log σ_p² − log det Σ ]`` with
``tr Σ = ‖L_row‖²_F ‖L_col‖²_F + d λ²`` and ``log det Σ = Σ_ab log(s_a² t_b² + λ²)``, ``s``, ``t`` the
singular values of ``L_row``, ``L_col`` (the eigenvalues of ``Σ_row ⊗ Σ_col`` are the products ``s_a² t_b²``).

**GLM predictive.** Per block, ``J Σ Jᵀ = (L_rowᵀ J L_col)(L_rowᵀ J L_col)ᵀ + λ² J Jᵀ`` (contracting the
block's entries): never the dense ``d×d`` covariance.

**Head.** A vector block of length ``n`` is a one-column matrix (``L_col`` is ``1×1``), so the family can
cover ``head.weight`` and ``head.bias``; Bayesian-LoRA itself keeps the head fixed (cores only).

**Training.** :meth:`MatrixNormalFactors.from_unconstrained` maps free parameters to valid factors
(lower-triangular with a softplus diagonal, ``λ = cap · sigmoid(ρ)``); :func:`sample_blocks` draws one
reparameterised core per example (``(rows, out, in)``, differentiable in the mean and every factor) for the
batched-rows forward, and :func:`total_kl` is the ELBO's KL term.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from adapters.errors import PosteriorValueError
from adapters.posteriors.base import KEY_SEP, Posterior, TensorDict
from adapters.vocab import PosteriorFamily

FIELDS = ("row_factor", "col_factor", "noise_scale")  # posterior.safetensors: "<block>::<field>"


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """``(out, in)`` of a block: a matrix as it is, a vector of length ``n`` as one column ``(n, 1)``."""
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 1:
        return shape[0], 1
    raise ValueError(f"matrix-normal blocks are matrices or vectors, got shape {tuple(shape)}")


@dataclass(frozen=True)
class MatrixNormalFactors:
    """The covariance of one block: ``Σ_row ⊗ Σ_col + λ² I`` over its row-major entries.

    Attributes:
        row: ``L_row (out, out)``, lower-triangular with a positive diagonal.
        col: ``L_col (in, in)`` (``(1, 1)`` for a vector block).
        noise: ``λ``, a 0-dim tensor ``≥ 0``.

    A :meth:`stack` of same-shaped blocks carries a leading ``(B,)`` dimension on all three; :meth:`trace`,
    :meth:`log_det` and :func:`kl_divergence` then answer per block (one batched SVD instead of B).
    """

    row: Tensor
    col: Tensor
    noise: Tensor

    @classmethod
    def isotropic(cls, shape: tuple[int, ...], std: float, noise: float, like: Tensor) -> MatrixNormalFactors:
        """``L_row = L_col = √std · I``: each entry's variance is ``std² + noise²`` (a training start point)."""
        out, inp = matrix_shape(shape)
        options = {"device": like.device, "dtype": like.dtype}
        root = math.sqrt(std)
        return cls(root * torch.eye(out, **options), root * torch.eye(inp, **options), torch.tensor(noise, **options))

    @classmethod
    def from_unconstrained(cls, row: Tensor, col: Tensor, noise: Tensor, noise_cap: float) -> MatrixNormalFactors:
        """Valid factors from free parameters, differentiably: the strictly lower parts as they are, the
        diagonals through softplus, ``λ = noise_cap · sigmoid(noise)`` (in ``(0, noise_cap)``)."""
        return cls(_lower_cholesky(row), _lower_cholesky(col), noise_cap * torch.sigmoid(noise))

    def unconstrained(self, noise_cap: float) -> tuple[Tensor, Tensor, Tensor]:
        """The inverse of :meth:`from_unconstrained` (to initialise free parameters); needs ``0 < λ < cap``."""
        if not 0.0 < float(self.noise) < noise_cap:
            raise ValueError(f"λ = {float(self.noise):g} must lie in (0, noise cap {noise_cap:g})")
        return _free_cholesky(self.row), _free_cholesky(self.col), torch.logit(self.noise / noise_cap)

    @classmethod
    def stack(cls, blocks: list[MatrixNormalFactors]) -> MatrixNormalFactors:
        """Same-shaped blocks along a new leading dimension (differentiable)."""
        return cls(*(torch.stack(parts) for parts in zip(*((b.row, b.col, b.noise) for b in blocks), strict=True)))

    def detach(self) -> MatrixNormalFactors:
        return MatrixNormalFactors(self.row.detach(), self.col.detach(), self.noise.detach())

    def to(self, dtype: torch.dtype) -> MatrixNormalFactors:
        return MatrixNormalFactors(self.row.to(dtype), self.col.to(dtype), self.noise.to(dtype))

    @property
    def size(self) -> int:
        """``d = out · in``, the entries of one block."""
        return self.row.shape[-1] * self.col.shape[-1]

    def covariance(self) -> Tensor:
        """Dense ``(d, d)`` ``Σ_row ⊗ Σ_col + λ² I`` over the row-major entries (tests and reports)."""
        kron = torch.kron(self.row @ self.row.T, self.col @ self.col.T)
        return kron + self.noise.square() * torch.eye(self.size, dtype=kron.dtype, device=kron.device)

    def trace(self) -> Tensor:
        """``tr Σ = ‖L_row‖²_F ‖L_col‖²_F + d λ²``."""
        frobenius = self.row.square().sum((-2, -1)) * self.col.square().sum((-2, -1))
        return frobenius + self.size * self.noise.square()

    def log_det(self) -> Tensor:
        """``log det Σ = Σ_ab log(s_a² t_b² + λ²)`` (differentiable, also at equal singular values)."""
        row_sq = torch.linalg.svdvals(self.row).square()
        col_sq = torch.linalg.svdvals(self.col).square()
        products = row_sq[..., :, None] * col_sq[..., None, :]
        return torch.log(products + self.noise.square()[..., None, None]).sum((-2, -1))


def sample_matrix_normal(
    mean: Tensor, factors: MatrixNormalFactors, num_samples: int, generator: torch.Generator | None = None
) -> Tensor:
    """``(S, *mean.shape)`` draws ``M + L_row E L_colᵀ + λ E'``, on ``mean``'s device, differentiable in
    ``mean`` and every factor (the reparameterisation trick)."""
    out, inp = matrix_shape(mean.shape)
    options = {"generator": generator, "device": mean.device, "dtype": mean.dtype}
    kron_noise = torch.randn(num_samples, out, inp, **options)
    iso_noise = torch.randn(num_samples, out, inp, **options)
    spread = factors.row @ kron_noise @ factors.col.T + factors.noise * iso_noise
    return mean + spread.reshape(num_samples, *mean.shape)


def sample_blocks(
    means: Mapping[str, Tensor],
    factors: Mapping[str, MatrixNormalFactors],
    num_samples: int,
    generator: torch.Generator | None = None,
) -> TensorDict:
    """Block name → ``(S, *shape)``; in training ``S`` is the batch size: one independent core per example
    for ``per_row_cores`` (never one draw shared across the batch)."""
    return {name: sample_matrix_normal(mean, factors[name], num_samples, generator) for name, mean in means.items()}


def kl_divergence(mean: Tensor, factors: MatrixNormalFactors, prior_std: float) -> Tensor:
    """``KL(q ‖ N(0, σ_p² I))`` of one block in closed form (0-dim, differentiable); of each block of a
    :meth:`MatrixNormalFactors.stack` (``(B,)``) when ``mean`` is stacked the same way."""
    if not prior_std > 0:
        raise ValueError(f"the prior standard deviation must be positive, got {prior_std}")
    size, prior_var = factors.size, prior_std**2
    squared_mean = mean.reshape(*factors.noise.shape, -1).square().sum(-1)
    spread = (factors.trace() + squared_mean) / prior_var
    return 0.5 * (spread - size + size * math.log(prior_var) - factors.log_det())


def total_kl(means: Mapping[str, Tensor], factors: Mapping[str, MatrixNormalFactors], prior_std: float) -> Tensor:
    """The KL of every block (independent blocks: the sum), the ELBO's complexity term; blocks of one
    shape (all cores of one rank) go through one batched computation."""
    by_shape: dict[torch.Size, list[str]] = {}
    for name, mean in means.items():
        by_shape.setdefault(mean.shape, []).append(name)
    parts = [
        kl_divergence(
            torch.stack([means[n] for n in names]), MatrixNormalFactors.stack([factors[n] for n in names]), prior_std
        ).sum()
        for names in by_shape.values()
    ]
    return torch.stack(parts).sum()


class MatrixNormalPosterior(Posterior):
    """``q(R) = MN(M, L_row L_rowᵀ, L_col L_colᵀ) + N(0, λ² I)`` per block, blocks independent.

    Args:
        mean: block name → ``M`` (a matrix, or a vector treated as one column).
        factors: block name → :class:`MatrixNormalFactors` fitting the block's shape.

    Raises:
        ValueError: names or shapes disagree (impossible values: :meth:`validate`, run by the bundle loader).
    """

    family = PosteriorFamily.MATRIX_NORMAL

    def __init__(self, mean: Mapping[str, Tensor], factors: Mapping[str, MatrixNormalFactors]) -> None:
        super().__init__(mean)
        if set(factors) != set(self._mean):
            raise ValueError(f"factor blocks {sorted(factors)[:5]} are not the mean blocks {self.names[:5]}")
        self.factors = {name: factors[name].detach() for name in self.names}
        for name, t in self._mean.items():
            _check_shapes(name, t, self.factors[name])

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> TensorDict:
        return sample_blocks(self._mean, self.factors, num_samples, generator)

    def covariance(self) -> Tensor:
        return torch.block_diag(*(self.factors[name].covariance() for name in self.names))

    def jacobian_covariance(self, jacobians: Mapping[str, Tensor]) -> Tensor:
        """Per block ``(L_rowᵀ J L_col)(…)ᵀ + λ² J Jᵀ``, summed over blocks: ``(N, C, C)``."""
        total = None
        for name in self.names:
            if name not in jacobians:
                raise ValueError(f"no Jacobian for posterior block {name!r}")
            jac = jacobians[name]
            factors = self.factors[name].to(jac.dtype)
            matrix = jac.reshape(*jac.shape[:2], *matrix_shape(self._mean[name].shape))  # (N, C, out, in)
            projected = (factors.row.T @ matrix @ factors.col).flatten(start_dim=2)
            flat = matrix.flatten(start_dim=2)
            block = projected @ projected.transpose(1, 2) + factors.noise.square() * (flat @ flat.transpose(1, 2))
            total = block if total is None else total + block
        return total

    def kl(self, prior_std: float) -> Tensor:
        """``KL(q ‖ N(0, σ_p² I))`` over all blocks (for reports; training uses :func:`total_kl`)."""
        return total_kl(self._mean, self.factors, prior_std)

    def _check_values(self) -> None:
        for name, factors in self.factors.items():
            for field, factor in zip(FIELDS[:2], (factors.row, factors.col), strict=True):  # finite: validate()
                if not torch.equal(factor, factor.tril()):
                    raise PosteriorValueError(f"{name}{KEY_SEP}{field} is not lower-triangular")
                if not bool((factor.diagonal() > 0).all()):
                    raise PosteriorValueError(f"{name}{KEY_SEP}{field} has a diagonal entry ≤ 0: not a Cholesky factor")
            noise = float(factors.noise)
            if not (math.isfinite(noise) and noise >= 0):
                raise PosteriorValueError(f"{name}{KEY_SEP}noise_scale λ must be finite and ≥ 0, got {noise}")

    def _state_tensors(self) -> TensorDict:
        return {
            f"{name}{KEY_SEP}{field}": t
            for name, factors in self.factors.items()
            for field, t in zip(FIELDS, (factors.row, factors.col, factors.noise), strict=True)
        }

    @classmethod
    def _from_state(cls, mean: TensorDict, tensors: TensorDict, params: dict[str, Any]) -> MatrixNormalPosterior:
        factors = {name: MatrixNormalFactors(*(tensors[f"{name}{KEY_SEP}{f}"] for f in FIELDS)) for name in mean}
        return cls(mean, factors)


def _check_shapes(name: str, mean: Tensor, factors: MatrixNormalFactors) -> None:
    out, inp = matrix_shape(mean.shape)
    got = (tuple(factors.row.shape), tuple(factors.col.shape), tuple(factors.noise.shape))
    if got != ((out, out), (inp, inp), ()):
        raise ValueError(
            f"matrix-normal factors of {name!r} (row, col, λ) have shapes {got}; a block of shape "
            f"{tuple(mean.shape)} needs {((out, out), (inp, inp), ())}"
        )
    dtypes = {t.dtype for t in (factors.row, factors.col, factors.noise)}
    if dtypes != {mean.dtype}:
        raise ValueError(f"matrix-normal factors of {name!r} are {sorted(map(str, dtypes))}, the mean {mean.dtype}")


def _lower_cholesky(free: Tensor) -> Tensor:
    """``(n, n)`` free → lower-triangular with a softplus (positive) diagonal: always a Cholesky factor."""
    return free.tril(-1) + torch.diag_embed(F.softplus(free.diagonal(dim1=-2, dim2=-1)))


def _free_cholesky(factor: Tensor) -> Tensor:
    """Inverse of :func:`_lower_cholesky` (``softplus⁻¹(y) = y + log(−expm1(−y))``)."""
    diagonal = factor.diagonal(dim1=-2, dim2=-1)
    return factor.tril(-1) + torch.diag_embed(diagonal + torch.log(-torch.expm1(-diagonal)))

"""Class-conditional Gaussians with one shared (tied) covariance, shrunk, stored by its eigendecomposition.

The covariance is the pooled within-class scatter ``Σ = (1/N) Σ_i (x_i - μ_{y_i})(x_i - μ_{y_i})ᵀ``, shrunk
towards a scaled identity as scikit-learn's ``ShrunkCovariance`` does: ``(1 - α) Σ + α (tr Σ / D) I``
(``α`` given, or the Ledoit–Wolf estimate). It is kept as eigenpairs, in one of two forms:

* dense (``r = D``): all eigenpairs; the exact squared Mahalanobis distance.
* low rank + isotropic residual (``r < D``, projected PCA): the top ``r`` eigenpairs, and the mean of the
  other ``D - r`` eigenvalues as the variance of every direction outside their span. ``D·r`` numbers instead
  of ``D²``: what keeps a 4,096-wide model's score within the size budget. Exact when the discarded
  eigenvalues are equal; close when they are nearly so, as after shrinkage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from adapters.errors import OodFitError, OodStateError
from adapters.ood.base import TensorDict, require, require_positive

MIN_PER_CLASS = 2  # a class mean from one example has no within-class scatter to pool
ORTHONORMAL_TOL = 1e-3
ORTHONORMAL_PROBES = 16


@dataclass
class TiedGaussian:
    """Means ``(C, D)``, covariance eigenvectors ``(D, r)`` and eigenvalues ``(r,)`` (descending), and for
    ``r < D`` the residual variance ``(1,)``."""

    means: Tensor
    eigenvectors: Tensor
    eigenvalues: Tensor
    residual_variance: Tensor | None = None

    def __post_init__(self) -> None:
        # Scores are computed in float64 whatever the stored dtype: a batch and its rows one at a time then
        # agree to ~1e-12, so a served score equals the trainer's however requests were batched.
        self._vectors = self.eigenvectors.double()
        self._scale = self.eigenvalues.double().rsqrt()
        self._means = self.means.double()
        self._projected_means = self._means @ self._vectors  # (C, r)
        self._residual = None if self.residual_variance is None else self.residual_variance.double()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def rank(self) -> int:
        return self.eigenvalues.shape[0]

    def squared_distances(self, features: Tensor) -> Tensor:
        """Squared Mahalanobis distance of ``(n, D)`` float64 features to each class mean: ``(n, C)``."""
        projected = features @ self._vectors  # (n, r)
        between = projected.unsqueeze(1) - self._projected_means.unsqueeze(0)  # (n, C, r)
        distances = (between * self._scale).square().sum(-1)
        if self._residual is None:
            return distances
        # The part of x - μ_c outside the top-r span: its squared length over the residual variance.
        total = (features.unsqueeze(1) - self._means.unsqueeze(0)).square().sum(-1)
        return distances + (total - between.square().sum(-1)).clamp_min(0) / self._residual

    def state(self, prefix: str) -> TensorDict:
        tensors = {
            f"{prefix}.means": self.means,
            f"{prefix}.eigenvectors": self.eigenvectors,
            f"{prefix}.eigenvalues": self.eigenvalues,
        }
        if self.residual_variance is not None:
            tensors[f"{prefix}.residual_variance"] = self.residual_variance
        return tensors

    @classmethod
    def from_state(cls, tensors: TensorDict, prefix: str) -> TiedGaussian:
        """Rebuild and check: shapes consistent, finite, positive variances, orthonormal eigenvectors."""
        means = require(tensors, f"{prefix}.means", (None, None))
        dim = means.shape[1]
        eigenvectors = require(tensors, f"{prefix}.eigenvectors", (dim, None))
        rank = eigenvectors.shape[1]
        if not 1 <= rank <= dim:
            raise OodStateError(f"OOD tensor {prefix}.eigenvectors has {rank} columns for dimension {dim}")
        eigenvalues = require_positive(require(tensors, f"{prefix}.eigenvalues", (rank,)), f"{prefix}.eigenvalues")
        if not is_orthonormal(eigenvectors):
            raise OodStateError(f"OOD tensor {prefix}.eigenvectors is not orthonormal")
        residual = None
        if rank < dim:
            key = f"{prefix}.residual_variance"
            residual = require_positive(require(tensors, key, (1,)), key)
        return cls(means, eigenvectors, eigenvalues, residual)


def is_orthonormal(vectors: Tensor) -> bool:
    """Whether the columns of ``(D, r)`` vectors are orthonormal: ``VᵀV = I`` within ``ORTHONORMAL_TOL``.

    Checked without forming ``VᵀV`` (``D·r²``: 60 ms of a MiniLM bundle's load on a CPU): unit column norms
    exactly, then ``Vᵀ(V G) = G`` on ``ORTHONORMAL_PROBES`` Gaussian probes ``G`` (``D·r·k``, a fixed seed so a
    bundle loads or not every time). ``(VᵀV - I) G = 0`` for every ``G`` only when ``VᵀV = I``; a deviation
    above the tolerance escapes all probes only if every probe's weights on it are near zero.
    """
    v = vectors if vectors.dtype in (torch.float32, torch.float64) else vectors.float()  # rounding ≪ tolerance
    if (torch.linalg.vector_norm(v, dim=0, dtype=torch.float64).square() - 1).abs().max() > ORTHONORMAL_TOL:
        return False
    probes = torch.randn(v.shape[1], ORTHONORMAL_PROBES, generator=torch.Generator().manual_seed(0), dtype=v.dtype)
    probes = probes.to(v.device)
    return bool((v.T @ (v @ probes) - probes).abs().max() <= ORTHONORMAL_TOL)


def fit_tied_gaussian(
    features: Tensor,
    labels: Tensor,
    shrinkage: float | None,
    rank: int | None,
    dtype: torch.dtype = torch.float32,
) -> tuple[TiedGaussian, float]:
    """Fit on features ``(N, D)`` and labels ``(N,)`` in ``0..C-1``; returns the Gaussian and the shrinkage used.

    Args:
        shrinkage: ``α`` in ``[0, 1]``; ``None`` for the Ledoit–Wolf estimate.
        rank: eigenpairs kept; ``None`` keeps all (dense).
        dtype: of the stored tensors (the fit itself runs in float64).
    """
    num_examples, dim = features.shape
    counts = torch.bincount(labels)
    if (counts < MIN_PER_CLASS).any():
        sparse = [(c, int(n)) for c, n in enumerate(counts.tolist()) if n < MIN_PER_CLASS]
        raise OodFitError(
            f"too few training examples for a class-conditional Gaussian: every class needs at least "
            f"{MIN_PER_CLASS}, but (class, examples) = {sparse}"
        )
    if shrinkage is not None and not 0.0 <= shrinkage <= 1.0:
        raise OodFitError(f"covariance shrinkage must be in [0, 1], got {shrinkage}")
    rank = dim if rank is None else rank
    if not 1 <= rank <= dim:
        raise OodFitError(f"the covariance rank must be in [1, {dim}], got {rank}")
    x = features.double()
    means = torch.zeros(len(counts), dim, dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    means /= counts.unsqueeze(1)
    residuals = x - means[labels]
    alpha = ledoit_wolf_shrinkage(residuals) if shrinkage is None else float(shrinkage)
    if alpha == 0.0 and num_examples - len(counts) < dim:
        raise OodFitError(
            f"too few training examples for an unshrunk covariance: {num_examples} examples in {len(counts)} "
            f"classes estimate at most {num_examples - len(counts)} of {dim} directions; use shrinkage > 0"
        )
    covariance = residuals.T @ residuals / num_examples
    mean_variance = covariance.trace() / dim
    if mean_variance <= 0:
        raise OodFitError("the training features do not vary within their classes: no covariance to fit")
    shrunk = (1 - alpha) * covariance + alpha * mean_variance * torch.eye(dim, dtype=x.dtype, device=x.device)
    eigenvalues, eigenvectors = torch.linalg.eigh(shrunk)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)  # descending
    if eigenvalues[-1] <= eigenvalues[0] * 1e-12:
        raise OodFitError("the within-class covariance is singular: use shrinkage > 0 or more training examples")
    residual = None
    if rank < dim:
        residual = ((shrunk.trace() - eigenvalues[:rank].sum()) / (dim - rank)).clamp_min(eigenvalues[-1]).reshape(1)
        residual = residual.to(dtype)
    gaussian = TiedGaussian(
        means.to(dtype), eigenvectors[:, :rank].to(dtype).contiguous(), eigenvalues[:rank].to(dtype), residual
    )
    return gaussian, alpha


def ledoit_wolf_shrinkage(residuals: Tensor) -> float:
    """The Ledoit–Wolf shrinkage of centred samples ``(N, D)`` (as ``sklearn.covariance.ledoit_wolf_shrinkage``
    with ``assume_centered=True``): the ``α`` that minimises the expected Frobenius error of the shrunk estimate."""
    num_examples, dim = residuals.shape
    if dim == 1:
        return 0.0
    squares = residuals.square()
    variances = squares.sum(0) / num_examples
    mu = variances.sum() / dim
    beta_sum = (squares.T @ squares).sum()
    delta_sum = (residuals.T @ residuals).square().sum() / num_examples**2
    beta = (beta_sum / num_examples - delta_sum) / (dim * num_examples)
    delta = (delta_sum - 2.0 * mu * variances.sum() + dim * mu**2) / dim
    beta = torch.minimum(beta, delta)
    return 0.0 if beta == 0 else float(beta / delta)

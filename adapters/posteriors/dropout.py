"""MC dropout on the adapter input, as a distribution over the cores (family ``dropout``).

Dropping entry ``j`` of the adapter's input ``a = A x`` (inverted dropout, kept entries scaled by
``1 / (1 − p)``) for a whole sequence is the same as using the core ``R diag(m) / (1 − p)``: a per-row core
sample. Masks are therefore drawn per sequence and rank direction (not per token), which lets MC dropout be
served by the same batched-rows forward as every other posterior: ``S`` masks are ``S`` core samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from adapters.posteriors.base import Posterior, TensorDict, require
from adapters.vocab import PosteriorFamily


def drop_columns(cores: Tensor, rate: float, generator: torch.Generator | None = None) -> Tensor:
    """``(S, out, in)`` cores with each sample's input columns dropped with probability ``rate``.

    Differentiable in ``cores`` (training uses it with per-example masks).
    """
    keep = torch.rand(*cores.shape[:-2], 1, cores.shape[-1], generator=generator, device=cores.device)
    return cores * (keep >= rate).to(cores.dtype) / (1.0 - rate)


class DropoutPosterior(Posterior):
    """Each sample drops input columns of every core (matrix block) with probability ``rate``; vector
    blocks (a head bias) stay fixed.

    Args:
        mean: block name → the trained (dropout-trained) values; the mean of the samples.
        rate: dropout probability ``p`` in ``[0, 1)``.
    """

    family = PosteriorFamily.DROPOUT
    gaussian: ClassVar[bool] = False
    mean_is_map = True  # the dropout-trained values are the served cores

    def __init__(self, mean: Mapping[str, Tensor], rate: float) -> None:
        super().__init__(mean)
        require(0.0 <= rate < 1.0, f"dropout rate must be in [0, 1), got {rate}")
        self.rate = float(rate)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> TensorDict:
        samples = {}
        for name, value in self._mean.items():
            stacked = value.expand(num_samples, *value.shape)
            samples[name] = drop_columns(stacked, self.rate, generator) if value.ndim == 2 else stacked
        return samples

    def covariance(self) -> Tensor:
        """Entries of one column share a mask: ``Cov(R_ij, R_kj) = R_ij R_kj p / (1 − p)``; columns and blocks
        are independent."""
        blocks = []
        for value in self._mean.values():
            if value.ndim != 2:
                blocks.append(torch.zeros(value.numel(), value.numel(), dtype=value.dtype, device=value.device))
                continue
            same_column = torch.eye(value.shape[1], dtype=value.dtype, device=value.device)
            flat = value.reshape(-1)
            column_mask = same_column.repeat(value.shape[0], value.shape[0])  # row-major: entry (i, j) → i·in + j
            blocks.append(torch.outer(flat, flat) * column_mask * self.rate / (1.0 - self.rate))
        return torch.block_diag(*blocks)

    def jacobian_covariance(self, jacobians: Mapping[str, Tensor]) -> Tensor:
        raise ValueError("MC dropout is not a Gaussian posterior: it has no GLM predictive")

    def _state_tensors(self) -> TensorDict:
        return {}

    def _state_params(self) -> dict[str, Any]:
        return {"rate": self.rate}

    @classmethod
    def _from_state(cls, mean: TensorDict, tensors: TensorDict, params: dict[str, Any]) -> DropoutPosterior:
        return cls(mean, params["rate"])

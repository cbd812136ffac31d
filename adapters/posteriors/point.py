"""Point-mass families: ``map`` (one value) and ``ensemble`` (M fixed members, the "samples")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from adapters.posteriors.base import KEY_SEP, Posterior, TensorDict, flatten
from adapters.vocab import PosteriorFamily


class MapPosterior(Posterior):
    """A point mass at the MAP: every sample is the mean, the covariance is zero."""

    family = PosteriorFamily.MAP
    mean_is_map = True

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> TensorDict:
        return {name: t.expand(num_samples, *t.shape) for name, t in self._mean.items()}

    def covariance(self) -> Tensor:
        return torch.zeros(self.num_params, self.num_params, dtype=self.dtype, device=self.device)

    def jacobian_covariance(self, jacobians: Mapping[str, Tensor]) -> Tensor:
        flat = self._flat_jacobians(jacobians)
        return flat.new_zeros(flat.shape[0], flat.shape[1], flat.shape[1])

    def _state_tensors(self) -> TensorDict:
        return {}

    @classmethod
    def _from_state(cls, mean: TensorDict, tensors: TensorDict, params: dict[str, Any]) -> MapPosterior:
        return cls(mean)


class EnsemblePosterior(Posterior):
    """M fixed members (independently trained cores); the predictive averages over them.

    ``sample(S)`` walks a generator-chosen permutation of the members cyclically, so ``S = M`` returns each
    member once and any multiple of M weights them equally.

    Args:
        members: block name → ``(M, *shape)``.
    """

    family = PosteriorFamily.ENSEMBLE
    gaussian: ClassVar[bool] = False

    def __init__(self, members: Mapping[str, Tensor]) -> None:
        sizes = {t.shape[0] for t in members.values()}
        if len(sizes) != 1:
            raise ValueError(f"ensemble members disagree on M: {sizes}")
        self.members: TensorDict = {name: t.detach() for name, t in members.items()}
        super().__init__({name: t.mean(dim=0) for name, t in self.members.items()})

    @property
    def num_members(self) -> int:
        return next(iter(self.members.values())).shape[0]

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> TensorDict:
        order = torch.randperm(self.num_members, generator=generator, device=self.device)
        index = order[torch.arange(num_samples, device=self.device) % self.num_members]
        return {name: t.index_select(0, index) for name, t in self.members.items()}

    def covariance(self) -> Tensor:
        flat = torch.stack([flatten({n: t[m] for n, t in self.members.items()}) for m in range(self.num_members)])
        centred = flat - flat.mean(dim=0)
        return centred.T @ centred / self.num_members

    def jacobian_covariance(self, jacobians: Mapping[str, Tensor]) -> Tensor:
        raise ValueError("an ensemble is a set of fixed members, not a Gaussian: it has no GLM predictive")

    def _state_tensors(self) -> TensorDict:
        return {f"{name}{KEY_SEP}members": t for name, t in self.members.items()}

    @classmethod
    def _from_state(cls, mean: TensorDict, tensors: TensorDict, params: dict[str, Any]) -> EnsemblePosterior:
        return cls({name: tensors[f"{name}{KEY_SEP}members"] for name in mean})

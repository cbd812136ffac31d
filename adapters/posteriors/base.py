"""The interface every posterior family implements, and the flat-vector helpers they share.

A posterior is a distribution over named parameter blocks: each adapted module's core ``(r, r)`` under the
module's name, and optionally ``head.weight (C, H)`` / ``head.bias (C,)``. ``θ`` is the concatenation of
the row-major flattened blocks in insertion order (P numbers); :meth:`Posterior.covariance` is over that
vector.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from adapters.errors import PosteriorValueError
from adapters.finite import first_non_finite
from adapters.vocab import PosteriorFamily

TensorDict = dict[str, Tensor]
KEY_SEP = "::"  # tensor keys in posterior.safetensors: "<block name>::<field>"


class Posterior(ABC):
    """A distribution over named parameter blocks.

    Args:
        mean: block name → mean tensor. Sampling happens on the device these tensors live on.
    """

    family: ClassVar[PosteriorFamily]
    gaussian: ClassVar[bool] = True  # a Gaussian (or point mass) has a GLM predictive; samples-only families not
    mean_is_map: ClassVar[bool] = False  # the mean is the MAP (Laplace, point mass, MC dropout): they must agree
    registry: ClassVar[dict[str, type[Posterior]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "family" in cls.__dict__:
            Posterior.registry[cls.family] = cls

    def __init__(self, mean: Mapping[str, Tensor]) -> None:
        if not mean:
            raise ValueError("a posterior needs at least one parameter block")
        self._mean: TensorDict = {name: t.detach() for name, t in mean.items()}
        self._flat_mean = flatten(self._mean)

    # ----------------------------------------------------------------------------------- the interface

    @abstractmethod
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> TensorDict:
        """Draw ``S`` samples: block name → ``(S, *shape)``, on the posterior's device."""

    def sample_many(self, requests: Sequence[tuple[int, torch.Generator | None]]) -> list[TensorDict]:
        """Samples of several requests ``(S_k, generator_k)`` at once; request ``k`` gets exactly what
        ``sample(S_k, generator_k)`` gives. Families whose draws are standard-normal noise under one affine map
        draw each request's noise from its own generator, then apply the map once for all of them."""
        return [self.sample(num_samples, generator) for num_samples, generator in requests]

    @abstractmethod
    def covariance(self) -> Tensor:
        """The analytic ``(P, P)`` covariance of θ (dense; meant for small P, tests and reports)."""

    def jacobian_covariance(self, jacobians: Mapping[str, Tensor]) -> Tensor:
        """``J Σ Jᵀ`` per input: the covariance of the linearised outputs (the GLM predictive).

        Args:
            jacobians: block name → ``(N, C, *block shape)``, ``∂f_c(x_n) / ∂θ_block``; every block of the
                posterior must be present.

        Returns:
            ``(N, C, C)``. This default goes through the dense :meth:`covariance`; families override it
            with their structure.
        """
        flat = self._flat_jacobians(jacobians)
        return flat @ self.covariance().to(flat.dtype) @ flat.transpose(1, 2)

    def _flat_jacobians(self, jacobians: Mapping[str, Tensor]) -> Tensor:
        """``(N, C, P)`` in θ order."""
        missing = set(self.names) - set(jacobians)
        if missing:
            raise ValueError(f"no Jacobian for posterior blocks {sorted(missing)[:5]}")
        return torch.cat([jacobians[name].flatten(start_dim=2) for name in self.names], dim=2)

    @abstractmethod
    def _state_tensors(self) -> TensorDict:
        """Family-specific tensors (the means are stored by the base class)."""

    def _state_params(self) -> dict[str, Any]:
        """Family-specific small JSON parameters."""
        return {}

    @classmethod
    @abstractmethod
    def _from_state(cls, mean: TensorDict, tensors: TensorDict, params: dict[str, Any]) -> Posterior:
        """Rebuild from what :meth:`state` wrote."""

    def _check_values(self) -> None:
        """Family-specific ranges (variances, eigenvalues, precisions); raise :class:`PosteriorValueError`."""
        return None  # families with no range beyond finiteness (map, ensemble, full)

    # ----------------------------------------------------------------------------------------- shared

    def validate(self) -> None:
        """Refuse impossible values: every tensor and number finite, then the family's own ranges.

        Raises:
            PosteriorValueError: naming the first tensor or parameter at fault.
        """
        tensors, params = self.state()
        if (key := first_non_finite(tensors)) is not None:
            raise PosteriorValueError(f"posterior tensor {key!r} holds NaN or infinite values")
        for key, value in params.items():
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise PosteriorValueError(f"posterior parameter {key!r} is not finite: {value}")
        self._check_values()

    @property
    def names(self) -> list[str]:
        return list(self._mean)

    @property
    def shapes(self) -> dict[str, torch.Size]:
        return {name: t.shape for name, t in self._mean.items()}

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self._mean.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self._mean.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._mean.values())).dtype

    def mean(self) -> TensorDict:
        """Block name → posterior mean (the MAP for Laplace)."""
        return dict(self._mean)

    def flat_mean(self) -> Tensor:
        """θ's mean ``(P,)``."""
        return self._flat_mean

    def state(self) -> tuple[TensorDict, dict[str, Any]]:
        """``(tensors, params)``: safetensors-ready tensors and small JSON parameters."""
        tensors = {f"{name}{KEY_SEP}mean": t for name, t in self._mean.items()}
        tensors.update(self._state_tensors())
        params = {"family": self.family, "names": self.names, **self._state_params()}
        return {k: v.detach().contiguous() for k, v in tensors.items()}, params

    @staticmethod
    def from_state(tensors: Mapping[str, Tensor], params: Mapping[str, Any]) -> Posterior:
        """Rebuild any family from :meth:`state` output (raises ``KeyError``/``ValueError`` when malformed)."""
        family = params["family"]
        if family not in Posterior.registry:
            raise ValueError(f"unknown posterior family {family!r}; known: {sorted(Posterior.registry)}")
        mean = {name: tensors[f"{name}{KEY_SEP}mean"] for name in params["names"]}
        rest = {k: v for k, v in tensors.items() if not k.endswith(f"{KEY_SEP}mean")}
        return Posterior.registry[family]._from_state(mean, rest, dict(params))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Posterior:
        """A copy on another device / dtype (samples are then drawn there)."""
        tensors, params = self.state()
        moved = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in tensors.items()}
        return Posterior.from_state(moved, params)

    def _normal(self, *shape: int, generator: torch.Generator | None) -> Tensor:
        return torch.randn(*shape, generator=generator, device=self.device, dtype=self.dtype)

    def _unflatten(self, flat: Tensor) -> TensorDict:
        """``(S, P)`` → block name → ``(S, *shape)``."""
        return unflatten(flat, self._mean)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(blocks={len(self._mean)}, params={self.num_params})"


def flatten(blocks: Mapping[str, Tensor]) -> Tensor:
    """Concatenate row-major flattened blocks into θ ``(P,)``."""
    return torch.cat([t.reshape(-1) for t in blocks.values()])


def unflatten(flat: Tensor, like: Mapping[str, Tensor]) -> TensorDict:
    """Inverse of :func:`flatten`: ``(..., P)`` → block name → ``(..., *shape)`` with ``like``'s shapes."""
    out, start = {}, 0
    for name, t in like.items():
        out[name] = flat[..., start : start + t.numel()].reshape(*flat.shape[:-1], *t.shape)
        start += t.numel()
    return out


def split_samples(samples: Mapping[str, Tensor], sizes: Sequence[int]) -> list[TensorDict]:
    """Block name → ``(ΣS_k, ...)`` samples of several requests back into one dict per request."""
    parts = {name: t.split(list(sizes)) for name, t in samples.items()}
    return [{name: parts[name][k] for name in parts} for k in range(len(sizes))]


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (a fresh random seed when ``None``)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def check_vector(name: str, tensor: Tensor, size: int) -> None:
    if tensor.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(tensor.shape)}")


def require(condition: bool, message: str) -> None:
    """Raise :class:`PosteriorValueError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise PosteriorValueError(message)


def inv_sqrt_clamped(precision: Tensor) -> Tensor:
    """``precision^{-1/2}`` with a floor that keeps a degenerate direction finite."""
    return precision.clamp_min(torch.finfo(precision.dtype).tiny * 1e6).rsqrt()

"""The contract every OOD score implements: fit on training features, score new ones, store as tensors.

An OOD score maps pooled features ``(n, D)`` to ``(n,)``: higher means further from the training data.
Features are preprocessed first (:class:`FeatureNorm`): L2 normalisation matters for mean-pooled encoders,
whose long inputs pool towards the mean feature and would otherwise look *more* typical than short ones.
A fitted score is rebuilt from :meth:`OodScore.state`'s named tensors and JSON parameters; rebuilding
checks every tensor and raises :class:`~adapters.errors.OodStateError` when one is damaged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F
from torch import Tensor

from adapters.errors import OodFitError, OodStateError
from adapters.ood.pvalues import DEFAULT_FRACTION, ood_pvalue, pvalue_threshold, sorted_reference
from adapters.vocab import OodMethod

TensorDict = dict[str, Tensor]
DEFAULT_BUDGET_BYTES = 2_000_000  # everything a fitted score stores, its validation reference included
REFERENCE_RESERVE_BYTES = 16_000  # of the budget, kept for the reference: 2,000 float64 validation scores
REFERENCE_KEY = "reference"


class FeatureNorm(StrEnum):
    NONE = "none"
    L2 = "l2"  # unit-length features: the score reads direction, not the pooled vector's length


def prepare_features(features: Tensor, norm: FeatureNorm) -> Tensor:
    """``(n, D)`` → ``(n, D)`` preprocessed as ``norm`` says."""
    return F.normalize(features, dim=-1) if norm is FeatureNorm.L2 else features


class OodScore(ABC):
    """A fitted OOD score.

    Args:
        norm: the preprocessing applied to features before fitting and scoring.
        reference: validation scores ``(n,)`` sorted ascending (:meth:`calibrate`), for p-values.
    """

    method: ClassVar[OodMethod]
    registry: ClassVar[dict[OodMethod, type[OodScore]]] = {}
    # the keyword options of :meth:`fit` a caller may set (the trainer passes these of its ``--ood-*`` settings)
    fit_options: ClassVar[tuple[str, ...]] = ("budget_bytes",)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "method" in cls.__dict__:
            OodScore.registry[cls.method] = cls

    def __init__(self, norm: FeatureNorm, reference: Tensor | None = None) -> None:
        self.norm = FeatureNorm(norm)
        self.reference = reference

    # ----------------------------------------------------------------------------------- the interface

    @classmethod
    @abstractmethod
    def fit(cls, features: Tensor, labels: Tensor | None = None, *, norm: FeatureNorm = FeatureNorm.L2) -> Self:
        """Fit on training features ``(N, D)`` with class labels ``(N,)`` (``None``: one class).

        Raises:
            OodFitError: the features cannot support this score (too few examples, a class missing, ...).
        """

    @abstractmethod
    def _score(self, features: Tensor) -> Tensor:
        """Preprocessed ``(n, D)`` float64 features on the state's device → ``(n,)``."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """The feature width ``D``."""

    @property
    @abstractmethod
    def _anchor(self) -> Tensor:
        """A state tensor on the device the score computes on."""

    @abstractmethod
    def _state_tensors(self) -> TensorDict: ...

    def _state_params(self) -> dict[str, Any]:
        return {}

    @classmethod
    @abstractmethod
    def _from_state(cls, tensors: TensorDict, params: dict[str, Any], norm: FeatureNorm) -> Self:
        """Rebuild and check the method's tensors; raises :class:`OodStateError`."""

    # ----------------------------------------------------------------------------------------- shared

    def score(self, features: Tensor) -> Tensor:
        """``(n, D)`` → ``(n,)`` float64, higher = further from the training data.

        Computed in float64 on the state's device, so the score of an input does not depend on the batch
        it arrives in.
        """
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must have shape (n, {self.dim}), got {tuple(features.shape)}")
        x = features.to(device=self._anchor.device, dtype=torch.float64)
        return self._score(prepare_features(x, self.norm))

    def calibrate(self, features: Tensor) -> Self:
        """Keep the scores of validation features ``(n, D)`` as the reference of :meth:`pvalue`."""
        self.reference = sorted_reference(self.score(features))
        return self

    def pvalue(self, scores: Tensor) -> Tensor:
        """The fraction of validation inputs at least as extreme (conformal form; :func:`ood_pvalue`)."""
        return ood_pvalue(scores, self._reference())

    def threshold(self, fraction: float = DEFAULT_FRACTION) -> float:
        """p-value threshold of the ``ood`` rule: abstain when ``p < τ`` (:func:`pvalue_threshold`)."""
        return pvalue_threshold(self._reference(), fraction)

    def _reference(self) -> Tensor:
        if self.reference is None:
            raise ValueError("this OOD score has no validation reference: call calibrate() first")
        return self.reference

    def state(self) -> tuple[TensorDict, dict[str, Any]]:
        """``(tensors, params)``: safetensors-ready tensors and small JSON parameters."""
        tensors = self._state_tensors()
        if self.reference is not None:
            tensors[REFERENCE_KEY] = self.reference
        params = {"method": str(self.method), "norm": str(self.norm), "dim": self.dim, **self._state_params()}
        return {k: v.detach().contiguous() for k, v in tensors.items()}, params

    @staticmethod
    def from_state(tensors: Mapping[str, Tensor], params: Mapping[str, Any]) -> OodScore:
        """Rebuild any method from :meth:`state`'s output, checking it; raises :class:`OodStateError`."""
        try:
            method, norm = OodMethod(params["method"]), FeatureNorm(params["norm"])
        except (KeyError, ValueError) as exc:
            raise OodStateError(f"OOD parameters without a known method and norm: {dict(params)}") from exc
        rest = {k: v for k, v in tensors.items() if k != REFERENCE_KEY}
        score = OodScore.registry[method]._from_state(rest, dict(params), norm)
        if params.get("dim") != score.dim:
            raise OodStateError(f"OOD parameters say dim {params.get('dim')}, the tensors have {score.dim}")
        if REFERENCE_KEY in tensors:
            score.reference = _checked_reference(tensors[REFERENCE_KEY])
        return score

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors, the validation reference included."""
        return sum(t.numel() * t.element_size() for t in self.state()[0].values())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> OodScore:
        """A copy on another device / dtype."""
        tensors, params = self.state()
        return OodScore.from_state({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, params)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, norm={self.norm}, bytes={self.nbytes})"


# ------------------------------------------------------------------------------------------- checks


def checked_training_features(features: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
    """Features ``(N, D)`` and labels ``(N,)`` (zeros when ``None``), checked; raises :class:`OodFitError`."""
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise OodFitError(f"training features must have shape (N, D) with N, D ≥ 1, got {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise OodFitError("training features must be finite (NaN or infinity found)")
    if labels is None:
        labels = torch.zeros(features.shape[0], dtype=torch.long, device=features.device)
    if labels.shape != features.shape[:1] or labels.is_floating_point() or (labels < 0).any():
        raise OodFitError(f"labels must be {features.shape[0]} non-negative integers, got shape {tuple(labels.shape)}")
    return features, labels.to(device=features.device, dtype=torch.long)


def require(tensors: Mapping[str, Tensor], key: str, shape: tuple[int | None, ...]) -> Tensor:
    """The finite floating tensor ``key`` with ``shape`` (``None`` = any size); raises :class:`OodStateError`."""
    if key not in tensors:
        raise OodStateError(f"OOD tensor {key!r} is missing (present: {sorted(tensors)})")
    tensor = tensors[key]
    if tensor.ndim != len(shape) or any(w is not None and g != w for g, w in zip(tensor.shape, shape, strict=True)):
        raise OodStateError(f"OOD tensor {key!r} has shape {tuple(tensor.shape)}, expected {shape}")
    if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
        raise OodStateError(f"OOD tensor {key!r} must be finite floating point numbers")
    return tensor


def require_positive(tensor: Tensor, key: str) -> Tensor:
    if (tensor <= 0).any():
        raise OodStateError(f"OOD tensor {key!r} must be positive (a variance), found {tensor.min().item():.3g}")
    return tensor


def no_extra(tensors: Mapping[str, Tensor], expected: set[str]) -> None:
    extra = set(tensors) - expected
    if extra:
        raise OodStateError(f"unexpected OOD tensors {sorted(extra)}")


def _checked_reference(reference: Tensor) -> Tensor:
    reference = require({REFERENCE_KEY: reference}, REFERENCE_KEY, (None,))
    if reference.numel() == 0 or (reference[1:] < reference[:-1]).any():
        raise OodStateError("OOD tensor 'reference' must be non-empty validation scores sorted ascending")
    return reference

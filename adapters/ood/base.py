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
from adapters.ood.pvalues import (
    DEFAULT_FRACTION,
    bucket_pvalue,
    length_edges,
    ood_pvalue,
    pvalue_threshold,
    sorted_reference,
    threshold_of,
)
from adapters.vocab import OodMethod

TensorDict = dict[str, Tensor]
DEFAULT_BUDGET_BYTES = 2_000_000  # everything a fitted score stores, its validation reference included
REFERENCE_RESERVE_BYTES = 16_000  # of the budget, kept for the reference: 2,000 float64 validation scores
REFERENCE_KEY = "reference"
LENGTH_EDGES_KEY = "length_edges"  # with length-aware p-values: the token-count bucket edges (B − 1,)
LENGTH_REFERENCE_PREFIX = "length_reference_"  # ... and each bucket's validation scores, sorted


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

    Attributes:
        length_edges: with length-aware p-values, the token-count bucket edges ``(B − 1,)``; else ``None``.
        length_references: ... and each bucket's validation scores, sorted (they partition ``reference``).
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
        self.length_edges: Tensor | None = None
        self.length_references: list[Tensor] | None = None

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

    def calibrate(self, features: Tensor, lengths: Tensor | None = None, length_buckets: int = 0) -> Self:
        """Keep the scores of validation features ``(n, D)`` as the reference of :meth:`pvalue`; with
        ``length_buckets`` ≥ 2 and the inputs' token counts ``lengths`` ``(n,)``, also per length bucket
        (length-aware p-values)."""
        scores = self.score(features)
        self.reference = sorted_reference(scores)
        self.length_edges = self.length_references = None
        if length_buckets >= 2:
            if lengths is None or lengths.shape != scores.shape:
                raise ValueError(f"length-aware p-values need the {scores.numel()} validation inputs' token counts")
            edges = length_edges(lengths, length_buckets)
            if edges.numel() == 0:
                raise OodFitError(
                    f"{scores.numel()} validation inputs cannot fill {length_buckets} token-length buckets of at "
                    "least 20 (their lengths are too alike, or there are too few)"
                )
            buckets = torch.bucketize(lengths.double(), edges)
            self.length_edges = edges.to(scores.device)
            self.length_references = [sorted_reference(scores[buckets == b]) for b in range(edges.numel() + 1)]
        return self

    @property
    def length_aware(self) -> bool:
        """Whether a p-value also compares an input with the validation inputs of its own length."""
        return self.length_references is not None

    def pvalue(self, scores: Tensor, lengths: Tensor | None = None) -> Tensor:
        """The fraction of validation inputs at least as extreme (conformal form; :func:`ood_pvalue`); a
        length-aware score reads the smaller of that and the fraction among the validation inputs of the
        input's own token-count bucket (``lengths`` ``(n,)``, required then)."""
        pooled = ood_pvalue(scores, self._reference())
        if self.length_references is None:
            return pooled
        if lengths is None or lengths.shape != scores.shape:
            raise ValueError("this OOD score's p-values are length-aware: pass each input's token count")
        buckets = torch.bucketize(lengths.to(self.length_edges), self.length_edges)
        return torch.minimum(pooled, bucket_pvalue(scores, buckets, self.length_references))

    def threshold(self, fraction: float = DEFAULT_FRACTION) -> float:
        """p-value threshold of the ``ood`` rule: abstain when ``p < τ`` (:func:`pvalue_threshold`); for a
        length-aware score, taken on the validation inputs' own p-values (:func:`threshold_of`)."""
        if self.length_references is None:
            return pvalue_threshold(self._reference(), fraction)
        pooled = self._reference()
        own = [torch.minimum(ood_pvalue(ref, pooled), ood_pvalue(ref, ref)) for ref in self.length_references]
        return threshold_of(torch.cat(own), fraction)

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
        if self.length_references is not None:
            tensors[LENGTH_EDGES_KEY] = self.length_edges
            tensors |= {f"{LENGTH_REFERENCE_PREFIX}{b}": ref for b, ref in enumerate(self.length_references)}
            params["length_buckets"] = len(self.length_references)
        return {k: v.detach().contiguous() for k, v in tensors.items()}, params

    @staticmethod
    def from_state(tensors: Mapping[str, Tensor], params: Mapping[str, Any]) -> OodScore:
        """Rebuild any method from :meth:`state`'s output, checking it; raises :class:`OodStateError`."""
        try:
            method, norm = OodMethod(params["method"]), FeatureNorm(params["norm"])
        except (KeyError, ValueError) as exc:
            raise OodStateError(f"OOD parameters without a known method and norm: {dict(params)}") from exc
        rest = {k: v for k, v in tensors.items() if not _calibration_key(k)}
        method_params = {k: v for k, v in params.items() if k != "length_buckets"}
        score = OodScore.registry[method]._from_state(rest, method_params, norm)
        if params.get("dim") != score.dim:
            raise OodStateError(f"OOD parameters say dim {params.get('dim')}, the tensors have {score.dim}")
        if REFERENCE_KEY in tensors:
            score.reference = _checked_reference(tensors[REFERENCE_KEY])
        _restore_length_references(score, tensors, params.get("length_buckets"))
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


def _checked_reference(reference: Tensor, key: str = REFERENCE_KEY) -> Tensor:
    reference = require({key: reference}, key, (None,))
    if reference.numel() == 0 or (reference[1:] < reference[:-1]).any():
        raise OodStateError(f"OOD tensor {key!r} must be non-empty validation scores sorted ascending")
    return reference


def _calibration_key(key: str) -> bool:
    """A tensor of the validation calibration (p-values), not of the score itself."""
    return key in (REFERENCE_KEY, LENGTH_EDGES_KEY) or key.startswith(LENGTH_REFERENCE_PREFIX)


def _restore_length_references(score: OodScore, tensors: Mapping[str, Tensor], buckets: Any) -> None:
    """The length-aware p-values' edges and per-bucket references (``params["length_buckets"]`` of them), checked:
    edges increasing, one reference per bucket, together exactly the pooled reference."""
    keys = sorted(k for k in tensors if k.startswith(LENGTH_REFERENCE_PREFIX))
    if buckets is None and not keys and LENGTH_EDGES_KEY not in tensors:
        return
    if not isinstance(buckets, int) or buckets < 2 or score.reference is None:
        raise OodStateError(f"OOD length_buckets must be an int ≥ 2 beside a reference, got {buckets!r}")
    edges = require(tensors, LENGTH_EDGES_KEY, (buckets - 1,))
    if (edges[1:] <= edges[:-1]).any():
        raise OodStateError(f"OOD tensor {LENGTH_EDGES_KEY!r} must be increasing")
    names = [f"{LENGTH_REFERENCE_PREFIX}{b}" for b in range(buckets)]
    if keys != sorted(names):
        raise OodStateError(f"OOD length references must be {names}, found {keys}")
    references = [_checked_reference(tensors[name], name) for name in names]
    if not torch.equal(torch.cat(references).sort().values, score.reference.to(references[0])):
        raise OodStateError("OOD length references must partition the validation reference")
    score.length_edges, score.length_references = edges, references

"""``bundle.json``: the typed manifest of a bundle (schema version 3; versions 1, without an OOD score, and 2, without
conformal calibration, still read).

The manifest says what the tensors are, what they were trained on and how to use them; the tensor files
hold the numbers. See docs/design.md §2 for the directory layout.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapters.defaults import DEFAULT_CLOZE_NORMALISATION
from adapters.eval_card import EvalCard
from adapters.predictive import ABSTENTION_SCORES, AbstentionRule
from adapters.tasks import ChoiceFormat
from adapters.vocab import (
    AbstentionKind,
    ChoiceScoring,
    ClozeNormalisation,
    ConformalScore,
    OodMethod,
    Pooling,
    PosteriorFamily,
    PredictiveMode,
    TaskType,
)


def _caveat_version() -> str:
    try:
        return version("caveat")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


CAVEAT_VERSION = _caveat_version()
SCHEMA_VERSION = 4
# what this library reads: 2 added the optional OOD score (``ood``, ood.safetensors), 3 the optional conformal
# calibration (``conformal``, conformal.safetensors), 4 the head's pooler (task.pooling "pooler") and the record of
# an imported adapter (``imported``)
SCHEMA_VERSIONS = (1, 2, 3, 4)
PROJECTIONS_FILE = "projections.safetensors"
ADAPTER_FILE = "adapter.safetensors"
POSTERIOR_FILE = "posterior.safetensors"
OOD_FILE = "ood.safetensors"
CONFORMAL_FILE = "conformal.safetensors"
MANIFEST_FILE = "bundle.json"
TENSOR_FILES = (PROJECTIONS_FILE, ADAPTER_FILE, POSTERIOR_FILE)


class _Strict(BaseModel):
    # NaN and infinity are JSON extensions Python accepts; no number of a manifest may be one
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TaskSpec(_Strict):
    """What the classifier predicts and how its inputs are presented."""

    type: TaskType = TaskType.SEQUENCE_CLASSIFICATION
    labels: list[str] = Field(min_length=2)
    pooling: Pooling = Pooling.MEAN
    text_pair: bool = False
    max_length: int = Field(default=128, gt=0)
    prompt_template: str | None = None
    choice_scoring: ChoiceScoring | None = Field(
        default=None, description="multiple choice: cloze or letter (a bundle without it: letter, the first format)"
    )
    cloze_normalisation: ClozeNormalisation | None = None

    @property
    def choice_format(self) -> ChoiceFormat | None:
        """How this multiple-choice adapter's items are put to the LM; ``None`` for classification."""
        if self.type != TaskType.MULTIPLE_CHOICE:
            return None
        scoring = self.choice_scoring or ChoiceScoring.LETTER
        return ChoiceFormat(scoring, self.prompt_template, self.cloze_normalisation or DEFAULT_CLOZE_NORMALISATION)


class BaseModelSpec(_Strict):
    """The frozen base model the adapter belongs to."""

    name_or_path: str
    revision: None = Field(default=None, exclude=True, description="unused; accepted so older bundles load")
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    dtype: str = "float32"
    architecture: str | None = None
    hidden_size: int = Field(gt=0)


class ProjectionSpecRecord(_Strict):
    """How ``A`` and ``B`` were built; ``data`` records what data fed W-SVD (dataset, tokens); ``trained``:
    they were then trained with the cores (L-LoRA-S), so they belong to this bundle alone."""

    spec: str = "svd"
    seed: int = 0
    data: dict[str, Any] | None = None
    trained: bool = False


class AdapterSpec(_Strict):
    rank: int = Field(gt=0)
    alpha: float = Field(gt=0)
    target_modules: list[str] = Field(min_length=1)
    modules: list[str] = Field(min_length=1, description="module names the patterns selected, in model order")
    projection: ProjectionSpecRecord = ProjectionSpecRecord()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class HeadSpec(_Strict):
    trained: bool = Field(default=True, description="trained with the adapter; false for a frozen LM head")
    in_features: int = Field(gt=0)
    num_labels: int = Field(ge=2)
    pooler_module: str | None = Field(
        default=None,
        description="task.pooling 'pooler': the base's own pooler layer the head reads through (its weights are the "
        "base's, covered by the fingerprint); null: the pooler's weights travel in the bundle",
    )


PositiveFloat = Annotated[float, Field(gt=0)]


class PosteriorSpec(_Strict):
    family: PosteriorFamily
    params: dict[str, Any] = Field(default_factory=dict)
    prior_precision: PositiveFloat | list[PositiveFloat] | None = None
    default_num_samples: int = Field(default=16, gt=0)
    covers_head: bool = False
    predictive: PredictiveMode = Field(
        default=PredictiveMode.SAMPLE,
        description="how the bundle's predictive was evaluated and calibrated (the default)",
    )


def _bundle_range(kind: AbstentionKind) -> tuple[float, float]:
    """A score's range, widened just enough for the trainer's "abstain on everything" (a threshold just above
    the top for a rule that fires below it, -1 for one that fires above it); the ``ood`` rule is not fitted that
    way. Finite always (a NaN disables the rule)."""
    score = ABSTENTION_SCORES[kind]
    if not score.fitted:
        return score.low, score.high
    return (score.low, math.nextafter(score.high, math.inf)) if score.below else (-1.0, score.high)


THRESHOLD_RANGES = {kind: _bundle_range(kind) for kind in AbstentionKind}


class AbstentionSpec(_Strict):
    kind: AbstentionKind
    threshold: float
    target: dict[str, float] | None = Field(default=None, description="e.g. {'risk': 0.05} it was fitted for")

    @model_validator(mode="after")
    def _threshold_in_range(self) -> AbstentionSpec:
        low, high = THRESHOLD_RANGES[self.kind]
        if not low <= self.threshold <= high:
            raise ValueError(f"a {self.kind} threshold must be in [{low}, {high}], got {self.threshold}")
        return self

    def rule(self) -> AbstentionRule:
        return AbstentionRule(self.kind, self.threshold)


class OodSpec(_Strict):
    """The feature-space OOD score (tensors in ood.safetensors): which features, and the score's parameters.

    Features: the frozen base's hidden states after ``layers`` (1-based), each pooled as ``pooling`` says and
    L2-normalised, concatenated (``adapters.ood.features``); ``params`` are the score's own (method, norm,
    dim, rank, ...: ``OodScore.state``).
    """

    method: OodMethod
    layers: list[Annotated[int, Field(gt=0)]] = Field(min_length=1)
    pooling: Pooling = Pooling.MEAN
    budget_bytes: int = Field(gt=0)
    fraction: float = Field(gt=0, lt=1, description="of validation inputs the fitted ``ood`` rule abstains on")
    train_size: int = Field(gt=0, description="training inputs the score was fitted on")
    params: dict[str, Any] = Field(default_factory=dict)


class FarConformalSpec(_Strict):
    """The conformal calibration of far-out inputs (``caveat-train recalibrate --by-ood``): its examples'
    scores are conformal.safetensors' "far_scores" and "far_labels", under the same score function and level."""

    size: int = Field(gt=0, description="calibration examples (labelled far-out answers)")
    thresholds: list[float | None] = Field(description="per label, the threshold at the bundle's alpha")


class ConformalSpec(_Strict):
    """Split-conformal prediction sets (``adapters.conformal``): the calibration examples' scores are in
    conformal.safetensors; a request may ask for another level."""

    score: ConformalScore
    alpha: float = Field(gt=0, lt=1, description="the bundle's miscoverage: sets hold the label w.p. ≥ 1 − alpha")
    class_conditional: bool = False
    size: int = Field(gt=0, description="calibration examples (the validation split)")
    thresholds: list[float | None] = Field(
        description="per label, the threshold at alpha (null: infinite, too few examples: every label)"
    )
    far: FarConformalSpec | None = Field(
        default=None,
        description="a calibration of its own for the inputs far out by the OOD score (those served at "
        "calibration.far_temperature), refitted on their production labels; null: one calibration for all inputs",
    )


class ImportSpec(_Strict):
    """Where an imported adapter came from, and how exactly its conversion reproduces the original."""

    format: Literal["peft-lora"] = "peft-lora"
    source: str = Field(description="the directory it was read from")
    config: dict[str, Any] = Field(description="the original's own settings (r, lora_alpha, target_modules, ...)")
    max_abs_logit_diff: float = Field(
        ge=0, description="largest |converted − original| logit on the checked validation inputs"
    )
    checked_inputs: int = Field(gt=0, description="validation inputs the logits were compared on")


class FarTemperature(_Strict):
    """A temperature for the inputs the OOD score places far out: refitted on production labels of such inputs
    (``caveat-train recalibrate --by-ood``), while the others keep the validation-calibrated one."""

    pvalue_below: float = Field(gt=0, le=1, description="inputs whose served OOD p-value is below this")
    temperature: float = Field(gt=0, description="are served at this temperature instead")


class CalibrationSpec(_Strict):
    temperature: float = Field(default=1.0, gt=0)
    far_temperature: FarTemperature | None = Field(
        default=None, description="another temperature for inputs far out by the OOD score (bundles with one)"
    )
    abstention: list[AbstentionSpec] = Field(default_factory=list)
    choice: str | None = Field(
        default=None,
        description="the predictive the trainer's validation rule chose to serve (map, map+temperature, posterior, "
        "posterior+temperature); None when the calibration was fixed",
    )
    candidates: dict[str, dict[str, float]] | None = Field(
        default=None, description="every candidate's validation figures (nll, ece, accuracy, temperature, gain, ...)"
    )


def fingerprinted_modules(modules: list[str], pooler_module: str | None) -> list[str]:
    """The base's layers a bundle's fingerprint covers: the adapted ones, and the pooler its head reads through."""
    return [*modules, *([pooler_module] if pooler_module else [])]


class BundleManifest(_Strict):
    schema_version: Literal[1, 2, 3, 4] = SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    version: str = Field(min_length=1, max_length=64)
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    caveat_version: str = CAVEAT_VERSION
    task: TaskSpec
    base_model: BaseModelSpec
    adapter: AdapterSpec
    head: HeadSpec
    posterior: PosteriorSpec
    calibration: CalibrationSpec = CalibrationSpec()
    ood: OodSpec | None = Field(default=None, description="the OOD score (schema 2); null: the bundle has none")
    conformal: ConformalSpec | None = Field(
        default=None, description="conformal prediction sets (schema 3); null: the bundle has none"
    )
    imported: ImportSpec | None = Field(
        default=None, description="schema 4: the adapter was imported (e.g. a PEFT LoRA), not trained by Caveat"
    )
    eval: EvalCard = Field(default_factory=EvalCard)
    files: dict[str, str] = Field(default_factory=dict, description="tensor file name → sha256")

    @property
    def fingerprinted_modules(self) -> list[str]:
        """The base's layers the fingerprint covers (:func:`fingerprinted_modules`)."""
        return fingerprinted_modules(self.adapter.modules, self.head.pooler_module)

    @field_validator("files")
    @classmethod
    def _plain_names(cls, files: dict[str, str]) -> dict[str, str]:
        for name in files:
            if "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(f"file name {name!r} must be a plain name inside the bundle")
        return files

    @model_validator(mode="after")
    def _ood_needs_schema_2(self) -> BundleManifest:
        if self.ood is not None and self.schema_version < 2:
            raise ValueError("an OOD score (ood) needs schema version 2")
        if self.conformal is not None and self.schema_version < 3:
            raise ValueError("conformal calibration (conformal) needs schema version 3")
        if self.head.pooler_module is not None and self.task.pooling != Pooling.POOLER:
            raise ValueError("head.pooler_module needs task.pooling 'pooler'")
        if (self.task.pooling == Pooling.POOLER or self.imported is not None) and self.schema_version < 4:
            raise ValueError("a head pooler (task.pooling 'pooler') or an import record (imported) needs schema 4")
        if self.conformal is not None and len(self.conformal.thresholds) != len(self.task.labels):
            raise ValueError("conformal.thresholds needs one threshold per label")
        if self.conformal is not None and self.conformal.far is not None:
            if self.calibration.far_temperature is None:
                raise ValueError("conformal.far needs calibration.far_temperature (which inputs are far out)")
            if len(self.conformal.far.thresholds) != len(self.task.labels):
                raise ValueError("conformal.far.thresholds needs one threshold per label")
        return self


__all__ = [
    "ADAPTER_FILE",
    "CAVEAT_VERSION",
    "CONFORMAL_FILE",
    "MANIFEST_FILE",
    "OOD_FILE",
    "POSTERIOR_FILE",
    "PROJECTIONS_FILE",
    "SCHEMA_VERSION",
    "SCHEMA_VERSIONS",
    "TENSOR_FILES",
    "AbstentionSpec",
    "AdapterSpec",
    "BaseModelSpec",
    "BundleManifest",
    "CalibrationSpec",
    "ConformalSpec",
    "FarConformalSpec",
    "HeadSpec",
    "ImportSpec",
    "OodSpec",
    "PosteriorSpec",
    "ProjectionSpecRecord",
    "TaskSpec",
    "fingerprinted_modules",
]

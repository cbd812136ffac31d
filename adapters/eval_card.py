"""The evaluation card of a bundle (``eval`` in ``bundle.json``): what the bundle was evaluated on and how it
scored, typed end to end from training to the server's adapter detail.

Every field is optional and unknown fields are kept, so bundles written by earlier versions (or by tools
that record less, such as the benchmarks' synthetic bundles) load unchanged.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

Metrics = dict[str, float]  # metric name → value (training.metrics defines them)


class _Card(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_serializer(mode="wrap")
    def _without_empty_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Absent parts stay absent in ``bundle.json`` (no ``"shift": null``), as readers of the JSON expect."""
        return {key: value for key, value in handler(self).items() if value is not None}


class SplitEval(_Card):
    """MAP and posterior-predictive metrics on one labelled split."""

    size: int = Field(ge=0)
    map: Metrics
    posterior: Metrics
    dataset: str | None = Field(default=None, description="the shift set's name (test: the task's)")
    conformal: Metrics | None = Field(
        default=None,
        description="the served predictive's conformal sets: coverage against its target (a guarantee only for "
        "inputs exchangeable with validation), mean set size, singleton and empty shares",
    )


class OodEval(_Card):
    """AUROC (OOD positive) and FPR at 95% TPR per score, MAP and posterior, against the test split."""

    dataset: str
    size: int = Field(ge=0)
    map: Metrics
    posterior: Metrics


class DataCard(_Card):
    """Which data the bundle saw: sizes and sha256 of every split, and where the sets came from."""

    task: str
    provenance: dict[str, Any] = Field(default_factory=dict)
    sizes: dict[str, int] = Field(default_factory=dict)
    sha256: dict[str, str] = Field(default_factory=dict)
    shift: dict[str, Any] | None = None
    ood: dict[str, Any] | None = None


class TrainingRecord(_Card):
    """How the bundle was trained: the MAP's epochs, the posterior fit's record and stage times."""

    map: dict[str, Any] | None = None
    posterior: dict[str, Any] = Field(default_factory=dict)
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    summary: str = ""


class EvalCard(_Card):
    """The predictive evaluated (method, draws, temperature) and its metrics on test, shift and OOD."""

    method: str | None = None
    num_samples: int | None = None
    predictive: str | None = None
    temperature: float | None = None
    test: SplitEval | None = None
    shift: SplitEval | None = None
    ood: OodEval | None = None
    data: DataCard | None = None
    training: TrainingRecord | None = None
    warnings: list[str] | None = Field(default=None, description="what the user should know, e.g. a target missed")
    recalibration: dict[str, Any] | None = Field(
        default=None,
        description="caveat-train recalibrate: the labels it refitted on and before/after on held-out ones",
    )

"""The fields of an answer, one entry each: the native response encoder, the Open Inference Protocol's outputs and
the OpenAPI document are all read from :data:`ANSWER_FIELDS`.

Adding an output is one entry here, plus computing its values: a field whose ``source`` is the predictive is read
from the :class:`~adapters.predictive.Predictive` attribute of its name; the OOD score's and the abstention's are
filled by the engine (``service.engine.answers``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field, create_model

from adapters.manifest import BundleManifest


class Kind(StrEnum):
    """A field's value per input, and how each encoding writes it."""

    NUMBER = "number"  # float; V2: FP32 [N]
    PROBS = "probs"  # a probability per label; V2: FP32 [N, C]
    LABEL = "label"  # a label's index, written as the label; V2: BYTES [N]
    FLAG = "flag"  # bool; V2: BOOL [N]
    SET = "set"  # label indices, written as labels; V2: BOOL [N, C], membership per label
    REASON = "reason"  # a text or null (not a V2 output)
    TEXT = "text"  # a text; V2: BYTES [N]


class Source(StrEnum):
    """What computes a field's values."""

    PREDICTIVE = "predictive"  # the Predictive's attribute of the field's name
    OOD = "ood"  # the bundle's feature-space OOD score (null for an adapter without one)
    CONFORMAL = "conformal"  # the bundle's conformal calibration (null for an adapter without one)
    ABSTENTION = "abstention"  # the abstention rules
    FEEDBACK = "feedback"  # the feedback store (``service.feedback``)


@dataclass(frozen=True)
class AnswerField:
    """One per-input output of a prediction.

    Attributes:
        uncertainty: nested under ``uncertainty`` in a ``/v1`` result.
        v2: its place among the Open Inference Protocol's outputs (``None``: not one of them).
    """

    name: str
    kind: Kind
    source: Source
    description: str
    uncertainty: bool = False
    v2: int | None = None

    @property
    def optional(self) -> bool:
        """Null for an adapter that does not compute it (an OOD field of a bundle without a score, a prediction
        set of one without conformal calibration)."""
        return self.source in OPTIONAL_SOURCES

    def available(self, manifest: BundleManifest) -> bool:
        """Whether an adapter with this manifest computes the field."""
        return OPTIONAL_SOURCES.get(self.source, lambda _: True)(manifest)


OPTIONAL_SOURCES: dict[Source, Callable[[BundleManifest], bool]] = {
    Source.OOD: lambda manifest: manifest.ood is not None,
    Source.CONFORMAL: lambda manifest: manifest.conformal is not None,
}


ANSWER_FIELDS: tuple[AnswerField, ...] = (
    AnswerField(
        "id", Kind.TEXT, Source.FEEDBACK, "this answer's id: send it with the true label to POST /v1/feedback",
        v2=7,
    ),
    AnswerField("label", Kind.LABEL, Source.PREDICTIVE, "the most probable label", v2=4),
    AnswerField("probs", Kind.PROBS, Source.PREDICTIVE, "aligned to the response's labels", v2=0),
    AnswerField("confidence", Kind.NUMBER, Source.PREDICTIVE, "the top probability"),
    AnswerField("entropy", Kind.NUMBER, Source.PREDICTIVE, "H[p̄] in nats (total)", uncertainty=True, v2=1),
    AnswerField("entropy_normalized", Kind.NUMBER, Source.PREDICTIVE, "H[p̄] / log C, in [0, 1]", uncertainty=True),
    AnswerField("expected_entropy", Kind.NUMBER, Source.PREDICTIVE, "E_s H[p_s] (aleatoric)", uncertainty=True),
    AnswerField(
        "mutual_information", Kind.NUMBER, Source.PREDICTIVE, "H[p̄] − E_s H[p_s] (epistemic)", uncertainty=True, v2=2
    ),
    AnswerField(
        "mc_stderr", Kind.NUMBER, Source.PREDICTIVE, "Monte-Carlo standard error of the top probability",
        uncertainty=True,
    ),
    AnswerField(
        "ood_score", Kind.NUMBER, Source.OOD, "feature-space OOD score of the input (higher = further from the "
        "training data); null for an adapter without one", uncertainty=True, v2=5,
    ),
    AnswerField(
        "ood_pvalue", Kind.NUMBER, Source.OOD, "fraction of validation inputs whose OOD score is at least as high "
        "(small = unusual)", uncertainty=True,
    ),
    AnswerField(
        "prediction_set", Kind.SET, Source.CONFORMAL, "the conformal prediction set: labels that hold the true one "
        "with probability ≥ the coverage asked for (default: the bundle's), for inputs like the validation data; "
        "null for an adapter without conformal calibration", v2=6,
    ),
    AnswerField("abstain", Kind.FLAG, Source.ABSTENTION, "whether to abstain: an abstention rule fired", v2=3),
    AnswerField("abstain_reason", Kind.REASON, Source.ABSTENTION, "the first rule that fired (null: none)"),
)  # fmt: skip

FIELDS = {field.name: field for field in ANSWER_FIELDS}
PREDICTIVE_FIELDS = tuple(f.name for f in ANSWER_FIELDS if f.source is Source.PREDICTIVE)
V2_OUTPUTS = tuple(f.name for f in sorted((f for f in ANSWER_FIELDS if f.v2 is not None), key=lambda f: f.v2))
V2_DATATYPES = {
    Kind.NUMBER: "FP32", Kind.PROBS: "FP32", Kind.LABEL: "BYTES", Kind.FLAG: "BOOL", Kind.SET: "BOOL",
    Kind.TEXT: "BYTES",
}  # fmt: skip
V2_MATRICES = (Kind.PROBS, Kind.SET)  # V2 outputs of shape [N, C]
_FIRST_NESTED = next(i for i, f in enumerate(ANSWER_FIELDS) if f.uncertainty)
# a /v1 result: the top-level fields before ``uncertainty``, the nested ones, the top-level ones after it
_PARTS = (
    ANSWER_FIELDS[:_FIRST_NESTED],
    tuple(f for f in ANSWER_FIELDS if f.uncertainty),
    tuple(f for f in ANSWER_FIELDS[_FIRST_NESTED:] if not f.uncertainty),
)
_PYTHON_TYPES: dict[Kind, Any] = {Kind.NUMBER: float, Kind.PROBS: list[float], Kind.LABEL: str, Kind.FLAG: bool,
                                  Kind.REASON: str | None, Kind.SET: list[str], Kind.TEXT: str}  # fmt: skip


# ------------------------------------------------------------------------------------------ /v1 results


def encode_results(values: dict[str, list], labels: list[str], samples: list | None = None) -> list[dict]:
    """The ``results`` of a ``/v1`` response as plain JSON values (:class:`PredictResult`), from the answer's
    host lists (field name → one value per input; an absent optional field is null)."""
    count = len(values["label"])
    columns = tuple(_column(f, values.get(f.name), labels) or [None] * count for f in ANSWER_FIELDS)
    extra = [None] * count if samples is None else samples
    return [_encode_result(columns, i, extra[i]) for i in range(count)]


def _column(field: AnswerField, column: list | None, labels: list[str]) -> list | None:
    """A field's values as a ``/v1`` result writes them: label indices as labels."""
    if column is None or field.kind not in (Kind.LABEL, Kind.SET):
        return column
    if field.kind is Kind.LABEL:
        return [labels[i] for i in column]
    return [[labels[i] for i in members] for members in column]


def _result_encoder() -> Callable[[tuple[list, ...], int, Any], dict]:
    """``(columns, i, samples) → result i``, compiled once from the table into one dict display, as
    ``dataclasses`` compiles an ``__init__``: the speed of a hand-written literal (a loop over the table per
    input and field took 4.7× as long: 55 against 12 µs for 16 inputs)."""

    def entries(fields: tuple[AnswerField, ...]) -> list[str]:
        return [f"{f.name!r}: c[{ANSWER_FIELDS.index(f)}][i]" for f in fields]

    before, nested, after = _PARTS
    items = [*entries(before), f"'uncertainty': {{{', '.join(entries(nested))}}}", *entries(after), "'samples': s"]
    return eval(f"lambda c, i, s: {{{', '.join(items)}}}")  # the table's own names and indices, nothing else


_encode_result = _result_encoder()


def _definition(field: AnswerField) -> tuple[Any, Any]:
    kind = _PYTHON_TYPES[field.kind]
    if field.optional:
        return kind | None, Field(None, description=field.description)
    return kind, Field(description=field.description)


def _result_model() -> tuple[type[BaseModel], type[BaseModel]]:
    """The OpenAPI document's ``PredictResult`` and its nested ``Uncertainty``, in the table's order."""
    uncertainty = create_model("Uncertainty", **{f.name: _definition(f) for f in ANSWER_FIELDS if f.uncertainty})
    definitions: dict[str, Any] = {}
    for field in ANSWER_FIELDS:
        if field.uncertainty:
            definitions.setdefault("uncertainty", (uncertainty, ...))
        else:
            definitions[field.name] = _definition(field)
    definitions["samples"] = (
        list[list[float]] | None,
        Field(None, description="per-sample probabilities (return_samples)"),
    )
    return create_model("PredictResult", **definitions), uncertainty


PredictResult, Uncertainty = _result_model()


# ------------------------------------------------------------------------------------------ /v2 outputs


def v2_tensor(field: AnswerField, column: list, labels: list[str]) -> dict[str, Any]:
    """An output tensor of a V2 response as plain JSON values (:class:`~service.schemas.V2Tensor`)."""
    n = len(column)
    if field.kind is Kind.PROBS:
        shape, data = [n, len(column[0])], [p for row in column for p in row]
    elif field.kind is Kind.SET:
        members = [set(row) for row in column]
        shape, data = [n, len(labels)], [i in row for row in members for i in range(len(labels))]
    else:
        shape, data = [n], [labels[i] for i in column] if field.kind is Kind.LABEL else column
    return {"name": field.name, "shape": shape, "datatype": V2_DATATYPES[field.kind], "data": data}

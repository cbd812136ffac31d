"""Request and response bodies of the native API (``/v1``) and of the Open Inference Protocol (``/v2``)."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)

from adapters.predictive import ABSTENTION_SCORES
from adapters.predictives import PREDICTORS
from service.fields import V2_OUTPUTS, PredictResult

SEED_LIMIT = 2**63  # torch generators take seeds below 2^63


# a text needs one character outside JSON Schema's (ECMAScript's) whitespace: the same rule in both places
NOT_BLANK = "[^\\t\\n\\v\\f\\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"


def check_text(value: str) -> str:
    """A text worth classifying: not empty or whitespace only."""
    if re.search(NOT_BLANK, value) is None:
        raise ValueError("a text must not be empty or whitespace only")
    return value


def reject_surrogates(value: Any) -> Any:
    """Refuse lone UTF-16 surrogates (JSON's "\\ud800") anywhere in a request: they are not Unicode text, and
    no tokenizer or JSON encoder takes them."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("strings must be valid Unicode (this one holds a lone surrogate)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            reject_surrogates(key)
            reject_surrogates(item)
    elif isinstance(value, list):
        for item in value:
            reject_surrogates(item)
    return value


def integral(value: Any) -> Any:
    """JSON Schema counts 7.0 as an integer; strings such as "7" stay refused (strict types on the wire)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Text = Annotated[
    str, AfterValidator(check_text), WithJsonSchema({"type": "string", "minLength": 1, "pattern": NOT_BLANK})
]


class _Request(BaseModel):
    """A request body: unknown fields refused, strict types on the wire ("7" is not a number), finite numbers,
    valid Unicode."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        return reject_surrogates(data)


# ---------------------------------------------------------------------------------------------- predict


class TextPair(_Request):
    text: Text
    text_pair: Text | None = None


class MultipleChoice(_Request):
    """A question for a multiple-choice adapter: the answer letters A, B, ... follow the choices' order."""

    question: Text
    choices: list[Text] = Field(min_length=2, max_length=5)


AbstainOverride = create_model(
    "AbstainOverride",
    __base__=_Request,
    __doc__="Thresholds that replace the bundle's abstention rules for this request (only those given apply; ``{}`` "
    "disables abstention).",
    **{
        str(kind): (float | None, Field(None, ge=score.low, le=score.high if math.isfinite(score.high) else None,
                                        description=score.description))
        for kind, score in ABSTENTION_SCORES.items()
    },  # one field per abstention kind (adapters.predictive), its range and meaning
)  # fmt: skip


class PredictRequest(_Request):
    adapter: str = Field(min_length=1, description="adapter name, or name@version to insist on a version")
    inputs: list[Text | TextPair | MultipleChoice] = Field(
        min_length=1,
        description="texts, {text, text_pair} objects, or {question, choices} for multiple-choice adapters (their "
        "probs are over the letters A–E, 0 for letters beyond an item's choices)",
    )
    num_samples: int | None = Field(
        None, ge=1, description="network samples (sample) or logit draws (glm); default: the bundle's"
    )
    method: Literal[tuple(PREDICTORS)] | None = Field(  # type: ignore[valid-type]
        None,
        description="; ".join(f"{mode}: {p.description}" for mode, p in PREDICTORS.items())
        + ". Default: the predictive the bundle was calibrated with",
    )
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT, description="same seed, same samples (default: random)")
    return_samples: bool = Field(False, description="include each sample's probabilities")
    abstain: AbstainOverride | None = None
    coverage: float | None = Field(
        None, gt=0, lt=1,
        description="the prediction sets' coverage level 1 − α (default: the bundle's, e.g. 0.9); it also sets the "
        "ambiguous abstention rule's sets",
    )  # fmt: skip

    _integral = field_validator("num_samples", "seed", mode="before")(integral)


class FeedbackItem(_Request):
    id: str = Field(min_length=1, max_length=128, description="an answer's id (its result's ``id``)")
    label: str = Field(min_length=1, description="the true label, one of the adapter's labels")


class FeedbackRequest(_Request):
    feedback: list[FeedbackItem] = Field(
        min_length=1, description="labels for served answers (at most the server's max_feedback per request)"
    )


class FeedbackResponse(BaseModel):
    accepted: int = Field(description="labels joined to their answers, logged and counted")


class AdapterRef(BaseModel):
    name: str
    version: str
    sha256: str


class Timing(BaseModel):
    queue_ms: float
    compute_ms: float
    total_ms: float
    batch_requests: int = Field(description="requests that shared the batched forward")
    batch_rows: int = Field(description="rows (inputs × samples) of that forward")


class PredictResponse(BaseModel):
    request_id: str
    adapter: AdapterRef
    labels: list[str]
    method: str
    num_samples: int
    seed: int
    results: list[PredictResult]
    timing: Timing


# --------------------------------------------------------------------------------------------- adapters


class LoadAdapterRequest(_Request):
    path: str = Field(description="bundle directory, relative to the adapter directory (or inside it)")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="default: bundle's")
    pin: bool = Field(False, description="never evict under the memory budget")


class RepositoryIndexRequest(_Request):
    ready: bool = Field(False, description="only the models ready on this server")


class RepositoryIndexEntry(BaseModel):
    name: str
    version: str
    state: Literal["READY", "UNAVAILABLE"]
    reason: str = ""


class ReplaceAdapterRequest(_Request):
    path: str | None = Field(
        None, description="a new bundle directory, published to the store as the adapter's new current version"
    )
    version: str | None = Field(None, description="a version already in the store, made current")

    @model_validator(mode="after")
    def _one_source(self) -> ReplaceAdapterRequest:
        if self.path is not None and self.version is not None:
            raise ValueError("give path or version, not both")
        return self


class AdapterSummary(BaseModel):
    name: str
    version: str
    sha256: str
    state: str
    pinned: bool
    labels: list[str]
    posterior: str
    default_num_samples: int
    path: str
    own_bytes: int = Field(
        description="device bytes of this adapter's own tensors when resident (cores, head, posterior, OOD "
        "score); projections are shared and counted once in the list's memory_bytes"
    )


class AdapterDetail(AdapterSummary):
    manifest: dict[str, Any]


class AdapterChange(BaseModel):
    adapter: AdapterSummary
    previous_version: str | None = None


class AdapterList(BaseModel):
    adapters: list[AdapterSummary]
    memory_bytes: int
    memory_budget_bytes: int


# --------------------------------------------------------------------------------------------- service


class Health(BaseModel):
    status: str
    reason: str | None = None


class Info(BaseModel):
    caveat_version: str
    base_model: str
    device: str
    dtype: str
    pooling: str
    adapters: int
    batching: bool
    max_batch_rows: int
    max_wait_ms: float
    queue_size: int
    step_tokens: int | None = Field(None, description="rows × tokens per engine step (null while loading)")
    split_padding: int | None = Field(
        None,
        description="rows × tokens of padding a forward takes to join inputs of different lengths, beyond which "
        "they run in separate forwards (measured at warm-up; null: not measured, inputs join up to the token budget)",
    )
    startup_problems: list[str]
    workers: int = Field(
        1, description="server processes sharing this address: --workers, or under Ray the worker replicas at start"
    )
    worker_pid: int = Field(description="the process that answered (one of the workers)")


# ------------------------------------------------------------------------------- Open Inference Protocol


class V2Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any]


class V2InputTensor(_Request):
    """An input Caveat takes: BYTES ``text`` (and ``text_pair``), shape ``[N]`` or ``[N, 1]``."""

    model_config = ConfigDict(extra="allow")  # the protocol lets clients add fields

    name: Literal["text", "text_pair"]
    shape: list[int]
    datatype: Literal["BYTES"]
    parameters: dict[str, Any] | None = None
    data: list[Text | list[Text]] = Field(
        min_length=1, description="row-major (with the binary tensor data extension, the raw bytes fill it)"
    )


class V2RequestedOutput(_Request):
    model_config = ConfigDict(extra="allow")

    name: Literal[V2_OUTPUTS]  # type: ignore[valid-type]
    parameters: dict[str, Any] | None = None


class V2InferRequest(_Request):
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="num_samples, seed (integers), method (string)")
    inputs: list[V2InputTensor] = Field(min_length=1)
    outputs: list[V2RequestedOutput] | None = Field(None, description="default: all of them")


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[V2Tensor]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]

"""One prediction, from a validated request to the response: limits, the job, the answer's fields.

Shared by the native route and the Open Inference Protocol route, which differ only in their bodies.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass

from adapters.cloze import ClozeInputError
from adapters.feedback import LOGGED_DRAWS
from adapters.predictive import AbstentionRule
from adapters.predictives import PREDICTORS
from service.engine import Engine, Job, JobResult
from service.errors import ClientGoneError, InvalidRequestError, PayloadTooLargeError, PredictionTimeoutError
from service.feedback import ServedAnswer, answer_ids
from service.fields import encode_results
from service.host import TextInput
from service.registry import AdapterVersion
from service.schemas import AbstainOverride, MultipleChoice, TextPair
from service.settings import Settings
from service.state import ServiceState

INLINE_COUNT_CHARS = 4096  # inputs this short are counted on the event loop (microseconds); longer in a thread
Input = str | TextPair | MultipleChoice


@dataclass
class Answer:
    adapter: AdapterVersion
    method: str
    num_samples: int
    seed: int
    result: JobResult
    total_seconds: float


async def run_prediction(
    state: ServiceState,
    adapter_ref: str,
    inputs: list[Input],
    *,
    num_samples: int | None = None,
    method: str | None = None,
    seed: int | None = None,
    abstain: AbstainOverride | None = None,
    coverage: float | None = None,
    disconnected: asyncio.Event | None = None,
) -> Answer:
    """Check limits, pin the adapter version, run the job through the engine (with the request timeout; a
    client that ``disconnected`` abandons its job). ``coverage``: the prediction sets' level (default: the
    bundle's)."""
    start = time.perf_counter()
    registry, engine = state.require_ready()
    settings = state.settings
    if method is not None and method not in PREDICTORS:
        raise InvalidRequestError(f"method must be one of {[str(m) for m in PREDICTORS]}, not {method!r}")
    if num_samples is not None and num_samples < 1:
        raise InvalidRequestError("num_samples must be at least 1")
    _check_inputs(inputs, settings)
    adapter = await registry.acquire(adapter_ref)
    texts = [_text_input(index, item, adapter) for index, item in enumerate(inputs)]
    if coverage is not None and adapter.bundle.conformal is None:
        raise InvalidRequestError(
            f"coverage: adapter {adapter.name!r} has no conformal calibration (a bundle written before schema 3)"
        )
    predictor = adapter.predictor(method)
    if predictor.fixed_draws is not None:
        num_samples = predictor.fixed_draws
    elif num_samples is None:
        num_samples = adapter.default_num_samples(predictor)
    limit = settings.max_glm_samples if predictor.logit_space else settings.max_samples
    if num_samples > limit:
        raise PayloadTooLargeError(
            f"num_samples {num_samples} exceeds this server's limit of {limit} for {predictor.mode}"
        )
    seed = secrets.randbits(63) if seed is None else seed
    deadline = time.perf_counter() + settings.request_timeout_s
    count = registry.host.token_counts
    chars = sum(len(item.text) + len(item.text_pair or "") + sum(map(len, item.choices or ())) for item in texts)
    try:
        lengths = count(texts) if chars <= INLINE_COUNT_CHARS else await asyncio.to_thread(count, texts)
    except ClozeInputError as exc:  # choices that leave no room for the question
        raise InvalidRequestError(str(exc)) from None
    job = Job(
        adapter, texts, num_samples, predictor.mode, seed, _rules(adapter, abstain), max(lengths), deadline=deadline,
        coverage=coverage, lengths=tuple(lengths),
    )  # fmt: skip
    if job.cost > settings.max_request_tokens:
        raise PayloadTooLargeError(
            f"this request's cost is {job.cost} rows × tokens ({job.rows} rows of up to {job.tokens} "
            f"tokens); this server's limit is {settings.max_request_tokens}: send fewer inputs or samples, or shorter "
            "texts"
        )
    result = await _answer(engine, job, settings.request_timeout_s, disconnected)
    result.values["id"] = ids = answer_ids(len(inputs))
    if state.feedback.enabled:
        state.feedback.remember(ids, _served(job, inputs, result))
    return Answer(adapter, predictor.mode, num_samples, seed, result, time.perf_counter() - start)


def _served(job: Job, inputs: list[Input], result: JobResult) -> list[ServedAnswer]:
    """What the feedback store keeps of each answer (its input as sent, for recalibration)."""
    adapter, values, now = job.adapter, result.values, time.time()
    sets = values.get("prediction_set") or [None] * len(inputs)
    coverage = job.conformal_coverage
    draws = result.pred.sample_probs
    per_input = draws[:LOGGED_DRAWS].transpose(0, 1).tolist() if draws.shape[0] > 1 else [None] * len(inputs)
    pvalues = result.ood_pvalue or [None] * len(inputs)
    served = []
    for i, item in enumerate(inputs):
        answer = ServedAnswer(
            adapter=adapter.name, version=adapter.version, sha256=adapter.sha256, labels=adapter.labels,
            input=item if isinstance(item, str) else item.model_dump(exclude_none=True),
            probs=values["probs"][i], predicted=values["label"][i], prediction_set=sets[i],
            coverage=None if sets[i] is None else coverage, abstained=values["abstain"][i], method=job.method,
            served_at=now, num_choices=job.inputs[i].num_choices, sample_probs=per_input[i], ood_pvalue=pvalues[i],
        )  # fmt: skip
        served.append(answer)
    return served


async def _answer(engine: Engine, job: Job, timeout_s: float, disconnected: asyncio.Event | None) -> JobResult:
    """The job's result; 504 at its deadline (``timeout_s`` after admission), 499 when the client goes away
    first. Then the job's future is cancelled, so the engine drops it before its next step. One wait per request
    (no polling: a waiting request costs the event loop nothing)."""
    waiting = asyncio.ensure_future(engine.submit(job))
    gone = asyncio.ensure_future(disconnected.wait()) if disconnected is not None else None
    try:
        await asyncio.wait(
            {waiting} if gone is None else {waiting, gone},
            timeout=max(job.deadline - time.perf_counter(), 0),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if waiting.done():
            return waiting.result()
        if gone is not None and gone.done():
            raise ClientGoneError("the client closed the connection before the answer")
        raise PredictionTimeoutError(f"no answer within {timeout_s:g} s")
    finally:
        if gone is not None:
            gone.cancel()
        if not waiting.done():
            job.future.cancel()


def _check_inputs(inputs: list[Input], settings: Settings) -> None:
    if len(inputs) > settings.max_inputs:
        raise PayloadTooLargeError(f"{len(inputs)} inputs; this server takes at most {settings.max_inputs} per request")
    for index, item in enumerate(inputs):
        if isinstance(item, MultipleChoice):
            texts = [item.question, *item.choices]
        else:
            texts = [item] if isinstance(item, str) else [item.text, item.text_pair or ""]
        if any(len(t) > settings.max_text_chars for t in texts):
            raise PayloadTooLargeError(
                f"input {index} is longer than this server's limit of {settings.max_text_chars} characters"
            )


def _text_input(index: int, item: Input, adapter: AdapterVersion) -> TextInput:
    task = adapter.manifest.task
    choice_format = task.choice_format
    if choice_format is not None:
        if not isinstance(item, MultipleChoice):
            raise InvalidRequestError(
                f"inputs[{index}]: adapter {adapter.name!r} answers multiple choice: send {{question, choices}}"
            )
        if len(item.choices) > len(task.labels):
            raise InvalidRequestError(
                f"inputs[{index}].choices: {len(item.choices)} choices; adapter {adapter.name!r} takes at most "
                f"{len(task.labels)}"
            )
        prompt = choice_format.prompt(item.question, item.choices)
        if not choice_format.cloze:
            return TextInput(prompt, None, adapter.max_length, num_choices=len(item.choices))
        return TextInput(
            prompt, None, adapter.max_length, len(item.choices), tuple(item.choices), choice_format.normalisation,
            len(task.labels),
        )  # fmt: skip
    if isinstance(item, MultipleChoice):
        raise InvalidRequestError(
            f"inputs[{index}]: adapter {adapter.name!r} classifies texts; {{question, choices}} is for multiple choice"
        )
    text, pair = (item, None) if isinstance(item, str) else (item.text, item.text_pair)
    if pair is not None and not adapter.manifest.task.text_pair:
        raise InvalidRequestError(f"adapter {adapter.name!r} takes single texts, not text pairs")
    if pair is None and adapter.manifest.task.text_pair:
        raise InvalidRequestError(f"adapter {adapter.name!r} takes text pairs: send {{text, text_pair}}")
    return TextInput(text, pair, adapter.max_length)


def _rules(adapter: AdapterVersion, override: AbstainOverride | None) -> list[AbstentionRule]:
    if override is None:
        return adapter.abstention_rules()
    return [AbstentionRule(kind, value) for kind, value in override.model_dump().items() if value is not None]


def response_body(answer: Answer, request_id: str, return_samples: bool = False) -> dict:
    """The body of a ``/v1/predict`` response (:class:`~service.schemas.PredictResponse`) as plain JSON values."""
    adapter, result = answer.adapter, answer.result
    return {
        "request_id": request_id,
        "adapter": {"name": adapter.name, "version": adapter.version, "sha256": adapter.sha256},
        "labels": adapter.labels,
        "method": answer.method,
        "num_samples": answer.num_samples,
        "seed": answer.seed,
        "results": results_of(answer, return_samples),
        "timing": {
            "queue_ms": result.queue_seconds * 1000,
            "compute_ms": result.compute_seconds * 1000,
            "total_ms": answer.total_seconds * 1000,
            "batch_requests": result.batch_requests,
            "batch_rows": result.batch_rows,
        },
    }


def results_of(answer: Answer, return_samples: bool = False) -> list[dict]:
    """The ``results`` of a response (:class:`~service.fields.PredictResult` as plain JSON values), from the
    answer's host lists: no tensor is touched and nothing is validated again."""
    result = answer.result
    samples = result.pred.sample_probs.transpose(0, 1).tolist() if return_samples else None
    return encode_results(result.values, answer.adapter.labels, samples)

"""Open Inference Protocol (KServe V2) routes, so that standard V2 clients can call Caveat adapters.

An adapter is a V2 *model*. ``infer`` takes a BYTES input ``text`` (shape ``[N]`` or ``[N, 1]``), an
optional BYTES ``text_pair``, and the parameters ``num_samples``, ``seed``, ``method`` and ``coverage`` (the
prediction sets' level); it returns ``probs`` (FP32 ``[N, C]``), ``entropy``, ``mutual_information``, for a
bundle with an OOD score ``ood_score`` (FP32 ``[N]``), ``abstain`` (BOOL ``[N]``), ``label`` (BYTES ``[N]``)
and, for a bundle with conformal calibration, ``prediction_set`` (BOOL ``[N, C]``: label ``c`` in input ``n``'s
set). Errors follow the protocol's ``{"error": "<message>"}``.

The body is JSON, with or without a ``Content-Type`` header, or uses the protocol's binary tensor data
extension: an ``Inference-Header-Content-Length`` header gives the length of the JSON header, and the raw
tensor bytes follow it (a BYTES element is a 4-byte little-endian length and its bytes).
"""

from __future__ import annotations

import json
from itertools import chain
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from adapters.manifest import CAVEAT_VERSION
from service.deps import State, client_gone
from service.errors import InvalidRequestError
from service.fields import FIELDS, V2_DATATYPES, V2_MATRICES, V2_OUTPUTS, Source, v2_tensor
from service.predict import run_prediction
from service.responses import FastJSONResponse
from service.schemas import (
    SEED_LIMIT,
    TextPair,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2TensorMetadata,
    check_text,
)

router = APIRouter(prefix="/v2", tags=["open inference protocol"])


@router.get("")
async def server_metadata() -> dict[str, Any]:
    return {"name": "caveat", "version": CAVEAT_VERSION, "extensions": []}


@router.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
async def ready(state: State):
    return JSONResponse({"ready": state.ready}, status_code=200 if state.ready else 503)


@router.get("/models/{model}", response_model=V2ModelMetadata)
async def model_metadata(model: str, state: State) -> V2ModelMetadata:
    registry, _ = state.require_ready()
    entry = registry.entry(model)
    inputs = [V2TensorMetadata(name="text", datatype="BYTES", shape=[-1])]
    if entry.manifest.task.text_pair:
        inputs.append(V2TensorMetadata(name="text_pair", datatype="BYTES", shape=[-1]))
    classes = len(entry.manifest.task.labels)
    outputs = [
        V2TensorMetadata(
            name=f.name, datatype=V2_DATATYPES[f.kind], shape=[-1, classes] if f.kind in V2_MATRICES else [-1]
        )
        for f in map(FIELDS.get, V2_OUTPUTS)
        if f.available(entry.manifest)
    ]
    return V2ModelMetadata(
        name=entry.name, versions=[entry.manifest.version], platform="caveat", inputs=inputs, outputs=outputs
    )


@router.get("/models/{model}/ready")
async def model_ready(model: str, state: State):
    registry, _ = state.require_ready()
    registry.entry(model)
    return {"name": model, "ready": True}


@router.post("/models/{model}/infer", response_model=V2InferResponse, response_model_exclude_none=True)
async def infer(model: str, request: Request, state: State) -> FastJSONResponse:
    """The body's shape is :class:`V2InferResponse`, built from host lists and encoded directly."""
    request.state.adapter = model
    body = _parse(await request.body(), request.headers.get("inference-header-content-length"))
    wanted = [o.name for o in body.outputs] if body.outputs else None  # names checked by the schema
    texts = _bytes_input(body, "text", required=True)
    pairs = _bytes_input(body, "text_pair", required=False)
    if pairs is not None and len(pairs) != len(texts):
        raise InvalidRequestError(f"text_pair has {len(pairs)} elements, text has {len(texts)}")
    inputs: list[str | TextPair] = (
        list(texts) if pairs is None else [TextPair(text=t, text_pair=p) for t, p in zip(texts, pairs, strict=True)]
    )
    params = body.parameters or {}
    method = params.get("method")
    if method is not None and not isinstance(method, str):
        raise InvalidRequestError("parameter 'method' must be a string")
    answer = await run_prediction(
        state, model, inputs, num_samples=_int_param(params, "num_samples"), seed=_int_param(params, "seed"),
        method=method, coverage=_level_param(params, "coverage"), disconnected=client_gone(request),
    )  # fmt: skip
    values, labels = answer.result.values, answer.adapter.labels
    if wanted is None:
        wanted = [name for name in V2_OUTPUTS if name in values]
    missing = next((name for name in wanted if name not in values), None)
    if missing is not None:  # only an optional output can be missing
        raise InvalidRequestError(
            f"adapter {answer.adapter.name!r} has no {missing}: {MISSING[FIELDS[missing].source]}"
        )
    response = {"model_name": answer.adapter.name, "model_version": answer.adapter.version}
    if body.id is not None:
        response["id"] = body.id
    response["parameters"] = {"num_samples": answer.num_samples, "seed": answer.seed, "sha256": answer.adapter.sha256}
    response["outputs"] = [v2_tensor(FIELDS[name], values[name], labels) for name in wanted]
    return FastJSONResponse(response)


def _parse(raw: bytes, header_length: str | None) -> V2InferRequest:
    """The request from a JSON body, or from a JSON header and the binary tensor data after it."""
    try:
        if header_length is None:
            return V2InferRequest.model_validate_json(raw)
        if not header_length.isdigit() or int(header_length) > len(raw):
            raise InvalidRequestError(
                f"Inference-Header-Content-Length {header_length[:20]!r} is not a length within the body "
                f"({len(raw)} bytes)"
            )
        try:
            header = json.loads(raw[: int(header_length)])
        except ValueError as exc:
            raise InvalidRequestError(f"the JSON header is not valid JSON ({exc})") from None
        _attach_binary(header, raw[int(header_length) :])
        return V2InferRequest.model_validate(header)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def _attach_binary(header: Any, binary: bytes) -> None:
    """Put each input's binary data (``parameters.binary_data_size`` bytes, in input order) in its ``data``."""
    offset = 0
    inputs = header.get("inputs") if isinstance(header, dict) else None
    for tensor in inputs if isinstance(inputs, list) else []:
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is None:
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise InvalidRequestError("an input's binary_data_size does not fit the binary data sent")
        tensor["data"] = _bytes_elements(binary[offset : offset + size], str(tensor.get("name")))
        offset += size
    if offset != len(binary):
        raise InvalidRequestError(f"{len(binary) - offset} bytes of binary data belong to no input")


def _bytes_elements(data: bytes, name: str) -> list[str]:
    """BYTES tensor data in the binary extension: each element a 4-byte little-endian length, then its bytes."""
    elements, offset = [], 0
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + 4], "little") if offset + 4 <= len(data) else -1
        if length < 0 or offset + 4 + length > len(data):
            raise InvalidRequestError(f"input {name!r}: binary BYTES data is truncated")
        try:
            elements.append(data[offset + 4 : offset + 4 + length].decode())
        except UnicodeDecodeError:
            raise InvalidRequestError(f"input {name!r}: an element is not UTF-8 text") from None
        offset += 4 + length
    return elements


def _bytes_input(body: V2InferRequest, name: str, required: bool) -> list[str] | None:
    tensor = next((t for t in body.inputs if t.name == name), None)
    if tensor is None:
        if required:
            raise InvalidRequestError(f"the request needs a BYTES input named {name!r}")
        return None
    data = list(chain.from_iterable(d if isinstance(d, list) else [d] for d in tensor.data or []))
    if not data or not all(isinstance(d, str) for d in data):
        raise InvalidRequestError(f"input {name!r} must hold one or more strings")
    if tensor.shape not in ([len(data)], [len(data), 1]):
        raise InvalidRequestError(
            f"input {name!r} has shape {tensor.shape[:4]} but holds {len(data)} elements; send [{len(data)}] or "
            f"[{len(data)}, 1]"
        )
    for index, text in enumerate(data):
        try:
            check_text(text)
        except ValueError as exc:
            raise RequestValidationError(
                [{"loc": ("body", "inputs", name, "data", index), "msg": str(exc), "type": "value_error"}]
            ) from None
    return data


MISSING = {
    Source.OOD: "it has no OOD score (a schema-1 bundle or none fitted)",
    Source.CONFORMAL: "it has no conformal calibration (a bundle written before schema 3)",
}


def _level_param(params: dict[str, Any], name: str) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise InvalidRequestError(f"parameter {name!r} must be a number in (0, 1)")
    return float(value)


def _int_param(params: dict[str, Any], name: str) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        raise InvalidRequestError(f"parameter {name!r} must be an integer in [0, 2^63)")
    return value

"""The OpenAPI document as the server behaves: the admin security scheme, every error status each operation
can answer with its real body, and this server's limits (which come from its settings).

FastAPI documents the happy path; this adds the rest once, after the routes are known.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from starlette.routing import Match

from service.schemas import SEED_LIMIT, V2InferRequest
from service.settings import Settings

BEARER = "adminToken"
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
ERROR_TEXT = {
    400: "Bad request: the body is well-formed but cannot be served as asked",
    401: "Missing or wrong admin token (feedback: the feedback token when one is set)",
    403: "The admin API is disabled (no admin token configured)",
    404: "No such adapter (or version) here or in the bundle store; feedback: no answer has that id",
    409: "Conflicts with the adapters loaded (name taken, memory budget, bundle changed on disk); feedback: the "
    "answer already has a label, or an id appears twice",
    410: "Feedback: the answer is no longer held (dropped from the store, or past its time)",
    413: "Over one of this server's limits (body bytes, inputs, characters, samples, estimated cost)",
    422: "The body does not validate (or a bundle is refused, or a label is not the adapter's)",
    429: "The queue is full (by requests or estimated cost); retry after Retry-After seconds",
    500: "The adapter produced non-finite probabilities, or an unexpected error; see the server log",
    503: "Not ready (starting, failed start, or shutting down); the adapter is being loaded from the bundle store or "
    "the store cannot be reached (retry after Retry-After seconds); feedback: the log cannot be written",
    504: "No answer within the request timeout; the work was stopped",
}
BODY = (413, 422)
PREDICT = (400, 404, *BODY, 429, 500, 503, 504)
ADMIN = (400, 401, 403, 404, 409, *BODY, 503)
STATUSES: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/v1/predict"): PREDICT,
    ("post", "/v1/feedback"): (401, 403, 404, 409, 410, *BODY, 503),
    ("get", "/v1/adapters"): (503,),
    ("post", "/v1/adapters"): ADMIN,
    ("get", "/v1/adapters/{name}"): (404, 503),
    ("put", "/v1/adapters/{name}"): ADMIN,
    ("delete", "/v1/adapters/{name}"): (401, 403, 404, 409, 503),
    ("get", "/v2/models/{model}"): (404, 503),
    ("get", "/v2/models/{model}/ready"): (404, 503),
    ("post", "/v2/models/{model}/infer"): PREDICT,
    ("post", "/v2/repository/index"): (*BODY, 503),
    ("post", "/v2/repository/models/{model}/load"): ADMIN,
    ("post", "/v2/repository/models/{model}/unload"): (401, 403, 404, 503),
}
ADMIN_OPERATIONS = {
    ("post", "/v1/adapters"), ("put", "/v1/adapters/{name}"), ("delete", "/v1/adapters/{name}"),
    ("post", "/v2/repository/models/{model}/load"), ("post", "/v2/repository/models/{model}/unload"),
}  # fmt: skip
TOKEN_OPERATIONS = ADMIN_OPERATIONS | {("post", "/v1/feedback")}  # a bearer token: admin's, or feedback's


def document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The app's OpenAPI document (built once)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _add_error_shapes(schema)
        _add_v2_request(schema)
        for (method, path), statuses in STATUSES.items():
            operation = schema["paths"][path][method]
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)  # FastAPI's {detail} shape: this server answers {error: {...}}
            for status in statuses:
                responses[str(status)] = _error_response(status, path.startswith("/v2/"))
            if (method, path) in TOKEN_OPERATIONS:
                operation["security"] = [{BEARER: []}]
        _state_limits(schema, settings)
        for name in ("HTTPValidationError", "ValidationError"):
            schema["components"]["schemas"].pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route takes at this path (the ``Allow`` header of OPTIONS and 405 answers)."""
    methods = {"OPTIONS"}
    for method in METHODS:  # asked route by route: included routers nest theirs
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in app.routes):
            methods.add(method)
    return sorted(methods)


def _error_response(status: int, v2: bool) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": ERROR_TEXT[status],
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{'V2Error' if v2 else 'Error'}"}}},
    }
    if status == 429:
        response["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    if status == 401:
        response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}}
    return response


def _add_error_shapes(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})[BEARER] = {
        "type": "http",
        "scheme": "bearer",
        "description": "the admin token (CAVEAT_ADMIN_TOKEN); without one configured, admin routes answer 403",
    }
    schemas = components.setdefault("schemas", {})
    schemas["ErrorDetail"] = {
        "type": "object",
        "required": ["code", "type", "message", "request_id"],
        "properties": {
            "code": {"type": "integer", "description": "the HTTP status"},
            "type": {"type": "string", "description": "the error's class, e.g. BundleRejectedError"},
            "message": {"type": "string"},
            "request_id": {"type": ["string", "null"]},
        },
    }
    schemas["Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"$ref": "#/components/schemas/ErrorDetail"}},
    }
    schemas["V2Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
        "description": "the Open Inference Protocol's error shape",
    }


def _add_v2_request(schema: dict[str, Any]) -> None:
    """``infer`` reads its body itself (JSON with or without Content-Type, or the binary tensor extension)."""
    request = V2InferRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schema["components"]["schemas"].update(request.pop("$defs", {}))
    schema["components"]["schemas"]["V2InferRequest"] = request
    operation = schema["paths"]["/v2/models/{model}/infer"]["post"]
    operation["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}}},
        "description": "JSON; with the binary tensor data extension, the JSON header's length goes in the "
        "Inference-Header-Content-Length header and raw tensor bytes follow it",
    }


def _state_limits(schema: dict[str, Any], settings: Settings) -> None:
    """Write the configured limits into the request schemas (the server answers 413 beyond them)."""
    schemas = schema["components"]["schemas"]
    request = schemas["PredictRequest"]["properties"]
    request["inputs"]["maxItems"] = settings.max_inputs
    request["inputs"]["description"] += (
        f". Limits: {settings.max_inputs} inputs, {settings.max_text_chars} characters per text, and an estimated "
        f"cost (inputs × samples × tokens) of {settings.max_request_tokens} rows × tokens (413 beyond)"
    )
    for branch in request["num_samples"]["anyOf"]:
        if branch.get("type") == "integer":
            branch["maximum"] = max(settings.max_samples, settings.max_glm_samples)
    for branch in request["seed"]["anyOf"]:  # FastAPI writes bounds as floats: 2^63 - 1 would round to 2^63
        if branch.get("type") == "integer":
            branch.pop("exclusiveMaximum", None)
            branch.update(minimum=0, maximum=SEED_LIMIT - 1)
    request["num_samples"]["description"] += (
        f" (at most {settings.max_samples} network samples, {settings.max_glm_samples} GLM logit draws; 413 beyond)"
    )
    text = {"maxLength": settings.max_text_chars}
    for item in request["inputs"]["items"]["anyOf"]:
        if item.get("type") == "string":
            item.update(text)
    schemas["TextPair"]["properties"]["text"].update(text)
    schemas["MultipleChoice"]["properties"]["question"].update(text)
    schemas["MultipleChoice"]["properties"]["choices"]["items"].update(text)
    schema["info"]["description"] += f" Request bodies are limited to {settings.max_body_bytes} bytes (413 beyond)."

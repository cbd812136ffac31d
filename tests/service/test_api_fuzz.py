"""API fuzzing with schemathesis against the real app (in process, a tiny random base, real bundles): every
operation of the OpenAPI document, admin routes with the token. Zero 5xx, and every response as the document
says (status, content type, headers, body schema). No stateful phase: nothing chains a DELETE onto the
fixture adapter, whose name random strings do not reach."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.service.bundles import TOKEN, make_bundle, running_app

ADAPTER = "fuzz-target-adapter"
CASES_PER_OPERATION = 200
cases: Counter[str] = Counter()
answered: Counter[tuple[str, int]] = Counter()


@pytest.fixture(scope="module")
def app(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    adapters = tmp_path_factory.mktemp("fuzz") / "adapters"
    make_bundle(tiny_base, adapters / ADAPTER, name=ADAPTER, max_length=16, num_samples=2)
    client = running_app(tiny_base, adapters, max_inputs=4, max_samples=4, max_glm_samples=8, max_text_chars=64)
    yield client.app
    client.__exit__(None, None, None)
    counts = dict(cases)
    print(f"\nschemathesis cases per operation: {counts}")


FUZZ = settings(
    max_examples=CASES_PER_OPERATION,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)


def test_every_operation_answers_as_documented_and_never_5xx(app) -> None:
    config = SchemathesisConfig.from_dict(
        {"checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", 400, 401, 403, 404, 409, 413, 429]}}}
    )  # schema-valid bodies may still be refused as documented: a text pair for a single-text adapter (400),
    # an unknown adapter (404), over a configured limit such as the estimated cost (413), a full queue (429)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    for operation in operations:
        _fuzz(operation)
    for label in ("POST /v1/predict", "POST /v2/models/{model}/infer"):  # predictions did run, not only refusals
        assert answered[label, 200] > 0, [(k, v) for k, v in answered.items() if k[0] == label]


def test_the_documented_seed_bound_is_an_exact_integer(app) -> None:
    """FastAPI wrote ``lt=2**63`` as the float 9.223372036854776e18, which schema-valid generators read as allowing
    2^63 itself; the server then refused it (found by the fuzzing above)."""
    seed = app.openapi()["components"]["schemas"]["PredictRequest"]["properties"]["seed"]
    (branch,) = [b for b in seed["anyOf"] if b.get("type") == "integer"]
    assert branch["maximum"] == 2**63 - 1 and isinstance(branch["maximum"], int) and "exclusiveMaximum" not in branch


def _fuzz(operation) -> None:
    label = f"{operation.method.upper()} {operation.path}"
    # a schema-valid path that holds no loadable bundle is refused with the documented 422
    excluded = [positive_data_acceptance] if operation.path.startswith("/v1/adapters") else []

    @FUZZ
    @given(case=operation.as_strategy())
    def fuzz(case) -> None:
        cases[label] += 1
        _aim_at_the_adapter(case, cases[label])
        response = case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, excluded_checks=excluded)
        answered[label, response.status_code] += 1

    fuzz()


def _aim_at_the_adapter(case, count: int) -> None:
    """Every other case names the loaded adapter, so that predictions run rather than all answering 404."""
    if count % 2:
        return
    for key in ("model", "name"):
        if case.path_parameters and key in case.path_parameters and case.operation.method != "delete":
            case.path_parameters[key] = ADAPTER
    if isinstance(case.body, dict) and "adapter" in case.body:
        case.body["adapter"] = ADAPTER
    inputs = case.body.get("inputs") if isinstance(case.body, dict) else None
    texts = [t for t in inputs or [] if isinstance(t, dict) and t.get("name") == "text"][:1]
    if texts and isinstance(texts[0].get("data"), list):  # V2: one text input within the limits, fitting shape
        texts[0]["data"] = [d for d in texts[0]["data"] if isinstance(d, str)][:2] or ["a text"]
        texts[0]["shape"] = [len(texts[0]["data"])]
        case.body["inputs"] = texts

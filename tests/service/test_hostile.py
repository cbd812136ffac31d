"""What a hostile user or a careless operator does, in process: each test failed on the server before it was
made to survive it (bad entries in the adapter directory, damaged outputs, requests too costly, protocol
clients, bad inputs, loose validation, an OpenAPI document that did not describe the API)."""

from __future__ import annotations

import json
import math
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.service.bundles import make_bundle, running_app

REVIEW = "a gorgeous, witty, seductive movie."


@pytest.fixture(scope="module")
def client(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    adapters = tmp_path_factory.mktemp("hostile") / "adapters"
    make_bundle(tiny_base, adapters / "alpha", name="alpha")
    make_bundle(tiny_base, adapters / "staged" / "beta", name="beta", seed=1)
    running = running_app(tiny_base, adapters)
    yield running
    running.__exit__(None, None, None)


def predict(client, **body):
    return client.post("/v1/predict", json={"adapter": "alpha", "inputs": [REVIEW], **body})


def infer(client, inputs, **body):
    return client.post("/v2/models/alpha/infer", json={"inputs": inputs, **body})


def text_tensor(data, shape=None):
    return {"name": "text", "datatype": "BYTES", "shape": shape or [len(data)], "data": data}


def metric(client, name: str) -> float:
    line = next(x for x in client.get("/metrics").text.splitlines() if x.startswith(name))
    return float(line.split()[-1])


def load_failures(client) -> float:
    return metric(client, "caveat_adapter_load_failures_total")


# ------------------------------------------------------------- 1, 6: the adapter directory at start-up


def test_unloadable_entries_are_reported_and_the_rest_load(tiny_base: Path, tmp_path: Path) -> None:
    adapters, outside = tmp_path / "adapters", tmp_path / "outside"
    make_bundle(tiny_base, adapters / "good", name="good")
    make_bundle(tiny_base, outside / "elsewhere", name="elsewhere")
    (adapters / "link-out").symlink_to(outside / "elsewhere", target_is_directory=True)
    make_bundle(tiny_base, adapters / "twin-a", name="twin", version="1")
    make_bundle(tiny_base, adapters / "twin-b", name="twin", version="2")
    app = running_app(tiny_base, adapters)  # before: start-up failed, ready never turned 200
    try:
        info = app.get("/v1/info").json()
        assert [a["name"] for a in app.get("/v1/adapters").json()["adapters"]] == ["good"]
        problems = info["startup_problems"]
        assert any(p.startswith("link-out:") and "links outside the directory" in p for p in problems)
        assert sum("all named 'twin'" in p for p in problems) == 2  # neither twin wins by listing order
        assert load_failures(app) == 3
        for path in (tmp_path, tiny_base):  # no server paths for unauthenticated clients
            assert str(path) not in json.dumps(info)
        assert info["base_model"] == tiny_base.name
    finally:
        app.__exit__(None, None, None)


def test_path_refusals_count_as_failed_loads(client) -> None:
    before = load_failures(client)
    for path in ("../../etc", "bad\x00path", "x" * 5000, "nothing-here"):
        response = client.post("/v1/adapters", json={"path": path})
        assert response.status_code in (400, 422), response.text  # before: NUL and long paths gave 500
    assert load_failures(client) == before + 4


# -------------------------------------------------------------------- 2: a damaged answer is withheld


def test_non_finite_probabilities_are_an_error_never_an_answer(client) -> None:
    weights = client.app.state.caveat.registry.entry("alpha").resident.weights
    saved = weights.head_bias.clone()
    weights.head_bias.fill_(math.nan)
    try:
        response = predict(client, method="map")
    finally:
        weights.head_bias.copy_(saved)
    assert response.status_code == 500 and response.json()["error"]["type"] == "NonFiniteOutputError"
    assert 'caveat_prediction_failures_total{reason="non_finite"} 1.0' in client.get("/metrics").text
    assert predict(client, method="map").status_code == 200


# ------------------------------------------------------------------------ 3: cost-bounded admission


def test_a_request_over_the_cost_limit_is_refused_before_any_work(client) -> None:
    body = {"inputs": ["word " * 150] * 64, "num_samples": 128, "method": "sample"}
    response = predict(client, **body)
    assert response.status_code == 413 and "rows × tokens" in response.json()["error"]["message"]


def test_pieces_give_the_same_predictive_as_one_forward(tiny_base: Path, tmp_path: Path) -> None:
    make_bundle(tiny_base, tmp_path / "adapters" / "alpha", name="alpha")
    body = {"adapter": "alpha", "inputs": [REVIEW, "dull", "so-so film"], "num_samples": 6, "seed": 4}
    answers = {}
    for step_tokens in (8, 1 << 20):  # 8: one row per piece (input slices of one sample); 2^20: one piece
        app = running_app(tiny_base, tmp_path / "adapters", step_tokens=step_tokens)
        try:
            answers[step_tokens] = [
                app.post("/v1/predict", json={**body, "method": method}).json() for method in ("sample", "glm")
            ]
        finally:
            app.__exit__(None, None, None)
    for pieced, whole in zip(answers[8], answers[1 << 20], strict=True):
        for a, b in zip(pieced["results"], whole["results"], strict=True):
            assert a["probs"] == pytest.approx(b["probs"], abs=1e-5)
            assert a["uncertainty"]["mutual_information"] == pytest.approx(
                b["uncertainty"]["mutual_information"], abs=1e-5
            )


def test_a_timed_out_request_stops_using_the_worker(tiny_base: Path, tmp_path: Path) -> None:
    make_bundle(tiny_base, tmp_path / "adapters" / "alpha", name="alpha")
    app = running_app(tiny_base, tmp_path / "adapters", step_tokens=64, request_timeout_s=0.5)
    try:
        host = app.app.state.caveat.host
        calls, forward = [], host.run

        def counted(*args, **kwargs):
            calls.append(time.perf_counter())
            time.sleep(0.05)  # a slow model: the request cannot finish in time
            return forward(*args, **kwargs)

        host.run = counted
        response = app.post("/v1/predict", json={"adapter": "alpha", "inputs": [REVIEW] * 8, "num_samples": 64})
        assert response.status_code == 504
        ran = len(calls)
        time.sleep(0.5)
        assert len(calls) <= ran + 1  # at most the piece in flight: the rest of its 64+ pieces never ran
        host.run = forward
        assert app.post("/v1/predict", json={"adapter": "alpha", "inputs": [REVIEW]}).status_code == 200
    finally:
        app.__exit__(None, None, None)


def test_small_requests_are_served_between_the_pieces_of_a_big_one(tiny_base: Path, tmp_path: Path) -> None:
    make_bundle(tiny_base, tmp_path / "adapters" / "alpha", name="alpha")
    app = running_app(tiny_base, tmp_path / "adapters", step_tokens=256)
    try:
        engine = app.app.state.caveat.engine
        finished: list[str] = []

        def ask(label: str, inputs: list[str], samples: int) -> None:
            body = {"adapter": "alpha", "inputs": inputs, "num_samples": samples, "method": "sample"}
            assert app.post("/v1/predict", json=body).status_code == 200
            finished.append(label)

        with ThreadPoolExecutor(4) as pool:
            big = pool.submit(ask, "big", [f"{REVIEW} {i}" for i in range(16)], 32)
            while not engine.pending:
                time.sleep(0.001)
            smalls = [pool.submit(ask, f"small{i}", ["dull"], 2) for i in range(3)]
            for future in [*smalls, big]:
                future.result()
        assert finished[-1] == "big"  # the small ones did not wait for all of the big one's pieces
    finally:
        app.__exit__(None, None, None)


# --------------------------------------------------------------------- 4: Open Inference Protocol


def test_v2_json_without_content_type_and_binary_tensor_data(client) -> None:
    texts = [REVIEW, "dull"]
    header = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "parameters": {}}]}
    binary = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    header["inputs"][0]["parameters"]["binary_data_size"] = len(binary)
    head = json.dumps({**header, "parameters": {"seed": 3, "num_samples": 4}}).encode()
    as_binary = client.post(
        "/v2/models/alpha/infer", content=head + binary,
        headers={"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
    )  # fmt: skip
    plain = {"inputs": [text_tensor(texts)], "parameters": {"seed": 3, "num_samples": 4}}
    no_type = client.post("/v2/models/alpha/infer", content=json.dumps(plain).encode())
    assert as_binary.status_code == 200, as_binary.text
    assert no_type.status_code == 200, no_type.text  # before: 422 "Input should be a valid dictionary"

    def answer(response) -> list[dict]:  # less the answers' ids, fresh per request
        return [output for output in response.json()["outputs"] if output["name"] != "id"]

    assert answer(as_binary) == answer(no_type)


@pytest.mark.parametrize("shape", [[5], [-3], [7, 7], [1, 2]])
def test_v2_shape_must_match_the_data(client, shape) -> None:
    response = infer(client, [text_tensor(["one"], shape)])
    assert response.status_code == 400 and "shape" in response.json()["error"]


# ------------------------------------------------------------------------ 5, 7: inputs that hurt


def test_lone_surrogates_are_refused_not_500(client) -> None:
    raw = '{"adapter": "alpha", "inputs": ["\\ud800"]}'
    native = client.post("/v1/predict", content=raw, headers={"Content-Type": "application/json"})
    v2 = client.post(
        "/v2/models/alpha/infer",
        content='{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["\\ud800"]}]}',
    )
    assert native.status_code == 422 and "surrogate" in native.json()["error"]["message"]
    assert v2.status_code == 422


@pytest.mark.parametrize("seed", [2**64, 2**63, -1, "7", 1.5, True])
def test_v2_seed_out_of_range_or_of_the_wrong_type(client, seed) -> None:
    response = infer(client, [text_tensor(["x"])], parameters={"seed": seed})
    assert response.status_code == 400 and "seed" in response.json()["error"]


def test_loose_inputs_are_refused_with_clear_messages(client) -> None:
    for blank in ("", "   ", "\n\t"):
        assert predict(client, inputs=[blank]).status_code == 422
        assert predict(client, inputs=[{"text": "fine", "text_pair": blank}]).status_code == 422
        assert infer(client, [text_tensor([blank])]).status_code == 422
    assert predict(client, seed="7").status_code == 422  # strict types on the wire
    assert predict(client, num_samples="3").status_code == 422
    body = '{"adapter": "alpha", "inputs": ["x"], "abstain": {"max_prob": NaN}}'  # Python's JSON reads NaN
    nan = client.post("/v1/predict", content=body, headers={"Content-Type": "application/json"})
    assert nan.status_code == 422 and "finite" in nan.json()["error"]["message"]
    broken = client.post("/v1/predict", content=b'{"adapter": ', headers={"Content-Type": "application/json"})
    assert broken.status_code == 422 and "not valid JSON" in broken.json()["error"]["message"]


def test_deeply_nested_json_is_a_client_error(client) -> None:
    deep = "[" * 200_000 + "]" * 200_000  # under the body limit, beyond any JSON parser's recursion limit
    for path in ("/v1/predict", "/v2/models/alpha/infer", "/v1/adapters"):
        response = client.post(path, content=deep, headers={"Content-Type": "application/json"})
        assert response.status_code in (400, 422), (path, response.text)
    assert "recursion limit" in client.post("/v2/models/alpha/infer", content=deep).json()["error"]


def test_v2_unknown_outputs_are_refused_before_the_model_runs(client) -> None:
    forwards = metric(client, "caveat_batch_rows_count")
    response = infer(client, [text_tensor(["x"])], outputs=[{"name": "nonsense"}])
    assert response.status_code == 422 and "probs" in response.json()["error"]
    assert metric(client, "caveat_batch_rows_count") == forwards


def test_unexpected_errors_answer_500_in_the_error_shape(client) -> None:
    host = client.app.state.caveat.host
    encode = host.encode
    host.encode = lambda inputs: (_ for _ in ()).throw(RuntimeError("boom"))
    try:
        response = predict(client, inputs=["an input never seen before"])
    finally:
        host.encode = encode
    # before: the exception escaped the app (uvicorn then dropped the keep-alive connection)
    assert response.status_code == 500 and response.json()["error"]["type"] == "InternalError"


# ------------------------------------------------------------------------------- 6: operator surprises


def test_401_names_the_scheme_and_request_ids_are_bounded(client) -> None:
    refused = client.post("/v1/adapters", json={"path": "staged/beta"}, headers={"Authorization": "Bearer nope"})
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
    kept = client.get("/v1/info", headers={"X-Request-ID": "trace-42.a:b"})
    assert kept.headers["x-request-id"] == "trace-42.a:b"
    for hostile in ("x" * 10_000, "a b", "<script>", "id\x7f"):
        echoed = client.get("/v1/info", headers={"X-Request-ID": hostile})
        assert echoed.headers["x-request-id"] != hostile and len(echoed.headers["x-request-id"]) == 32


# ------------------------------------------------------------------------------ 8: the OpenAPI document


def test_openapi_documents_security_errors_and_limits(client) -> None:
    document = client.get("/openapi.json").json()
    assert document["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"
    load = document["paths"]["/v1/adapters"]["post"]
    assert load["security"] == [{"adminToken": []}]
    assert "Written to the store" in document["paths"]["/v1/adapters/{name}"]["put"]["description"]  # every replica
    predict_op = document["paths"]["/v1/predict"]["post"]
    for status in ("400", "404", "413", "422", "429", "503", "504"):
        schema = predict_op["responses"][status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/Error"}
    assert "HTTPValidationError" not in document["components"]["schemas"]
    inputs = document["components"]["schemas"]["PredictRequest"]["properties"]["inputs"]
    assert inputs["maxItems"] == 64 and "rows × tokens" in inputs["description"]
    options = client.options("/v1/adapters")
    assert options.status_code == 204 and {"GET", "POST"} <= set(options.headers["allow"].split(", "))
    wrong = client.patch("/v1/adapters")
    assert wrong.status_code == 405 and {"GET", "POST"} <= set(wrong.headers["allow"].split(", "))

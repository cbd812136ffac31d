"""End-to-end: a real ``caveat-serve`` process on 127.0.0.1, real bundles, real HTTP."""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.service.bundles import make_bundle, save_tiny_base
from tests.service.conftest import Server, start_server

REVIEW = "a gorgeous, witty, seductive movie."


def predict(client: httpx.Client, adapter: str, inputs: list, **options) -> httpx.Response:
    return client.post("/v1/predict", json={"adapter": adapter, "inputs": inputs, **options})


def test_predict_returns_the_predictive_and_its_uncertainty(server: Server) -> None:
    with server.client() as client:
        response = predict(client, "alpha", [REVIEW, {"text": "dull"}], num_samples=12, seed=5, return_samples=True)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["adapter"]["name"] == "alpha" and body["adapter"]["version"] == "1"
    assert len(body["adapter"]["sha256"]) == 64 and response.headers["x-request-id"] == body["request_id"]
    assert body["labels"] == ["negative", "positive"] and body["num_samples"] == 12 and body["seed"] == 5
    assert set(body["timing"]) == {"queue_ms", "compute_ms", "total_ms", "batch_requests", "batch_rows"}
    for result in body["results"]:
        assert sum(result["probs"]) == pytest.approx(1.0, abs=1e-5)
        assert result["label"] == body["labels"][max(range(2), key=result["probs"].__getitem__)]
        assert result["confidence"] == pytest.approx(max(result["probs"]))
        u = result["uncertainty"]
        assert u["mutual_information"] == pytest.approx(u["entropy"] - u["expected_entropy"], abs=1e-5)
        assert 0 <= u["entropy_normalized"] <= 1 and u["mc_stderr"] >= 0
        assert isinstance(result["abstain"], bool) and "abstain_reason" in result
        assert len(result["samples"]) == 12
        mean = [sum(s[c] for s in result["samples"]) / 12 for c in range(2)]
        assert mean == pytest.approx(result["probs"], abs=1e-5)  # probabilities averaged, not logits


def test_same_seed_same_probabilities_and_map_is_deterministic(server: Server) -> None:
    with server.client() as client:
        first, again, other = (predict(client, "alpha", [REVIEW], seed=s).json() for s in (11, 11, 12))
        maps = [predict(client, "alpha", [REVIEW], method="map").json() for _ in range(2)]
    assert first["results"][0]["probs"] == again["results"][0]["probs"]
    assert first["results"][0]["probs"] != other["results"][0]["probs"]
    assert maps[0]["num_samples"] == 1 and maps[0]["results"][0]["probs"] == maps[1]["results"][0]["probs"]
    assert maps[0]["results"][0]["uncertainty"]["mutual_information"] == 0


def test_second_adapter_loaded_at_runtime_serves_concurrently(server: Server) -> None:
    with server.admin() as admin:
        loaded = admin.post("/v1/adapters", json={"path": "staged/beta"})
        assert loaded.status_code == 201, loaded.text
        assert loaded.json()["adapter"]["name"] == "beta" and loaded.json()["adapter"]["version"] == "7"
        again = admin.post("/v1/adapters", json={"path": "staged/beta"})
        assert again.status_code == 409
    jobs = [("alpha" if i % 2 else "beta", [f"{REVIEW} {i}", "so-so"]) for i in range(24)]
    with server.client() as client, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda job: predict(client, *job, num_samples=8), jobs))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    for (name, _), response in zip(jobs, responses, strict=True):
        body = response.json()
        assert body["adapter"]["name"] == name
        assert len(body["results"][0]["probs"]) == (2 if name == "alpha" else 3)
    assert max(r.json()["timing"]["batch_requests"] for r in responses) > 1  # requests did share forwards
    with server.client() as client:
        listed = client.get("/v1/adapters").json()
        detail = client.get("/v1/adapters/beta").json()
    assert [a["name"] for a in listed["adapters"]] == ["alpha", "beta"]
    assert detail["manifest"]["task"]["labels"] == ["x", "y", "z"] and detail["state"] == "ready"


def test_replacing_an_adapter_under_load_loses_no_request(server: Server, tiny_base) -> None:
    versions = [str(v) for v in range(2, 22)]
    for version in versions:
        make_bundle(tiny_base, server.adapter_dir / "staged" / f"gamma-{version}", name="gamma", version=version)
    with server.admin() as admin:
        assert admin.post("/v1/adapters", json={"path": "staged/gamma-2"}).status_code == 201
    current = {"version": 2}
    stop = threading.Event()
    failures, served = [], []

    def client_loop() -> None:
        with server.client() as client:
            while not stop.is_set():
                low = current["version"]
                response = predict(client, "gamma", [REVIEW], num_samples=4)
                high = current["version"]
                if response.status_code != 200:
                    failures.append(response.text)
                    continue
                version = int(response.json()["adapter"]["version"])
                served.append(version)
                if not low <= version <= high:  # the version that was current while the request was open
                    failures.append(f"served version {version} outside [{low}, {high}]")

    loops = [threading.Thread(target=client_loop) for _ in range(4)]
    for loop in loops:
        loop.start()
    with server.admin() as admin:
        for version in versions[1:]:
            time.sleep(0.05)
            response = admin.put("/v1/adapters/gamma", json={"path": f"staged/gamma-{version}"})
            assert response.status_code == 200, response.text
            assert response.json()["previous_version"] == str(current["version"])
            current["version"] = int(version)
        time.sleep(0.2)
    stop.set()
    for loop in loops:
        loop.join()
    assert not failures, failures[:3]
    assert len(served) > 20 and max(served) == 21 and len(set(served)) > 5


def test_errors_have_one_shape_and_the_right_status(server: Server) -> None:
    with server.client() as client:
        unknown = predict(client, "nobody", [REVIEW])
        malformed = [
            client.post("/v1/predict", content=b"{not json", headers={"content-type": "application/json"}),
            client.post("/v1/predict", json={"adapter": "alpha"}),
            client.post("/v1/predict", json={"adapter": "alpha", "inputs": [REVIEW], "num_samples": 0}),
            client.post("/v1/predict", json={"adapter": "alpha", "inputs": [3]}),
            client.post("/v1/predict", json={"adapter": "alpha", "inputs": [REVIEW], "method": "guess"}),
        ]
        too_big = client.post("/v1/predict", json={"adapter": "alpha", "inputs": ["x" * 2_000_000]})
        too_many = predict(client, "alpha", ["x"] * 65)
        too_long = predict(client, "alpha", ["x" * 20_001])
        no_token = client.post("/v1/adapters", json={"path": "staged/beta"})
        bad_token = client.delete("/v1/adapters/alpha", headers={"Authorization": "Bearer wrong"})
        wrong_pair = predict(client, "alpha", [{"text": "a", "text_pair": "b"}])
    assert unknown.status_code == 404 and "nobody" in unknown.json()["error"]["message"]
    assert [r.status_code for r in malformed] == [422] * 5
    assert too_big.status_code == 413 and too_many.status_code == 413 and too_long.status_code == 413
    assert no_token.status_code == 401 and bad_token.status_code == 401
    assert wrong_pair.status_code == 400
    for response in [unknown, *malformed, too_big, too_many, no_token, wrong_pair]:
        error = response.json()["error"]
        assert set(error) == {"code", "type", "message", "request_id"} and error["code"] == response.status_code


def test_bad_bundles_are_refused_while_serving_goes_on(server: Server, tmp_path) -> None:
    other_base = save_tiny_base(tmp_path / "other-base", seed=1)
    make_bundle(other_base, server.adapter_dir / "staged" / "foreign", name="foreign")
    damaged = make_bundle(server_base(server), server.adapter_dir / "staged" / "damaged", name="damaged")
    data = bytearray((damaged / "adapter.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (damaged / "adapter.safetensors").write_bytes(bytes(data))
    outside = tmp_path / "outside"
    make_bundle(server_base(server), outside, name="outside")
    with server.admin() as admin:
        foreign = admin.post("/v1/adapters", json={"path": "staged/foreign"})
        broken = admin.post("/v1/adapters", json={"path": "staged/damaged"})
        traversal = admin.post("/v1/adapters", json={"path": "../../outside"})
        absolute = admin.post("/v1/adapters", json={"path": str(outside)})
        missing = admin.post("/v1/adapters", json={"path": "staged/nothing-here"})
    assert foreign.status_code == 422 and "fingerprint" in foreign.json()["error"]["message"]
    assert broken.status_code == 422 and "sha256" in broken.json()["error"]["message"]
    assert traversal.status_code == 400 and absolute.status_code == 400
    assert "outside the adapter directory" in traversal.json()["error"]["message"]
    assert missing.status_code == 422
    with server.client() as client:
        assert predict(client, "alpha", [REVIEW]).status_code == 200
        assert "foreign" not in [a["name"] for a in client.get("/v1/adapters").json()["adapters"]]


def server_base(server: Server):
    with server.client() as client:
        return client.get("/v1/adapters/alpha").json()["manifest"]["base_model"]["name_or_path"]


def test_open_inference_protocol_routes(server: Server) -> None:
    with server.client() as client:
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get("/v2/health/ready").status_code == 200
        metadata = client.get("/v2/models/alpha").json()
        assert metadata["name"] == "alpha" and metadata["versions"] == ["1"]
        assert client.get("/v2/models/alpha/ready").status_code == 200
        infer = client.post(
            "/v2/models/alpha/infer",
            json={
                "id": "r1",
                "parameters": {"num_samples": 6, "seed": 3},
                "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": [REVIEW, "dull"]}],
            },
        )
        native = predict(client, "alpha", [REVIEW, "dull"], num_samples=6, seed=3).json()
        missing = client.post("/v2/models/nobody/infer", json={"inputs": [{"name": "text", "datatype": "BYTES",
                                                                           "shape": [1], "data": ["a"]}]})  # fmt: skip
    assert infer.status_code == 200, infer.text
    body = infer.json()
    outputs = {o["name"]: o for o in body["outputs"]}
    assert body["id"] == "r1" and body["model_name"] == "alpha" and body["model_version"] == "1"
    assert outputs["probs"]["shape"] == [2, 2] and outputs["abstain"]["datatype"] == "BOOL"
    assert outputs["probs"]["data"] == [p for r in native["results"] for p in r["probs"]]
    assert outputs["mutual_information"]["data"] == [r["uncertainty"]["mutual_information"] for r in native["results"]]
    assert missing.status_code == 404 and isinstance(missing.json()["error"], str)


def test_metrics_after_traffic(server: Server) -> None:
    with server.client() as client:
        assert predict(client, "alpha", [REVIEW, "dull"]).status_code == 200
        text = client.get("/metrics").text
    for series in (
        'caveat_requests_total{adapter="alpha",endpoint="predict",status="200"}',
        "caveat_request_duration_seconds_bucket",
        "caveat_queue_wait_seconds_count",
        "caveat_batch_rows_bucket",
        "caveat_samples_per_request_count",
        'caveat_adapters_loaded{state="ready"}',
        "caveat_adapter_load_seconds_count",
        'caveat_prediction_confidence_count{adapter="alpha"}',
        'caveat_prediction_entropy_normalized_count{adapter="alpha"}',
        'caveat_prediction_mutual_information_nats_count{adapter="alpha"}',
        'caveat_predictions_total{adapter="alpha"}',
    ):
        assert series in text, series
    assert 'adapter="nobody"' not in text  # unknown names never become label values


def test_full_queue_answers_429_and_sigterm_drains(tiny_base, tmp_path) -> None:
    adapter_dir = tmp_path / "adapters"
    make_bundle(tiny_base, adapter_dir / "alpha", name="alpha")
    server = start_server(
        tiny_base, adapter_dir, tmp_path / "server.log", "--queue-size", "1", "--no-batching", "--drain-s", "1.5"
    )
    try:
        heavy = {"adapter": "alpha", "inputs": [f"{REVIEW} {i}" for i in range(64)], "num_samples": 64}
        with server.client() as client, ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(lambda _: client.post("/v1/predict", json=heavy), range(12)))
        codes = [r.status_code for r in statuses]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
        refused = next(r for r in statuses if r.status_code == 429)
        assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "QueueFullError"

        with server.client() as client, ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(client.post, "/v1/predict", json=heavy)
            time.sleep(0.2)
            server.process.send_signal(15)
            time.sleep(0.3)
            draining = client.get("/health/ready")
            assert draining.status_code == 503 and "draining" in draining.json()["reason"]
            assert in_flight.result().status_code == 200  # admitted before SIGTERM: answered
        assert server.process.wait(timeout=30) == 0  # a drained SIGTERM is a clean exit, not death by signal
        assert "Traceback" not in server.log.read_text()
    finally:
        server.stop()


def test_keep_alive_survives_errors_and_hostile_inputs(server: Server) -> None:
    """Over one HTTP/1.1 connection: a lone surrogate, a huge seed, a NUL in an admin path, then a good
    request. Before, the first gave a 500 and the server dropped the connection without ``Connection: close``,
    so the next request failed with a reset."""
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {server.admin_token}"}
    bad = [
        ("/v1/predict", '{"adapter": "alpha", "inputs": ["\\ud800"]}', 422),
        (
            "/v2/models/alpha/infer",
            '{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["\\ud800"]}]}',
            422,
        ),
        (
            "/v2/models/alpha/infer",
            '{"parameters": {"seed": 18446744073709551616}, "inputs": [{"name": "text", '
            '"datatype": "BYTES", "shape": [1], "data": ["a"]}]}',
            400,
        ),
        ("/v1/adapters", '{"path": "bad\\u0000path"}', 400),
        ("/v1/adapters", json.dumps({"path": "y" * 5000}), 400),
    ]
    try:
        for path, body, status in bad:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            assert response.status == status, (path, response.read())
            response.read()
        connection.request("POST", "/v1/predict", body=json.dumps({"adapter": "alpha", "inputs": [REVIEW]}),
                           headers=headers)  # fmt: skip
        assert connection.getresponse().status == 200
    finally:
        connection.close()
    assert "Traceback" not in server.log.read_text()


def test_an_abandoned_request_stops_using_the_worker(tiny_base, tmp_path) -> None:
    """A client that gives up (closes its connection) before the answer: its job is dropped at the next step,
    long before its timeout, and the server goes on answering."""
    adapter_dir = tmp_path / "adapters"
    make_bundle(tiny_base, adapter_dir / "alpha", name="alpha")
    server = start_server(
        tiny_base, adapter_dir, tmp_path / "server.log", "--step-tokens", "256", "--max-request-tokens", "10000000",
        "--queue-tokens", "20000000", "--request-timeout-s", "300", "--max-samples", "4096",
    )  # fmt: skip
    try:
        # 64 inputs × 4,096 samples: minutes of work in 256-token steps even on a fast machine, so the client
        # always gives up first (64 × 128 finished inside the client's second on a faster CI runner).
        heavy = {"adapter": "alpha", "inputs": [f"{REVIEW} {i}" for i in range(64)], "num_samples": 4096}
        with httpx.Client(base_url=server.url, timeout=0.5) as impatient, pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/predict", json=heavy)
        deadline = time.monotonic() + 30
        with server.client() as client:
            while 'caveat_requests_dropped_total{reason="abandoned"} 1.0' not in client.get("/metrics").text:
                assert time.monotonic() < deadline, "the abandoned job was never dropped"
                time.sleep(0.1)
            assert predict(client, "alpha", [REVIEW]).status_code == 200
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text()

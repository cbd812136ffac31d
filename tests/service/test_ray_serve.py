"""``caveat-serve --engine ray``: a real local Ray cluster (2 CPUs), two worker replicas multiplexed by adapter, real
HTTP through Ray's proxy and Caveat's ingress."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.ray_serve import RawRequest, adapter_of, call_app
from service.settings import Settings
from tests.service.bundles import make_bundle
from tests.service.conftest import Server, start_server
from tests.service.test_workers import TEXTS, answers, metric

pytestmark = pytest.mark.ray
ADAPTERS = ["alpha", "beta", "gamma", "delta", "epsilon"]


@pytest.fixture(scope="module")
def adapter_dir(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ray") / "adapters"
    for seed, name in enumerate(ADAPTERS):
        make_bundle(tiny_base, directory / name, name=name, version="1", seed=seed)
    return directory


@pytest.fixture(scope="module")
def ray_server(tiny_base: Path, adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("ray-server")
    running = start_server(
        tiny_base, adapter_dir, root / "server.log", "--engine", "ray", "--replicas", "2", "--adapters-per-replica",
        "2", "--store-poll-s", "1", "--feedback-dir", str(root / "feedback"),
    )  # fmt: skip
    yield running
    running.stop()
    assert running.process.returncode == 0, running.log.read_text()[-3000:]


def predict(client: httpx.Client, adapter: str) -> httpx.Response:
    return client.post("/v1/predict", json={"adapter": adapter, "inputs": TEXTS[:1], "method": "map"})


def loads(client: httpx.Client) -> float:
    return metric(client.get("/metrics").text, "caveat_adapter_load_seconds_count")


def replica_pids(server: Server, tries: int = 100) -> set[int]:
    pids: set[int] = set()
    with server.client() as client:
        for _ in range(tries):
            response = client.get("/v1/info")
            if response.status_code == 200:
                pids.add(response.json()["worker_pid"])
            if len(pids) == 2:
                break
    return pids


def test_the_adapter_of_a_request_is_read_from_its_body_or_path() -> None:
    assert adapter_of("POST", "/v1/predict", b'{"adapter": "alpha@3", "inputs": []}') == "alpha"
    assert adapter_of("POST", "/v2/models/beta/infer", b"") == "beta"
    assert adapter_of("POST", "/v1/predict", b"not json") == ""
    assert adapter_of("POST", "/v1/predict", b'{"adapter": "../etc"}') == ""
    assert adapter_of("PUT", "/v1/adapters/gamma", b"{}") == "gamma"
    assert adapter_of("POST", "/v2/repository/models/delta/load", b"") == "delta"
    assert adapter_of("GET", "/v1/info", b"") == ""


def test_call_app_answers_as_the_app_does(tiny_base: Path, adapter_dir: Path) -> None:
    app = create_app(Settings(base_model=str(tiny_base), adapter_dir=adapter_dir, warmup=False))
    with TestClient(app) as client:
        while client.get("/health/ready").status_code != 200:
            time.sleep(0.05)
        expected = client.get("/v1/adapters")
        raw = asyncio.run(call_app(app, RawRequest("GET", "/v1/adapters", b"", [], b"")))
    assert raw.status == 200 and raw.body == expected.content


def test_two_replicas_answer_bitwise_as_one_process(ray_server: Server, tiny_base: Path, adapter_dir: Path,
                                                    tmp_path: Path) -> None:  # fmt: skip
    single = start_server(tiny_base, adapter_dir, tmp_path / "single.log")
    try:
        with single.client() as client:
            expected = answers(client)
    finally:
        single.stop()
    with ray_server.client() as client:
        for _ in range(2):  # whichever replica answers
            assert answers(client) == expected
    assert len(replica_pids(ray_server)) == 2


def test_requests_for_an_adapter_go_to_the_replica_that_holds_it(ray_server: Server) -> None:
    with ray_server.client() as client:
        assert predict(client, "alpha").status_code == 200
        time.sleep(1)  # the replica tells Ray's router which adapters it holds
        before = loads(client)
        for _ in range(20):
            assert predict(client, "alpha").status_code == 200
        assert loads(client) == before  # no replica had to load it again


def test_a_replica_drops_its_least_recently_used_adapter_beyond_its_bound(ray_server: Server) -> None:
    with ray_server.client() as client:
        for name in ADAPTERS:  # 5 adapters, 2 replicas holding 2 each
            assert predict(client, name).status_code == 200, name
        time.sleep(1)
        held = metric(client.get("/metrics").text, r'caveat_adapters_loaded\{state="ready"\}')
        assert 1 <= held <= 2  # the most any replica holds
        assert predict(client, "nope").status_code == 404


def test_a_replaced_adapter_is_served_by_every_replica_within_5_s(
    ray_server: Server, tiny_base: Path, adapter_dir: Path
) -> None:
    staged = adapter_dir / "staged" / "alpha-2"
    make_bundle(tiny_base, staged, name="alpha", version="2", seed=9)
    with ray_server.admin() as admin, ThreadPoolExecutor(4) as pool:
        response = admin.put("/v1/adapters/alpha", json={"path": str(staged)})
        assert response.status_code == 200, response.text
        swapped = time.monotonic()
        while time.monotonic() - swapped < 5:
            versions = set(pool.map(lambda _: predict(admin, "alpha").json()["adapter"]["version"], range(8)))
            if versions == {"2"}:
                break
        assert versions == {"2"}
        for _ in range(3):  # and it stays so, whichever replica answers
            assert set(pool.map(lambda _: predict(admin, "alpha").json()["adapter"]["version"], range(8))) == {"2"}


def test_the_ingress_refuses_a_body_over_the_limit_in_the_error_shape(ray_server: Server) -> None:
    with ray_server.client() as client:
        response = client.post("/v1/predict", content=b"x" * (1_048_576 + 1),
                               headers={"content-type": "application/json"})  # fmt: skip
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "PayloadTooLargeError"
        assert predict(client, "alpha").status_code == 200


def test_a_replica_killed_under_load_loses_no_request(ray_server: Server) -> None:
    victim = min(replica_pids(ray_server))
    statuses: list[int] = []
    stop = time.monotonic() + 12

    def load() -> None:
        with httpx.Client(base_url=ray_server.url, timeout=30) as client:
            while time.monotonic() < stop:
                response = predict(client, ADAPTERS[len(statuses) % 3])
                statuses.append(response.status_code)
                if response.status_code == 503:
                    assert response.headers.get("retry-after"), response.text

    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(load) for _ in range(4)]
        time.sleep(3)
        os.kill(victim, signal.SIGKILL)
        for future in running:
            future.result(timeout=60)  # none hangs
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert statuses.count(200) > len(statuses) // 2
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (len(pids := replica_pids(ray_server)) == 2 and victim not in pids):
        time.sleep(1)
    assert victim not in pids and len(pids) == 2  # Ray replaced it

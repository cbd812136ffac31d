"""Serving from a bundle store: an adapter loads on its first request (404 when the store has none, 503 with
Retry-After while it loads), the admin API writes the store, a second replica on the same store follows within its
poll interval, a version swapped under load fails no request, a damaged version is refused while others serve, and
the store may be an S3-compatible server."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from adapters.store import BundleStore
from tests.service.bundles import make_bundle, running_app

INPUTS = ["a fine film", "a dull one"]


@pytest.fixture(scope="module")
def bundles(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {
        "a1": make_bundle(tiny_base, root / "a1", name="sentiment", version="1", seed=1),
        "a2": make_bundle(tiny_base, root / "a2", name="sentiment", version="2", seed=2),
        "b": make_bundle(tiny_base, root / "b", name="topics", version="1", seed=3),
    }


def predict(client, adapter: str):
    return client.post("/v1/predict", json={"adapter": adapter, "inputs": INPUTS, "method": "map", "seed": 0})


def wait_for(condition, timeout: float = 10.0) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "condition not reached"
        time.sleep(0.05)
    return time.monotonic() - start


def test_an_adapter_loads_on_its_first_request(tiny_base: Path, tmp_path: Path, bundles) -> None:
    store = BundleStore(tmp_path / "store")
    client = running_app(tiny_base, tmp_path / "store")
    try:
        assert client.get("/v1/adapters").json()["adapters"] == []
        store.publish(bundles["a1"], "sentiment", "1")  # after start-up: nothing has loaded it
        answer = predict(client, "sentiment")
        assert answer.status_code == 200 and answer.json()["adapter"]["version"] == "1"
        missing = predict(client, "nowhere")
        assert missing.status_code == 404 and "not in the store" in missing.json()["error"]["message"]
        assert predict(client, "../sentiment").status_code == 404  # never a path out of the store
    finally:
        client.__exit__(None, None, None)


def test_a_slow_load_answers_503_with_retry_after_and_then_serves(tiny_base: Path, tmp_path: Path, bundles) -> None:
    store = BundleStore(tmp_path / "store")
    client = running_app(tiny_base, tmp_path / "store", miss_wait_ms=0)
    try:
        store.publish(bundles["b"], "topics", "1")
        first = predict(client, "topics")
        assert first.status_code == 503 and first.headers["Retry-After"] == "1"
        wait_for(lambda: predict(client, "topics").status_code == 200)
    finally:
        client.__exit__(None, None, None)


def test_admin_changes_write_the_store_and_another_replica_follows(tiny_base: Path, tmp_path: Path, bundles) -> None:
    adapters = tmp_path / "store"
    make_bundle(tiny_base, adapters / "drop" / "v1", name="sentiment", version="1", seed=1)  # a bundle to publish
    first = running_app(tiny_base, adapters, store_poll_s=0.2)
    second = running_app(tiny_base, adapters, store_poll_s=0.2)
    try:
        assert first.post("/v1/adapters", json={"path": "drop/v1"}).status_code == 201
        assert BundleStore(adapters).current("sentiment").key == "sentiment/1"  # written to the store
        assert predict(second, "sentiment").json()["adapter"]["version"] == "1"  # the other replica: loaded on its miss
        BundleStore(adapters).publish(bundles["a2"], "sentiment", "2", make_current=False)
        assert first.put("/v1/adapters/sentiment", json={"version": "2"}).status_code == 200
        seconds = wait_for(lambda: predict(second, "sentiment").json()["adapter"]["version"] == "2", timeout=5)
        assert seconds < 5  # the documented bound: the poll interval plus one load
        assert first.delete("/v1/adapters/sentiment").status_code == 200
        wait_for(lambda: predict(second, "sentiment").status_code == 404, timeout=5)
        assert BundleStore(adapters).versions("sentiment") == ["1", "2"]  # withdrawn, never deleted
    finally:
        first.__exit__(None, None, None)
        second.__exit__(None, None, None)


def test_a_replica_serving_a_legacy_directory_follows_a_version_published_for_its_name(
    tiny_base: Path, tmp_path: Path, bundles
) -> None:
    """Both replicas serve ``sentiment`` from a bundle directory directly under the store (the layout before
    versions); a new version PUT through one becomes the store's current version, and the other follows it (it
    kept serving the directory before: a legacy entry was never synced)."""
    adapters = tmp_path / "store"
    make_bundle(tiny_base, adapters / "sentiment", name="sentiment", version="1", seed=1)
    make_bundle(tiny_base, adapters / "staged" / "v2", name="sentiment", version="2", seed=2)
    first = running_app(tiny_base, adapters, store_poll_s=0.2)
    second = running_app(tiny_base, adapters, store_poll_s=0.2)
    try:
        assert predict(second, "sentiment").json()["adapter"]["version"] == "1"
        assert first.put("/v1/adapters/sentiment", json={"path": "staged/v2"}).status_code == 200
        wait_for(lambda: predict(second, "sentiment").json()["adapter"]["version"] == "2", timeout=5)
    finally:
        first.__exit__(None, None, None)
        second.__exit__(None, None, None)


def test_a_version_swapped_under_load_fails_no_request(tiny_base: Path, tmp_path: Path, bundles) -> None:
    store = BundleStore(tmp_path / "store")
    store.publish(bundles["a1"], "sentiment", "1")
    store.publish(bundles["a2"], "sentiment", "2", make_current=False)
    client = running_app(tiny_base, tmp_path / "store")
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            statuses.append(predict(client, "sentiment").status_code)

    workers = [threading.Thread(target=load) for _ in range(4)]
    try:
        for worker in workers:
            worker.start()
        for version in ("2", "1", "2"):
            time.sleep(0.2)
            assert client.put("/v1/adapters/sentiment", json={"version": version}).status_code == 200
        time.sleep(0.2)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
        client.__exit__(None, None, None)
    assert len(statuses) > 20 and set(statuses) == {200}


def test_a_damaged_version_is_refused_while_the_others_serve(tiny_base: Path, tmp_path: Path, bundles) -> None:
    store = BundleStore(tmp_path / "store")
    store.publish(bundles["a1"], "sentiment", "1")
    store.publish(bundles["b"], "topics", "1")
    (tmp_path / "store" / "topics" / "1" / "adapter.safetensors").write_bytes(b"damaged")
    client = running_app(tiny_base, tmp_path / "store")
    try:
        problems = client.get("/v1/info").json()["startup_problems"]
        assert any(p.startswith("topics/1:") and "ChecksumMismatchError" in p for p in problems)
        assert predict(client, "sentiment").status_code == 200
        refused = predict(client, "topics")  # looked up again on a request: refused with the same reason
        assert refused.status_code == 422 and "ChecksumMismatchError" in refused.json()["error"]["message"]
        bad = client.put("/v1/adapters/sentiment", json={"version": "../../etc"})
        assert bad.status_code == 400 and "not a version" in bad.json()["error"]["message"]
    finally:
        client.__exit__(None, None, None)


def test_a_stored_version_that_links_out_of_the_store_is_refused(tiny_base: Path, tmp_path: Path, bundles) -> None:
    """``topics/1`` is a symbolic link to a bundle outside the store: refused at start-up and on a request (the
    link is never followed out), while the other adapter serves."""
    store = BundleStore(tmp_path / "store")
    store.publish(bundles["a1"], "sentiment", "1")
    (tmp_path / "store" / "topics").mkdir()
    (tmp_path / "store" / "topics" / "1").symlink_to(bundles["b"], target_is_directory=True)
    (tmp_path / "store" / "topics" / "CURRENT").write_text("1\n")
    client = running_app(tiny_base, tmp_path / "store")
    try:
        problems = client.get("/v1/info").json()["startup_problems"]
        assert any(p.startswith("topics/1:") and "outside" in p for p in problems), problems
        assert predict(client, "sentiment").status_code == 200
        refused = predict(client, "topics")
        assert refused.status_code in (400, 422) and "outside" in refused.json()["error"]["message"]
    finally:
        client.__exit__(None, None, None)


def test_the_store_may_be_an_s3_compatible_server(
    tiny_base: Path, tmp_path: Path, bundles, s3_endpoint: str, monkeypatch
) -> None:
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "eu-west-1",
                       "AWS_ENDPOINT_URL": s3_endpoint}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    store = BundleStore("s3://serving/store", cache_dir=tmp_path / "cache")
    store.fs.mkdir("serving")
    store.publish(bundles["a1"], "sentiment", "1")
    client = running_app(tiny_base, tmp_path / "drop", store="s3://serving/store")
    try:
        assert [a["name"] for a in client.get("/v1/adapters").json()["adapters"]] == ["sentiment"]
        assert predict(client, "sentiment").status_code == 200
    finally:
        client.__exit__(None, None, None)


def test_the_v2_repository_lists_loads_and_unloads_as_triton_does(tiny_base: Path, tmp_path: Path, bundles) -> None:
    store = BundleStore(tmp_path / "store")
    store.publish(bundles["a1"], "sentiment", "1")
    client = running_app(tiny_base, tmp_path / "store")
    try:
        store.publish(bundles["b"], "topics", "1")  # after start-up: in the store, not loaded here
        index = client.post("/v2/repository/index").json()
        assert index == [
            {"name": "sentiment", "version": "1", "state": "READY", "reason": ""},
            {"name": "topics", "version": "1", "state": "UNAVAILABLE", "reason": "not loaded on this server yet"},
        ]
        assert client.post("/v2/repository/index", json={"ready": True}).json()[0]["name"] == "sentiment"
        assert client.post("/v2/repository/models/topics/load").status_code == 200
        assert client.get("/v2/models/topics/ready").json()["ready"] is True
        assert client.post("/v2/repository/models/sentiment/unload").status_code == 200
        refused = client.post("/v2/models/sentiment/infer", json={"inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["fine"]}]})  # fmt: skip
        assert refused.status_code == 404 and "unloaded" in refused.json()["error"]
        assert store.current("sentiment") is not None  # unloaded here only: the store still serves it
        missing = client.post("/v2/repository/models/nowhere/load")
        assert missing.status_code == 404 and missing.json() == {"error": "adapter 'nowhere' is not in the store"}
        anonymous = client.post("/v2/repository/models/topics/unload", headers={"Authorization": ""})
        assert anonymous.status_code == 401
    finally:
        client.__exit__(None, None, None)

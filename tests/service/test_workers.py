"""``caveat-serve --workers 2``: real processes on one socket answer as one process does and share what they must."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.bundles import make_bundle
from tests.service.conftest import ADMIN_TOKEN, Server, start_server

TEXTS = ["a gorgeous, witty, seductive movie.", "the plot is a mess", "fine", "an utterly charmless remake"]
REQUESTS = [
    {"method": "map"},
    {"method": "sample", "num_samples": 8, "seed": 11},
    {"method": "glm", "num_samples": 64, "seed": 5},
    {"method": "sample", "num_samples": 4, "seed": 12},
]


@pytest.fixture(scope="module")
def adapter_dir(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("workers") / "adapters"
    make_bundle(tiny_base, directory / "alpha", name="alpha", version="1", seed=0)
    return directory


@pytest.fixture(scope="module")
def workers(tiny_base: Path, adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("two")
    running = start_server(tiny_base, adapter_dir, root / "server.log", "--workers", "2", "--feedback-dir",
                           str(root / "feedback"))  # fmt: skip
    yield running
    running.stop()


def clients_by_worker(server: Server, count: int = 2, tries: int = 200) -> dict[int, httpx.Client]:
    """One kept-alive connection to each of ``count`` workers (new connections until each worker took one)."""
    found: dict[int, httpx.Client] = {}
    for _ in range(tries):
        client = server.client(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        pid = client.get("/v1/info").json()["worker_pid"]
        if pid in found:
            client.close()
        else:
            found[pid] = client
        if len(found) == count:
            return found
        time.sleep(0.01)
    raise AssertionError(f"{tries} connections reached only workers {sorted(found)}")


def answers(client: httpx.Client) -> list[list[dict]]:
    results = []
    for options in REQUESTS:
        response = client.post("/v1/predict", json={"adapter": "alpha", "inputs": TEXTS, **options})
        assert response.status_code == 200, response.text
        results.append([{k: v for k, v in r.items() if k != "id"} for r in response.json()["results"]])
    return results


def metric(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


def test_each_worker_answers_bitwise_as_one_process_does(
    workers: Server, tiny_base: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    single = start_server(tiny_base, adapter_dir, tmp_path / "single.log")  # the same 1 torch thread per process
    try:
        with single.client() as client:
            expected = answers(client)
    finally:
        single.stop()
    for pid, client in clients_by_worker(workers).items():
        try:
            assert answers(client) == expected, f"worker {pid}"
        finally:
            client.close()


def test_a_label_comes_back_through_another_worker_and_metrics_count_every_worker(workers: Server) -> None:
    (first, a), (second, b) = clients_by_worker(workers).items()
    try:
        before = metric(b.get("/metrics").text, "caveat_predictions_total")
        served = a.post("/v1/predict", json={"adapter": "alpha", "inputs": TEXTS[:3], "method": "map"}).json()
        b.post("/v1/predict", json={"adapter": "alpha", "inputs": TEXTS[:1], "method": "map"})
        ids = [r["id"] for r in served["results"]]
        labels = [{"id": ids[0], "label": "positive"}, {"id": ids[1], "label": "negative"}]
        response = b.post("/v1/feedback", json={"feedback": labels})  # served by `first`, labelled through `second`
        assert response.status_code == 200, response.text
        again = a.post("/v1/feedback", json={"feedback": labels[:1]})
        assert again.status_code == 409, again.text  # the claim is shared: not counted twice
        assert b.post("/v1/feedback", json={"feedback": [{"id": "nope-0", "label": "x"}]}).status_code == 404
        for client in (a, b):  # any worker renders every worker's series
            text = client.get("/metrics").text
            assert metric(text, "caveat_predictions_total") == before + 4
            assert metric(text, "caveat_feedback_labelled_total") == 2
        logged = (workers.log.parent / "feedback").glob("feedback-*.jsonl")
        assert sum(len(f.read_text().splitlines()) for f in logged) == 2
    finally:
        a.close(), b.close()
    assert first != second


def test_a_killed_worker_is_replaced_and_the_others_serve_meanwhile(workers: Server) -> None:
    clients = clients_by_worker(workers)
    victim, survivor = list(clients)
    os.kill(victim, signal.SIGKILL)
    response = clients[survivor].post("/v1/predict", json={"adapter": "alpha", "inputs": TEXTS[:1], "method": "map"})
    assert response.status_code == 200, response.text
    for client in clients.values():
        client.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            reached = clients_by_worker(workers, tries=40)
            for client in reached.values():
                client.close()
            pids = set(reached)
            if victim not in pids and survivor in pids:
                break
        except AssertionError:
            pass  # the new worker is still loading
        time.sleep(0.5)
    else:
        raise AssertionError(f"no worker replaced {victim}:\n{workers.log.read_text()[-3000:]}")
    assert "starting another" in workers.log.read_text()


def test_sigterm_to_the_supervisor_stops_every_worker_and_exits_0(
    tiny_base: Path, adapter_dir: Path, tmp_path: Path
) -> None:
    before = set(Path(tempfile.gettempdir()).glob("caveat-serve-*"))
    server = start_server(tiny_base, adapter_dir, tmp_path / "server.log", "--workers", "2", "--feedback-dir",
                          str(tmp_path / "feedback"))  # fmt: skip
    assert len(set(Path(tempfile.gettempdir()).glob("caveat-serve-*")) - before) == 1  # the run directory
    reached = clients_by_worker(server)
    for client in reached.values():
        client.close()
    pids = set(reached)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert set(Path(tempfile.gettempdir()).glob("caveat-serve-*")) <= before  # removed


def test_an_address_in_use_is_a_clear_error_not_a_traceback(tiny_base: Path, adapter_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "service.cli", "--workers", "2", "--port", str(port), "--base-model",
             str(tiny_base), "--adapter-dir", str(adapter_dir)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--engine", "ray", "--workers", "2"], "--workers is for --engine uvicorn"),
        (["--engine", "ray"], "--engine ray needs Ray Serve: pip install '.[ray]'"),
    ],
)
def test_ray_options_that_cannot_run_say_why(argv: list[str], message: str) -> None:
    """Without the ray extra (simulated: the module is made unimportable) or with both fronts at once: exit 2."""
    code = "import sys; sys.modules['ray'] = None; from service.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                            check=False)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr

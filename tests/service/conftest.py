"""Fixtures for the service tests: a tiny random base on disk, bundles for it, and real server processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.service.bundles import make_bundle, save_tiny_base

ADMIN_TOKEN = "test-admin-token"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("tiny-base"))


@dataclass
class Server:
    """A ``caveat-serve`` process on 127.0.0.1."""

    process: subprocess.Popen
    url: str
    adapter_dir: Path
    log: Path

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def admin(self) -> httpx.Client:
        return self.client(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: Path, adapter_dir: Path, log: Path, *flags: str) -> Server:
    """Start ``python -m service.cli`` and wait until /health/ready says 200."""
    port = free_port()
    command = [
        sys.executable, "-m", "service.cli", "--base-model", str(base), "--adapter-dir", str(adapter_dir),
        "--port", str(port), "--admin-token", ADMIN_TOKEN, "--torch-threads", "1", "--log-level", "warning",
        *flags,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}", adapter_dir, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/health/ready", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server not ready within 120 s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with adapter ``alpha`` (version 1) loaded at start; more bundles wait in ``staged/``."""
    root = tmp_path_factory.mktemp("server")
    adapter_dir = root / "adapters"
    make_bundle(tiny_base, adapter_dir / "alpha", name="alpha", version="1", seed=0)
    make_bundle(tiny_base, adapter_dir / "staged" / "beta", name="beta", version="7", seed=1, labels=("x", "y", "z"))
    running = start_server(tiny_base, adapter_dir, root / "server.log")
    yield running
    running.stop()

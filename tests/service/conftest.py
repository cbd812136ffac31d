"""Fixtures for the service tests: a tiny random base on disk, bundles for it, and real server processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.harness import ServerProcess
from tests.service.bundles import make_bundle

ADMIN_TOKEN = "test-admin-token"


Server = ServerProcess


def start_server(base: Path, adapter_dir: Path, log: Path, *flags: str) -> ServerProcess:
    return ServerProcess.start(base, adapter_dir, log, "--torch-threads", "1", *flags, admin_token=ADMIN_TOKEN)


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

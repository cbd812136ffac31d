"""Running the app under uvicorn: one process, or one of ``caveat-serve --workers N`` on a socket the parent bound."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from service.settings import Settings
from service.state import ServiceState


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: readiness turns 503 at once; the listener closes ``drain_s`` later, after which
    uvicorn finishes the requests in flight and the engine finishes the admitted jobs."""

    def __init__(self, config: uvicorn.Config, state: ServiceState, drain_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_s = drain_s

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn re-raises a captured signal after a graceful shutdown (exit 143 for SIGTERM); a drained
        SIGTERM is the orderly end of this process, so it exits 0."""
        with super().capture_signals():
            yield
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    def handle_exit(self, sig: int, frame) -> None:
        if self.state.draining or self.drain_s <= 0 or sig == signal.SIGINT:
            self.state.draining = True
            super().handle_exit(sig, frame)
            return
        self.state.draining = True
        threading.Timer(self.drain_s, super().handle_exit, args=(sig, frame)).start()


def serve(app: FastAPI, settings: Settings, sockets: list[socket.socket] | None = None) -> None:
    """Serve ``app`` until SIGTERM/SIGINT: on ``settings.host:port``, or on ``sockets`` bound by a parent."""
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=30,
        loop=settings.loop, http=settings.http,  # uvloop + httptools by default: measured, docs/benchmarks.md
    )  # fmt: skip
    DrainingServer(config, app.state.caveat, settings.drain_s).run(sockets=sockets)

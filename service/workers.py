"""``caveat-serve --workers N``: N server processes on one address, under a supervisor.

The parent binds one listening socket per worker on the same address (``SO_REUSEPORT``: the kernel spreads new
connections evenly over them; one shared socket left most of a burst of connections with whichever worker woke
first), starts N spawned workers (each loads the base model once and runs its own engine and micro-batching) and
restarts a worker that dies on the same socket, whose queued connections wait for it. What the workers share lives
in a run directory the parent creates and removes:

- ``metrics/``: prometheus_client's multiprocess files, so that ``/metrics`` of any worker renders every worker's
  series (counters and histograms summed; gauges as :mod:`service.metrics` says);
- ``answers.sqlite``: the answers kept for feedback, so that a label can come back through any worker.

The bundle store (each worker syncs with it on its own, within ``store_poll_s``) and the feedback log (appends
under ``flock``) are shared already. SIGTERM or SIGINT to the parent reaches each worker once, as SIGTERM: each
drains like a single server; the parent exits when all have.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.context import SpawnProcess
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from service.app import create_app
from service.metrics import MULTIPROCESS_DIR
from service.server import serve
from service.settings import Settings, configure_logging

log = logging.getLogger("caveat.serve")
RAPID_EXIT_S = 10.0  # a worker that dies this soon after its start counts towards giving up
MAX_RAPID_EXITS = 3
ORPHAN_POLL_S = 1.0


def supervise(settings: Settings) -> int:
    """Run ``settings.workers`` workers until SIGTERM/SIGINT; 0 after an orderly stop, 1 when workers keep dying."""
    try:
        sockets = listening_sockets(settings.host, settings.port, settings.workers)
    except OSError as exc:  # what uvicorn says when it cannot bind, without a traceback
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc.strerror or exc)
        return 1
    run_dir = Path(tempfile.mkdtemp(prefix="caveat-serve-"))
    (run_dir / "metrics").mkdir()
    os.environ[MULTIPROCESS_DIR] = str(run_dir / "metrics")  # inherited by the workers, read at their import
    multiprocessing.allow_connection_pickling()
    worker_settings = settings.model_copy(update={"torch_threads": settings.torch_threads or _threads(settings)})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    workers: list[SpawnProcess] = []
    try:
        workers = [_start(worker_settings, sockets[i], run_dir, i) for i in range(settings.workers)]
        log.info("supervising %d workers on %s:%d (pids %s; %d torch threads each)", len(workers), settings.host,
                 sockets[0].getsockname()[1], ", ".join(str(w.pid) for w in workers),
                 worker_settings.torch_threads)  # fmt: skip
        return _watch(workers, worker_settings, sockets, run_dir, stop)
    finally:
        _stop(workers, settings.drain_s)
        for sock in sockets:
            sock.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` sockets listening on ``host:port`` with ``SO_REUSEPORT`` (port 0: the first one's free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, sockets[0].getsockname()[1] if sockets else port))
        sock.listen(2048)
        sock.set_inheritable(True)
        sockets.append(sock)
    return sockets


def _threads(settings: Settings) -> int:
    return max(1, len(os.sched_getaffinity(0)) // settings.workers)


def _start(settings: Settings, sock: socket.socket, run_dir: Path, index: int) -> SpawnProcess:
    worker = multiprocessing.get_context("spawn").Process(
        target=_serve, args=(settings, sock, run_dir, os.getpid()), name=f"caveat-worker-{index}"
    )
    worker.start()
    worker.started_at = time.monotonic()  # type: ignore[attr-defined]
    return worker


def _watch(
    workers: list[SpawnProcess], settings: Settings, sockets: list[socket.socket], run_dir: Path, stop: threading.Event
) -> int:
    """Restart workers that die, until ``stop``; 1 when they die soon after starting again and again."""
    rapid_exits = 0
    while not stop.wait(0.5):
        for index, worker in enumerate(workers):
            if worker.is_alive():
                continue
            mark_process_dead(worker.pid, str(run_dir / "metrics"))  # its live gauges go; its counters stay
            rapid = time.monotonic() - worker.started_at < RAPID_EXIT_S  # type: ignore[attr-defined]
            rapid_exits = rapid_exits + 1 if rapid else 0
            if rapid_exits >= MAX_RAPID_EXITS:
                log.error("worker %d exited %d times within %g s of its start (last exit code %s); stopping",
                          index, rapid_exits, RAPID_EXIT_S, worker.exitcode)  # fmt: skip
                return 1
            log.warning("worker %d (pid %d) exited with code %s; starting another", index, worker.pid, worker.exitcode)
            workers[index] = _start(settings, sockets[index], run_dir, index)
    return 0


def _stop(workers: list[SpawnProcess], drain_s: float) -> None:
    """SIGTERM each worker once; wait for the drains (uvicorn's 30 s graceful shutdown after ``drain_s``)."""
    for worker in workers:
        if worker.is_alive():
            os.kill(worker.pid, signal.SIGTERM)
    deadline = time.monotonic() + drain_s + 40
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            log.error("worker pid %d did not stop in time; killing it", worker.pid)
            worker.kill()
            worker.join()


def _serve(settings: Settings, sock: socket.socket, run_dir: Path, parent: int) -> None:
    """A worker: the app on the parent's socket, in a process group of its own (a terminal's Ctrl-C reaches the
    parent only, which passes it on once); it stops when the parent is gone."""
    os.setpgrp()
    configure_logging(settings.log_level)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    serve(create_app(settings, shared=run_dir), settings, sockets=[sock])


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(ORPHAN_POLL_S)
    log.error("the supervisor (pid %d) is gone; stopping", parent)
    os.kill(os.getpid(), signal.SIGTERM)

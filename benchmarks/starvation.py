"""A bigger request among a stream of small ones: does it wait for the stream to stop?

The engine (in-process, its real loop and worker thread; no HTTP) serves ``--concurrency`` closed-loop clients
for each ``--scenarios`` mix (Rotten Tomatoes snippets, one per request):

* ``starve``: ``--concurrency`` − 1 clients send ``map`` requests and one client sends ``sample`` requests of
  ``--big-samples`` samples, bigger than the room the small ones leave in a step;
* ``mixed``: the clients take ``sample`` (S = ``--samples``), ``map`` and ``glm`` in turn.

Two arms alternate for ``--rounds`` rounds (the order flips each round, so drift on a shared machine hits both
alike), each a fresh engine on the calibrated step:

* ``small_first``: the engine before jobs were aged: small jobs fill each step whole, and the oldest job left
  out gets only the room they leave (``MAX_PASSED_OVER`` set out of reach);
* ``aged``: a job passed over ``MAX_PASSED_OVER`` times has its pieces run first (the engine as it is).

Reported per arm: req/s, network rows per second (inputs × samples: the work done) and latency p50/p99 per
kind of request over ``--seconds`` after ``--warmup`` seconds, the longest any request of the kind waited
(warm-up and the drain after the window included: a starved request is answered only once the stream stops),
and the steps' seconds against ``step_ms`` (p50, p90, max). Usage::

    python benchmarks/starvation.py --model minilm --json OUT.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: benchmarks.* importable

from adapters.store import BundleStore
from adapters.vocab import PredictiveMode
from benchmarks.overhead import bodies, make_job, run_in_process
from service import engine as engine_module
from service.engine import BatchingConfig, Engine
from service.host import ModelHost
from service.metrics import Metrics
from service.registry import AdapterRegistry, AdapterVersion

SCENARIOS = ("starve", "mixed")
ARMS = ("small_first", "aged")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "minilm"], default="minilm")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    parser.add_argument("--samples", type=int, default=16, help="network samples (sample) or logit draws (glm)")
    parser.add_argument("--big-samples", type=int, default=64, help="samples of the bigger request (starve)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per arm and round")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (the order flips each round)")
    parser.add_argument("--step-ms", type=float, help="the step's target duration (default: the device's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    return parser.parse_args()


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(100 * q) - 1] if len(values) > 1 else values[0]


async def run_arm(args: argparse.Namespace, host: ModelHost, step_tokens: int, step_ms: float,
                  adapter: AdapterVersion, clients: list[tuple[str, list[str]]]) -> dict:  # fmt: skip
    """One arm: a fresh engine under the closed-loop clients (each a label and its request bodies); its steps,
    throughput and latencies."""
    engine = Engine(host, BatchingConfig(step_tokens=step_tokens), Metrics())
    steps: list[tuple[float, float]] = []  # (when it ended, seconds)
    run = engine.worker.run_isolated

    def timed(pieces: list) -> dict:
        start = time.perf_counter()
        try:
            return run(pieces)
        finally:
            now = time.perf_counter()
            steps.append((now, now - start))

    engine.worker.run_isolated = timed  # type: ignore[method-assign]
    latencies: dict[str, list[float]] = {label: [] for label, _ in clients}
    longest: dict[str, float] = dict.fromkeys(latencies, 0.0)  # any request of the arm, warm-up and drain too
    rows: dict[str, int] = dict.fromkeys(latencies, 0)  # network rows of the requests answered in the window
    begin = time.perf_counter()
    measure_from, end = begin + args.warmup, begin + args.warmup + args.seconds

    async def client(index: int) -> None:
        label, mix = clients[index]
        sent = index
        while time.perf_counter() < end:
            job = make_job(adapter, host, mix[sent % len(mix)])
            sent += len(clients)
            start = time.perf_counter()
            await engine.submit(job)
            done = time.perf_counter()
            longest[label] = max(longest[label], done - start)
            if start >= measure_from and done <= end:
                latencies[label].append(done - start)
                rows[label] += job.rows

    engine.start()
    try:
        await asyncio.gather(*(client(i) for i in range(len(clients))))
    finally:
        await engine.close()
    measured = [seconds for ended, seconds in steps if measure_from <= ended <= end]
    return {
        "rps": round(sum(len(v) for v in latencies.values()) / args.seconds, 2),
        "rows_per_s": round(sum(rows.values()) / args.seconds, 1),
        "requests": {
            label: {
                "rps": round(len(values) / args.seconds, 2),
                "rows_per_s": round(rows[label] / args.seconds, 1),
                "p50_ms": round(1000 * statistics.median(values), 1) if values else None,
                "p99_ms": round(1000 * quantile(values, 0.99), 1) if values else None,
                "longest_ms": round(1000 * longest[label], 1),
            }
            for label, values in latencies.items()
        },
        "steps": len(measured),
        "step_p50_ms": round(1000 * statistics.median(measured), 1),
        "step_p90_ms": round(1000 * quantile(measured, 0.9), 1),
        "step_max_ms": round(1000 * max(measured), 1),
    }


def clients_of(scenario: str, args: argparse.Namespace, texts: list[str]) -> list[tuple[str, list[str]]]:
    """The scenario's clients: a label (what its latencies are reported under) and its request bodies."""
    if scenario == "starve":
        big = (f"sample S={args.big_samples}", bodies(PredictiveMode.SAMPLE, args.big_samples, texts))
        return [("map", bodies(PredictiveMode.MAP, args.samples, texts))] * (args.concurrency - 1) + [big]
    methods = [PredictiveMode.SAMPLE, PredictiveMode.MAP, PredictiveMode.GLM]
    return [(str(m), bodies(m, args.samples, texts)) for m in (methods[i % 3] for i in range(args.concurrency))]


async def measure(args: argparse.Namespace, base: Path, adapters: Path, texts: list[str]) -> dict:
    torch.set_num_threads(args.threads)
    host = ModelHost(str(base))
    host.warm_up()
    step_ms = args.step_ms or host.default_step_ms
    calibration = host.calibrate(step_ms)
    registry = AdapterRegistry(host, BundleStore(adapters), budget_bytes=1 << 31)
    await registry.load_store()
    adapter = await registry.acquire("main")
    aged = engine_module.MAX_PASSED_OVER
    results: dict = {"step_tokens": calibration.step_tokens, "step_ms": step_ms, "scenarios": {}}
    for scenario in args.scenarios:
        clients, rounds = clients_of(scenario, args, texts), []
        for round_ in range(args.rounds):
            arms = {}
            for arm in ARMS if round_ % 2 == 0 else ARMS[::-1]:
                engine_module.MAX_PASSED_OVER = aged if arm == "aged" else 1 << 30
                try:
                    arms[arm] = await run_arm(args, host, calibration.step_tokens, step_ms, adapter, clients)
                finally:
                    engine_module.MAX_PASSED_OVER = aged
                print(scenario, round_, arm, json.dumps(arms[arm]), flush=True)
            rounds.append(arms)
        results["scenarios"][scenario] = rounds
    return results


def main() -> None:
    run_in_process(parse_args(), measure)


if __name__ == "__main__":
    main()

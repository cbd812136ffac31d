"""Padding across requests: one step's batched forward with and without ``split_padding``, in-process.

The step is the one the engine forms when ``--concurrency`` requests of the real mix wait (Rotten Tomatoes
snippets of 5 to 60-odd tokens; S = 16 samples, or the GLM's one row per input). Its batched forward runs
twice per round, once joining requests of any lengths up to the CPU token budget (``split_padding=None``,
the server before calibration measured it) and once ending a forward where joining would pad more than
the calibrated ``split_padding``; the two alternate for ``--rounds`` rounds so that drift on a shared
machine hits both alike. Usage::

    python benchmarks/padding.py --model minilm --threads 2 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: benchmarks.* importable

from adapters.store import BundleStore
from adapters.vocab import PredictiveMode
from benchmarks.overhead import batched_forward, bodies, make_job, run_in_process, step_of
from service.engine import BatchingConfig, Engine
from service.host import ModelHost
from service.metrics import Metrics
from service.registry import AdapterRegistry


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "minilm"], default="minilm")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--methods", nargs="+", default=["sample", "glm"], choices=list(PredictiveMode))
    parser.add_argument("--concurrency", type=int, default=16, help="requests waiting when the step forms")
    parser.add_argument("--samples", type=int, default=16, help="network samples of a sampled request")
    parser.add_argument("--steps", type=int, default=4, help="different steps (request mixes) per method")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per step")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    return parser.parse_args()


async def measure(args: argparse.Namespace, base: Path, adapters: Path, texts: list[str]) -> dict:
    torch.set_num_threads(args.threads)
    host = ModelHost(str(base))
    host.warm_up()
    calibration = host.calibrate(host.default_step_ms)
    registry = AdapterRegistry(host, BundleStore(adapters), budget_bytes=1 << 31)
    await registry.load_store()
    adapter = await registry.acquire("main")
    engine = Engine(host, BatchingConfig(step_tokens=calibration.step_tokens), Metrics())
    results: dict = {"split_padding": calibration.split_padding, "step_tokens": calibration.step_tokens}
    for method in args.methods:
        mix = bodies(method, args.samples, texts)
        points = []
        for step in range(args.steps):
            jobs = [
                make_job(adapter, host, mix[(step * args.concurrency + i) % len(mix)]) for i in range(args.concurrency)
            ]
            pieces = await step_of(engine, jobs)
            forward = batched_forward(host, method, pieces, engine)
            timings: dict[str, list[float]] = {"joined": [], "split": []}
            for _ in range(args.rounds):
                for label, padding in (("joined", None), ("split", calibration.split_padding)):
                    host.split_padding = padding
                    forward()  # this layout's first call: allocator
                    start = time.perf_counter()
                    forward()
                    timings[label].append(time.perf_counter() - start)
            joined, split = (statistics.median(timings[k]) for k in ("joined", "split"))
            points.append({
                "requests": len({id(p.job) for p in pieces}),
                "rows": sum(p.rows for p in pieces),
                "joined_ms": round(1000 * joined, 2),
                "split_ms": round(1000 * split, 2),
                "joined_over_split": round(joined / split, 3),
            })  # fmt: skip
            print(method, json.dumps(points[-1]), flush=True)
        results[method] = points
    return results


def main() -> None:
    run_in_process(parse_args(), measure, "steps")


if __name__ == "__main__":
    main()

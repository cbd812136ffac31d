"""One process against ``caveat-serve --workers 2``, side by side in one run, under ``wrk``.

The servers run at once (idle but for the one under load): one process with its default torch threads (every
CPU), one process with one torch thread (on a tiny model the better of the two), and ``--workers`` workers with
their default (the CPUs divided among them). For each ``--methods`` (S = ``--samples``) and ``--concurrency``,
``--rounds`` alternating ``wrk`` runs of ``--duration`` seconds per server: req/s (median over rounds), p50 and p99,
and the ratio of the workers to the better single process at that point. The adapter is
``benchmarks.overhead``'s synthetic bundle with the embedded default's shape. Usage::

    python benchmarks/workers.py --model tiny --json docs/benchmarks/workers-cpu-tiny.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: benchmarks.* importable

from benchmarks.harness import ServerProcess
from benchmarks.overhead import bodies, prepared, wrk


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "minilm"], default="tiny")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--workers", type=int, default=2, help="the multi-process server's workers")
    parser.add_argument("--methods", nargs="+", default=["map", "sample"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--samples", type=int, default=16, help="network samples of method sample")
    parser.add_argument("--duration", type=int, default=5, help="seconds of wrk load per point")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per server and point")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with prepared(args) as run:
        layouts = {"one": ["--workers", "1"], "one_1_thread": ["--workers", "1", "--torch-threads", "1"],
                   "workers": ["--workers", str(args.workers)]}  # fmt: skip
        servers = {
            name: ServerProcess.start(run.base, run.adapters, run.root / f"{name}.log", *flags, "--queue-size",
                                      "4096", "--feedback-dir", str(run.root / f"feedback-{name}"))
            for name, flags in layouts.items()
        }  # fmt: skip
        try:
            run.results["points"] = measure(args, servers, run.root, run.texts)
        finally:
            for server in servers.values():
                server.stop()
        print(markdown(run.results["points"], args.workers))


def measure(args: argparse.Namespace, servers: dict[str, ServerProcess], root: Path, texts: list[str]) -> list:
    points = []
    for method in args.methods:
        body_file = root / f"{method}.jsonl"
        body_file.write_text("\n".join(bodies(method, args.samples, texts)) + "\n")
        for server in servers.values():
            wrk(server.url, max(args.concurrency), 1, body_file)  # warm-up
        for concurrency in args.concurrency:
            runs: dict[str, list[dict]] = {name: [] for name in servers}
            for _ in range(args.rounds):
                for name, server in servers.items():
                    runs[name].append(wrk(server.url, concurrency, args.duration, body_file))
            point = {"method": method, "concurrency": concurrency}
            for name, measured in runs.items():
                point[name] = {
                    "rps": statistics.median(r["rps"] for r in measured),
                    "p50_ms": statistics.median(r["p50_ms"] for r in measured),
                    "p99_ms": statistics.median(r["p99_ms"] for r in measured),
                    "errors": sum(r["errors"] for r in measured),
                    "runs": measured,
                }
            best = max(point["one"]["rps"], point["one_1_thread"]["rps"])
            point["ratio"] = round(point["workers"]["rps"] / best, 2)
            print(json.dumps({k: v for k, v in point.items() if k not in servers}), flush=True)
            points.append(point)
    return points


def markdown(points: list[dict], workers: int) -> str:
    lines = [
        "| method | c | 1 process (all threads): req/s | p50 ms | 1 process (1 thread): req/s | p50 ms | "
        f"{workers} workers: req/s | p50 ms | p99 ms | workers / better single |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        one, thin, many = p["one"], p["one_1_thread"], p["workers"]
        lines.append(
            f"| {p['method']} | {p['concurrency']} | {one['rps']:.0f} | {one['p50_ms']:.1f} | {thin['rps']:.0f} | "
            f"{thin['p50_ms']:.1f} | {many['rps']:.0f} | {many['p50_ms']:.1f} | {many['p99_ms']:.1f} | "
            f"{p['ratio']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

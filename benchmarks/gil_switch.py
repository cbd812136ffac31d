"""Does the GIL's switch interval change what the server serves? One GIL option of issue #15, measured.

The event loop (HTTP, validation, serialisation) and the engine's worker thread (the forward) share one
interpreter. CPython hands the GIL over every ``sys.getswitchinterval()`` seconds (5 ms by default) when another
thread waits for it, so a shorter interval lets the event loop answer sooner while the worker runs Python, at
the price of more handovers. This runs the tiny-model server of ``benchmarks/overhead.py`` (S = 16, ``sample``)
under ``wrk`` once per interval, ``--rounds`` times alternately, at concurrency 1 and 64, beside
``GET /health/live`` at 64::

    python benchmarks/gil_switch.py --json docs/benchmarks/gil-switch-cpu.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: benchmarks.* importable

from benchmarks.harness import ServerProcess, write_results
from benchmarks.overhead import bodies, prepare, uptime, wrk
from benchmarks.serve import machine
from training.data import rotten_tomatoes_snippets

ENTRY = (  # python -c ENTRY <interval s> <caveat-serve flags>
    "import sys; sys.setswitchinterval(float(sys.argv[1])); from service.cli import main; sys.exit(main(sys.argv[2:]))"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intervals-ms", type=float, nargs="+", default=[5.0, 1.0, 0.2])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over the intervals")
    parser.add_argument("--duration", type=int, default=5, help="seconds of wrk load per point")
    parser.add_argument("--json", type=Path)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    texts = [e.text for e in rotten_tomatoes_snippets()[:256]]
    results: dict = {"machine": {**machine(), "uptime_before": uptime()}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, adapters = prepare("tiny", 16, root)
        body_file = root / "sample.jsonl"
        body_file.write_text("\n".join(bodies("sample", 16, texts)) + "\n")
        for round_ in range(args.rounds):
            for interval in args.intervals_ms:
                entry = ("-c", ENTRY, str(interval / 1000))
                server = ServerProcess.start(
                    base, adapters, root / "server.log", "--torch-threads", "1", "--queue-size", "4096", entry=entry
                )
                try:
                    wrk(server.url, 64, 1, body_file)  # warm-up
                    run = {"round": round_, "interval_ms": interval, "load": uptime()}
                    run["sample"] = {c: wrk(server.url, c, args.duration, body_file) for c in (1, 64)}
                    run["health_c64"] = wrk(f"{server.url}/health/live", 64, args.duration)
                finally:
                    server.stop()
                results["runs"].append(run)
                print(
                    f"round {round_} interval {interval:g} ms: sample c=1 {run['sample'][1]['rps']} req/s "
                    f"(p50 {run['sample'][1]['p50_ms']} ms), c=64 {run['sample'][64]['rps']} req/s "
                    f"(p50 {run['sample'][64]['p50_ms']} ms); health c=64 {run['health_c64']['rps']} req/s",
                    flush=True,
                )
    results["machine"]["uptime_after"] = uptime()
    write_results(args.json, results)


if __name__ == "__main__":
    main()

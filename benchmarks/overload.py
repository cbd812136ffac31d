"""Overload benchmark: one very costly request in a steady stream of small ones, against a real server.

The server (``caveat-serve`` on 127.0.0.1, its own process) serves the embedded MiniLM with a synthetic bundle
of the embedded default's shape (r=16 on query, key, value and the feed-forward maps, Kronecker posterior,
max length 128). This process is the load generator (asyncio + httpx, never the server's interpreter): an
open-loop stream of small requests (one review snippet, ``--small-samples`` samples) at ``--rate`` per
second for ``--duration`` seconds, and ``--after`` seconds in, the big request of the hostile probe: 64
inputs of ~800 characters, ``method: sample, num_samples: 128`` (8,192 rows).

Scenarios, each a fresh server:

* ``default``: the default limits, so the big request's estimated cost is over ``max_request_tokens`` (413);
* ``admitted``: limits raised so the big request is admitted; it runs in pieces between the small requests
  until its deadline (504), then stops;
* ``one-step``: as ``admitted`` but ``--step-tokens`` so large that the big request is one step (how the
  engine behaved before it was cut into pieces).

Reported per scenario: the small requests' p50, p99 and max latency (over all of them, refused or timed out
ones included) and status counts, the big request's
status and seconds, and the server's peak resident memory. Usage::

    python benchmarks/overload.py --json OUT.json [--scenarios default admitted one-step] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: benchmarks.* importable

from adapters.architectures import BERT_TARGETS
from adapters.embedded import resolve_model
from benchmarks.harness import ServerProcess, synthetic_bundle, write_results
from benchmarks.serve import machine
from training.data import rotten_tomatoes_snippets

SCENARIOS = {
    "default": [],
    "admitted": ["--max-request-tokens", "4000000", "--queue-tokens", "8000000"],
    "one-step": ["--max-request-tokens", "4000000", "--queue-tokens", "8000000", "--step-tokens", "100000000"],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--rate", type=float, default=2.0, help="small requests per second (open loop)")
    parser.add_argument("--small-samples", type=int, default=8)
    parser.add_argument("--duration", type=float, default=45.0, help="seconds of small requests")
    parser.add_argument("--after", type=float, default=5.0, help="seconds before the big request is sent")
    parser.add_argument("--threads", type=int, default=2, help="server torch threads")
    parser.add_argument("--timeout", type=float, default=30.0, help="the server's request timeout")
    parser.add_argument("--step-tokens", type=int, help="the server's step (default: its own) but for one-step")
    return parser.parse_args()


async def run_scenario(server: ServerProcess, args: argparse.Namespace, texts: list[str]) -> dict:
    small: list[tuple[float, int]] = []  # (seconds, status)
    big: dict = {}
    start = time.perf_counter()

    async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=httpx.Limits(max_connections=512)) as http:

        async def one_small(i: int) -> None:
            body = {"adapter": "main", "inputs": [texts[i % len(texts)]], "num_samples": args.small_samples,
                    "method": "sample"}  # fmt: skip
            t = time.perf_counter()
            response = await http.post("/v1/predict", json=body)
            small.append((time.perf_counter() - t, response.status_code))

        async def the_big_one() -> None:
            await asyncio.sleep(args.after)
            inputs = [" ".join(texts[i * 6 : i * 6 + 6])[:800].ljust(800, ".") for i in range(64)]
            body = {"adapter": "main", "inputs": inputs, "method": "sample", "num_samples": 128}
            t = time.perf_counter()
            response = await http.post("/v1/predict", json=body)
            big.update(status=response.status_code, seconds=round(time.perf_counter() - t, 2),
                       sent_at_s=round(t - start, 2))  # fmt: skip

        tasks = [asyncio.create_task(the_big_one())]
        i = 0
        while time.perf_counter() - start < args.duration:
            tasks.append(asyncio.create_task(one_small(i)))
            i += 1
            await asyncio.sleep(1.0 / args.rate)
        await asyncio.gather(*tasks)
    ok = sorted(s for s, _ in small)  # every small request, answered or not (a 504 counts its 30 s)
    statuses: dict[str, int] = {}
    for _, status in small:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "small_requests": len(small),
        "small_statuses": statuses,
        "small_p50_s": round(statistics.median(ok), 3) if ok else None,
        "small_p99_s": round(ok[min(len(ok) - 1, int(0.99 * len(ok)))], 3) if ok else None,
        "small_max_s": round(ok[-1], 3) if ok else None,
        "big": big,
        "server_peak_rss_mb": peak_rss_mb(server),
        "load_average_1min": round(os.getloadavg()[0], 2),  # above 2 on two cores: something else was running
    }


def peak_rss_mb(server: ServerProcess) -> float | None:
    """The server process's peak resident set (VmHWM), Linux only."""
    status = Path(f"/proc/{server.process.pid}/status")
    if not status.exists():
        return None
    line = next((x for x in status.read_text().splitlines() if x.startswith("VmHWM")), None)
    return round(int(line.split()[1]) / 1024, 1) if line else None


def main() -> None:
    args = parse_args()
    texts = [e.text for e in rotten_tomatoes_snippets()[:1024]]
    results: dict = {"config": {k: str(v) for k, v in vars(args).items()}, "machine": machine(), "scenarios": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic_bundle(
            resolve_model("minilm"), root / "adapters" / "main", name="main", targets=BERT_TARGETS, rank=16,
            family="kron", variance=1e-3, num_samples=args.small_samples, max_length=128,
        )  # fmt: skip
        for name in args.scenarios:
            flags = ["--torch-threads", str(args.threads), "--request-timeout-s", str(args.timeout)]
            if args.step_tokens and name != "one-step":
                flags += ["--step-tokens", str(args.step_tokens)]
            flags += SCENARIOS[name]
            server = ServerProcess.start("minilm", root / "adapters", root / f"{name}.log", *flags)
            try:
                result = asyncio.run(run_scenario(server, args, texts))
            finally:
                server.stop()
            results["scenarios"][name] = result
            print(name, json.dumps(result), flush=True)
    write_results(args.json, results)


if __name__ == "__main__":
    main()

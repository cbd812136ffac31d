"""``caveat-serve --engine ray`` on this machine: 1 against 2 worker replicas, adapter affinity, a killed replica, a
hot swap. Each server is a real ``caveat-serve --engine ray`` process (its own local Ray cluster); the load comes
from ``wrk`` (throughput) or from this process's HTTP clients (per-request statuses), never from a server's
interpreter.

* **throughput**: for ``--methods`` (S = ``--samples``) at ``--concurrency``, req/s, p50, p99 of 1 and of 2 replicas,
  ``--rounds`` times alternately (one cluster at a time; each round starts its own), medians and the ratio;
* **affinity**: 2 replicas holding ``--per-replica`` adapters each, ``--adapters`` adapters, ``--requests`` requests
  whose adapters follow a Zipf law (exponent ``--zipf``): the share answered by a replica that already held the
  adapter (1 − loads / requests, loads summed over the replicas' ``caveat_adapter_load_seconds``), beside the share a
  perfect router would reach (one least-recently-used cache of the replicas' whole capacity over the same sequence);
* **kill**: SIGKILL to one replica under ``--kill-clients`` clients: every status, the slowest answer, none hung;
* **swap**: a new version through the admin API: seconds until every answer carries it.

    python benchmarks/ray_replicas.py --json docs/benchmarks/ray-cpu-tiny.json
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: benchmarks.* importable

from adapters.architectures import BERT_TARGETS
from benchmarks.harness import ServerProcess, synthetic_bundle
from benchmarks.overhead import bodies, prepared, wrk

TEXT = "a gorgeous, witty, seductive movie."


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "minilm"], default="tiny")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--parts", nargs="+", default=["throughput", "affinity", "kill", "swap"])
    parser.add_argument("--methods", nargs="+", default=["map", "sample"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--duration", type=int, default=5, help="seconds of wrk load per point")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--adapters", type=int, default=50)
    parser.add_argument("--per-replica", type=int, default=10)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--zipf", type=float, default=1.2)
    parser.add_argument("--kill-clients", type=int, default=8)
    return parser.parse_args()


def start(base: Path, adapters: Path, log: Path, replicas: int, *flags: str) -> ServerProcess:
    flags = ("--engine", "ray", "--replicas", str(replicas), "--queue-size", "4096", "--feedback-dir",
             str(log.parent / "feedback"), *flags)  # fmt: skip
    return ServerProcess.start(base, adapters, log, *flags, timeout_s=300)


def throughput(args: argparse.Namespace, base: Path, adapters: Path, root: Path, texts: list[str]) -> list[dict]:
    runs: dict[tuple[str, int, int], list[dict]] = collections.defaultdict(list)
    for round_ in range(args.rounds):
        for replicas in (1, 2):
            server = start(base, adapters, root / f"throughput-{replicas}-{round_}.log", replicas)
            try:
                for method in args.methods:
                    body_file = root / f"{method}.jsonl"
                    body_file.write_text("\n".join(bodies(method, args.samples, texts)) + "\n")
                    wrk(server.url, max(args.concurrency), 2, body_file)  # warm-up: every replica loads the adapter
                    for concurrency in args.concurrency:
                        point = wrk(server.url, concurrency, args.duration, body_file)
                        runs[method, concurrency, replicas].append(point)
                        print(method, concurrency, replicas, point, flush=True)
            finally:
                server.stop()
    points = []
    for method in args.methods:
        for concurrency in args.concurrency:
            point: dict = {"method": method, "concurrency": concurrency}
            for replicas in (1, 2):
                measured = runs[method, concurrency, replicas]
                point[f"replicas_{replicas}"] = {
                    "rps": statistics.median(r["rps"] for r in measured),
                    "p50_ms": statistics.median(r["p50_ms"] for r in measured),
                    "p99_ms": statistics.median(r["p99_ms"] for r in measured),
                    "errors": sum(r["errors"] for r in measured),
                    "runs": measured,
                }
            point["ratio"] = round(point["replicas_2"]["rps"] / point["replicas_1"]["rps"], 2)
            points.append(point)
    return points


def metric_sum(client: httpx.Client, name: str) -> float:
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def zipf_sequence(count: int, adapters: int, exponent: float, seed: int = 0) -> list[int]:
    weights = [1 / (rank + 1) ** exponent for rank in range(adapters)]
    return random.Random(seed).choices(range(adapters), weights=weights, k=count)


def lru_hits(sequence: list[int], capacity: int) -> int:
    cache: collections.OrderedDict[int, None] = collections.OrderedDict()
    hits = 0
    for item in sequence:
        if item in cache:
            hits += 1
            cache.move_to_end(item)
        else:
            cache[item] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits


def affinity(args: argparse.Namespace, base: Path, root: Path) -> dict:
    adapters = root / "many"
    for index in range(args.adapters):
        synthetic_bundle(base, adapters / f"a{index:02d}", name=f"a{index:02d}", seed=index, max_length=64)
    sequence = zipf_sequence(args.requests, args.adapters, args.zipf)
    server = start(base, adapters, root / "affinity.log", 2, "--adapters-per-replica", str(args.per_replica))
    statuses: collections.Counter[int] = collections.Counter()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            before = metric_sum(client, "caveat_adapter_load_seconds_count")
            for index in sequence:  # one client: each request's routing sees the replicas' last holdings
                body = {"adapter": f"a{index:02d}", "inputs": [TEXT], "method": "map"}
                statuses[client.post("/v1/predict", json=body).status_code] += 1
            loads = metric_sum(client, "caveat_adapter_load_seconds_count") - before
    finally:
        server.stop()
    ideal = lru_hits(sequence, 2 * args.per_replica)
    return {
        "requests": len(sequence), "statuses": dict(statuses), "loads": loads,
        "held_share": round(1 - loads / len(sequence), 4), "perfect_router_share": round(ideal / len(sequence), 4),
        "distinct_adapters_requested": len(set(sequence)),
    }  # fmt: skip


def worker_pids() -> list[int]:
    """The worker replicas' processes (Ray titles them ``ray::ServeReplica:<app>:CaveatWorker``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"ServeReplica:caveat:CaveatWorker" in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return sorted(pids)


def kill(args: argparse.Namespace, base: Path, adapters: Path, root: Path) -> dict:
    """Under load, SIGKILL one worker replica, let Ray replace it, then the other (so that one of them held the
    adapter the load is for)."""
    server = start(base, adapters, root / "kill.log", 2)
    results: list[tuple[int, float]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 50
    kills = []

    def load() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while time.monotonic() < stop_at:
                began = time.monotonic()
                try:
                    status = client.post("/v1/predict", json={"adapter": "main", "inputs": [TEXT]}).status_code
                except httpx.HTTPError:
                    status = 0  # no answer (a hang ends at the 30 s timeout)
                with lock:
                    results.append((status, time.monotonic() - began))

    try:
        with ThreadPoolExecutor(args.kill_clients) as pool:
            futures = [pool.submit(load) for _ in range(args.kill_clients)]
            for delay in (5, 20):
                time.sleep(delay)
                pids = worker_pids()
                os.kill(pids[0], signal.SIGKILL)
                kills.append({"pid": pids[0], "replicas_before": len(pids), "at_request": len(results)})
            for future in futures:
                future.result()
        replicas_after = len(worker_pids())
    finally:
        server.stop()
    statuses = collections.Counter(status for status, _ in results)
    return {"clients": args.kill_clients, "kills": kills, "replicas_after": replicas_after, "statuses": dict(statuses),
            "slowest_s": round(max(seconds for _, seconds in results), 2)}  # fmt: skip


def swap(base: Path, adapters: Path, root: Path) -> dict:
    server = start(base, adapters, root / "swap.log", 2, "--store-poll-s", "2")
    staged = adapters / "staged" / "main-2"
    synthetic_bundle(base, staged, name="main", version="2", targets=BERT_TARGETS, rank=16, family="kron", seed=5)
    try:
        with server.admin() as client, ThreadPoolExecutor(8) as pool:

            def version(_: int) -> str:
                answer = client.post("/v1/predict", json={"adapter": "main", "inputs": [TEXT]}).json()
                return answer["adapter"]["version"]

            list(pool.map(version, range(32)))  # both replicas hold version 1
            assert client.put("/v1/adapters/main", json={"path": str(staged)}).status_code == 200
            swapped = time.monotonic()
            while set(pool.map(version, range(16))) != {"2"} and time.monotonic() - swapped < 60:
                pass
            seconds = time.monotonic() - swapped
            after = collections.Counter(pool.map(version, range(200)))
    finally:
        server.stop()
    return {"seconds_until_every_answer_has_it": round(seconds, 2), "versions_of_the_next_200": dict(after)}


def main() -> None:
    args = parse_args()
    with prepared(args) as run:
        results = run.results
        if "throughput" in args.parts:
            results["throughput"] = throughput(args, run.base, run.adapters, run.root, run.texts)
        if "affinity" in args.parts:
            results["affinity"] = affinity(args, run.base, run.root)
            print("affinity", results["affinity"], flush=True)
        if "kill" in args.parts:
            results["kill"] = kill(args, run.base, run.adapters, run.root)
            print("kill", results["kill"], flush=True)
        if "swap" in args.parts:
            results["swap"] = swap(run.base, run.adapters, run.root)
            print("swap", results["swap"], flush=True)
        for point in results.get("throughput", []):
            one, two = point["replicas_1"], point["replicas_2"]
            print(f"| {point['method']} | {point['concurrency']} | {one['rps']:.0f} | {one['p50_ms']:.1f} | "
                  f"{two['rps']:.0f} | {two['p50_ms']:.1f} | {point['ratio']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()

"""Serving benchmark: real ``caveat-serve`` processes under closed-loop HTTP load.

Measured in one run, on one machine:

* a concurrency sweep (``--concurrency`` bounded client loops, one real review snippet per request,
  ``--samples`` posterior samples each) with micro-batching on and off: throughput, p50 and p99 latency;
* adapter load-to-first-prediction: admin ``POST /v1/adapters`` of a bundle, then its first prediction;
* throughput with the requests spread over 8 adapters against all on one (batching on).

The adapter is ``--bundle`` (a trained bundle, e.g. ``bundles/sst2-minilm``) or, by default, a synthetic
bundle for ``--base-model`` with the embedded default's shape (r=16 on query, key, value and the
feed-forward maps, Kronecker posterior): serving cost does not depend on what the cores learned. The load
generator (asyncio + httpx) runs in this process, on the same machine as the server. Usage::

    python benchmarks/serve.py --json OUT.json [--bundle DIR] [--base-model minilm] [--concurrency 1 4 16 64]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: benchmarks.harness importable

from adapters.architectures import BERT_TARGETS  # MiniLM is a BERT: every attention and MLP map
from adapters.bundle import load_bundle, save_bundle
from adapters.embedded import resolve_model
from benchmarks.harness import ServerProcess, synthetic_bundle, write_results
from training.data import rotten_tomatoes_snippets


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--base-model", default="minilm")
    parser.add_argument("--bundle", type=Path, help="a trained bundle for --base-model (default: synthetic)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--samples", type=int, default=16, help="network samples (sample) or logit draws (glm)")
    parser.add_argument("--method", default="sample", choices=["sample", "glm", "map"], help="predictive per request")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds measured per point")
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds of load before each measurement")
    parser.add_argument("--threads", type=int, default=None, help="server torch threads (default: torch's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-batch-rows", type=int, default=512)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--loads", type=int, default=5, help="adapter load-to-first-prediction repeats")
    return parser.parse_args()


# ------------------------------------------------------------------------------------------------ load


async def closed_loop(url: str, adapters: list[str], concurrency: int, samples: int, seconds: float,
                      warmup: float, texts: list[str], method: str = "sample") -> dict:  # fmt: skip
    """``concurrency`` loops, each sending its next request when the last is answered."""
    latencies: list[float] = []
    errors = 0
    measuring = False

    async def loop(index: int, client: httpx.AsyncClient, stop_at: float) -> None:
        nonlocal errors
        i = index
        while time.perf_counter() < stop_at:
            body = {"adapter": adapters[i % len(adapters)], "inputs": [texts[i % len(texts)]],
                    "num_samples": samples, "method": method}  # fmt: skip
            i += concurrency
            start = time.perf_counter()
            response = await client.post("/v1/predict", json=body)
            if not measuring:
                continue
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(loop(i, client, time.perf_counter() + warmup) for i in range(concurrency)))
        measuring = True
        start = time.perf_counter()
        await asyncio.gather(*(loop(i, client, start + seconds) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 3),
        "throughput_rps": round(len(latencies) / elapsed, 2),
        "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1)
        if latencies
        else None,
    }


def load_to_first_prediction(
    server: ServerProcess, names: list[str], samples: int, text: str, method: str
) -> dict[str, list[float]]:
    """Milliseconds from the admin load request to the first answer from the new adapter (``total``), and its
    parts: the load request (``load``), the first prediction (``first``) and the same prediction once more
    (``warm``: what the model costs, so ``first - warm`` is what a fresh adapter adds)."""
    times: dict[str, list[float]] = {"total": [], "load": [], "first": [], "warm": []}
    with server.admin() as admin:
        for name in names:
            body = {"adapter": name, "inputs": [text], "num_samples": samples, "method": method, "seed": 0}
            start = time.perf_counter()
            loaded = admin.post("/v1/adapters", json={"path": f"staged/{name}"})
            loaded_at = time.perf_counter()
            answer = admin.post("/v1/predict", json=body)
            answered_at = time.perf_counter()
            again = admin.post("/v1/predict", json=body)
            warm = time.perf_counter() - answered_at
            if loaded.status_code != 201 or answer.status_code != 200 or again.status_code != 200:
                raise RuntimeError(f"loading {name}: {loaded.text} / {answer.text} / {again.text}")
            for key, seconds in (("total", answered_at - start), ("load", loaded_at - start),
                                 ("first", answered_at - loaded_at), ("warm", warm)):  # fmt: skip
                times[key].append(round(1000 * seconds, 1))
            admin.delete(f"/v1/adapters/{name}")
    return times


# --------------------------------------------------------------------------------------------- bundles


def prepare_adapters(args: argparse.Namespace, root: Path) -> Path:
    """``adapters/main`` served from the start; renamed copies ``staged/a0..a7`` and ``staged/load-i``."""
    adapter_dir = root / "adapters"
    main = adapter_dir / "main"
    if args.bundle is not None:
        shutil.copytree(args.bundle, main)
        rename(main, "main")
    else:
        synthetic_bundle(
            resolve_model(args.base_model), main, name="main", targets=BERT_TARGETS, rank=16, family="kron",
            variance=1e-3, num_samples=args.samples, max_length=128,
        )  # fmt: skip
    for name in [f"a{i}" for i in range(8)] + [f"load-{i}" for i in range(args.loads)]:
        shutil.copytree(main, adapter_dir / "staged" / name)
        rename(adapter_dir / "staged" / name, name)
    return adapter_dir


def rename(directory: Path, name: str) -> None:
    bundle = load_bundle(directory)
    save_bundle(dataclasses.replace(bundle, manifest=bundle.manifest.model_copy(update={"name": name})), directory)


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    args = parse_args()
    texts = [e.text for e in rotten_tomatoes_snippets()[:512]]
    flags = ["--device", args.device, "--dtype", args.dtype, "--queue-size", "4096",
             "--max-batch-rows", str(args.max_batch_rows), "--max-wait-ms", str(args.max_wait_ms)]  # fmt: skip
    if args.threads:
        flags += ["--torch-threads", str(args.threads)]
    results: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    results["machine"] = machine()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapter_dir = prepare_adapters(args, root)
        results["sweep"] = []
        for batching in (True, False):
            server = ServerProcess.start(
                args.base_model, adapter_dir, root / f"server-{batching}.log",
                *flags, "--batching" if batching else "--no-batching",
            )  # fmt: skip
            try:
                for concurrency in args.concurrency:
                    point = asyncio.run(closed_loop(server.url, ["main"], concurrency, *load_args(args, texts)))
                    point["batching"] = batching
                    results["sweep"].append(point)
                    print(json.dumps(point), flush=True)
                if batching:
                    names = [f"load-{i}" for i in range(args.loads)]
                    loads = load_to_first_prediction(server, names, args.samples, texts[0], args.method)
                    results["load_to_first_prediction_ms"] = loads.pop("total")
                    results["load_parts_ms"] = loads
                    print("load to first prediction (ms):", results["load_to_first_prediction_ms"], loads, flush=True)
                    results["adapters"] = spread_over_adapters(server, args, texts)
                    print(json.dumps(results["adapters"]), flush=True)
            finally:
                server.stop()
    print(markdown(results))
    write_results(args.json, results)


def load_args(args: argparse.Namespace, texts: list[str]) -> tuple:
    """The closed-loop arguments after url, adapters and concurrency."""
    return args.samples, args.duration, args.warmup, texts, args.method


def spread_over_adapters(server: ServerProcess, args: argparse.Namespace, texts: list[str]) -> dict:
    names = [f"a{i}" for i in range(8)]
    with server.admin() as admin:
        for name in names:
            admin.post("/v1/adapters", json={"path": f"staged/{name}"}).raise_for_status()
    concurrency = 16
    one = asyncio.run(closed_loop(server.url, ["main"], concurrency, *load_args(args, texts)))
    eight = asyncio.run(closed_loop(server.url, names, concurrency, *load_args(args, texts)))
    return {"concurrency": concurrency, "one_adapter": one, "eight_adapters": eight}


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "cpu_count": __import__("os").cpu_count()}  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def markdown(results: dict) -> str:
    by_key = {(p["batching"], p["concurrency"]): p for p in results["sweep"]}
    lines = [
        "| concurrency | batching on: req/s | p50 ms | p99 ms | batching off: req/s | p50 ms | p99 ms | on / off |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for concurrency in sorted({c for _, c in by_key}):
        on, off = by_key.get((True, concurrency)), by_key.get((False, concurrency))
        ratio = f"{on['throughput_rps'] / off['throughput_rps']:.2f}×" if on and off and off["throughput_rps"] else "—"
        lines.append(
            f"| {concurrency} | {on['throughput_rps']} | {on['p50_ms']} | {on['p99_ms']} | "
            f"{off['throughput_rps']} | {off['p50_ms']} | {off['p99_ms']} | {ratio} |"
        )
    loads = results.get("load_to_first_prediction_ms")
    if loads:
        lines.append(f"\nAdapter load to first prediction: median {statistics.median(loads)} ms ({loads}).")
        parts = {key: statistics.median(ms) for key, ms in results.get("load_parts_ms", {}).items()}
        if parts:
            lines.append(
                f"Medians of its parts: the load request {parts['load']} ms, the first prediction {parts['first']} ms, "
                f"the same prediction again {parts['warm']} ms."
            )
    spread = results.get("adapters")
    if spread:
        one, eight = spread["one_adapter"], spread["eight_adapters"]
        lines.append(
            f"\nConcurrency {spread['concurrency']}, batching on: one adapter {one['throughput_rps']} req/s "
            f"(p99 {one['p99_ms']} ms); spread over 8 adapters {eight['throughput_rps']} req/s "
            f"(p99 {eight['p99_ms']} ms)."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

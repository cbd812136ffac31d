"""Serving overhead: a real ``caveat-serve`` under ``wrk`` against the same batches run in-process.

Measured in one run, on one machine, side by side:

* **server**: closed-loop load from ``wrk`` (a compiled load generator in its own process; the POST bodies come
  from ``benchmarks/wrk_post.lua``) at each ``--concurrency``, for each ``--methods`` (S = ``--samples``): req/s,
  p50, p99;
* **health**: ``GET /health/live`` of the same server under the same ``wrk`` settings (what HTTP alone costs);
* **in-process**: the batches the engine forms when ``c`` requests wait, run by this process without HTTP:
  the engine's whole step (sampling, row plan, forward, predictive) and the batched forward alone
  (``ModelHost.forward`` / ``linearise``, row plan included). Their req/s are the ceiling the server is held to;
* **profile**: where one batch's time goes (``--profile-concurrency`` requests), stage by stage;
* with ``--adapters SHARED DISTINCT`` instead: one adapter against SHARED copies sharing their projections and
  DISTINCT bundles with their own (random) projections, the requests spread uniformly over them.

Model: ``--model tiny`` (a random 2-layer BERT, hidden 64, built with ``from_config``: its forward is nearly
free, so the ratios are the server's efficiency) or ``--model minilm`` (the embedded base). The adapter is a
synthetic bundle with the embedded default's shape (r = 16 on every attention and feed-forward map, Kronecker
posterior, a Mahalanobis OOD score): serving cost does not depend on what the cores learned. Usage::

    python benchmarks/overhead.py --model tiny --json docs/benchmarks/overhead-cpu-tiny.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: benchmarks.* importable

from adapters.architectures import BERT_TARGETS
from adapters.batching import RowBlock, RowPlan
from adapters.bundle import load_bundle, save_bundle
from adapters.embedded import resolve_model
from adapters.predictives import get_predictor
from adapters.store import BundleStore
from adapters.vocab import PredictiveMode
from benchmarks.harness import ServerProcess, save_tiny_bert, synthetic_bundle, write_results
from benchmarks.serve import machine
from service.engine import BatchingConfig, Engine, Job
from service.engine.answers import answer_jobs
from service.host import ModelHost
from service.metrics import Metrics
from service.predict import Answer, _rules, _text_input, response_body
from service.registry import AdapterRegistry, AdapterVersion
from service.responses import FastJSONResponse
from service.schemas import PredictRequest
from training.data import rotten_tomatoes_snippets

LUA = Path(__file__).with_name("wrk_post.lua")
STAGES = ("parse", "admission", "encode", "sampling", "row_plan", "forward", "predictive", "serialisation")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "minilm"], default="tiny")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--methods", nargs="+", default=["sample", "glm", "map"], choices=list(PredictiveMode))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--samples", type=int, default=16, help="network samples (sample) or logit draws (glm)")
    parser.add_argument("--duration", type=int, default=5, help="seconds of wrk load per point")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of wrk load before each method")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server and of this process")
    parser.add_argument("--repeats", type=int, default=7, help="in-process repeats (median)")
    parser.add_argument("--profile-concurrency", type=int, default=16)
    parser.add_argument(
        "--adapters", type=int, nargs=2, metavar=("SHARED", "DISTINCT"),
        help="instead of the sweep: --methods[0] at the largest --concurrency over one adapter, over SHARED "
        "copies (projections shared) and over DISTINCT bundles with their own random projections",
    )  # fmt: skip
    parser.add_argument("--server-only", action="store_true", help="skip the in-process runs and the profile")
    parser.add_argument("--server-flags", nargs=argparse.REMAINDER, default=[], help="extra caveat-serve flags")
    return parser.parse_args()


# ------------------------------------------------------------------------------------------ the setup


def prepare(model: str, samples: int, root: Path) -> tuple[Path, Path]:
    """The base directory and an adapter directory holding ``main`` (r = 16, Kronecker, Mahalanobis OOD)."""
    base = save_tiny_bert(root / "tiny", 64, 128, 512) if model == "tiny" else Path(resolve_model("minilm"))
    adapters = root / "adapters"
    synthetic_bundle(
        base, adapters / "main", name="main", targets=BERT_TARGETS, rank=16, family="kron", variance=1e-3,
        num_samples=samples, max_length=128, ood_method="mahalanobis",
    )  # fmt: skip
    return base, adapters


@dataclasses.dataclass
class Prepared:
    """What a benchmark runs on: its results so far (config, machine), a scratch directory, the prepared base and
    adapter directory (``args.model``, ``args.samples``), and 256 review snippets."""

    results: dict
    root: Path
    base: Path
    adapters: Path
    texts: list[str]


@contextlib.contextmanager
def prepared(args: argparse.Namespace) -> Iterator[Prepared]:
    """The frame of a benchmark: the machine and its load before and after, the prepared base and adapter in a
    scratch directory; on exit the results are written to ``args.json``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    texts = [e.text for e in rotten_tomatoes_snippets()[:256]]
    results: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    results["machine"] = {**machine(), "uptime_before": uptime()}
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = prepare(args.model, args.samples, Path(tmp))
        yield Prepared(results, Path(tmp), base, adapters, texts)
    results["machine"]["uptime_after"] = uptime()
    print(results["machine"]["uptime_before"], "/", results["machine"]["uptime_after"])
    write_results(args.json, results)


def run_in_process(args: argparse.Namespace, measure: Callable[..., Awaitable[dict]], key: str | None = None) -> None:
    """The frame of an in-process benchmark: ``measure(args, base, adapters, texts)`` in :func:`prepared`; its
    results under ``key`` (``None``: merged)."""
    with prepared(args) as run:
        measured = asyncio.run(measure(args, run.base, run.adapters, run.texts))
        run.results.update({key: measured} if key else measured)


def bodies(method: str, samples: int, texts: list[str]) -> list[str]:
    """One JSON body per text: the request mix of the server and of the in-process runs."""
    extra = {} if method == PredictiveMode.MAP else {"num_samples": samples}
    return [json.dumps({"adapter": "main", "inputs": [t], "method": method, **extra}) for t in texts]


# ------------------------------------------------------------------------------------------ the server


def wrk(url: str, concurrency: int, seconds: int, body_file: Path | None = None) -> dict:
    """One closed-loop ``wrk`` run (one thread, ``concurrency`` connections): req/s of 2xx answers, p50, p99."""
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "60s", "-s", str(LUA), url]
    if body_file is not None:
        command += ["--", str(body_file), "/v1/predict"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    raw = json.loads(next(line for line in out.splitlines() if line.startswith("WRK_JSON "))[9:])
    errors = raw["status_errors"] + raw["timeouts"] + raw["connect_errors"] + raw["read_errors"]
    return {
        "concurrency": concurrency,
        "requests": raw["requests"],
        "errors": errors,
        "rps": round((raw["requests"] - raw["status_errors"]) / (raw["duration_us"] / 1e6), 1),
        "p50_ms": round(raw["p50_us"] / 1000, 2),
        "p99_ms": round(raw["p99_us"] / 1000, 2),
    }


def server_sweep(args: argparse.Namespace, base: Path, adapters: Path, root: Path, texts: list[str]) -> dict:
    flags = ["--torch-threads", str(args.threads), "--queue-size", "4096", *args.server_flags]
    server = ServerProcess.start(base, adapters, root / "server.log", *flags)
    try:
        info = httpx.get(f"{server.url}/v1/info").json()  # the in-process steps use its step and padding too
        health = {c: wrk(f"{server.url}/health/live", c, args.duration) for c in args.concurrency}
        sweep = {}
        for method in args.methods:
            body_file = root / f"{method}.jsonl"
            body_file.write_text("\n".join(bodies(method, args.samples, texts)) + "\n")
            wrk(server.url, max(args.concurrency), args.warmup, body_file)
            sweep[method] = {c: wrk(server.url, c, args.duration, body_file) for c in args.concurrency}
            print(method, json.dumps(sweep[method]), flush=True)
    finally:
        server.stop()
    calibrated = {"step_tokens": info["step_tokens"], "split_padding": info.get("split_padding")}
    return {**calibrated, "health": health, "predict": sweep}


def adapters_sweep(args: argparse.Namespace, base: Path, adapters: Path, root: Path, texts: list[str]) -> dict:
    """One server per adapter set, the same request mix spread uniformly over its adapters: req/s, p50, p99, and
    device bytes per resident adapter (``GET /v1/adapters``)."""
    shared_count, distinct_count = args.adapters
    sets = {"one": adapters}
    sets["shared"] = root / "shared"
    for i in range(shared_count):  # renamed copies: the registry interns their identical projections
        bundle = load_bundle(adapters / "main")
        save_bundle(dataclasses.replace(bundle, manifest=bundle.manifest.model_copy(update={"name": f"s{i}"})),
                    sets["shared"] / f"s{i}")  # fmt: skip
    sets["distinct"] = root / "distinct"
    for i in range(distinct_count):
        synthetic_bundle(
            base, sets["distinct"] / f"d{i}", name=f"d{i}", targets=BERT_TARGETS, rank=16, family="kron",
            variance=1e-3, num_samples=args.samples, max_length=128, projection="random", seed=i,
        )  # fmt: skip
    method, concurrency = args.methods[0], max(args.concurrency)
    flags = ["--torch-threads", str(args.threads), "--queue-size", "4096", "--memory-budget-mb", "65536"]
    out = {}
    for label, directory in sets.items():
        names = sorted(p.name for p in directory.iterdir())
        mix = [b.replace('"adapter": "main"', f'"adapter": "{names[i % len(names)]}"')
               for i, b in enumerate(bodies(method, args.samples, texts * (1 + len(names) // len(texts))))]  # fmt: skip
        body_file = root / f"{label}.jsonl"
        body_file.write_text("\n".join(mix) + "\n")
        server = ServerProcess.start(base, directory, root / f"server-{label}.log", *flags, timeout_s=900)
        try:
            wrk(server.url, concurrency, args.warmup, body_file)
            point = wrk(server.url, concurrency, args.duration, body_file)
            listed = httpx.get(f"{server.url}/v1/adapters", timeout=60).json()
        finally:
            server.stop()
        point.update(adapters=len(listed["adapters"]), memory_bytes=listed["memory_bytes"])
        point["bytes_per_adapter"] = listed["memory_bytes"] // max(1, len(listed["adapters"]))
        out[label] = point
        print("adapters", label, json.dumps(point), flush=True)
    return out


# -------------------------------------------------------------------------------------- in-process runs


def make_job(adapter: AdapterVersion, host: ModelHost, body: str) -> Job:
    """The job ``run_prediction`` admits for one request body (without HTTP, limits or waiting)."""
    request = PredictRequest.model_validate(json.loads(body))
    texts = [_text_input(item, adapter) for item in request.inputs]
    method = request.method
    samples = get_predictor(method).fixed_draws or request.num_samples
    tokens = max(host.token_counts(texts))
    return Job(adapter, texts, samples, method, 0, _rules(adapter, request.abstain), tokens)


async def step_of(engine: Engine, jobs: list[Job]) -> list:
    """The pieces of the first step the engine forms when ``jobs`` wait."""
    engine._jobs = list(jobs)
    for job in jobs:
        job.progress.plan(engine.config.step_tokens)
    pieces = await engine._collect()
    engine._jobs = []
    return pieces


def blocks_of(engine: Engine, pieces: list) -> tuple[dict, list[RowBlock], Callable]:
    """What a step hands to the batched forward: the encoded unique inputs, the row blocks, and a maker of its
    OOD tap (a tap is spent by the forward that fills it)."""
    unique: dict = {}
    blocks = []
    for piece in pieces:
        job = piece.job
        samples = job.adapter.draw(job.num_samples, job.seed, job.predictor)
        indices = [unique.setdefault(item, len(unique)) for item in job.inputs[piece.inputs]]
        blocks.append(RowBlock(job.adapter.weights, samples, torch.tensor(indices)))
    return engine.host.encode(list(unique)), blocks, lambda: engine.worker._feature_tap(pieces, unique)


def median_s(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def batched_forward(host: ModelHost, method: str, pieces: list, engine: Engine) -> Callable[[], object]:
    """The batched forward of a step's pieces alone (row plan included; a fresh OOD tap each call)."""
    batch, blocks, tap = blocks_of(engine, pieces)
    predictor = get_predictor(method)
    return lambda: host.run(predictor, batch, blocks, tap())


async def inprocess_point(args: argparse.Namespace, engine: Engine, adapter: AdapterVersion, mix: list[str],
                          method: str, concurrency: int) -> dict:  # fmt: skip
    """The step the engine forms when ``concurrency`` requests wait; req/s of that step and of its forward."""
    host = engine.host

    def fresh() -> list[Job]:
        return [make_job(adapter, host, mix[i % len(mix)]) for i in range(concurrency)]

    pieces = await step_of(engine, fresh())
    requests = len({id(p.job) for p in pieces})
    forward_s = median_s(batched_forward(host, method, pieces, engine), args.repeats)
    steps = []
    for _ in range(args.repeats + 1):
        step = await step_of(engine, fresh())
        start = time.perf_counter()
        engine.worker.run(step)
        steps.append(time.perf_counter() - start)
    step_s = statistics.median(steps[1:])
    return {
        "batch_requests": requests,
        "batch_rows": sum(p.rows for p in pieces),
        "step_ms": round(1000 * step_s, 3),
        "forward_ms": round(1000 * forward_s, 3),
        "step_rps": round(requests / step_s, 1),
        "forward_rps": round(requests / forward_s, 1),
    }


async def profile_method(args: argparse.Namespace, engine: Engine, adapter: AdapterVersion, mix: list[str],
                         method: str) -> dict:  # fmt: skip
    """Median ms of each stage for the step of the first requests of ``mix``."""
    host = engine.host
    pieces = await step_of(engine, [make_job(adapter, host, b) for b in mix])
    whole = [p.job for p in pieces if p.job.progress.pieces == [q for q in pieces if q.job is p.job]]
    jobs = list(dict.fromkeys(whole))  # the requests the step completes
    pieces = [p for p in pieces if p.job in jobs]
    chosen = [mix[i] for i, _ in enumerate(jobs)]
    _, blocks, tap = blocks_of(engine, pieces)
    wanted = tap()
    base_inputs = None if wanted is None else torch.tensor(sorted(wanted.pending))
    done = [make_job(adapter, host, body) for body in chosen]  # run once: their predictive can be recomputed
    for job in done:
        job.progress.plan(engine.config.step_tokens)
    engine.worker.run([p for job in done for p in job.progress.pieces])
    results = answer_jobs(done)
    answers = [Answer(job.adapter, method, job.num_samples, 0, results[id(job)], 0.0) for job in done]
    encoder = FastJSONResponse(None)

    def serialise() -> None:  # what the route does with an answer
        for answer in answers:
            encoder.render(response_body(answer, "r"))

    stages = {
        "parse": lambda: [PredictRequest.model_validate(json.loads(body)) for body in chosen],
        "admission": lambda: [make_job(adapter, host, body) for body in chosen],
        "encode": lambda: host.encode(list(dict.fromkeys(i for j in jobs for i in j.inputs))),
        "sampling": lambda: [job.adapter.draw(job.num_samples, job.seed, job.predictor) for job in jobs],
        "row_plan": lambda: RowPlan.build(blocks, list(host.classifier.lora_layers), base_inputs),
        "forward": batched_forward(host, method, pieces, engine),
        "predictive": lambda: answer_jobs(done),
        "serialisation": serialise,
    }
    times = {name: round(1000 * median_s(run, args.repeats), 3) for name, run in stages.items()}
    times["forward"] = round(times["forward"] - times["row_plan"], 3)  # the forward builds its own plan
    return {"batch_requests": len(jobs), "stages_ms": times}


async def inprocess_all(
    args: argparse.Namespace,
    base: Path,
    adapters: Path,
    texts: list[str],
    step_tokens: int | None = None,
    split_padding: int | None = None,
) -> dict:
    """The in-process runs and the profile, with the server's steps and forwards (``step_tokens``,
    ``split_padding``: as the server calibrated them)."""
    torch.set_num_threads(args.threads)
    host = ModelHost(str(base))
    host.split_padding = split_padding
    registry = AdapterRegistry(host, BundleStore(adapters), budget_bytes=1 << 31)
    await registry.load_store()
    adapter = await registry.acquire("main")
    engine = Engine(host, BatchingConfig(step_tokens=step_tokens or host.default_step_tokens), Metrics())
    runs: dict = {}
    stages: dict = {}
    for method in args.methods:
        mix = bodies(method, args.samples, texts)
        runs[method] = {c: await inprocess_point(args, engine, adapter, mix, method, c) for c in args.concurrency}
        print("in-process", method, json.dumps(runs[method]), flush=True)
        stages[method] = await profile_method(args, engine, adapter, mix[: args.profile_concurrency], method)
        print("profile", method, json.dumps(stages[method]), flush=True)
    return {"runs": runs, "profile": stages}


# ------------------------------------------------------------------------------------------------ report


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def markdown(results: dict) -> str:
    server, local = results["server"], results["inprocess"]["runs"]
    lines = [
        "| method | c | req/s | p50 ms | p99 ms | /health/live req/s | in-process step req/s | forward req/s | "
        "server / health | server / forward |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, points in server["predict"].items():
        for c, point in points.items():
            health, inp = server["health"][c], local[method][c]
            lines.append(
                f"| {method} | {c} | {point['rps']} | {point['p50_ms']} | {point['p99_ms']} | {health['rps']} | "
                f"{inp['step_rps']} | {inp['forward_rps']} | {point['rps'] / health['rps']:.2f}× | "
                f"{point['rps'] / inp['forward_rps']:.2f}× |"
            )
    lines += ["", "| method | requests | " + " | ".join(STAGES) + " |", "|---|---:|" + "---:|" * len(STAGES)]
    for method, entry in results["inprocess"]["profile"].items():
        stages = entry["stages_ms"]
        lines.append(f"| {method} | {entry['batch_requests']} | " + " | ".join(str(stages[s]) for s in STAGES) + " |")
    return "\n".join(lines)


def adapters_markdown(points: dict) -> str:
    one = points["one"]["rps"]
    lines = ["| adapters | req/s | p50 ms | p99 ms | / one adapter | bytes per resident adapter |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for label, p in points.items():
        lines.append(
            f"| {label} ({p['adapters']}) | {p['rps']} | {p['p50_ms']} | {p['p99_ms']} | {p['rps'] / one:.2f}× | "
            f"{p['bytes_per_adapter']} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    with prepared(args) as run:
        results = run.results
        if args.adapters:
            results["adapters"] = adapters_sweep(args, run.base, run.adapters, run.root, run.texts)
            print(adapters_markdown(results["adapters"]))
        else:
            results["server"] = server = server_sweep(args, run.base, run.adapters, run.root, run.texts)
            if not args.server_only:
                results["inprocess"] = asyncio.run(inprocess_all(
                    args, run.base, run.adapters, run.texts, server["step_tokens"], server["split_padding"]
                ))  # fmt: skip
                print(markdown(results))


if __name__ == "__main__":
    main()

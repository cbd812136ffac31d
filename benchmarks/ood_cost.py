"""What the OOD score costs the server: the same requests with the bundle's score on and off, side by side.

One in-process server (the app and its engine, no network) holds two adapters made from one bundle: ``ood``,
the bundle as it is, and ``plain``, the same bundle without its OOD score (no ``ood.safetensors``, no ``ood``
rule), so their forwards differ only by the score's base row per input and the score itself. For every
method (``sample`` with ``--samples`` network samples, ``glm`` with as many logit draws, ``map``) and batch size
(inputs per request), ``--repeats`` pairs of sequential requests are sent, each pair the same fresh review
snippets to both adapters, in alternating order (so drifting contention from other processes hits both
alike). Reported per point: the medians of the server's time per request (``timing.total_ms``: admission to
answer, the score included), of its forward time (``timing.compute_ms``) and of the CPU time the process
spent on the request (every thread: on a shared machine the figure least disturbed by other processes), each
with the median of the paired ratios on / off. Usage::

    python benchmarks/ood_cost.py --json OUT.json [--bundle DIR] [--base-model minilm] [--samples 16]

``--bundle`` is a trained bundle for ``--base-model`` (e.g. ``bundles/sst2-minilm``); by default a synthetic
bundle of the embedded default's shape with a Mahalanobis score on synthetic texts (what the score costs does
not depend on what it learned).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: benchmarks.* importable

from adapters.architectures import BERT_TARGETS
from adapters.bundle import load_bundle, save_bundle
from adapters.embedded import resolve_model
from benchmarks.harness import synthetic_bundle, write_results
from benchmarks.serve import machine
from service.app import create_app
from service.settings import Settings
from training.data import rotten_tomatoes_snippets

ON, OFF = "ood", "plain"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--base-model", default="minilm")
    parser.add_argument("--bundle", type=Path, help="a trained bundle with an OOD score (default: synthetic)")
    parser.add_argument("--methods", nargs="+", default=["sample", "glm", "map"], choices=["sample", "glm", "map"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="inputs per request")
    parser.add_argument("--samples", type=int, default=16, help="network samples (sample) or logit draws (glm)")
    parser.add_argument("--repeats", type=int, default=30, help="request pairs per point (after 3 warm-up pairs)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (pinned)")
    return parser.parse_args()


def prepare_adapters(args: argparse.Namespace, root: Path) -> Path:
    """``root/adapters/ood``: the bundle; ``root/adapters/plain``: the same bundle without its OOD score."""
    adapters = root / "adapters"
    if args.bundle is None:
        synthetic_bundle(
            resolve_model(args.base_model), adapters / ON, name=ON, targets=BERT_TARGETS, rank=16, family="kron",
            variance=1e-3, max_length=128, ood_method="mahalanobis",
        )  # fmt: skip
    else:
        shutil.copytree(args.bundle, adapters / ON)
    bundle = load_bundle(adapters / ON)
    if bundle.ood is None:
        raise SystemExit(f"{args.bundle}: the bundle has no OOD score to measure")
    save_bundle(dataclasses.replace(bundle, manifest=bundle.manifest.model_copy(update={"name": ON})), adapters / ON)
    manifest = bundle.manifest.model_copy(deep=True, update={"name": OFF, "ood": None})
    manifest.calibration.abstention = [rule for rule in manifest.calibration.abstention if rule.kind != "ood"]
    save_bundle(dataclasses.replace(bundle, manifest=manifest, ood=None), adapters / OFF)
    return adapters


def timed(client: TestClient, adapter: str, inputs: list[str], method: str, samples: int) -> dict[str, float]:
    body = {"adapter": adapter, "inputs": inputs, "method": method, "num_samples": samples, "seed": 0}
    cpu = time.process_time()
    response = client.post("/v1/predict", json=body)
    cpu_ms = (time.process_time() - cpu) * 1000
    response.raise_for_status()
    answer = response.json()
    scores = [r["uncertainty"]["ood_score"] for r in answer["results"]]
    if (adapter == ON) != all(s is not None for s in scores):
        raise RuntimeError(f"adapter {adapter} answered OOD scores {scores}")
    return {"total_ms": answer["timing"]["total_ms"], "compute_ms": answer["timing"]["compute_ms"], "cpu_ms": cpu_ms}


def measure(client: TestClient, texts: list[str], method: str, batch: int, args: argparse.Namespace) -> dict:
    """``--repeats`` request pairs (on, off) over fresh inputs, alternating which goes first."""
    runs: dict[str, list[dict[str, float]]] = {ON: [], OFF: []}
    for repeat in range(-3, args.repeats):  # three warm-up pairs
        inputs = [texts[(repeat * batch + i) % len(texts)] for i in range(batch)]
        for adapter in (ON, OFF) if repeat % 2 == 0 else (OFF, ON):
            timing = timed(client, adapter, inputs, method, args.samples)
            if repeat >= 0:
                runs[adapter].append(timing)
    point: dict = {"method": method, "batch": batch, "samples": 1 if method == "map" else args.samples}
    for key in ("total_ms", "compute_ms", "cpu_ms"):
        on, off = ([t[key] for t in runs[a]] for a in (ON, OFF))
        point[key] = {ON: round(statistics.median(on), 2), OFF: round(statistics.median(off), 2)}
        point[f"{key}_ratio"] = round(statistics.median(a / b for a, b in zip(on, off, strict=True)), 3)
    point["load_average_1min"] = round(os.getloadavg()[0], 2)
    return point


def markdown(points: list[dict]) -> str:
    lines = [
        "| method | inputs | S | server ms: off | on | on / off | CPU ms: off | on | on / off | load avg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        total, cpu = p["total_ms"], p["cpu_ms"]
        lines.append(
            f"| `{p['method']}` | {p['batch']} | {p['samples']} | {total[OFF]:.1f} | {total[ON]:.1f} | "
            f"{p['total_ms_ratio']:.3f} | {cpu[OFF]:.1f} | {cpu[ON]:.1f} | {p['cpu_ms_ratio']:.3f} | "
            f"{p['load_average_1min']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    texts = [e.text for e in rotten_tomatoes_snippets()[:2048]]
    results: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    results["machine"] = machine()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = prepare_adapters(args, Path(tmp))
        settings = Settings(
            base_model=args.base_model, adapter_dir=adapters, torch_threads=args.threads, max_wait_ms=0.0,
            request_timeout_s=600.0,
        )  # fmt: skip
        with TestClient(create_app(settings)) as client:
            while client.get("/health/ready").status_code != 200:
                time.sleep(0.1)
            results["points"] = []
            for method in args.methods:
                for batch in args.batch_sizes:
                    point = measure(client, texts, method, batch, args)
                    results["points"].append(point)
                    print(json.dumps(point), flush=True)
    print(markdown(results["points"]))
    write_results(args.json, results)


if __name__ == "__main__":
    main()

"""The guarantees and the feedback loop on the embedded default, measured through the real server (in process):

1. conformal coverage and set size on the SST-2 test split at α = 0.1 and 0.05: the bundle's served sets (LAC),
   and APS and class-conditional sets calibrated the same way on the served validation predictive;
2. the loop with the drug reviews as production: serve them, send ``--labels`` of their labels to
   ``POST /v1/feedback``, ``caveat-train recalibrate`` on the server's log, hot-swap the new version, and compare
   the drug reviews not labelled (held out) and the SST-2 test split before and after.

    python -m benchmarks.feedback_loop --bundle bundles/sst2-minilm --json docs/results/feedback-loop-cpu.json
    python -m benchmarks.feedback_loop --by-ood --skip-coverage --json docs/results/feedback-loop-by-ood-cpu.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from adapters import load_bundle
from adapters.conformal import ConformalCalibration, set_metrics
from adapters.vocab import ConformalScore
from benchmarks.serve import machine
from service.app import create_app
from service.settings import Settings
from training.cli import main as train_main
from training.cli import parse_config
from training.data import Example
from training.metrics import classification_metrics
from training.session import load_splits

TOKEN = "loop"


def serve(client: TestClient, adapter: str, examples: list[Example], coverage: float | None = None) -> list[dict]:
    """The adapter's answers (the predictive the bundle serves by default), 64 inputs per request."""
    results = []
    for start in range(0, len(examples), 64):
        body = {"adapter": adapter, "inputs": [e.text for e in examples[start : start + 64]], "seed": 0}
        if coverage is not None:
            body["coverage"] = coverage
        response = client.post("/v1/predict", json=body)
        response.raise_for_status()
        results += response.json()["results"]
    return results


def figures(results: list[dict], examples: list[Example], labels: list[str]) -> dict[str, float]:
    probs = torch.tensor([r["probs"] for r in results], dtype=torch.float64)
    truth = torch.tensor([e.label for e in examples])
    metrics = classification_metrics(probs, truth)
    out = {k: metrics[k] for k in ("accuracy", "ece", "nll")}
    if results[0].get("prediction_set") is not None:
        covered = [labels[e.label] in r["prediction_set"] for r, e in zip(results, examples, strict=True)]
        out["coverage"] = sum(covered) / len(covered)
        out["mean_set_size"] = sum(len(r["prediction_set"]) for r in results) / len(results)
    return out


def coverage_table(
    client: TestClient, adapter: str, validation: list[Example], test: list[Example], labels: list[str]
) -> dict:
    """Coverage on test of each score and grouping at α = 0.1 and 0.05, calibrated on the served validation
    predictive (the served LAC sets are the bundle's own)."""
    val_probs = torch.tensor([r["probs"] for r in serve(client, adapter, validation)], dtype=torch.float64)
    val_labels = torch.tensor([e.label for e in validation])
    test_labels = torch.tensor([e.label for e in test])
    table = {}
    for coverage in (0.9, 0.95):
        served = serve(client, adapter, test, coverage)
        table[f"served lac @{coverage}"] = figures(served, test, labels)
        test_probs = torch.tensor([r["probs"] for r in served], dtype=torch.float64)
        for score in ConformalScore:
            for conditional in (False, True):
                calibration = ConformalCalibration.fit(val_probs, val_labels, score, conditional)
                sets = calibration.sets(test_probs, 1 - coverage)
                name = f"{score}{' class-conditional' if conditional else ''} @{coverage}"
                table[name] = set_metrics(sets, test_labels, 1 - coverage)
    return table


def loop(
    client: TestClient, adapter: str, root: Path, drugs: list[Example], test: list[Example], labels: list[str],
    count: int, seed: int, recalibrate_flags: list[str],
) -> dict:  # fmt: skip
    order = torch.randperm(len(drugs), generator=torch.Generator().manual_seed(seed)).tolist()
    production, held_out = [drugs[i] for i in order[:count]], [drugs[i] for i in order[count:]]
    answers = serve(client, adapter, production)
    items = [{"id": r["id"], "label": labels[e.label]} for r, e in zip(answers, production, strict=True)]
    for start in range(0, len(items), 500):
        client.post("/v1/feedback", json={"feedback": items[start : start + 500]}).raise_for_status()
    before = {"drug reviews (held out)": figures(serve(client, adapter, held_out), held_out, labels),
              "sst2 test": figures(serve(client, adapter, test), test, labels)}  # fmt: skip
    out = root / "adapters" / f"{adapter}-recalibrated"
    source = root / "adapters" / adapter
    argv = ["recalibrate", str(source), "--labels", str(root / "feedback"), "--out", str(out), *recalibrate_flags]
    assert train_main(argv) == 0, "recalibrate failed"
    client.put(f"/v1/adapters/{adapter}", json={"path": out.name}).raise_for_status()
    after = {"drug reviews (held out)": figures(serve(client, adapter, held_out), held_out, labels),
             "sst2 test": figures(serve(client, adapter, test), test, labels)}  # fmt: skip
    record = load_bundle(out).manifest.eval.recalibration
    return {"labels": count, "held_out": len(held_out), "before": before, "after": after, "recalibration": record}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("bundles/sst2-minilm"))
    parser.add_argument("--labels", type=int, default=300, help="drug reviews labelled in production")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--by-ood", action="store_true", help="recalibrate the far-out inputs only (--by-ood)")
    parser.add_argument("--skip-coverage", action="store_true", help="measure the loop only")
    args = parser.parse_args()
    config = parse_config(["--shift", "drugreviews", "--out", "unused"])  # the embedded default's splits
    task, _, validation, test, shift, _ = load_splits(config)
    labels = task.labels
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        name = load_bundle(args.bundle).name  # the registry's name for it
        shutil.copytree(args.bundle, root / "adapters" / name)
        settings = Settings(base_model="minilm", adapter_dir=root / "adapters", admin_token=TOKEN,
                            feedback_dir=root / "feedback", max_inputs=64)  # fmt: skip
        with TestClient(create_app(settings), headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            while client.get("/health/ready").status_code != 200:
                pass
            result = {
                "machine": {**machine(), "torch_threads": torch.get_num_threads()},
                "bundle": str(args.bundle),
                "coverage": None if args.skip_coverage else coverage_table(client, name, validation, test, labels),
                "loop": loop(
                    client,
                    name,
                    root,
                    shift[1],
                    test,
                    labels,
                    args.labels,
                    args.seed,
                    ["--by-ood"] if args.by_ood else [],
                ),
            }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

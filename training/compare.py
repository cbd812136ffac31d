"""Compare posterior families on one MAP checkpoint: ``caveat-train compare``.

Trains the MAP once with the usual flags, then fits each requested posterior on the same checkpoint and
evaluates it on the same splits (test, shift, OOD), and prints one markdown table (also written as JSON).
Usage::

    caveat-train compare --posteriors map,laplace-diag,laplace-kron,laplace-full --json OUT.json [train flags]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from training.pipeline import POSTERIORS, ConfigError, TrainConfig, calibrate, evaluate, fit_posterior, prepare, train

COLUMNS = [
    ("test", "accuracy", "SST acc"),
    ("test", "ece", "ECE"),
    ("test", "nll", "NLL"),
    ("test", "brier", "Brier"),
    ("test", "aurc", "AURC"),
    ("shift", "accuracy", "shift acc"),
    ("shift", "ece", "shift ECE"),
    ("shift", "nll", "shift NLL"),
    ("ood", "max_prob", "OOD AUROC 1−maxp"),
    ("ood", "entropy", "OOD AUROC H"),
    ("ood", "mutual_information", "OOD AUROC MI"),
]


def compare(config: TrainConfig, families: list[str]) -> list[dict[str, Any]]:
    """One row per family: its posterior-predictive metrics (MAP metrics for ``map``) and costs."""
    unknown = [f for f in families if f not in POSTERIORS]
    if unknown:
        raise ConfigError(f"unknown posteriors {unknown}; choose from {list(POSTERIORS)}")
    session = prepare(config)
    train(session)
    if not session.accelerator.is_main_process:
        return []
    rows = []
    for family in families:
        start = time.perf_counter()
        posterior, info = fit_posterior(session, family)
        fit_seconds = time.perf_counter() - start
        temperature, _ = calibrate(session, posterior)
        evaluation, _ = evaluate(session, posterior, temperature)
        tensors, _ = posterior.state()
        row: dict[str, Any] = {
            "posterior": family,
            "fit_seconds": round(fit_seconds, 1),
            "posterior_kb": round(sum(t.numel() * t.element_size() for t in tensors.values()) / 1024, 1),
            "prior_precision": info.get("prior_precision"),
        }
        for split in ("test", "shift", "ood"):
            if split in evaluation:
                row[split] = evaluation[split]["posterior"]
        rows.append(row)
        session.say(markdown_table(rows))
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    present = [(s, k, label) for s, k, label in COLUMNS if any(k in row.get(s, {}) for row in rows)]
    header = "| posterior | " + " | ".join(label for _, _, label in present) + " | fit s | posterior kB |"
    lines = [header, "|---|" + "---:|" * (len(present) + 2)]
    for row in rows:
        cells = [f"{row[s][k]:.4f}" if k in row.get(s, {}) else "—" for s, k, _ in present]
        lines.append(
            f"| {row['posterior']} | " + " | ".join(cells) + f" | {row['fit_seconds']} | {row['posterior_kb']} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from training.cli import parse_config

    parser = argparse.ArgumentParser(prog="caveat-train compare", add_help=False)
    parser.add_argument("--posteriors", default="map,laplace-diag,laplace-kron,laplace-full")
    parser.add_argument("--json", type=Path)
    own, rest = parser.parse_known_args(argv)
    config = parse_config(rest)
    rows = compare(config, [p.strip() for p in own.posteriors.split(",") if p.strip()])
    print(markdown_table(rows))
    if own.json:
        own.json.parent.mkdir(parents=True, exist_ok=True)
        own.json.write_text(json.dumps({"config": vars(config), "rows": rows}, indent=2, default=str) + "\n")

"""Compare posterior methods on one dataset: ``caveat-train compare``.

Trains the MAP once with the usual flags; every method that builds on it (temperature scaling, Laplace,
SWAG, VI, the ensemble's first member) reuses that checkpoint, MC dropout trains its own (with dropout, from
the same initialisation), and the ensemble trains or loads (``--member-bundles``) its other members. Each
method is calibrated and evaluated on the same splits (test, shift, OOD); one markdown table is printed
(and written as JSON). Usage::

    caveat-train compare --posteriors map,temperature,laplace-kron,swag,vi --json OUT.json [train flags]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from training.config import POSTERIORS, ConfigError, TrainConfig
from training.methods import fit_posterior, reinitialise
from training.pipeline import calibrate, evaluate
from training.session import Fitted, Session, prepare, train

METHODS = ("zero-shot", "map", "temperature", *POSTERIORS[1:])  # zero-shot: the base before any training
NEEDS_OWN_MAP = ("mc-dropout",)  # trained last, so the shared MAP serves every other method first

COLUMNS = [
    ("test", "accuracy", "test acc"),
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


def compare(config: TrainConfig, methods: list[str]) -> list[dict[str, Any]]:
    """One row per method: its predictive's metrics (MAP metrics for ``map``), training time and size."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    session = prepare(config)
    rows = []
    if "zero-shot" in methods:  # the cores start at ~0: the base model as it is (with a new head, if any)
        rows.append(_row(session, "zero-shot", 0.0))
        session.say(markdown_table(rows))
        session.forget_outputs()
    others = [m for m in methods if m != "zero-shot"]
    if not others:  # nothing needs the MAP
        return rows
    train(session, dropout=False)
    if not session.accelerator.is_main_process:
        return []
    map_seconds = session.map_result.seconds
    ordered = [m for m in others if m not in NEEDS_OWN_MAP] + [m for m in others if m in NEEDS_OWN_MAP]
    for method in ordered:
        if method in NEEDS_OWN_MAP:
            reinitialise(session.model, config.seed)
            session.forget_outputs()
            map_seconds = train(session, dropout=True).seconds
        rows.append(_row(session, method, map_seconds))
        session.say(markdown_table(rows))
    return rows


def _row(session: Session, method: str, map_seconds: float) -> dict[str, Any]:
    """Fit, calibrate and evaluate one method on the session's current model."""
    config = session.config
    fitted = fit_posterior(session, "map" if method in ("temperature", "zero-shot") else method)
    temperature, _ = calibrate(session, fitted, method == "temperature" or config.temperature_scaling)
    evaluation, _ = evaluate(session, fitted, temperature)
    if method == "ensemble":
        train_seconds = sum(fitted.info["member_training_seconds"])
    else:
        train_seconds = map_seconds + fitted.seconds
    row: dict[str, Any] = {
        "posterior": method,
        "train_seconds": round(train_seconds, 1),
        "fit_seconds": fitted.seconds,
        "bundle_kb": round(_tensor_kb(session, fitted), 1),
        "num_samples": fitted.num_samples,
        "predictive": fitted.predictive,
        "temperature": temperature,
        "prior_precision": fitted.info.get("prior_precision"),
        "fit": fitted.info,
    }
    for split in ("test", "shift", "ood"):
        if split in evaluation:
            row[split] = evaluation[split]["posterior"]
    return row


def _tensor_kb(session: Session, fitted: Fitted) -> float:
    """kB of the bundle's own tensors: cores, head and posterior (the shared projections excluded)."""
    tensors, _ = fitted.posterior.state()
    own = [layer.core.weight for layer in session.model.lora_layers.values()] + list(session.model.head.parameters())
    return sum(t.numel() * t.element_size() for t in [*tensors.values(), *own]) / 1024


def markdown_table(rows: list[dict[str, Any]]) -> str:
    present = [(s, k, label) for s, k, label in COLUMNS if any(k in row.get(s, {}) for row in rows)]
    header = "| method | " + " | ".join(label for _, _, label in present) + " | train s | bundle kB |"
    lines = [header, "|---|" + "---:|" * (len(present) + 2)]
    for row in rows:
        cells = [f"{row[s][k]:.4f}" if k in row.get(s, {}) else "—" for s, k, _ in present]
        lines.append(
            f"| {row['posterior']} | " + " | ".join(cells) + f" | {row['train_seconds']:.0f} | {row['bundle_kb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from training.cli import parse_config

    parser = argparse.ArgumentParser(prog="caveat-train compare", add_help=False)
    parser.add_argument("--posteriors", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--json", type=Path)
    own, rest = parser.parse_known_args(argv)
    config = parse_config(rest)
    rows = compare(config, [p.strip() for p in own.posteriors.split(",") if p.strip()])
    print(markdown_table(rows))
    if own.json:
        own.json.parent.mkdir(parents=True, exist_ok=True)
        own.json.write_text(json.dumps({"config": vars(config), "rows": rows}, indent=2, default=str) + "\n")

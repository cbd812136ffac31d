"""Compare posterior methods on one dataset: ``caveat-train compare``.

Trains the MAP once with the usual flags; every method that builds on it (temperature scaling, Laplace,
SWAG, VI, the ensemble's first member) reuses that checkpoint, MC dropout trains its own (with dropout, from
the same initialisation), and the ensemble trains or loads (``--member-bundles``) its other members. Each
method is calibrated and evaluated on the same splits (test, shift, OOD); one markdown table is printed
(and written as JSON). Usage::

    caveat-train compare --posteriors map,temperature,laplace-kron,swag,vi --json OUT.json [train flags]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.config import ConfigError, PosteriorMethod, TrainConfig
from training.inference import labels_of, split_metrics
from training.methods import Fitted, fit, get_method
from training.ood import FittedOod, fit_ood
from training.pipeline import calibrate, evaluate, posterior_outputs
from training.session import Session, fit_map, prepare, reinitialise

# Rows beyond the posterior methods: the base before any training, the MAP with temperature scaling, and what
# caveat-train ships by default — ``--posterior`` under ``--calibration auto`` (the validation rule's choice).
ZERO_SHOT, TEMPERATURE, DEFAULT = "zero-shot", "temperature", "default"
COMPARED = (
    ZERO_SHOT, PosteriorMethod.MAP, TEMPERATURE, DEFAULT, *[m for m in PosteriorMethod if m != PosteriorMethod.MAP]
)  # fmt: skip

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
    ("ood", "ood_score", "OOD AUROC ood_score"),
    ("shift", "ood_score_auroc", "shift AUROC ood_score"),
]


def compare(config: TrainConfig, methods: list[str], json_path: Path | None = None) -> list[dict[str, Any]]:
    """One row per method: its predictive's metrics (MAP metrics for ``map``), training time and size. With
    ``json_path``, the rows so far are written after every method: a run stopped late keeps what it measured."""
    unknown = [m for m in methods if m not in COMPARED]
    if unknown:
        raise ConfigError(f"unknown methods {unknown}; choose from {[str(m) for m in COMPARED]}")
    imported_refused = [m for m in methods if m == ZERO_SHOT or (m in COMPARED and trains_own_map(m, config))]
    if config.adapter.from_peft and imported_refused:
        raise ConfigError(f"--from-peft: {imported_refused} train their own model; the import is the MAP")
    session = prepare(config)
    ood = fit_ood(session)  # reads the frozen base: one fit, before training, serves every method's row
    rows = []
    if ZERO_SHOT in methods:  # the cores start at ~0: the base model as it is (with a new head, if any)
        rows.append(_row(session, ZERO_SHOT, 0.0, ood))
        _report(session, rows, json_path)
        session.forget_outputs()
    others = [m for m in methods if m != ZERO_SHOT]
    if not others:  # nothing needs the MAP
        return rows
    # methods with their own MAP objective (MC dropout) train last, so the shared MAP serves the others first
    own_map = [m for m in others if trains_own_map(m, config)]
    if session.imported is None and len(own_map) < len(others):  # the shared MAP, unless each trains its own
        fit_map(session)
    if not session.accelerator.is_main_process:
        return []
    map_seconds = session.map_result.seconds if session.map_result else 0.0
    fits: dict[str, Fitted] = {}  # one fit per posterior and MAP: `default` and the row of its posterior share it
    for method in [m for m in others if m not in own_map] + own_map:
        if method in own_map:
            reinitialise(session.model, config.seed, session.initial_projections)
            session.forget_outputs()
            fits.clear()
            map_seconds = fit_map(session, objective=get_method(method).map_objective(config)).seconds
        rows.append(_row(session, method, map_seconds, ood, fits))
        _report(session, rows, json_path)
    return rows


def trains_own_map(method: str, config: TrainConfig) -> bool:
    """Whether a compared method trains its own MAP (MC dropout's objective)."""
    return method not in (ZERO_SHOT, TEMPERATURE, DEFAULT) and get_method(method).map_objective(config) is not None


def _report(session: Session, rows: list[dict[str, Any]], json_path: Path | None) -> None:
    session.log(markdown_table(rows))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"config": session.config.flat(), "rows": rows}, indent=2, default=str) + "\n")


def _row(
    session: Session,
    method: str,
    map_seconds: float,
    ood: FittedOod | None = None,
    fits: dict[str, Fitted] | None = None,
) -> dict[str, Any]:
    """Fit (or take from ``fits``, the posteriors already fitted on the session's current MAP), calibrate and
    evaluate one method on the session's current model."""
    config = session.config
    posterior = _posterior_of(method, config)
    fitted = fits.get(posterior) if fits is not None else None
    if fitted is None:
        fitted = fit(session, posterior)
        if fits is not None:
            fits[posterior] = fitted
    validation = posterior_outputs(session, fitted, "validation", session.validation)
    scale = None if method == DEFAULT else method == TEMPERATURE or config.calibration.temperature_scaling
    calibrated = calibrate(session, fitted, scale, validation)
    temperature, served = calibrated.temperature, calibrated.served
    if served is not fitted:  # the rule chose the MAP: its validation outputs are the MAP's
        validation = posterior_outputs(session, served, "validation", session.validation)
    evaluation, _ = evaluate(session, served, temperature, ood)
    train_seconds = map_seconds + fitted.seconds if fitted.train_seconds is None else fitted.train_seconds
    row: dict[str, Any] = {
        "posterior": str(method),
        "train_seconds": round(train_seconds, 1),
        "fit_seconds": fitted.seconds,
        "bundle_kb": round(_tensor_kb(session, fitted), 1),
        "num_samples": fitted.num_samples,
        "predictive": str(served.mode),
        "temperature": temperature,
        "calibration": None if calibrated.choice is None else calibrated.choice.choice,
        "candidates": None if calibrated.choice is None else calibrated.choice.candidates,
        "prior_precision": fitted.diagnostics.get("prior_precision"),
        "fit": fitted.diagnostics,
        # the predictive on validation (temperature included): what a method's settings may be tuned on
        "validation": split_metrics(validation.distribution(temperature), labels_of(session.validation)),
    }
    for split in ("test", "shift", "ood"):
        metrics = getattr(evaluation, split)
        if metrics is not None:
            row[split] = metrics.posterior
    return row


def _posterior_of(method: str, config: TrainConfig) -> str:
    """The posterior a row fits: the MAP's for zero-shot and temperature, ``--posterior`` for the default."""
    if method in (TEMPERATURE, ZERO_SHOT):
        return PosteriorMethod.MAP
    return config.posterior.method if method == DEFAULT else method


def _tensor_kb(session: Session, fitted: Fitted) -> float:
    """kB of the bundle's own tensors: cores, head and posterior, and the projections when they were trained
    (L-LoRA-S; otherwise they are shared with every bundle on the same base)."""
    tensors, _ = fitted.posterior.state()
    own = [layer.core.weight for layer in session.model.lora_layers.values()] + list(session.model.head.parameters())
    if session.config.optimisation.train_projections:
        own += [t for layer in session.model.lora_layers.values() for t in (layer.lora_A, layer.lora_B)]
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


def run(config: TrainConfig, methods: list[str], json_path: Path | None = None) -> list[dict[str, Any]]:
    """``caveat-train compare``: the rows, printed as one table and written as JSON when asked."""
    rows = compare(config, methods, json_path)
    print(markdown_table(rows))
    return rows

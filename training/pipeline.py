"""The training pipeline: data → LoRA-XS → MAP → posterior → calibration → evaluation → bundle."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapters import (
    Bundle,
    save_bundle,
)
from adapters.manifest import (
    MANIFEST_FILE,
    AbstentionSpec,
    AdapterSpec,
    BaseModelSpec,
    BundleManifest,
    CalibrationSpec,
    HeadSpec,
    PosteriorSpec,
    ProjectionSpecRecord,
    TaskSpec,
)
from adapters.model import HEAD_WEIGHT
from adapters.tasks import DEFAULT_TEMPLATE
from training.calibration import fit_abstention, fit_temperature
from training.config import ConfigError, TrainConfig
from training.evaluate import labels_of, ood_metrics, split_metrics
from training.methods import fit_posterior
from training.report import render_report, write_reliability_png
from training.session import Fitted, Session, data_card, prepare, train


def prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse to write into a directory that holds something else, or over a bundle unless asked."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST_FILE).is_file():
            raise ConfigError(f"--out {out} holds other files; choose an empty or new directory")
        if not overwrite:
            raise ConfigError(f"--out {out} already holds a bundle; pass --overwrite to replace it")


def calibrate(
    session: Session, fitted: Fitted, temperature_scaling: bool | None = None
) -> tuple[float, list[AbstentionSpec]]:
    """Temperature (``--temperature-scaling``, or as asked) and abstention thresholds, fitted on validation."""
    config = session.config
    scale = config.temperature_scaling if temperature_scaling is None else temperature_scaling
    outputs = session.sampled_outputs(fitted, "validation", session.validation)
    labels = labels_of(session.validation)
    temperature = fit_temperature(outputs.logits, labels) if scale else 1.0
    pred = outputs.predictive(temperature)
    target_risk = config.target_risk
    if target_risk is None and config.target_coverage is None:
        target_risk = 0.05
    rules = []
    for kind in config.abstain_on:
        if kind == "mutual_information":  # an epistemic alarm: answer the usual in-distribution range
            rules.append(fit_abstention(pred, labels, kind, target_coverage=config.mi_coverage))
        else:
            rules.append(
                fit_abstention(pred, labels, kind, target_risk=target_risk, target_coverage=config.target_coverage)
            )
    return temperature, rules


def evaluate(session: Session, fitted: Fitted, temperature: float) -> tuple[dict[str, Any], dict]:
    """MAP and posterior metrics on test, shift and OOD; the reliability-diagram panels."""
    with_mi = fitted.predictive != "map"
    evaluation: dict[str, Any] = {
        "method": fitted.method,
        "num_samples": fitted.num_samples,
        "predictive": fitted.predictive,
        "temperature": temperature,
    }
    preds, panels = {}, {}
    for split, examples in session.splits().items():
        preds[split] = {
            "MAP": session.map_outputs(split, examples).predictive(),
            "posterior": session.sampled_outputs(fitted, split, examples).predictive(temperature),
        }
        if split == "ood":
            continue
        labels = labels_of(examples)
        evaluation[split] = {
            "size": len(examples),
            "map": split_metrics(preds[split]["MAP"], labels),
            "posterior": split_metrics(preds[split]["posterior"], labels),
        }
        title = "test" if split == "test" else f"shift: {session.shift[0]}"
        panels[title] = {method: (pred.probs, labels) for method, pred in preds[split].items()}
    if session.shift is not None:
        evaluation["shift"]["dataset"] = session.shift[0]
    if session.ood is not None:
        evaluation["ood"] = {
            "dataset": session.ood[0],
            "size": len(session.ood[1]),
            "map": ood_metrics(preds["test"]["MAP"], preds["ood"]["MAP"], with_mi=False),
            "posterior": ood_metrics(preds["test"]["posterior"], preds["ood"]["posterior"], with_mi=with_mi),
        }
    return evaluation, panels


def write_bundle(
    session: Session,
    out: Path,
    fitted: Fitted,
    calibration: tuple[float, list[AbstentionSpec]],
    evaluation: dict[str, Any],
    panels: dict,
) -> Path:
    config, model, base = session.config, session.model, session.model.base
    posterior = fitted.posterior
    temperature, rules = calibration
    manifest = BundleManifest(
        name=config.name or _bundle_name(out),
        version=config.version or datetime.now(UTC).strftime("%Y%m%d.%H%M%S"),
        task=TaskSpec(
            type="multiple-choice" if config.multiple_choice else "sequence-classification",
            labels=session.task.labels,
            pooling=model.pooling,
            text_pair=session.task.text_pair,
            max_length=config.tokens,
            prompt_template=(config.prompt_template or DEFAULT_TEMPLATE) if config.multiple_choice else None,
        ),
        base_model=BaseModelSpec(
            name_or_path=config.base_model,
            fingerprint=session.fingerprint,
            dtype="float32",
            architecture=base.config.model_type,
            hidden_size=base.config.hidden_size,
        ),
        adapter=AdapterSpec(
            rank=config.rank,
            alpha=config.alpha,
            target_modules=session.patterns,
            modules=session.names,
            projection=ProjectionSpecRecord(spec=config.projection, seed=config.seed, data=session.projection_data),
        ),
        head=HeadSpec(in_features=base.config.hidden_size, num_labels=len(session.task.labels)),
        posterior=PosteriorSpec(
            family=posterior.family,
            prior_precision=fitted.info.get("prior_precision"),
            default_num_samples=fitted.num_samples,
            covers_head=HEAD_WEIGHT in posterior.names and posterior.family != "map",
            predictive="glm" if fitted.predictive == "glm" else "sample",
        ),
        calibration=CalibrationSpec(temperature=temperature, abstention=rules),
        eval=evaluation | {"data": data_card(session)},
    )
    map_result = session.map_result
    record = {
        "config": asdict(config),
        "map": asdict(map_result) if map_result else None,
        "posterior": {"method": fitted.method, "seconds": fitted.seconds, **fitted.info},
        "stage_seconds": session.stage.seconds,
        "summary": (
            f"{map_result.best_epoch} of {len(map_result.history)} epochs kept (validation {config.select_by}); "
            f"{sum(session.stage.seconds.values()):.0f} s in all ({_stage_list(session.stage.seconds)})."
        ),
    }
    manifest.eval["training"] = {k: v for k, v in record.items() if k != "config"}
    bundle = Bundle.from_classifier(model, posterior, manifest)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"  # the old bundle survives a failed write
    shutil.rmtree(staging, ignore_errors=True)
    save_bundle(bundle, staging)
    write_reliability_png(staging / "reliability.png", panels)
    manifest_dict = json.loads((staging / MANIFEST_FILE).read_text())
    (staging / "report.md").write_text(render_report(manifest_dict, record))
    (staging / "training.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    _replace_directory(staging, out)
    session.say(f"bundle written to {out} ({bundle_size_kb(out):.0f} kB without projections)")
    return out


def _replace_directory(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing (empty or bundle) ``target`` is removed only after the move."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def run(config: TrainConfig) -> Path:
    """Train, fit the posterior, calibrate, evaluate and write a bundle; returns its directory."""
    config.validate()
    out = Path(config.out)
    prepare_output(out, config.overwrite)
    session = prepare(config)
    train(session)
    if not session.accelerator.is_main_process:  # under `accelerate launch`, one process finishes the job
        return out
    fitted = fit_posterior(session, config.posterior)
    session.stage.done("posterior")
    calibration = calibrate(session, fitted)
    session.stage.done("calibration")
    evaluation, panels = evaluate(session, fitted, calibration[0])
    session.stage.done("evaluation")
    return write_bundle(session, out, fitted, calibration, evaluation, panels)


def _stage_list(seconds: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())


def _bundle_name(out: Path) -> str:
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in out.resolve().name).strip("-._")
    return name or "bundle"


def bundle_size_kb(directory: Path) -> float:
    """Size of bundle.json, adapter and posterior files (projections may be shared across bundles)."""
    files = ["bundle.json", "adapter.safetensors", "posterior.safetensors"]
    return sum((directory / f).stat().st_size for f in files) / 1024

"""The training pipeline: data → LoRA-XS → MAP → posterior → calibration → evaluation → bundle."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from torch import Tensor

from adapters import (
    Bundle,
    Predictive,
    save_bundle,
)
from adapters.bundle import conformal_spec
from adapters.conformal import ConformalCalibration, set_metrics
from adapters.eval_card import EvalCard, OodEval, SplitEval, TrainingRecord
from adapters.files import staged
from adapters.heads import HEAD_WEIGHT
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
from adapters.posteriors import Posterior
from adapters.predictive import AMBIGUOUS_THRESHOLD
from adapters.tasks import valid_labels
from adapters.vocab import PosteriorFamily, PredictiveMode
from training.calibration import (
    PredictiveChoice,
    abstention_warning,
    choose_predictive,
    fit_abstention,
    fit_temperature,
)
from training.config import (
    DEFAULT_TARGET_COVERAGE,
    AbstainOn,
    CalibrationChoice,
    ConfigError,
    SelectBy,
    TrainConfig,
)
from training.data import Example
from training.inference import Outputs, labels_of, ood_metrics, predict, split_metrics
from training.map_training import MapResult
from training.methods import Fitted, fit, get_method
from training.ood import FittedOod, fit_ood
from training.report import render_report, summary_lines, write_reliability_png
from training.session import Session, data_card, fit_map, prepare


def prepare_output(
    out: Path, overwrite: bool, marker: str = MANIFEST_FILE, kind: str = "a bundle", flag: str = "--out "
) -> None:
    """Refuse to write into a directory that holds something else, or over ``kind`` (a directory with ``marker``)
    unless asked; ``flag`` prefixes the path in messages."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag}{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / marker).is_file():
            raise ConfigError(f"{flag}{out} holds other files; choose an empty or new directory")
        if not overwrite:
            raise ConfigError(f"{flag}{out} already holds {kind}; pass --overwrite to replace it")


@dataclass
class Calibrated:
    """What calibration chose on validation.

    Attributes:
        temperature: applied to the served predictive's logits.
        rules: the abstention rules, fitted on the served predictive.
        served: the fit whose predictive the bundle serves by default: the posterior's, or (when the rule chose
            the MAP) the same posterior with the ``map`` predictive.
        conformal: the served predictive's conformal calibration on validation; alpha: the bundle's level
            (``--conformal-alpha``).
        choice: the validation rule's record (``--calibration auto``); ``None`` when the calibration was fixed.
    """

    temperature: float
    rules: list[AbstentionSpec]
    served: Fitted
    conformal: ConformalCalibration
    alpha: float
    choice: PredictiveChoice | None = None


def calibrate(
    session: Session, fitted: Fitted, temperature_scaling: bool | None = None, outputs: Outputs | None = None
) -> Calibrated:
    """The served predictive and its temperature (``--calibration``; ``temperature_scaling``, when given, fixes
    the posterior predictive with or without a temperature), and abstention thresholds, all fitted on
    validation (``outputs``: the posterior's validation outputs when the caller has them already)."""
    config = session.config.calibration
    if temperature_scaling is None and config.temperature_scaling:
        temperature_scaling = True
    if outputs is None:
        outputs = posterior_outputs(session, fitted, "validation", session.validation)
    labels = labels_of(session.validation)
    served, choice = fitted, None
    if temperature_scaling is None and config.choice == CalibrationChoice.AUTO:
        map_logits = session.map_outputs("validation", session.validation).logits
        posterior_logits = None if fitted.mode == PredictiveMode.MAP else outputs.logits
        choice = choose_predictive(map_logits, posterior_logits, labels, seed=session.config.seed)
        figures = ", ".join(f"{name} {record['nll']:.4f}" for name, record in choice.candidates.items())
        session.log(f"calibration: serving {choice.choice} (validation NLL {figures}; --calibration auto)")
        if not choice.uses_posterior:
            served, outputs = replace(fitted, mode=PredictiveMode.MAP), Outputs(map_logits)
        temperature = choice.candidates[choice.choice]["temperature"]  # fitted on all of validation by the rule
    else:
        temperature = fit_temperature(outputs.logits, labels) if temperature_scaling else 1.0
    pred = outputs.distribution(temperature)
    target_coverage = config.target_coverage
    if config.target_risk is None and target_coverage is None:
        target_coverage = DEFAULT_TARGET_COVERAGE
    conformal = session.config.conformal
    calibration = ConformalCalibration.fit(pred.probs, labels, conformal.score, conformal.class_conditional)
    rules = []
    for kind in config.abstain_on:
        if kind == AbstainOn.AMBIGUOUS:  # a fixed rule: answer single-label sets
            target = {"alpha": conformal.alpha}
            rules.append(AbstentionSpec(kind=kind, threshold=AMBIGUOUS_THRESHOLD, target=target))
        elif kind == AbstainOn.MUTUAL_INFORMATION:  # an epistemic alarm: answer the usual in-distribution range
            rules.append(fit_abstention(pred, labels, kind, target_coverage=config.mi_coverage))
        else:
            rules.append(
                fit_abstention(pred, labels, kind, target_risk=config.target_risk, target_coverage=target_coverage)
            )
    return Calibrated(temperature, rules, served, calibration, conformal.alpha, choice)


@dataclass
class SessionSplit:
    """One of the session's splits as a predictive mode reads it (``adapters.predictives.EvaluationSplit``; the
    session computes MAP logits and linearisations once)."""

    session: Session
    name: str
    examples: list[Example]

    def map_logits(self) -> Tensor:
        return self.session.map_outputs(self.name, self.examples).logits[0]

    def linearisation(self) -> tuple[Tensor, dict[str, Tensor]]:
        linearised = self.session.linearisation(self.name, self.examples)
        return linearised.logits, linearised.jacobians

    def sampled_logits(self, posterior: Posterior, num_samples: int, seed: int) -> Tensor:
        session, config = self.session, self.session.config
        return predict(
            session.model, self.examples, session.encoder, posterior=posterior, num_samples=num_samples, seed=seed,
            batch_size=config.optimisation.batch_size, desc=f"{self.name} (posterior)", progress=config.progress,
        ).logits  # fmt: skip


def posterior_outputs(session: Session, fitted: Fitted, split: str, examples: list[Example]) -> Outputs:
    """The posterior predictive's per-draw logits, the way the bundle's server computes them."""
    draws = fitted.predictor.split_draws(
        SessionSplit(session, split, examples), fitted.posterior, fitted.num_samples, session.config.seed
    )
    return Outputs(draws)


def evaluate(
    session: Session,
    fitted: Fitted,
    temperature: float,
    ood: FittedOod | None = None,
    conformal: tuple[ConformalCalibration, float] | None = None,
) -> tuple[EvalCard, dict]:
    """MAP and posterior metrics on test, shift and OOD (with the OOD score's AUROCs when ``ood`` is given, the
    conformal sets' coverage and size at level ``alpha`` when ``conformal = (calibration, alpha)`` is); the
    reliability-diagram panels."""
    with_mi = fitted.predictor.epistemic
    card = EvalCard(
        method=fitted.method, num_samples=fitted.num_samples, predictive=fitted.mode, temperature=temperature
    )
    preds, panels = {}, {}
    for split, examples in session.splits().items():
        preds[split] = {
            "MAP": session.map_outputs(split, examples).distribution(),
            "posterior": posterior_outputs(session, fitted, split, examples).distribution(temperature),
        }
        if split == "ood":
            continue
        labels = labels_of(examples)
        metrics = SplitEval(
            size=len(examples),
            map=split_metrics(preds[split]["MAP"], labels),
            posterior=split_metrics(preds[split]["posterior"], labels),
            conformal=None if conformal is None else conformal_metrics(preds[split]["posterior"], examples, *conformal),
        )
        if split == "test":
            card.test = metrics
        else:
            card.shift = metrics.model_copy(update={"dataset": session.shift[0]})
        title = "test" if split == "test" else f"shift: {session.shift[0]}"
        panels[title] = {method: (pred.probs, labels) for method, pred in preds[split].items()}
    if session.ood is not None:
        card.ood = OodEval(
            dataset=session.ood[0],
            size=len(session.ood[1]),
            map=ood_metrics(preds["test"]["MAP"], preds["ood"]["MAP"], with_mi=False),
            posterior=ood_metrics(preds["test"]["posterior"], preds["ood"]["posterior"], with_mi=with_mi),
        )
    if ood is not None:
        add_ood_score_metrics(card, ood)
    return card, panels


def conformal_metrics(
    pred: Predictive, examples: list[Example], calibration: ConformalCalibration, alpha: float
) -> dict[str, float]:
    """The served predictive's conformal sets on a labelled split: coverage against its target, mean size."""
    valid = valid_labels([e.num_choices for e in examples], pred.probs.shape[-1])
    return set_metrics(calibration.sets(pred.probs, alpha, valid), labels_of(examples), alpha)


def add_ood_score_metrics(card: EvalCard, ood: FittedOod) -> None:
    """The OOD score's AUROC (and FPR at 95% TPR) against the OOD set beside the other scores (the same for
    MAP and posterior: it reads the frozen base), and against the shift set as ``ood_score_auroc``."""
    if card.ood is not None and "ood" in ood.metrics:
        values = {
            "ood_score": ood.metrics["ood"]["auroc"],
            "ood_score_fpr_at_95_tpr": ood.metrics["ood"]["fpr_at_95_tpr"],
        }
        card.ood.map.update(values)
        card.ood.posterior.update(values)
    if card.shift is not None and "shift" in ood.metrics:
        values = {"ood_score_auroc": ood.metrics["shift"]["auroc"]}
        card.shift.map.update(values)
        card.shift.posterior.update(values)


def write_bundle(
    session: Session,
    out: Path,
    fitted: Fitted,
    calibration: Calibrated,
    evaluation: EvalCard,
    panels: dict,
    ood: FittedOod | None = None,
) -> Path:
    config, model, base = session.config, session.model, session.model.base
    posterior = fitted.posterior
    temperature, rules = calibration.temperature, calibration.rules
    adapter = config.adapter
    manifest = BundleManifest(
        name=config.bundle.name or _bundle_name(out),
        version=config.bundle.version or datetime.now(UTC).strftime("%Y%m%d.%H%M%S"),
        task=TaskSpec(
            type="multiple-choice" if config.multiple_choice else "sequence-classification",
            labels=session.task.labels,
            pooling=model.task_pooling,
            text_pair=session.task.text_pair,
            max_length=config.max_tokens,
            **_choice_fields(config),
        ),
        base_model=BaseModelSpec(
            name_or_path=adapter.base_model,
            fingerprint=session.fingerprint,
            dtype="float32",
            architecture=base.config.model_type,
            hidden_size=base.config.hidden_size,
        ),
        adapter=AdapterSpec(
            rank=adapter.rank,
            alpha=adapter.alpha,
            target_modules=session.patterns,
            modules=session.names,
            projection=ProjectionSpecRecord(
                spec=adapter.projection,
                seed=config.seed,
                data=session.projection_data,
                trained=config.optimisation.train_projections or session.imported is not None,
            ),
        ),
        head=HeadSpec(
            trained=model.train_head,
            in_features=model.head.in_features,
            num_labels=len(session.task.labels),
            pooler_module=session.pooler_module,
        ),
        posterior=PosteriorSpec(
            family=posterior.family,
            prior_precision=fitted.diagnostics.get("prior_precision"),
            default_num_samples=fitted.num_samples,
            covers_head=HEAD_WEIGHT in posterior.names and posterior.family != PosteriorFamily.MAP,
            predictive=calibration.served.mode,
        ),
        # the ood rule first: when an input is both unfamiliar and unsure, "out of distribution" is the reason
        conformal=conformal_spec(calibration.conformal, calibration.alpha),
        calibration=CalibrationSpec(
            temperature=temperature,
            abstention=([ood.rule] if ood else []) + rules,
            **_choice_record(calibration.choice),
        ),
        ood=ood.spec if ood else None,
        imported=session.imported,
        eval=evaluation.model_copy(
            update={
                "data": data_card(session),
                "training": _training_record(session, fitted),
                "warnings": [w for rule in rules if (w := abstention_warning(rule))] or None,
            }
        ),
    )
    bundle = Bundle.from_classifier(model, posterior, manifest)
    bundle.ood = ood.score if ood else None
    bundle.conformal = calibration.conformal
    with staged(out) as staging:
        save_bundle(bundle, staging)
        write_reliability_png(staging / "reliability.png", panels)
        (staging / "report.md").write_text(render_report(manifest))
        record = {"config": config.flat(), **manifest.eval.training.model_dump(mode="json")}
        (staging / "training.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    own = manifest.adapter.projection.trained  # trained with the cores, or imported: this bundle's alone
    size = bundle_size_kb(out, projections=own)
    session.log(f"bundle written to {out} ({size:.0f} kB {'with its own' if own else 'without'} projections)")
    for line in summary_lines(evaluation):
        session.log(line)
    for warning in manifest.eval.warnings or []:  # last, where the user looks
        session.log(f"warning: {warning}")
    return out


def _training_record(session: Session, fitted: Fitted) -> TrainingRecord:
    map_result, seconds = session.map_result, session.stage.seconds
    if map_result is not None:
        kept = f"epoch {map_result.best_epoch} of {len(map_result.history)} kept ({_kept_by(session.config)})"
    else:
        kept = f"the MAP imported from {session.imported.source}, not trained" if session.imported else "no MAP"
    return TrainingRecord(
        map=_map_record(map_result) if map_result else None,
        posterior={"method": fitted.method, "seconds": fitted.seconds, **fitted.diagnostics},
        stage_seconds=seconds,
        summary=f"{kept}; {sum(seconds.values()):.0f} s in all ({_stage_list(seconds)}).",
    )


def run(config: TrainConfig) -> Path:
    """Train, fit the posterior, calibrate, evaluate and write a bundle; returns its directory."""
    return train(config)[0]


def train(config: TrainConfig) -> tuple[Path, Session, Fitted | None]:
    """:func:`run`, also returning the session (the trained model) and the fitted posterior (``None`` on the
    processes other than the main one under ``accelerate launch``)."""
    config.validate()
    out = Path(config.bundle.out)
    targets = checkpoint_outputs(out, config.optimisation.checkpoint_epochs)
    for target in targets.values():
        prepare_output(target, config.bundle.overwrite)
    session = prepare(config)
    ood = fit_ood(session)  # the frozen base's features: before training, so a score that cannot fit fails fast
    session.stage.done("ood_score")
    if session.imported is None:
        map_result = fit_map(session, objective=get_method(config.posterior.method).map_objective(config))
    if not session.accelerator.is_main_process:  # under `accelerate launch`, one process finishes the job
        return out, session, None
    written, fitted = out, None
    for epoch, target in targets.items():
        if epoch is not None:  # the MAP as it was at the end of that epoch
            session.model.load_state_dict(map_result.checkpoints[epoch], strict=False)
            map_result.best_epoch = epoch
            session.accelerator.print(f"checkpoint epoch {epoch}: posterior, calibration and evaluation → {target}")
        fitted = fit(session, config.posterior.method)
        session.stage.done("posterior")
        calibration = calibrate(session, fitted)
        session.stage.done("calibration")
        conformal = (calibration.conformal, calibration.alpha)
        evaluation, panels = evaluate(session, calibration.served, calibration.temperature, ood, conformal)
        session.stage.done("evaluation")
        written = write_bundle(session, target, fitted, calibration, evaluation, panels, ood)
    return written, session, fitted


def checkpoint_outputs(out: Path, epochs: list[int] | None) -> dict[int | None, Path]:
    """Where each bundle goes: ``out`` itself, or with ``--checkpoint-epochs`` one ``out/epoch-<E>`` per epoch
    (``out`` then holds only those)."""
    if epochs is None:
        return {None: out}
    if (out / MANIFEST_FILE).is_file():
        raise ConfigError(f"--out {out} holds a bundle; --checkpoint-epochs writes one bundle per epoch below it")
    return {epoch: out / f"epoch-{epoch}" for epoch in sorted(epochs)}


def _stage_list(seconds: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())


def _bundle_name(out: Path) -> str:
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in out.resolve().name).strip("-._")
    return name or "bundle"


def bundle_size_kb(directory: Path, projections: bool = False) -> float:
    """Size of bundle.json, adapter, posterior and OOD-score files, and of the projections when asked (shared
    across bundles unless they were trained, L-LoRA-S)."""
    files = ["bundle.json", "adapter.safetensors", "posterior.safetensors", "ood.safetensors"]
    files += ["projections.safetensors"] if projections else []
    return sum((directory / f).stat().st_size for f in files if (directory / f).is_file()) / 1024


def _choice_fields(config: TrainConfig) -> dict[str, Any]:
    """The manifest's record of how multiple-choice items are put to the LM (nothing for classification)."""
    if not config.multiple_choice:
        return {}
    choice_format = config.choice_format
    fields = {"prompt_template": choice_format.prompt_template, "choice_scoring": choice_format.scoring}
    return fields | ({"cloze_normalisation": choice_format.normalisation} if choice_format.cloze else {})


def _map_record(result: MapResult) -> dict[str, Any]:
    """The MAP training as the bundle records it (the checkpoints' tensors are not kept, only their epochs)."""
    return {
        "best_epoch": result.best_epoch,
        "history": result.history,
        "seconds": result.seconds,
        "checkpoint_epochs": sorted(result.checkpoints) or None,
    }


def _kept_by(config: TrainConfig) -> str:
    optimisation = config.optimisation
    if optimisation.checkpoint_epochs is not None:
        return "a named checkpoint epoch"
    if optimisation.select_by == SelectBy.LAST:
        return "the last epoch, no early stopping"
    return f"validation {optimisation.select_by}"


def _choice_record(choice: PredictiveChoice | None) -> dict[str, Any]:
    """The calibration rule's record for the manifest (nothing when the calibration was fixed)."""
    if choice is None:
        return {}
    return {"choice": choice.choice, "candidates": choice.candidates}

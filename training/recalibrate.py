"""``caveat-train recalibrate``: refit a bundle's calibration on labels that came back from production.

The serve → labels → recalibrate → swap loop (docs/design.md, feedback): the server logs each labelled answer with
the probabilities it served (``adapters.feedback``); this command splits those of one bundle version into a fitting
part and a held-out part, refits on the fitting part the temperature over the served predictive, the abstention
thresholds (same kinds and targets) and the conformal thresholds (same score and level) — never the cores — and
writes a new bundle version that the server takes by the usual hot swap, with before/after figures on the held-out
part in its manifest and report.

The temperature is exact for a bundle that serves its MAP (the default when the posterior does not beat it):
``softmax(log p / τ)`` of the served ``p = softmax(f / T)`` is ``softmax(f / (T τ))``, so the new bundle serves
temperature ``T τ``. A bundle that serves a posterior predictive mixes draws ``p̄ = mean_s softmax(f_s / T)``, which a
temperature over the mixture does not reproduce; the server logs such an answer's per-draw probabilities (its
first :data:`adapters.feedback.LOGGED_DRAWS`), and the temperature is fitted over the draws:
``mean_s softmax(log q_s / τ)`` with ``q_s = softmax(f_s / T)`` is the predictive at temperature ``T τ`` — exact for
those draws, a Monte-Carlo estimate of the served predictive beyond them.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adapters import load_bundle, save_bundle
from adapters.bundle import Bundle, conformal_spec, far_conformal_spec
from adapters.conformal import ConformalCalibration, set_metrics
from adapters.errors import CaveatError
from adapters.feedback import LabelledAnswer, read_feedback
from adapters.files import staged
from adapters.manifest import AbstentionSpec, FarTemperature
from adapters.predictive import Predictive, predictive
from adapters.tasks import valid_labels
from adapters.vocab import AbstentionKind, PosteriorFamily, PredictiveMode
from training.calibration import fit_abstention, fit_temperature
from training.config import ConfigError
from training.metrics import classification_metrics
from training.pipeline import prepare_output
from training.report import render_report

MIN_LABELS = 20  # fewer labelled answers to fit on cannot move a threshold honestly
DESCRIPTION = __doc__.split("\n\n")[0]


@dataclass
class Recalibration:
    """What recalibration fitted and what it did on the held-out labels."""

    temperature: float  # over the served predictive (τ); the bundle's new temperature is T τ
    rules: list[AbstentionSpec]
    conformal: ConformalCalibration | None
    before: dict[str, float]
    after: dict[str, float]
    fitted_on: int
    held_out: int
    far_below: float | None = None  # --by-ood: the temperature is for inputs with a p-value below this
    far_conformal: ConformalCalibration | None = None  # --by-ood: the conformal calibration of those inputs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caveat-train recalibrate", description=DESCRIPTION)
    parser.add_argument("bundle", type=Path, help="the bundle whose answers were labelled")
    parser.add_argument(
        "--labels", type=Path, required=True, help="the server's feedback log: a feedback-*.jsonl file or its directory"
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the new bundle version")
    parser.add_argument("--holdout", type=float, default=0.3, help="fraction of the labels kept out for the report")
    parser.add_argument(
        "--by-ood",
        action="store_true",
        help="refit a temperature and conformal sets only for the inputs the OOD score placed far out (served "
        "p-value below --ood-pvalue-below); the others keep the bundle's calibration, and the thresholds stay",
    )
    parser.add_argument(
        "--ood-pvalue-below",
        type=float,
        default=None,
        help="with --by-ood: the p-value below which an input is far out (default: the bundle's ood rule level, "
        "else 0.01)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the fit / held-out split")
    parser.add_argument("--version", default=None, help="the new version (default: a UTC timestamp)")
    parser.add_argument("--overwrite", action="store_true", help="replace a bundle in --out")
    return parser


def main(argv: list[str]) -> Path:
    args = build_parser().parse_args(argv)
    if not 0 < args.holdout < 1:
        raise ConfigError("--holdout must be in (0, 1)")
    if args.ood_pvalue_below is not None and not args.by_ood:
        raise ConfigError("--ood-pvalue-below is a level of --by-ood; pass --by-ood with it")
    prepare_output(args.out, args.overwrite)
    try:
        bundle = load_bundle(args.bundle)
    except (CaveatError, OSError) as exc:
        raise ConfigError(f"{args.bundle}: {exc}") from exc
    records = labelled_answers(bundle, args.labels)
    if args.by_ood:
        result = recalibrate_far(bundle, records, args.holdout, args.seed, args.ood_pvalue_below)
    else:
        result = recalibrate(bundle, records, args.holdout, args.seed)
    path = write(bundle, result, args.out, args.version, args.labels)
    print(summary(result, path))
    return path


def labelled_answers(bundle: Bundle, path: Path) -> list[LabelledAnswer]:
    """The log's records of this bundle version, checked against its labels (``ConfigError``: exit 2)."""
    if not path.exists():
        raise ConfigError(f"--labels {path}: no such file or directory")
    try:
        records, torn = read_feedback(path)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"--labels {path}: {exc}") from exc
    if not records:
        raise ConfigError(f"--labels {path}: holds no labelled answers")
    name, version, labels = bundle.name, bundle.version, bundle.manifest.task.labels
    own = [r for r in records if r.adapter == name and r.version == version]
    if not own:
        held = sorted({f"{r.adapter}@{r.version}" for r in records})
        raise ConfigError(f"--labels {path}: no labels for {name}@{version}; the log holds {', '.join(held[:5])}")
    for record in own:
        if record.label >= len(labels) or labels[record.label] != record.label_name:
            raise ConfigError(f"--labels {path}: answer {record.id!r} has label {record.label_name!r}, unknown here")
        if len(record.probs) != len(labels):
            raise ConfigError(f"--labels {path}: answer {record.id!r} has {len(record.probs)} probabilities")
    if torn:
        print(f"recalibrate: skipped {torn} torn line(s) of an interrupted write in {path}")
    return own


def recalibrate(bundle: Bundle, records: list[LabelledAnswer], holdout: float, seed: int) -> Recalibration:
    """Fit on a seeded ``1 − holdout`` share of ``records``, report on the rest."""
    _check_draws(bundle, records)
    fit_part, held = _split(records, holdout, seed)
    if len(fit_part) < MIN_LABELS:
        raise ConfigError(f"{len(records)} labelled answers leave {len(fit_part)} to fit on; at least {MIN_LABELS}")
    log_p, labels = _served(fit_part)
    tau = fit_temperature(log_p, labels)
    fitted = predictive(log_p, tau)
    rules = [_refit(rule, fitted, labels) for rule in bundle.manifest.calibration.abstention]
    conformal, alpha = None, None
    if bundle.conformal is not None:
        spec = bundle.manifest.conformal
        conformal = ConformalCalibration.fit(fitted.probs, labels, spec.score, spec.class_conditional)
        alpha = spec.alpha
    held_log_p, held_labels = _served(held)
    before = _figures(predictive(held_log_p), held_labels, held, bundle.conformal, alpha, _served_far(bundle, held))
    after = _figures(predictive(held_log_p, tau), held_labels, held, conformal, alpha)
    return Recalibration(tau, rules, conformal, before, after, len(fit_part), len(held))


def recalibrate_far(
    bundle: Bundle, records: list[LabelledAnswer], holdout: float, seed: int, below: float | None
) -> Recalibration:
    """``--by-ood``: a temperature fitted only on the records whose input was far out (served OOD p-value below
    ``below``), served to such inputs only (``calibration.far_temperature``); the figures are on all held-out
    records, far ones at the new temperature and the others as served."""
    if bundle.ood is None:
        raise ConfigError(f"{bundle.name}: --by-ood needs a bundle with an OOD score")
    below = below if below is not None else _ood_level(bundle)
    if not 0 < below <= 1:
        raise ConfigError("--ood-pvalue-below must be in (0, 1]")
    if any(r.ood_pvalue is None for r in records):
        raise ConfigError(f"{bundle.name}: --by-ood needs the served OOD p-value of every labelled answer (logged "
                          "by servers since this release)")  # fmt: skip
    served_far = bundle.manifest.calibration.far_temperature
    if served_far is not None and served_far.pvalue_below != below:
        raise ConfigError(
            f"{bundle.name} serves a far temperature below p {served_far.pvalue_below:g}, not {below:g}: "
            "recalibrate --by-ood at that level, or start from a version without one"
        )
    _check_draws(bundle, records)
    fit_part, held = _split(records, holdout, seed)
    far = [r for r in fit_part if r.ood_pvalue < below]
    if len(far) < MIN_LABELS:
        raise ConfigError(f"{len(far)} of the labels to fit on were far out (p < {below:g}); at least {MIN_LABELS}")
    log_p, labels = _served(far)
    tau = fit_temperature(log_p, labels)
    far_conformal, alpha = None, None
    if bundle.conformal is not None:  # the far inputs' sets from their own labels, at their new temperature
        spec = bundle.manifest.conformal
        far_probs = predictive(log_p, tau).probs
        far_conformal = ConformalCalibration.fit(far_probs, labels, spec.score, spec.class_conditional)
        alpha = spec.alpha
    held_log_p, held_labels = _served(held)
    is_far = torch.tensor([r.ood_pvalue < below for r in held])
    per_record = torch.where(is_far, tau, 1.0).double()
    before = _figures(predictive(held_log_p), held_labels, held, bundle.conformal, alpha, _served_far(bundle, held))
    after = _figures(
        predictive(held_log_p / per_record.view(1, -1, 1)), held_labels, held, bundle.conformal, alpha,
        far=None if far_conformal is None else (far_conformal, is_far),
    )  # fmt: skip
    rules = list(bundle.manifest.calibration.abstention)
    return Recalibration(
        tau, rules, None, before, after, len(far), len(held), far_below=below, far_conformal=far_conformal
    )


def _served_far(bundle: Bundle, records: list[LabelledAnswer]) -> tuple[ConformalCalibration, Tensor] | None:
    """The bundle's far-out conformal calibration and the mask of ``records`` whose sets it gave, or ``None``."""
    far = bundle.manifest.calibration.far_temperature
    if bundle.far_conformal is None or far is None:
        return None
    return bundle.far_conformal, torch.tensor([r.ood_pvalue is not None and r.ood_pvalue < far.pvalue_below
                                               for r in records])  # fmt: skip


def _ood_level(bundle: Bundle) -> float:
    """The p-value level of the bundle's ood abstention rule, else 0.01."""
    rule = next((r for r in bundle.manifest.calibration.abstention if r.kind == AbstentionKind.OOD), None)
    return float(rule.threshold) if rule is not None else 0.01


def _split(records: list[LabelledAnswer], holdout: float, seed: int) -> tuple[list, list]:
    """A seeded split into the records to fit on and the ``holdout`` share (at least one) kept out for the report."""
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))
    cut = len(records) - max(1, round(holdout * len(records)))
    return [records[i] for i in order[:cut]], [records[i] for i in order[cut:]]


def _check_draws(bundle: Bundle, records: list[LabelledAnswer]) -> None:
    """A bundle serving a posterior predictive is refitted over its answers' logged draws: every record has them."""
    posterior = bundle.manifest.posterior
    if posterior.predictive == PredictiveMode.MAP or posterior.family == PosteriorFamily.MAP:
        return
    missing = sum(r.sample_probs is None for r in records)
    if missing:
        raise ConfigError(
            f"{bundle.name}: it serves the {posterior.predictive} posterior predictive, and {missing} of its "
            f"{len(records)} labelled answers carry no per-draw probabilities (answered by method map, or logged by "
            "a server before they were); a temperature over a posterior predictive is refitted over its draws"
        )


def _served(records: list[LabelledAnswer]) -> tuple[Tensor, Tensor]:
    """Log-probabilities as served (the floor keeps a 0 finite) and labels ``(N,)``: ``(1, N, C)`` of the served
    probabilities, or ``(S, N, C)`` of a posterior answer's logged draws (the fewest any record has)."""
    labels = torch.tensor([r.label for r in records])
    if all(r.sample_probs is not None for r in records):
        draws = min(len(r.sample_probs) for r in records)
        probs = torch.tensor([r.sample_probs[:draws] for r in records], dtype=torch.float64).transpose(0, 1)
    else:
        probs = torch.tensor([r.probs for r in records], dtype=torch.float64).unsqueeze(0)
    return probs.clamp_min(1e-300).log(), labels


def _refit(rule: AbstentionSpec, pred: Predictive, labels: Tensor) -> AbstentionSpec:
    """The same rule refitted on the recalibrated predictive, for the same target; rules not fitted on labels
    (the OOD score's, ``ambiguous``, an epistemic one that a MAP never fires) stay as they are."""
    target = rule.target or {}
    if rule.kind not in (AbstentionKind.MAX_PROB, AbstentionKind.ENTROPY) or not target:
        return rule
    if "risk" in target:
        return fit_abstention(pred, labels, rule.kind, target_risk=target["risk"])
    return fit_abstention(pred, labels, rule.kind, target_coverage=target["coverage"])


def _figures(
    pred: Predictive,
    labels: Tensor,
    records: list[LabelledAnswer],
    conformal: ConformalCalibration | None,
    alpha: float | None,
    far: tuple[ConformalCalibration, Tensor] | None = None,
) -> dict[str, float]:
    """Accuracy, ECE, NLL, Brier and the conformal sets' figures of the held-out records (``far``: a calibration
    and the ``(N,)`` mask of the records whose sets it gives)."""
    metrics = classification_metrics(pred.probs, labels)
    figures = {k: metrics[k] for k in ("accuracy", "ece", "nll", "brier")}
    if conformal is not None and alpha is not None:
        counts = [_choice_count(r) for r in records]
        valid = valid_labels(counts, pred.probs.shape[-1])
        sets = conformal.sets(pred.probs, alpha, valid)
        if far is not None:
            far_conformal, is_far = far
            sets[is_far] = far_conformal.sets(pred.probs[is_far], alpha, None if valid is None else valid[is_far])
        figures |= {f"set_{k}": v for k, v in set_metrics(sets, labels, alpha).items()}
    return figures


def _choice_count(record: LabelledAnswer) -> int | None:
    """A multiple-choice answer's number of choices (its set never holds a letter beyond them)."""
    return len(record.input["choices"]) if isinstance(record.input, dict) and "choices" in record.input else None


def write(bundle: Bundle, result: Recalibration, out: Path, version: str | None, source: Path) -> Path:
    """The new bundle version: the old one's tensors, the refitted calibration, the record of what was done."""
    manifest = bundle.manifest.model_copy(deep=True)
    manifest.version = version or datetime.now(UTC).strftime("%Y%m%d.%H%M%S")
    manifest.created_at = datetime.now(UTC).isoformat(timespec="seconds")
    calibration, far = manifest.calibration, manifest.calibration.far_temperature
    far_conformal = bundle.far_conformal
    if result.far_below is None:  # every input's served predictive was refitted: the far ones' too
        calibration.temperature *= result.temperature
        if far is not None:
            far.temperature *= result.temperature
    else:  # the far inputs were served at the far temperature when the bundle had one (at the same level)
        served = calibration.temperature if far is None else far.temperature
        calibration.far_temperature = FarTemperature(
            pvalue_below=result.far_below, temperature=served * result.temperature
        )
        far_conformal = result.far_conformal
    calibration.abstention = result.rules
    if result.conformal is not None:  # refitted on all the labels: the far inputs' own sets no longer apply
        manifest.conformal, far_conformal = conformal_spec(result.conformal, manifest.conformal.alpha), None
    if manifest.conformal is not None:
        alpha = manifest.conformal.alpha
        manifest.conformal.far = None if far_conformal is None else far_conformal_spec(far_conformal, alpha)
    record: dict[str, Any] = {
        "from_version": bundle.version, "labels": str(source), "fitted_on": result.fitted_on,
        "held_out": result.held_out, "temperature_over_served": result.temperature, "before": result.before,
        "after": result.after, "far_pvalue_below": result.far_below,
    }  # fmt: skip
    stale = (
        f"the test, shift and OOD figures are version {bundle.version}'s, measured before recalibration; the "
        "held-out labels' before/after figures are in the recalibration record"
    )
    warnings = [*(manifest.eval.warnings or []), stale]
    manifest.eval = manifest.eval.model_copy(update={"recalibration": record, "warnings": warnings})
    new = replace(  # every tensor kept
        bundle, manifest=manifest, conformal=result.conformal or bundle.conformal, far_conformal=far_conformal
    )
    with staged(out) as staging:
        save_bundle(new, staging)
        (staging / "report.md").write_text(render_report(manifest) + _report_section(record))
        (staging / "recalibration.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def _report_section(record: dict[str, Any]) -> str:
    rows = sorted(set(record["before"]) | set(record["after"]))
    lines = [
        "\n## Recalibration on production labels\n",
        f"Refitted on {record['fitted_on']} labelled answers of version {record['from_version']} "
        f"({record['labels']}); a temperature of {record['temperature_over_served']:.4f} over the served "
        f"predictive{_far_words(record)}; the figures are on the {record['held_out']} held-out labels.\n",
        "| metric | before | after |\n|---|---:|---:|",
        *(f"| {k} | {record['before'].get(k, math.nan):.4f} | {record['after'].get(k, math.nan):.4f} |" for k in rows),
    ]
    return "\n".join(lines) + "\n"


def _far_words(record: dict[str, Any]) -> str:
    below = record.get("far_pvalue_below")
    return "" if below is None else f" of the inputs far out (OOD p-value below {below:g}; the others unchanged)"


def summary(result: Recalibration, path: Path) -> str:
    b, a = result.before, result.after
    line = (
        f"recalibrated on {result.fitted_on} labels (held out {result.held_out}): ECE {b['ece']:.4f} → "
        f"{a['ece']:.4f}, NLL {b['nll']:.4f} → {a['nll']:.4f}"
    )
    if "set_coverage" in a:
        line += (
            f", set coverage {b['set_coverage']:.3f} → {a['set_coverage']:.3f} (target {a['set_target_coverage']:g})"
        )
    return f"{line}; new bundle at {path}"

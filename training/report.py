"""The bundle's human-readable report: report.md and reliability.png (MAP vs posterior)."""

from __future__ import annotations

from pathlib import Path

import torch

from adapters.bins import calibration_bins
from adapters.eval_card import EvalCard
from adapters.manifest import AbstentionSpec, BundleManifest

METRIC_ROWS = [
    ("accuracy", "accuracy ↑"),
    ("ece", "ECE (15 bins) ↓"),
    ("mce", "MCE ↓"),
    ("nll", "NLL ↓"),
    ("brier", "Brier ↓"),
    ("aurc", "AURC ↓"),
    ("risk_at_80_coverage", "risk @ 80% coverage ↓"),
    ("coverage_at_5_risk", "coverage @ 5% risk ↑"),
    ("mean_mutual_information", "mean MI (nats)"),
]


def write_reliability_png(path: Path, panels: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> None:
    """One panel per split, one reliability curve per method: ``panels[split][method] = (probs, labels)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (split, methods) in zip(axes[0], panels.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
        for method, (probs, labels) in methods.items():
            count, acc, conf = calibration_bins(probs, labels)
            mask = count > 0
            ax.plot(conf[mask].numpy(), acc[mask].numpy(), marker="o", markersize=3, label=method)
        ax.set(title=split, xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(columns: dict[str, dict[str, float]], rows: list[tuple[str, str]]) -> str:
    header = "| metric | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns) + "\n"
    lines = []
    for key, label in rows:
        if any(key in values for values in columns.values()):
            cells = [f"{values[key]:.4f}" if key in values else "—" for values in columns.values()]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return header + "\n".join(lines) + "\n"


def _describe_ood(manifest: BundleManifest) -> str:
    ood, ev = manifest.ood, manifest.eval
    against = []
    if ev.ood is not None and "ood_score" in ev.ood.posterior:
        against.append(f"{ev.ood.dataset} {ev.ood.posterior['ood_score']:.4f}")
    if ev.shift is not None and "ood_score_auroc" in ev.shift.posterior:
        against.append(f"{ev.shift.dataset} {ev.shift.posterior['ood_score_auroc']:.4f}")
    return (
        f"## OOD score\n\n`{ood.method}` on the frozen base's layers {ood.layers} ({ood.pooling}-pooled, each "
        f"L2-normalised), fitted on {ood.train_size} training inputs; AUROC against the test split: "
        f"{', '.join(against) or 'not measured'}.\n"
    )


def _describe_rule(rule: AbstentionSpec) -> str:
    target = rule.target or {}
    if rule.kind == "ood":
        return f"ood: p-value below {rule.threshold:.4g} ({target.get('validation_fraction', 0):.3g} of validation)"
    if rule.kind == "ambiguous":
        return f"ambiguous: a conformal set of more than {rule.threshold:.4g} label, or none"
    goal = ", ".join(f"{k} {v:.3g}" for k, v in target.items() if not k.startswith("validation_"))
    fitted = (
        f"validation coverage {target.get('validation_coverage', 0):.3f}, risk {target.get('validation_risk', 0):.3f}"
    )
    return f"{rule.kind} threshold {rule.threshold:.4g} (target {goal or 'none'}; {fitted})"


def render_report(manifest: BundleManifest) -> str:
    """Markdown report of a bundle from its manifest (eval card and training record included)."""
    ev, posterior, adapter = manifest.eval, manifest.posterior, manifest.adapter
    summary = ev.training.summary if ev.training else ""
    parts = [
        f"# {manifest.name} {manifest.version}\n",
        f"Base `{manifest.base_model.name_or_path}`, LoRA-XS r={adapter.rank} "
        f"(alpha {adapter.alpha}, projection `{adapter.projection.spec}`"
        f"{', trained with the cores (L-LoRA-S)' if adapter.projection.trained else ''}) on "
        f"{len(adapter.modules)} layers (`{', '.join(adapter.target_modules)}`); "
        f"posterior `{posterior.family}` (prior precision {posterior.prior_precision}), "
        f"{posterior.default_num_samples} samples by default. Labels: {', '.join(manifest.task.labels)}.\n",
        f"Training: {summary}\n",
    ]
    if ev.warnings:
        parts += ["## Warnings\n", "".join(f"- {warning}\n" for warning in ev.warnings)]
    prior_choice = (ev.training.posterior.get("prior_choice") if ev.training else None) or ""
    if prior_choice:
        parts.append(f"Prior precision: {prior_choice}\n")
    served = _served_label(manifest)
    if ev.test is not None:
        parts += ["## Test split\n", _table({"MAP": ev.test.map, served: ev.test.posterior}, METRIC_ROWS)]
    if ev.shift is not None:
        parts += [
            f"## Domain shift: {ev.shift.dataset} ({ev.shift.size} examples)\n",
            _table({"MAP": ev.shift.map, served: ev.shift.posterior}, METRIC_ROWS),
        ]
    if ev.ood is not None:
        rows = [
            ("max_prob", "AUROC, 1 − max prob"),
            ("entropy", "AUROC, entropy"),
            ("mutual_information", "AUROC, MI"),
            ("ood_score", "AUROC, ood_score (frozen-base features)"),
        ]
        parts += [
            f"## Out-of-distribution detection: {ev.ood.dataset} ({ev.ood.size} texts) vs the test split\n",
            _table({"MAP": ev.ood.map, served: ev.ood.posterior}, rows),
        ]
    if manifest.ood is not None:
        parts.append(_describe_ood(manifest))
    if manifest.conformal is not None:
        parts.append(_describe_conformal(manifest))
    calibration = manifest.calibration
    rules = "; ".join(_describe_rule(r) for r in calibration.abstention)
    parts += [
        "## Calibration (fitted on the validation split)\n",
        f"Temperature {calibration.temperature:.4f}. Abstention: {rules or 'none'}.\n",
        *_describe_choice(manifest),
        "![reliability](reliability.png)\n",
    ]
    return "\n".join(parts)


def _describe_conformal(manifest: BundleManifest) -> str:
    """The prediction sets' guarantee, its condition, and what they did on test and under shift."""
    spec, ev = manifest.conformal, manifest.eval
    kind = "class-conditional (per label) " if spec.class_conditional else ""
    lines = [
        f"## Conformal prediction sets\n\n{spec.score.upper()} {kind}sets at α = {spec.alpha:g}, calibrated on "
        f"{spec.size} validation examples: each holds the true label with probability at least {1 - spec.alpha:g} "
        "for inputs exchangeable with the validation data (under shift this is measured, not promised).\n"
    ]
    splits = (("test", ev.test), ("shift", ev.shift))
    measured = {name: split.conformal for name, split in splits if split is not None and split.conformal}
    if measured:
        rows = [("coverage", "coverage"), ("mean_set_size", "mean set size"), ("singleton", "single-label sets"),
                ("empty", "empty sets")]  # fmt: skip
        lines.append(_table(measured, rows))
    return "\n".join(lines)


def _served_label(manifest: BundleManifest) -> str:
    """The column of the predictive the bundle serves: the posterior's, or what the validation rule chose."""
    choice = manifest.calibration.choice
    return "posterior" if choice is None else f"served ({choice})"


def _describe_choice(manifest: BundleManifest) -> list[str]:
    """The validation rule's candidates, as a table, and its choice."""
    calibration = manifest.calibration
    if calibration.choice is None or not calibration.candidates:
        return []
    rows = [("nll", "validation NLL (temperatures cross-fitted)"), ("ece", "validation ECE"),
            ("temperature", "temperature"), ("gain", "NLL gain over the choice before"),
            ("standard_error", "its standard error")]  # fmt: skip
    return [
        f"Served predictive: **{calibration.choice}**, the simplest candidate that no later one beat on validation "
        "NLL by more than twice the standard error of the gain.\n",
        _table(calibration.candidates, rows),
    ]


def summary_lines(card: EvalCard) -> list[str]:
    """The end-of-run console summary: test (and shift) accuracy, ECE, NLL; OOD AUROC per score."""
    lines = []
    for split, metrics in (("test", card.test), ("shift", card.shift)):
        if metrics is not None:
            sets = metrics.conformal
            coverage = "" if sets is None else (
                f"; sets cover {sets['coverage']:.3f} (target {sets['target_coverage']:g}), mean size "
                f"{sets['mean_set_size']:.2f}"
            )  # fmt: skip
            lines.append(
                f"{split} ({metrics.size}): posterior {_headline(metrics.posterior)}; MAP {_headline(metrics.map)}"
                f"{coverage}"
            )
    if card.ood is not None:
        scores = ", ".join(f"{name} {value:.4f}" for name, value in card.ood.posterior.items() if "_fpr_" not in name)
        lines.append(f"ood {card.ood.dataset} ({card.ood.size}): posterior AUROC {scores}")
    return lines


def _headline(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} {metrics[name]:.4f}" for name in ("accuracy", "ece", "nll") if name in metrics)

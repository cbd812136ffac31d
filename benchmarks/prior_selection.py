"""How the Laplace prior precision δ is chosen, and what each rule does on test and under shift.

One MAP (trained here, or read from ``--map-bundle``, a bundle trained with the same flags) and one
Laplace-Kronecker fit; every δ on a half-decade ladder around the marginal-likelihood value is evaluated with
the GLM predictive on validation, test, the shift set and the OOD set (one linearisation per split serves
every δ). Each selection rule then picks a δ **from the validation columns only**, with or without a
temperature fitted on validation after the posterior, and its test and shift figures are read off the same
table::

    python benchmarks/prior_selection.py --map-bundle bundles/sst2-minilm \
        --json docs/results/prior-selection-sst2-minilm-cpu.json -- --shift drugreviews --ood bbcnews

Everything after ``--`` is ``caveat-train`` flags (the embedded default when empty, plus the evaluation sets).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adapters.predictives import GLM
from training.calibration import fit_temperature
from training.cli import build_parser, parse
from training.data import subset
from training.encoding import make_loader
from training.inference import Outputs, labels_of, ood_metrics
from training.methods.laplace import CHECK_STEP
from training.methods.laplace_fit import fit_laplace
from training.metrics import classification_metrics
from training.session import Session, bundle_parameters, fit_map, prepare

# δ = marglik × 10^d for d on this half-decade ladder; 12 decades above it the posterior is the MAP.
DECADES = [d / 2 for d in range(-2, 13)]
ECE_SLACK = 0.005  # the in-distribution ECE a posterior may add to the MAP's (the target)


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--map-bundle", type=Path, help="take the MAP cores and head from this bundle")
    parser.add_argument("--json", type=Path, default=Path("docs/results/prior-selection-sst2-minilm-cpu.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("train_flags", nargs="*", help="caveat-train flags (after --)")
    args = parser.parse_args()
    return args, args.train_flags


def load_or_train_map(session: Session, bundle: Path | None) -> float:
    """The session's MAP: a bundle's cores and head (checked to match), or trained; returns training seconds."""
    if bundle is None:
        return fit_map(session).seconds
    parameters, seconds = bundle_parameters(session, bundle, "--map-bundle")
    with torch.no_grad():
        for name, value in session.model.posterior_parameters(include_head=True).items():
            value.copy_(parameters[name])
    return seconds


FIGURES = ("accuracy", "nll", "ece")  # of training.metrics.classification_metrics, per labelled split


def evaluate(outputs: dict[str, Outputs], labels: dict[str, torch.Tensor | None], temperature: float) -> dict:
    """Each labelled split's accuracy, NLL and ECE, and the OOD set's 1 − max p AUROC against test."""
    preds = {split: out.distribution(temperature) for split, out in outputs.items()}
    figures = {}
    for split, pred in preds.items():
        if split != "ood":
            metrics = classification_metrics(pred.probs, labels[split])
            figures[split] = {name: metrics[name] for name in FIGURES}
    if "ood" in preds:
        figures["ood"] = {"auroc_max_prob": ood_metrics(preds["test"], preds["ood"], with_mi=False)["max_prob"]}
    return figures


def ladder(session: Session, num_samples: int) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """The MAP's figures, and every δ on the ladder with and without a validation temperature."""
    config = session.config
    loader = make_loader(
        subset(session.train, config.posterior.laplace.limit, config.seed), session.encoder,
        config.optimisation.batch_size, shuffle=False,
    )  # fmt: skip
    fit = fit_laplace(
        session.model, loader, "kron", include_head=config.posterior.head, n_data=len(session.train),
        progress=config.progress,
    )  # fmt: skip
    splits = {"validation": session.validation} | session.splits()
    labels = {name: None if name == "ood" else labels_of(examples) for name, examples in splits.items()}
    map_outputs = {name: session.map_outputs(name, examples) for name, examples in splits.items()}
    linearised = {name: session.linearisation(name, examples) for name, examples in splits.items()}
    map_temperature = fit_temperature(map_outputs["validation"].logits, labels["validation"])
    map_row = {
        "plain": evaluate(map_outputs, labels, 1.0),
        "tempered": evaluate(map_outputs, labels, map_temperature),
        "temperature": map_temperature,
    }
    marglik, rows = fit.info["prior_precision"], []
    for decade in DECADES:
        delta = marglik * 10**decade
        posterior = fit.with_prior(delta)
        outputs = {name: lin.outputs(posterior, num_samples, config.seed) for name, lin in linearised.items()}
        temperature = fit_temperature(outputs["validation"].logits, labels["validation"])
        rows.append({
            "decade": decade, "delta": delta, "temperature": temperature,
            "plain": evaluate(outputs, labels, 1.0), "tempered": evaluate(outputs, labels, temperature),
        })  # fmt: skip
        print(f"δ = {delta:10.4g}: validation NLL {rows[-1]['plain']['validation']['nll']:.4f} "
              f"ECE {rows[-1]['plain']['validation']['ece']:.4f}", flush=True)  # fmt: skip
    return rows, map_row, fit.info


Rule = Callable[[list[dict[str, Any]], dict[str, Any]], dict[str, Any]]


def first_no_worse(keys: tuple[str, ...], slack: dict[str, float]) -> Rule:
    """From marglik upwards, the first δ whose validation ``keys`` are each no worse than the MAP's (+ slack)."""

    def rule(rows, map_row):
        mapv = map_row["plain"]["validation"]
        for row in rows:
            if row["decade"] >= 0 and all(
                row["plain"]["validation"][k] <= mapv[k] + slack.get(k, 0.0) for k in keys
            ):  # fmt: skip
                return row
        return rows[-1]

    return rule


def best_validation(key: str, view: str = "plain") -> Rule:
    return lambda rows, map_row: min(rows, key=lambda row: row[view]["validation"][key])


RULES: dict[str, tuple[Rule, str]] = {
    "marglik": (lambda rows, map_row: next(r for r in rows if r["decade"] == 0), "plain"),
    "marglik-checked (NLL)": (first_no_worse(("nll",), {}), "plain"),
    f"marglik-checked (NLL, ECE + {ECE_SLACK})": (first_no_worse(("nll", "ece"), {"ece": ECE_SLACK}), "plain"),
    "grid: min validation NLL": (best_validation("nll"), "plain"),
    "marglik + temperature": (lambda rows, map_row: next(r for r in rows if r["decade"] == 0), "tempered"),
    "marglik-checked (NLL) + temperature": (first_no_worse(("nll",), {}), "tempered"),
    "grid (min NLL after temperature) + temperature": (best_validation("nll", "tempered"), "tempered"),
}


def table(rows: list[dict[str, Any]], map_row: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    has_shift = "shift" in map_row["plain"]
    header = (
        "| rule | δ | T | val NLL | val ECE | test acc | test NLL | test ECE | shift NLL | shift ECE | OOD 1−maxp |"
    )
    lines = [header, "|---|" + "---:|" * 10]
    chosen = []

    def line(name, delta, temperature, figures):
        shift = figures.get("shift", {})
        cells = [
            name, delta, f"{temperature:.3f}", f"{figures['validation']['nll']:.4f}",
            f"{figures['validation']['ece']:.4f}", f"{figures['test']['accuracy']:.4f}",
            f"{figures['test']['nll']:.4f}", f"{figures['test']['ece']:.4f}",
            f"{shift['nll']:.4f}" if has_shift else "—", f"{shift['ece']:.4f}" if has_shift else "—",
            f"{figures['ood']['auroc_max_prob']:.4f}" if "ood" in figures else "—",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")

    line("MAP", "∞", 1.0, map_row["plain"])
    line("MAP + temperature", "∞", map_row["temperature"], map_row["tempered"])
    for name, (rule, view) in RULES.items():
        row = rule(rows, map_row)
        temperature = row["temperature"] if view == "tempered" else 1.0
        line(name, f"{row['delta']:.4g}", temperature, row[view])
        chosen.append({"rule": name, "delta": row["delta"], "temperature": temperature, "figures": row[view]})
    return "\n".join(lines), chosen


def main() -> None:
    args, flags = parse_args()
    torch.set_num_threads(args.threads)
    config, _ = parse(flags, build_parser())
    started = time.perf_counter()
    session = prepare(config)
    map_seconds = load_or_train_map(session, args.map_bundle)
    num_samples = config.posterior.num_samples or GLM.default_draws
    rows, map_row, info = ladder(session, num_samples)
    text, chosen = table(rows, map_row)
    print(text)
    record = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}",
        "config": config.flat(),
        "map_bundle": str(args.map_bundle) if args.map_bundle else None,
        "map_seconds": map_seconds,
        "num_samples": num_samples,
        "laplace": info,
        "check_step_decades": CHECK_STEP,
        "map": map_row,
        "ladder": rows,
        "rules": chosen,
        "table": text,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()

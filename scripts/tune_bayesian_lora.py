"""Tune Bayesian-LoRA on validation only: one MAP, then one ELBO fit per candidate setting, each scored by its
sampled predictive on the validation split (NLL, ECE, accuracy). Test, shift and OOD data are never read.

python scripts/tune_bayesian_lora.py --json OUT.json -- [caveat-train flags, e.g. --train-limit 2000]

Candidates are ``name:key=value,key=value`` with the keys of ``BayesianLoraConfig`` (``prior_std``,
``kl_weight``, ...); ``--candidates`` replaces the built-in list. Each fit starts from the same MAP with the
same seed, so candidates differ only in their settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from training.cli import parse_config
from training.config import PosteriorMethod
from training.inference import labels_of, split_metrics
from training.methods import fit
from training.pipeline import posterior_outputs
from training.session import Session, fit_map, prepare

# One change each from the settings before tuning (factor lr 0.01, spelled out since the default is now 0.001).
CANDIDATES = [
    "before:factor_lr=0.01",
    "prior0.1:factor_lr=0.01,prior_std=0.1",
    "beta0.1:factor_lr=0.01,kl_weight=0.1",
    "factor-lr0.001:factor_lr=0.001",
    "prior0.3:factor_lr=0.01,prior_std=0.3",
    "prior0.1-beta0.1:factor_lr=0.01,prior_std=0.1,kl_weight=0.1",
]
REPORTED = ("nll", "ece", "accuracy", "brier")


def parse_candidate(text: str) -> tuple[str, dict[str, Any]]:
    """``name:key=value,...`` → the name and the typed changes to ``BayesianLoraConfig``."""
    name, _, body = text.partition(":")
    types = {f.name: f.type for f in dataclasses.fields(parse_config([]).posterior.bayesian_lora)}
    changes = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"{text!r}: unknown setting {key!r}; choose from {sorted(types)}")
        changes[key] = int(value) if types[key] in ("int", int) else float(value)
    return name, changes


def score(session: Session, changes: dict[str, Any]) -> dict[str, Any]:
    """Fit Bayesian-LoRA with ``changes`` from the session's MAP; its validation metrics and fit record."""
    config = session.config
    config.posterior.bayesian_lora = dataclasses.replace(config.posterior.bayesian_lora, **changes)
    config.validate(needs_out=False)
    fitted = fit(session, PosteriorMethod.BAYESIAN_LORA)
    outputs = posterior_outputs(session, fitted, "validation", session.validation)
    metrics = split_metrics(outputs.distribution(), labels_of(session.validation))
    return {
        "settings": dataclasses.asdict(config.posterior.bayesian_lora),
        "validation": metrics,
        "fit": fitted.diagnostics,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="write the candidates' validation scores here")
    parser.add_argument("--candidates", nargs="+", default=CANDIDATES, help="name:key=value,... (see above)")
    parser.add_argument("train_flags", nargs=argparse.REMAINDER, help="after --: caveat-train flags")
    args = parser.parse_args(argv)
    flags = args.train_flags[1:] if args.train_flags[:1] == ["--"] else args.train_flags
    candidates = [parse_candidate(c) for c in args.candidates]
    config = parse_config(flags)
    session = prepare(config)
    fit_map(session)
    default = dataclasses.replace(config.posterior.bayesian_lora)
    labels = labels_of(session.validation)
    rows = [
        {
            "name": "map",
            "validation": split_metrics(session.map_outputs("validation", session.validation).distribution(), labels),
        }
    ]
    record = {"command": " ".join(sys.argv), "train_flags": flags, "map_seconds": session.map_result.seconds}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    print("map | " + " | ".join(f"{k} {rows[0]['validation'][k]:.4f}" for k in REPORTED), flush=True)
    for name, changes in candidates:  # the record is rewritten after each candidate: a stopped run keeps its rows
        config.posterior.bayesian_lora = dataclasses.replace(default)
        rows.append({"name": name, **score(session, changes)})
        print(" | ".join([name, *(f"{k} {rows[-1]['validation'][k]:.4f}" for k in REPORTED)]), flush=True)
        args.json.write_text(json.dumps({**record, "rows": rows}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])

"""``caveat-train``: train a LoRA-XS adapter with a posterior and write a bundle.

``caveat-train compare --posteriors map,laplace-kron,...`` trains once and compares posterior families
(:mod:`training.compare`).

Every flag is a field of :class:`training.config.TrainConfig`; ``--config FILE`` (YAML or JSON) supplies
defaults that flags override. Problems with the input exit with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

from adapters.errors import CaveatError

HELP = {
    "out": "directory for the bundle (new or empty; an existing bundle needs --overwrite)",
    "base_model": "Hugging Face id, local path, or an embedded name: 'minilm', 'smollm2' (a causal LM, for "
    "multiple choice)",
    "dataset": "embedded name (sst2; arc-easy, multiple choice) or a local .csv/.tsv/.jsonl/.parquet file",
    "task": "classification or multiple-choice (default: multiple-choice for arc-easy, else classification)",
    "prompt_template": "multiple choice: the prompt, with {question} and {choices} (rendered 'A. … B. …'); the "
    "answer letter's logit is read after it",
    "text_column": "text column of local files",
    "text_pair_column": "second text column for sentence-pair tasks",
    "label_column": "label column of local files",
    "validation_file": "separate validation file (default: carved from the training data)",
    "test_file": "separate test file (default: carved from the training data)",
    "validation_size": "examples carved for validation",
    "shift": "labelled set in the same label space, only for evaluation under shift (embedded: drugreviews; "
    "openbookqa for multiple choice)",
    "ood": "texts only for out-of-distribution detection (embedded: bbcnews; openbookqa for multiple choice)",
    "shift_limit": "evaluate on at most this many shift examples (seeded subset)",
    "ood_limit": "evaluate on at most this many OOD texts (seeded subset)",
    "train_limit": "train on at most this many examples (seeded subset; for quick runs)",
    "eval_limit": "validate and test on at most this many examples (seeded subset; for quick runs)",
    "projection": "projection family: svd, wsvd, dct, random, or a hybrid such as dct-1/2_svd",
    "rank": "LoRA-XS rank r (the core is r×r)",
    "alpha": "scaling numerator (the update is scaled by alpha/rank)",
    "targets": "comma-separated module-name patterns (default per architecture; 're:<regex>' allowed)",
    "pooling": "mean, cls or last (default: mean for encoders, last for decoders)",
    "epochs": "maximum MAP epochs",
    "lr": "learning rate of the cores",
    "head_lr": "learning rate of the classifier head",
    "weight_decay": "AdamW weight decay",
    "batch_size": "examples per batch",
    "max_length": "tokens per example (default 64; 256 for multiple choice, whose prompts lose their start)",
    "patience": "stop after this many epochs without validation improvement",
    "select_by": "validation score that picks the checkpoint: nll or accuracy",
    "seed": "seed of data splits, initialisation, shuffling and sampling",
    "data_seed": "seed of the data splits and subsets only (default: --seed); fixing it while varying --seed "
    "changes only initialisation, shuffling and sampling",
    "posterior": "map, laplace-diag, laplace-kron, laplace-full, swag, vi (mean-field variational), ensemble or "
    "mc-dropout (dropout on the adapter input, also during MAP training)",
    "predictive": "glm (linearised network: one forward and C backward passes per input; the published "
    "Laplace predictive, default) or sample (posterior samples through the network)",
    "prior": "prior precision: marglik (Laplace marginal likelihood) or grid (validation NLL around it)",
    "posterior_head": "include the classifier head in the posterior (Laplace, SWAG; an ensemble always does)",
    "prior_structure": "scalar or layerwise prior precision",
    "laplace_limit": "fit the curvature on at most this many training examples",
    "swag_epochs": "SWAG: epochs at a constant learning rate after the MAP (the MAP training is the burn-in)",
    "swag_lr": "SWAG: the constant learning rate",
    "swag_snapshots": "SWAG: snapshots of the cores, spread evenly over the SWAG epochs",
    "swag_rank": "SWAG: K, the deviations kept for the low-rank part of the covariance",
    "swag_scale": "SWAG: λ, the covariance scale when sampling",
    "vi_epochs": "VI: epochs of ELBO training after the MAP",
    "vi_lr": "VI: learning rate of the variational means",
    "vi_std_lr": "VI: learning rate of log σ",
    "vi_init_std": "VI: initial σ of every core entry",
    "vi_rank": "VI: rank k of a low-rank part of the covariance shared by all cores (0: mean-field)",
    "vi_prior_precision": "VI: precision δ of the N(0, δ⁻¹ I) prior (default: learned, the ELBO's optimum)",
    "vi_kl_weight": "VI: β, the KL weight per example is β/N (1: the ELBO)",
    "members": "ensemble: number of members M (independently seeded MAPs)",
    "member_bundles": "ensemble: comma-separated bundles of already trained members (same data and base)",
    "adapter_dropout": "mc-dropout: probability of dropping a rank direction of each layer's adapter input",
    "num_samples": "posterior draws for evaluation and the bundle's default (16 network samples; 256 GLM logit "
    "draws; an ensemble always uses each member once)",
    "temperature_scaling": "fit a temperature on the validation split",
    "target_risk": "fit abstention thresholds for this selective risk on validation (default 0.05)",
    "target_coverage": "fit abstention thresholds for this coverage instead",
    "abstain_on": "comma-separated rules: max_prob, entropy, mutual_information",
    "mi_coverage": "the mutual-information rule answers this fraction of validation inputs",
    "mixed_precision": "no, fp16 or bf16 (GPU)",
    "name": "bundle name (default: the output directory's name)",
    "version": "bundle version (default: a UTC timestamp)",
    "overwrite": "replace an existing bundle in --out",
    "progress": "show progress bars",
}


def _field_type(hint: Any) -> tuple[Any, bool]:
    """(scalar type, is_list) of a field's annotation, optional-ness stripped."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def build_parser() -> argparse.ArgumentParser:
    from training.config import TrainConfig

    parser = argparse.ArgumentParser(
        prog="caveat-train",
        description="Fine-tune a frozen model with LoRA-XS, fit a posterior over the cores, calibrate, evaluate "
        "and write a bundle.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML or JSON file of defaults (keys are flag names)")
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind, is_list = _field_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=HELP[field.name])
        elif is_list:
            parser.add_argument(flag, type=_comma_list, default=default, help=HELP[field.name])
        else:
            parser.add_argument(flag, type=kind, default=default, help=HELP[field.name])
    return parser


def _comma_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CaveatError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:
        raise CaveatError(f"--config {path} cannot be parsed: {exc}") from exc
    if not isinstance(data, dict):
        raise CaveatError(f"--config {path} must hold a mapping of flag names to values")
    return {key.replace("-", "_"): value for key, value in data.items()}


def parse_config(argv: list[str] | None = None):
    """Flags (and an optional config file) → ``TrainConfig``."""
    from training.config import TrainConfig

    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config is not None:
        defaults = _read_config_file(first.config)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(defaults) - known)
        if unknown:
            raise CaveatError(f"--config {first.config}: unknown keys {unknown}")
        for key, value in defaults.items():
            if isinstance(value, str) and key in ("targets", "abstain_on"):
                defaults[key] = _comma_list(value)
        parser.set_defaults(**defaults)
    args = vars(parser.parse_args(argv))
    args.pop("config")
    return TrainConfig(**args)


def main(argv: list[str] | None = None) -> int:
    """``caveat-train [flags]`` trains a bundle; ``caveat-train compare [flags]`` compares posteriors."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["compare"]:
            from training.compare import main as compare_main

            compare_main(argv[1:])
            return 0
        config = parse_config(argv)
        from training.pipeline import run

        run(config)
    except CaveatError as exc:
        print(f"caveat-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("caveat-train: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

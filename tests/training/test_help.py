"""``caveat-train --help`` and ``caveat-train compare --help`` list every flag the command takes, with help;
flag names are the ones the flat config always had, and ``--config`` keys are the same names."""

from __future__ import annotations

import subprocess
import sys

import pytest

from training.cli import build_parser, parse
from training.config import TrainConfig, flags

# the flags of caveat-train before the config became a tree: none may be renamed or lost
FLAT_FLAGS = [
    "out",
    "base-model",
    "dataset",
    "task",
    "prompt-template",
    "text-column",
    "text-pair-column",
    "label-column",
    "validation-file",
    "test-file",
    "validation-size",
    "shift",
    "ood",
    "shift-limit",
    "ood-limit",
    "train-limit",
    "eval-limit",
    "projection",
    "rank",
    "alpha",
    "targets",
    "pooling",
    "epochs",
    "lr",
    "head-lr",
    "weight-decay",
    "batch-size",
    "max-length",
    "patience",
    "select-by",
    "seed",
    "data-seed",
    "posterior",
    "predictive",
    "prior",
    "posterior-head",
    "prior-structure",
    "laplace-limit",
    "swag-epochs",
    "swag-lr",
    "swag-snapshots",
    "swag-rank",
    "swag-scale",
    "vi-epochs",
    "vi-lr",
    "vi-std-lr",
    "vi-init-std",
    "vi-rank",
    "vi-prior-precision",
    "vi-kl-weight",
    "blora-epochs",
    "blora-lr",
    "blora-factor-lr",
    "blora-kl-weight",
    "blora-prior-std",
    "blora-init-std",
    "blora-noise-init",
    "blora-noise-cap",
    "blora-samples",
    "train-projections",
    "projection-lr",
    "members",
    "member-bundles",
    "adapter-dropout",
    "num-samples",
    "temperature-scaling",
    "target-risk",
    "target-coverage",
    "abstain-on",
    "mi-coverage",
    "ood-method",
    "ood-train-size",
    "ood-shrinkage",
    "ood-rank",
    "ood-k",
    "ood-budget",
    "ood-fraction",
    "mixed-precision",
    "name",
    "version",
    "overwrite",
    "progress",
]
# flags added since, each once
ADDED_FLAGS = [
    "dataset-config", "train-split", "validation-split", "test-split", "prior-ece-slack", "mc-scoring",
    "cloze-normalisation", "checkpoint-epochs", "calibration", "conformal-alpha", "conformal-score",
    "conformal-class-conditional", "from-peft", "ood-length-buckets",
]  # fmt: skip


def _help(*command: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "training.cli", *command, "--help"], capture_output=True, text=True, check=True
    )
    return " ".join(result.stdout.split())  # argparse wraps lines


def test_the_config_tree_keeps_every_flat_flag_name() -> None:
    assert sorted(flag.name for flag in flags()) == sorted(FLAT_FLAGS + ADDED_FLAGS)


@pytest.mark.parametrize("command", ["train", "compare"])
def test_every_flag_has_help_and_appears_in_the_help_text(command: str) -> None:
    parser = build_parser(command)
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert all(a.help and len(a.help) > 10 for a in actions), [a.dest for a in actions if not a.help]
    text = _help() if command == "train" else _help("compare")
    own = {"--config"} | ({"--posteriors", "--json"} if command == "compare" else set())
    for flag in [f"--{name}" for name in FLAT_FLAGS + ADDED_FLAGS] + sorted(own):
        assert flag in text, flag
    for action in actions:  # every help string is printed (whitespace normalised)
        assert " ".join(action.help.replace("%%", "%").split()[:4]) in text, action.dest


def test_compare_parses_its_own_flags_and_every_train_flag(tmp_path) -> None:
    argv = ["--posteriors", "map,swag", "--json", str(tmp_path / "c.json"), "--swag-epochs", "3", "--rank", "4"]
    config, own = parse(argv, build_parser("compare"))
    assert own["posteriors"] == ["map", "swag"] and own["json"] == tmp_path / "c.json"
    assert config.posterior.swag.epochs == 3 and config.adapter.rank == 4


def test_flat_names_round_trip_through_the_tree() -> None:
    config = TrainConfig.from_flat(swag_epochs=2, posterior="vi", laplace_limit=10, adapter_dropout=0.2)
    assert config.posterior.swag.epochs == 2 and config.posterior.method == "vi"
    assert config.posterior.laplace.limit == 10 and config.posterior.mc_dropout.rate == 0.2
    assert TrainConfig.from_flat(**config.flat()) == config


def test_enum_options_are_checked_with_a_clear_message(capsys) -> None:
    from training.cli import main

    assert main(["--out", "x", "--select-by", "loss"]) == 2
    err = capsys.readouterr().err
    assert "unknown --select-by 'loss'; choose one of ['nll', 'accuracy', 'last']" in err and "Traceback" not in err

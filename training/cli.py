"""``caveat-train``: train a LoRA-XS adapter with a posterior and write a bundle.

``caveat-train compare --posteriors map,laplace-kron,... [--json OUT]`` trains once and compares posterior
methods (:mod:`training.compare`). Both commands take every flag of :class:`training.config.TrainConfig`,
built by :func:`build_parser` from the config tree; ``--config FILE`` (YAML or JSON, keys are flag names)
supplies defaults that flags override. ``caveat-train recalibrate`` (:mod:`training.recalibrate`) and
``caveat-train export-peft`` (:mod:`training.peft_export`) take their own arguments. Problems with the input exit
with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from adapters.errors import CaveatError
from adapters.options import add_flag, comma_list
from training import compare, peft_export, pipeline, recalibrate
from training.config import ConfigError, Flag, TrainConfig, flags

DESCRIPTION = (
    "Fine-tune a frozen model with LoRA-XS, fit a posterior over the cores, calibrate, evaluate and write a bundle."
)
COMPARE_DESCRIPTION = (
    "Train the MAP once and compare posterior methods on the same splits: one markdown table of test, shift and "
    "OOD metrics, training time and bundle size per method."
)


def build_parser(command: str = "train") -> argparse.ArgumentParser:
    """The parser of ``caveat-train`` (``command="train"``) or ``caveat-train compare``: one flag per config
    leaf, grouped by section, each with its help and default."""
    is_compare = command == "compare"
    parser = argparse.ArgumentParser(
        prog="caveat-train compare" if is_compare else "caveat-train",
        description=COMPARE_DESCRIPTION if is_compare else DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    if is_compare:
        parser.add_argument(
            "--posteriors",
            type=comma_list,
            default=list(compare.COMPARED),
            help=f"comma-separated methods to compare, from {list(compare.COMPARED)}",
        )
        parser.add_argument("--json", type=Path, default=None, help="also write the config and the rows here")
    parser.add_argument("--config", type=Path, help="YAML or JSON file of defaults (keys are flag names)")
    groups: dict[tuple[str, ...], Any] = {}
    for flag in flags():
        where = flag.path[:-1]
        if where not in groups:
            groups[where] = parser.add_argument_group(".".join(where) or "run") if where else parser
        _add(groups[where], flag)
    return parser


def _add(group: Any, flag: Flag) -> None:
    help = flag.help + (f" (choices: {', '.join(flag.choices)})" if flag.choices and flag.is_list else "")
    enum = flag.choices is not None
    add_flag(
        group, flag.name, str if enum else flag.kind, is_list=flag.is_list, dest=flag.key,
        default=_plain(flag.default), help=help,
        metavar="{" + ",".join(flag.choices) + "}" if enum and not flag.is_list else None,
    )  # fmt: skip


def _plain(value: Any) -> Any:
    """Enum defaults as their strings (for the help text and the config file's comparison)."""
    if isinstance(value, list):
        return [str(v) for v in value]
    return str(value) if isinstance(value, str) else value


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise ConfigError(f"--config {path} cannot be parsed: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of flag names to values")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def parse(argv: list[str] | None, parser: argparse.ArgumentParser) -> tuple[TrainConfig, dict[str, Any]]:
    """Flags (and an optional config file) → the config and the command's own options."""
    first, _ = parser.parse_known_args(argv)
    if first.config is not None:
        defaults = _read_config_file(first.config)
        leaves = {flag.key: flag for flag in flags()}
        unknown = sorted(set(defaults) - set(leaves))
        if unknown:
            raise ConfigError(f"--config {first.config}: unknown keys {unknown}")
        for key, value in defaults.items():
            if isinstance(value, str) and leaves[key].is_list:
                defaults[key] = comma_list(value)
        parser.set_defaults(**defaults)
    args = vars(parser.parse_args(argv))
    args.pop("config")
    keys = {flag.key for flag in flags()}
    own = {k: v for k, v in args.items() if k not in keys}
    return TrainConfig.from_flat(**{k: v for k, v in args.items() if k in keys}), own


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """``caveat-train`` flags (and an optional config file) → ``TrainConfig``."""
    return parse(argv, build_parser())[0]


def main(argv: list[str] | None = None) -> int:
    """``caveat-train [flags]`` trains a bundle; ``caveat-train compare [flags]`` compares posteriors;
    ``caveat-train recalibrate BUNDLE --labels LOG --out NEW`` refits its calibration on production labels;
    ``caveat-train export-peft BUNDLE OUT`` writes its MAP as a PEFT LoRA."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["recalibrate"]:
            recalibrate.main(argv[1:])
        elif argv[:1] == ["export-peft"]:
            peft_export.main(argv[1:])
        elif argv[:1] == ["compare"]:
            config, own = parse(argv[1:], build_parser("compare"))
            compare.run(config, own["posteriors"], own["json"])
        else:
            pipeline.run(parse_config(argv))
    except CaveatError as exc:
        print(f"caveat-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("caveat-train: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One embedded default: the CLI defaults, what scripts/main.sh runs and the README's command are one model; the
default abstention answers most in-distribution inputs; a target validation cannot reach is warned about."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from adapters import load_bundle, predictive
from adapters.architectures import ARCHITECTURES
from adapters.manifest import AbstentionSpec
from adapters.predictive import Predictive
from training.calibration import abstention_warning, fit_abstention
from training.cli import main, parse_config
from training.config import DEFAULT_TARGET_COVERAGE, TrainConfig

ROOT = Path(__file__).resolve().parents[2]
SAME_MODEL_EXCEPT = {"shift", "ood", "out"}  # evaluation sets and the output directory do not change the model


def _train_flags(text: str) -> list[str]:
    """The flags of the ``caveat-train`` command in a shell text (continuation lines joined)."""
    command = re.search(r"\.venv/bin/caveat-train ((?:[^\n]*\\\n)*[^\n]*)", text).group(1)
    return [flag for flag in shlex.split(command.replace("\\\n", " ")) if flag != "$@"]


def test_main_sh_and_the_readme_train_the_cli_default_model() -> None:
    defaults = TrainConfig().flat()
    main_sh = parse_config(_train_flags((ROOT / "scripts/main.sh").read_text())).flat()
    readme_text = (ROOT / "README.md").read_text()
    readme = parse_config(_train_flags(readme_text[readme_text.index("# the embedded default") :])).flat()
    for flat in (main_sh, readme):
        changed = {key for key in defaults if flat[key] != defaults[key]}
        assert changed <= SAME_MODEL_EXCEPT, f"flags beyond the defaults: {sorted(changed - SAME_MODEL_EXCEPT)}"
    assert (
        main_sh | {"out": "bundles/sst2-minilm"} == readme
        and "bundle=bundles/sst2-minilm" in (ROOT / "scripts/main.sh").read_text()
    )


def test_the_embedded_default_adapts_every_attention_and_mlp_map_at_128_tokens() -> None:
    config = TrainConfig()
    assert config.max_tokens == 128 and config.adapter.targets is None
    assert ARCHITECTURES["bert"].targets == ("query", "key", "value", "intermediate.dense", "output.dense")
    assert config.posterior.laplace.prior == "marglik-checked"
    assert config.calibration.abstain_on == ["max_prob"] and config.calibration.target_risk is None


def _predictive(num: int = 200, seed: int = 0) -> tuple[Predictive, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(1, num, 2, generator=generator)
    labels = torch.randint(0, 2, (num,), generator=generator)
    return predictive(logits), labels


def test_an_unreachable_target_risk_warns_and_a_coverage_target_does_not() -> None:
    pred, labels = _predictive()  # random labels: 50% risk at every coverage
    unreachable = fit_abstention(pred, labels, "max_prob", target_risk=0.01)
    assert unreachable.target["validation_coverage"] < 0.5
    warning = abstention_warning(unreachable)
    assert warning is not None and "target risk 0.01" in warning and "--target-coverage" in warning
    assert abstention_warning(fit_abstention(pred, labels, "max_prob", target_coverage=0.9)) is None
    assert abstention_warning(fit_abstention(pred, labels, "entropy", target_risk=0.6)) is None
    nothing = AbstentionSpec(kind="max_prob", threshold=1.0, target={"risk": 0.01, "validation_coverage": 0.0})
    assert "is not reached at any coverage" in abstention_warning(nothing)


TINY = [
    "--train-limit", "96", "--eval-limit", "32", "--validation-size", "96", "--epochs", "1", "--rank", "2",
    "--targets", "query,value", "--laplace-limit", "32", "--max-length", "32", "--no-progress",
]  # fmt: skip


def test_the_default_abstention_answers_the_target_coverage_of_validation(tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    assert main(["--out", str(out), "--base-model", str(tiny_base), "--posterior", "map", *TINY]) == 0
    manifest = load_bundle(out).manifest
    rules = {rule.kind: rule for rule in manifest.calibration.abstention}
    assert set(rules) == {"max_prob", "ood"}  # the ood rule comes with the default OOD score
    rule = rules["max_prob"]
    assert rule.target["coverage"] == DEFAULT_TARGET_COVERAGE
    assert rule.target["validation_coverage"] >= DEFAULT_TARGET_COVERAGE
    assert manifest.eval.warnings is None and "## Warnings" not in (out / "report.md").read_text()


def test_an_unreachable_target_is_warned_at_the_end_of_the_run_and_in_the_report(
    tiny_base: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "b"
    argv = ["--out", str(out), "--base-model", str(tiny_base), "--posterior", "map", "--target-risk", "0.001"]
    assert main([*argv, "--abstain-on", "max_prob,entropy", *TINY]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("warning: abstention rule entropy: target risk 0.001")
    warnings = load_bundle(out).manifest.eval.warnings
    assert [w.split(":")[0] for w in warnings] == ["abstention rule max_prob", "abstention rule entropy"]
    report = (out / "report.md").read_text()
    assert "## Warnings" in report and all(w in report for w in warnings)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--target-coverage", "1.5"], "--target-coverage must be in (0, 1]"),
        (["--target-risk", "0"], "--target-risk must be in (0, 1]"),
        (["--prior", "bayes"], "unknown --prior 'bayes'"),
    ],
)
def test_bad_calibration_and_prior_flags_are_refused(flags: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert main(["--out", str(tmp_path / "b"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err

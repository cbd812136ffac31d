"""Conformal calibration in the trainer: the scores are the served predictive's on validation (its temperature
included), the bundle's sets reproduce the reported coverage, the flags and their errors, and the report."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters import load_bundle
from adapters.conformal import label_nonconformity, set_metrics
from adapters.vocab import PredictiveMode
from tests.training.test_defaults import TINY
from training.cli import main, parse_config
from training.inference import labels_of
from training.pipeline import train


@pytest.fixture(scope="module")
def trained(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("conformal") / "b"
    flags = ["--base-model", str(tiny_base), "--out", str(out), "--posterior", "map", "--temperature-scaling",
             "--conformal-score", "aps", "--conformal-alpha", "0.2", "--abstain-on", "max_prob,ambiguous",
             "--shift", "drugreviews", "--shift-limit", "32", *TINY]  # fmt: skip
    path, session, _ = train(parse_config(flags))
    return load_bundle(path), session


def test_the_scores_are_the_served_predictives_on_validation(trained) -> None:
    bundle, session = trained
    assert bundle.manifest.posterior.predictive == PredictiveMode.MAP
    temperature = bundle.manifest.calibration.temperature
    assert temperature != 1.0  # so that a score computed without it would differ
    served = session.map_outputs("validation", session.validation).distribution(temperature).probs
    labels = labels_of(session.validation)
    expected = label_nonconformity(served, labels, bundle.conformal.score)
    torch.testing.assert_close(bundle.conformal.scores, expected, rtol=0, atol=1e-12)
    assert torch.equal(bundle.conformal.labels, labels)
    spec = bundle.manifest.conformal
    assert (spec.score, spec.alpha, spec.size, spec.class_conditional) == ("aps", 0.2, len(labels), False)


def test_the_bundles_sets_give_the_reported_coverage(trained) -> None:
    bundle, session = trained
    temperature = bundle.manifest.calibration.temperature
    for split, card in (("test", bundle.manifest.eval.test), ("shift", bundle.manifest.eval.shift)):
        examples = session.splits()[split]
        probs = session.map_outputs(split, examples).distribution(temperature).probs
        sets = bundle.conformal.sets(probs, bundle.manifest.conformal.alpha)
        assert card.conformal == pytest.approx(set_metrics(sets, labels_of(examples), 0.2)), split
        assert card.conformal["target_coverage"] == pytest.approx(0.8)


def test_the_ambiguous_rule_and_the_report(trained) -> None:
    bundle, _ = trained
    rules = {rule.kind: rule for rule in bundle.manifest.calibration.abstention}
    assert rules["ambiguous"].threshold == 1.0 and rules["ambiguous"].target == {"alpha": 0.2}
    report = (bundle.path / "report.md").read_text()
    assert "## Conformal prediction sets" in report and "APS sets at α = 0.2" in report
    assert "ambiguous: a conformal set of more than 1 label, or none" in report


def test_class_conditional_sets_have_a_threshold_per_label(tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    flags = ["--base-model", str(tiny_base), "--out", str(out), "--posterior", "map", "--conformal-class-conditional",
             "--ood-method", "none", *TINY]  # fmt: skip
    assert main(flags) == 0
    bundle = load_bundle(out)
    spec, calibration = bundle.manifest.conformal, bundle.conformal
    assert spec.class_conditional and spec.score == "lac"
    for label in range(2):
        own = calibration.scores[calibration.labels == label]
        rank = -(-(len(own) + 1) * 9 // 10)  # ⌈(n + 1)(1 − α)⌉ at α = 0.1
        expected = None if rank > len(own) else float(torch.sort(own).values[rank - 1])
        assert spec.thresholds[label] == expected


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--conformal-alpha", "1.5"], "--conformal-alpha must be in (0, 1)"),
        (["--conformal-alpha", "0"], "--conformal-alpha must be in (0, 1)"),
        (["--conformal-score", "raps"], "--conformal-score"),
        (["--abstain-on", "ood"], "--abstain-on"),
    ],
)
def test_bad_conformal_flags_exit_2(flags: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert main(["--out", str(tmp_path / "b"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err

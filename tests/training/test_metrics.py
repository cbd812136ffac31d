"""Our metrics equal torchmetrics / scikit-learn on random inputs, and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score
from torchmetrics.functional.classification import multiclass_calibration_error

from training import metrics


def _random(n: int = 500, c: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, c, generator=g, dtype=torch.float64), dim=-1)
    return probs, torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_and_mce_match_torchmetrics(seed) -> None:
    probs, labels = _random(seed=seed)
    for norm, ours in (("l1", metrics.ece), ("max", metrics.mce)):
        theirs = multiclass_calibration_error(probs.float(), labels, num_classes=4, n_bins=15, norm=norm).item()
        assert ours(probs, labels) == pytest.approx(theirs, abs=1e-5)


def test_nll_matches_sklearn_and_brier_matches_formula() -> None:
    probs, labels = _random(seed=3)
    assert metrics.nll(probs, labels) == pytest.approx(log_loss(labels.numpy(), probs.numpy(), labels=range(4)))
    onehot = np.eye(4)[labels.numpy()]
    assert metrics.brier(probs, labels) == pytest.approx(((probs.numpy() - onehot) ** 2).sum(1).mean())


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_matches_sklearn(ties) -> None:
    g = torch.Generator().manual_seed(4)
    neg, pos = torch.randn(300, generator=g), torch.randn(200, generator=g) + 0.7
    if ties:
        neg, pos = neg.round(decimals=1), pos.round(decimals=1)
    y = np.r_[np.zeros(300), np.ones(200)]
    assert metrics.auroc(neg, pos) == pytest.approx(roc_auc_score(y, np.r_[neg.numpy(), pos.numpy()]))


def test_selective_prediction_by_hand() -> None:
    confidence = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    correct = torch.tensor([True, True, False, True, False])
    # risks at coverage 1/5..5/5: 0, 0, 1/3, 1/4, 2/5
    assert metrics.aurc(confidence, correct) == pytest.approx((0 + 0 + 1 / 3 + 1 / 4 + 2 / 5) / 5)
    assert metrics.risk_at_coverage(confidence, correct, 0.8) == pytest.approx(1 / 4)
    assert metrics.coverage_at_risk(confidence, correct, 0.05) == pytest.approx(0.4)
    # tied confidences are kept or dropped together
    tied = torch.tensor([0.9, 0.9, 0.5, 0.5])
    assert metrics.risk_at_coverage(tied, torch.tensor([True, False, True, True]), 0.25) == pytest.approx(0.5)


def test_ece_by_hand_and_bin_edges() -> None:
    probs = torch.tensor([[0.2, 0.8], [0.2, 0.8], [0.6, 0.4], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([1, 0, 0, 1])
    # bins: 0.8 → (11/15, 12/15] with acc 1/2; 0.6 → (8/15, 9/15] acc 1; 1.0 → last bin acc 1
    expected = 0.5 * abs(0.5 - 0.8) + 0.25 * abs(1 - 0.6) + 0.25 * abs(1 - 1.0)
    assert metrics.ece(probs, labels) == pytest.approx(expected)
    assert metrics.mce(probs, labels) == pytest.approx(0.4)
    assert metrics.classification_metrics(probs, labels)["accuracy"] == pytest.approx(0.75)


def test_temperature_recovers_a_known_scale() -> None:
    from training.calibration import fit_temperature

    g = torch.Generator().manual_seed(0)
    true_logits = 2 * torch.randn(4000, 3, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=g).squeeze(-1)
    # a model that is 3x overconfident: the fitted temperature undoes it
    assert fit_temperature((3 * true_logits).unsqueeze(0), labels) == pytest.approx(3.0, rel=0.1)


def test_abstention_thresholds_meet_their_targets_on_the_fitting_data() -> None:
    from adapters import abstain, predictive
    from training.calibration import fit_abstention

    g = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(8, 2000, 2, generator=g)
    pred = predictive(logits)
    labels = torch.where(torch.rand(2000, generator=g) < pred.confidence, pred.label, 1 - pred.label)
    for kind in ("max_prob", "entropy", "mutual_information"):
        spec = fit_abstention(pred, labels, kind, target_risk=0.1)
        flags, _ = abstain(pred, [spec.rule()])
        answered = ~flags
        risk = (pred.label[answered] != labels[answered]).float().mean().item()
        assert risk <= 0.1 + 1e-6 and answered.float().mean().item() == pytest.approx(
            spec.target["validation_coverage"]
        )
        spec = fit_abstention(pred, labels, kind, target_coverage=0.7)
        flags, _ = abstain(pred, [spec.rule()])
        assert (~flags).float().mean().item() == pytest.approx(0.7, abs=0.002)


def test_unreachable_target_risk_abstains_on_everything_with_a_finite_threshold() -> None:
    from adapters import abstain, predictive
    from training.calibration import fit_abstention

    pred = predictive(torch.tensor([[[3.0, 0.0], [0.0, 3.0], [2.0, 0.0]]]))
    labels = torch.tensor([1, 0, 1])  # every prediction wrong
    for kind in ("max_prob", "entropy", "mutual_information"):
        spec = fit_abstention(pred, labels, kind, target_risk=0.01)
        assert math.isfinite(spec.threshold) and spec.target["validation_coverage"] == 0.0
        assert abstain(pred, [spec.rule()])[0].all()

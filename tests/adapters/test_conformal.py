"""Conformal prediction sets: the quantile and the sets against MAPIE's, and the coverage guarantee on
exchangeable synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mapie.classification import SplitConformalClassifier  # the oracle: a dev dependency (pyproject.toml)
from mapie.conformity_scores.sets.aps import APSConformityScore
from mapie.utils import _compute_classification_quantile

from adapters.conformal import ConformalCalibration, conformal_quantile, coverage, nonconformity, set_metrics
from adapters.vocab import ConformalScore


def random_probs(n: int, classes: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(2.5 * torch.randn(n, classes, generator=generator, dtype=torch.float64), dim=-1)


class LookupClassifier:
    """A fitted scikit-learn classifier whose ``predict_proba`` returns stored rows: ``X`` holds row indices."""

    _estimator_type = "classifier"

    def __init__(self, probs: np.ndarray) -> None:
        self.probs = probs
        self.classes_ = np.arange(probs.shape[1])
        self.n_features_in_ = 1

    def fit(self, X, y):
        return self

    def predict_proba(self, X):
        return self.probs[np.asarray(X)[:, 0].astype(int)]

    def predict(self, X):
        return self.predict_proba(X).argmax(axis=1)

    def get_params(self, deep=True):
        return {"probs": self.probs}

    def __sklearn_tags__(self):
        from sklearn.utils import ClassifierTags, Tags, TargetTags

        return Tags(estimator_type="classifier", target_tags=TargetTags(required=True),
                    classifier_tags=ClassifierTags())  # fmt: skip


@pytest.mark.parametrize("n", [7, 50, 333, 1000])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2, 0.5])
def test_quantile_equals_mapie(n: int, alpha: float) -> None:
    scores = torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    ours = conformal_quantile(scores, alpha)
    if math.ceil((n + 1) * (1 - alpha)) > n:
        assert ours == math.inf  # MAPIE warns and clips; the finite-sample rule says every label
        return
    assert ours == float(_compute_classification_quantile(scores.numpy(), np.array([alpha]))[0])


@pytest.mark.parametrize("classes", [2, 5])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.3])
def test_lac_sets_equal_mapie(classes: int, alpha: float) -> None:
    calibration, test = random_probs(400, classes, 1), random_probs(300, classes, 2)
    labels = torch.multinomial(calibration.float(), 1, generator=torch.Generator().manual_seed(3)).squeeze(-1)
    probs = torch.cat([calibration, test]).numpy()
    index = np.arange(len(probs)).reshape(-1, 1)
    oracle = SplitConformalClassifier(LookupClassifier(probs), confidence_level=1 - alpha, conformity_score="lac")
    oracle.conformalize(index[:400], labels.numpy())
    _, expected = oracle.predict_set(index[400:])
    ours = ConformalCalibration.fit(calibration, labels, ConformalScore.LAC).sets(test, alpha)
    assert torch.equal(ours, torch.from_numpy(expected[:, :, 0]))


@pytest.mark.parametrize("classes", [3, 5])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.3])
def test_aps_sets_equal_mapie_non_randomised(classes: int, alpha: float) -> None:
    """MAPIE randomises APS calibration scores, so the oracle is its set rule at our threshold (the threshold is
    the quantile checked above): ``include_last_label=False``, the non-randomised APS."""
    calibration, test = random_probs(500, classes, 4), random_probs(300, classes, 5)
    labels = torch.multinomial(calibration.float(), 1, generator=torch.Generator().manual_seed(6)).squeeze(-1)
    ours = ConformalCalibration.fit(calibration, labels, ConformalScore.APS)
    oracle = APSConformityScore()
    oracle.quantiles_ = np.array([float(ours.thresholds(alpha)[0])])
    expected = oracle.get_prediction_sets(test.numpy()[:, :, None], None, np.array([alpha]), cv="prefit",
                                          include_last_label=False)  # fmt: skip
    assert torch.equal(ours.sets(test, alpha), torch.from_numpy(expected[:, :, 0]))


def test_aps_scores_are_the_mass_ranked_at_or_above_each_label() -> None:
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.25, 0.25, 0.5]])
    expected = torch.tensor([[1.0, 0.6, 0.9], [0.75, 1.0, 0.5]], dtype=torch.float64)  # ties: lower index first
    assert torch.allclose(nonconformity(probs, ConformalScore.APS), expected)
    assert torch.allclose(nonconformity(probs, ConformalScore.LAC), 1 - probs.double())


def synthetic(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A misspecified model: labels drawn from sharper probabilities than the model's."""
    logits = 1.5 * torch.randn(n, 4, generator=generator, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(2 * logits, -1), 1, generator=generator).squeeze(-1)
    return torch.softmax(logits, -1), labels


@pytest.mark.parametrize("score", list(ConformalScore))
@pytest.mark.parametrize("class_conditional", [False, True])
def test_coverage_holds_on_exchangeable_data(score: ConformalScore, class_conditional: bool) -> None:
    """E[coverage] ≥ 1 − α over many calibration draws (and ≤ 1 − α + 1/(n+1) for the marginal sets, up to the
    Monte-Carlo error); class-conditional sets cover every label."""
    alpha, n, runs = 0.1, 300, 200
    generator = torch.Generator().manual_seed(11)
    covered, per_label = [], []
    for _ in range(runs):
        cal_probs, cal_labels = synthetic(n, generator)
        test_probs, test_labels = synthetic(400, generator)
        sets = ConformalCalibration.fit(cal_probs, cal_labels, score, class_conditional).sets(test_probs, alpha)
        covered.append(coverage(sets, test_labels))
        per_label.append([coverage(sets[test_labels == c], test_labels[test_labels == c]) for c in range(4)])
    mean, error = float(np.mean(covered)), float(np.std(covered) / math.sqrt(runs))
    assert mean >= 1 - alpha - 3 * error
    if not class_conditional and score == ConformalScore.LAC:
        assert mean <= 1 - alpha + 1 / (n + 1) + 3 * error
    if class_conditional:
        assert (np.mean(per_label, axis=0) >= 1 - alpha - 0.02).all()


def test_too_few_examples_give_every_label() -> None:
    calibration = ConformalCalibration.fit(random_probs(5, 3, 0), torch.tensor([0, 1, 2, 0, 1]), ConformalScore.LAC)
    assert calibration.sets(random_probs(4, 3, 1), 0.1).all()
    assert conformal_quantile(torch.rand(5), 0.1) == math.inf


def test_class_conditional_thresholds_read_each_label_alone() -> None:
    probs = random_probs(600, 3, 7)
    labels = torch.arange(600) % 3
    calibration = ConformalCalibration.fit(probs, labels, ConformalScore.LAC, class_conditional=True)
    scores = 1 - probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    for label in range(3):
        assert calibration.thresholds(0.2)[label] == conformal_quantile(scores[labels == label], 0.2)


def test_invalid_labels_never_enter_a_set() -> None:
    probs = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.2, 0.2, 0.6, 0.0]])
    valid = torch.tensor([[True, True, False, False], [True, True, True, False]])
    calibration = ConformalCalibration.fit(random_probs(3, 4, 0), torch.tensor([0, 1, 2]), ConformalScore.APS)
    sets = calibration.sets(probs, 0.1, valid)  # three examples: the threshold is infinite, every valid label
    assert torch.equal(sets, valid)


def test_set_metrics() -> None:
    sets = torch.tensor([[True, False], [True, True], [False, False]])
    metrics = set_metrics(sets, torch.tensor([0, 1, 1]), 0.1)
    assert metrics == pytest.approx(
        {"target_coverage": 0.9, "coverage": 2 / 3, "mean_set_size": 1.0, "singleton": 1 / 3, "empty": 1 / 3}
    )


def test_bad_alpha_is_refused() -> None:
    with pytest.raises(ValueError, match="alpha"):
        conformal_quantile(torch.rand(10), 1.0)

"""Feature-space OOD scores against scikit-learn, their stored state, and their p-values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sklearn.covariance import LedoitWolf, ShrunkCovariance
from sklearn.neighbors import NearestNeighbors

from adapters.errors import OodFitError, OodStateError
from adapters.ood import (
    DEFAULT_BUDGET_BYTES,
    FeatureNorm,
    KnnScore,
    MahalanobisScore,
    OodMethod,
    OodScore,
    fit_ood_score,
    ood_pvalue,
    pvalue_threshold,
    sorted_reference,
)
from adapters.ood.gaussian import ORTHONORMAL_TOL, is_orthonormal
from adapters.ood.mahalanobis import budget_rank

F64 = torch.float64


def clusters(n: int = 400, dim: int = 24, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated Gaussian clusters: features ``(n, dim)`` float64 and labels ``(n,)``."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=generator)
    centres = 3 * torch.randn(classes, dim, generator=generator, dtype=F64)
    mixing = torch.randn(dim, dim, generator=generator, dtype=F64) / dim**0.5
    return centres[labels] + torch.randn(n, dim, generator=generator, dtype=F64) @ mixing, labels


def queries(dim: int = 24, n: int = 50, seed: int = 1) -> torch.Tensor:
    return 2 * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def sklearn_class_mahalanobis(x, labels, q, estimator) -> np.ndarray:
    """min over classes of sklearn's squared Mahalanobis distance, tied covariance of class residuals."""
    x, q = x.numpy(), q.numpy()
    means = np.stack([x[labels.numpy() == c].mean(0) for c in range(int(labels.max()) + 1)])
    estimator.fit(x - means[labels.numpy()])
    return np.min(np.stack([estimator.mahalanobis(q - m) for m in means]), axis=0), estimator


# --------------------------------------------------------------------------------------- Mahalanobis


@pytest.mark.parametrize("shrinkage", [0.0, 0.1, 0.7])
def test_mahalanobis_equals_sklearn_shrunk_covariance(shrinkage):
    x, labels = clusters()
    q = queries()
    score = fit_ood_score("mahalanobis", x, labels, norm="none", shrinkage=shrinkage, dtype=F64)
    expected, _ = sklearn_class_mahalanobis(
        x, labels, q, ShrunkCovariance(shrinkage=shrinkage, assume_centered=True, store_precision=True)
    )
    np.testing.assert_allclose(score.score(q).numpy(), expected, rtol=1e-9)
    assert score.shrinkage == shrinkage


def test_default_shrinkage_is_ledoit_wolf_as_sklearn():
    x, labels = clusters(n=120, dim=40)  # few examples per direction: Ledoit–Wolf shrinks noticeably
    q = queries(dim=40)
    score = fit_ood_score("mahalanobis", x, labels, norm="none", dtype=F64)
    expected, estimator = sklearn_class_mahalanobis(x, labels, q, LedoitWolf(assume_centered=True))
    assert score.shrinkage == pytest.approx(estimator.shrinkage_, rel=1e-10)
    assert 0.05 < score.shrinkage < 1
    np.testing.assert_allclose(score.score(q).numpy(), expected, rtol=1e-9)


def test_l2_normalisation_is_applied_before_fitting_and_scoring():
    x, labels = clusters()
    q = queries()
    score = fit_ood_score("mahalanobis", x, labels, norm=FeatureNorm.L2, shrinkage=0.2, dtype=F64)
    expected, _ = sklearn_class_mahalanobis(
        F.normalize(x, dim=1), labels, F.normalize(q, dim=1), ShrunkCovariance(shrinkage=0.2, assume_centered=True)
    )
    np.testing.assert_allclose(score.score(q).numpy(), expected, rtol=1e-9)
    # a longer pooled vector in the same direction is the same input to the score
    torch.testing.assert_close(score.score(5 * q), score.score(q))


def test_float32_state_is_close_to_the_float64_oracle():
    x, labels = clusters()
    q = queries()
    score = fit_ood_score("mahalanobis", x.float(), labels, norm="none", shrinkage=0.1)
    assert score.gaussian.means.dtype == torch.float32
    expected, _ = sklearn_class_mahalanobis(x, labels, q, ShrunkCovariance(shrinkage=0.1, assume_centered=True))
    np.testing.assert_allclose(score.score(q.float()).numpy(), expected, rtol=1e-4)


def test_relative_mahalanobis_equals_two_sklearn_fits():
    x, labels = clusters()
    q = queries()
    score = fit_ood_score("relative-mahalanobis", x, labels, norm="none", shrinkage=0.1, dtype=F64)
    by_class, _ = sklearn_class_mahalanobis(x, labels, q, ShrunkCovariance(shrinkage=0.1, assume_centered=True))
    background = ShrunkCovariance(shrinkage=0.1).fit(x.numpy())  # one Gaussian around the overall mean
    np.testing.assert_allclose(score.score(q).numpy(), by_class - background.mahalanobis(q.numpy()), rtol=1e-8)


def test_batched_score_equals_one_input_at_a_time():
    x, labels = clusters()
    q = queries().float()
    for method in OodMethod:
        score = fit_ood_score(method, x.float(), labels)
        one_by_one = torch.cat([score.score(row.unsqueeze(0)) for row in q])
        torch.testing.assert_close(score.score(q), one_by_one, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------ low-rank form


def spiked(n: int, dim: int, spikes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features whose covariance is ``spikes`` strong directions plus isotropic noise, two classes."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, spikes, generator=generator, dtype=F64)).Q
    strengths = torch.linspace(10, 3, spikes, dtype=F64)
    labels = torch.randint(0, 2, (n,), generator=generator)
    signal = (torch.randn(n, spikes, generator=generator, dtype=F64) * strengths) @ basis.T
    centres = torch.randn(2, dim, generator=generator, dtype=F64)
    return centres[labels] + signal + 0.5 * torch.randn(n, dim, generator=generator, dtype=F64), labels


def test_low_rank_form_approximates_the_dense_score():
    x, labels = spiked(n=2000, dim=128, spikes=8)
    q = torch.cat([x[:200] + 0.3 * torch.randn(200, 128, dtype=F64), 2 * torch.randn(200, 128, dtype=F64)])
    dense = fit_ood_score("mahalanobis", x, labels, norm="none", shrinkage=0.1, dtype=F64)
    low = fit_ood_score("mahalanobis", x, labels, norm="none", shrinkage=0.1, rank=16, dtype=F64)
    assert low.gaussian.rank == 16 and low.gaussian.residual_variance is not None
    assert low.nbytes < dense.nbytes / 4
    relative_error = ((low.score(q) - dense.score(q)).abs() / dense.score(q)).max()
    assert relative_error < 0.1
    assert np.corrcoef(low.score(q).numpy(), dense.score(q).numpy())[0, 1] > 0.99
    # with every eigenpair kept the "low-rank" form is the dense one
    full = fit_ood_score("mahalanobis", x, labels, norm="none", shrinkage=0.1, rank=128, dtype=F64)
    assert full.gaussian.residual_variance is None
    torch.testing.assert_close(full.score(q), dense.score(q))


def test_rank_is_chosen_to_fit_the_budget():
    x, labels = spiked(n=600, dim=256, spikes=8)
    budget = 100_000  # a dense 256-wide covariance (262 kB) does not fit
    assert budget_rank(256, 2, 1, budget) < 256
    assert 100 < budget_rank(4096, 2, 1, DEFAULT_BUDGET_BYTES) < 128  # a 4,096-wide model: low rank
    assert budget_rank(384, 2, 2, DEFAULT_BUDGET_BYTES) == 384  # MiniLM: dense, even for two Gaussians
    for method in (OodMethod.MAHALANOBIS, OodMethod.RELATIVE_MAHALANOBIS):
        score = fit_ood_score(method, x.float(), labels, shrinkage=0.1, budget_bytes=budget).calibrate(x[:2000])
        assert score.gaussian.rank < 256
        assert score.nbytes <= budget
    dense = fit_ood_score("mahalanobis", x.float(), labels, shrinkage=0.1)  # the default 2 MB budget
    assert dense.gaussian.rank == 256


def test_minilm_width_fits_the_budget_densely():
    x, labels = clusters(n=3000, dim=384, classes=2)
    score = fit_ood_score("relative-mahalanobis", x.float(), labels, shrinkage=0.1).calibrate(x.float()[:2000])
    assert score.gaussian.rank == 384 and score.background.rank == 384
    assert score.nbytes <= 2_000_000


# ---------------------------------------------------------------------------------------------- kNN


@pytest.mark.parametrize("k", [1, 5])
def test_knn_equals_sklearn_nearest_neighbors(k):
    x, labels = clusters(n=300)
    q = queries()
    score = fit_ood_score("knn", x, labels, k=k, dtype=F64)
    assert score.bank.shape[0] == 300
    bank, probe = F.normalize(x, dim=1).numpy(), F.normalize(q, dim=1).numpy()
    distances, _ = NearestNeighbors(n_neighbors=k).fit(bank).kneighbors(probe)
    np.testing.assert_allclose(score.score(q).numpy(), distances[:, -1], rtol=1e-6, atol=1e-7)


def test_knn_bank_is_a_seeded_subset_within_the_budget():
    x, labels = clusters(n=2000, dim=100)
    score = fit_ood_score("knn", x.float(), labels, budget_bytes=216_000).calibrate(x.float()[:2000])
    assert score.bank.shape == (500, 100)  # 200 kB, and 16 kB for 2,000 validation scores
    assert score.nbytes <= 216_000
    again = fit_ood_score("knn", x.float(), labels, budget_bytes=216_000)
    assert torch.equal(score.bank, again.bank)


# ------------------------------------------------------------------------------------------- state


@pytest.mark.parametrize("method", list(OodMethod))
@pytest.mark.parametrize("rank", [None, 6])
def test_state_round_trips_bit_exactly_through_safetensors(tmp_path, method, rank):
    x, labels = clusters()
    options = {"k": 3} if method is OodMethod.KNN else {"rank": rank}
    score = fit_ood_score(method, x.float(), labels, **options).calibrate(x.float()[:100])
    tensors, params = score.state()
    save_file(tensors, tmp_path / "ood.safetensors")
    loaded = OodScore.from_state(load_file(tmp_path / "ood.safetensors"), json.loads(json.dumps(params)))
    assert type(loaded) is type(score)
    q = queries().float()
    assert torch.equal(loaded.score(q), score.score(q))
    assert torch.equal(loaded.reference, score.reference)
    assert loaded.threshold() == score.threshold()
    assert loaded.nbytes == score.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())


def damaged_states():
    """(what, change to the Mahalanobis state) pairs; each must be refused."""

    def set_tensor(key, value):
        return lambda t, p: t.__setitem__(key, value(t[key]))

    return {
        "NaN mean": set_tensor("class.means", lambda v: v.index_fill(1, torch.tensor([0]), float("nan"))),
        "negative eigenvalue": set_tensor("class.eigenvalues", lambda v: -v),
        "zero eigenvalue": set_tensor("class.eigenvalues", lambda v: v.index_fill(0, torch.tensor([3]), 0.0)),
        "eigenvectors wrong shape": set_tensor("class.eigenvectors", lambda v: v[:-1]),
        "eigenvalues wrong shape": set_tensor("class.eigenvalues", lambda v: v[:-1]),
        "eigenvectors not orthonormal": set_tensor("class.eigenvectors", lambda v: 2 * v),
        "unit eigenvectors not orthogonal": set_tensor(
            "class.eigenvectors", lambda v: v[:, [0, *range(v.shape[1] - 1)]]
        ),
        "integer tensor": set_tensor("class.means", lambda v: v.long()),
        "missing tensor": lambda t, p: t.pop("class.eigenvalues"),
        "unexpected tensor": lambda t, p: t.__setitem__("class.extra", torch.zeros(2)),
        "unsorted reference": set_tensor("reference", lambda v: v.flip(0)),
        "infinite reference": set_tensor("reference", lambda v: v.index_fill(0, torch.tensor([0]), float("inf"))),
        "unknown method": lambda t, p: p.__setitem__("method", "entropy"),
        "unknown norm": lambda t, p: p.__setitem__("norm", "l3"),
        "dim disagrees": lambda t, p: p.__setitem__("dim", 7),
    }


@pytest.mark.parametrize("what", list(damaged_states()))
def test_damaged_state_is_refused(what):
    x, labels = clusters()
    tensors, params = fit_ood_score("mahalanobis", x.float(), labels).calibrate(x.float()[:50]).state()
    tensors = dict(tensors)
    damaged_states()[what](tensors, params)
    with pytest.raises(OodStateError):
        OodScore.from_state(tensors, params)


@pytest.mark.parametrize(
    ("method", "options", "damage"),
    [
        (
            "relative-mahalanobis",
            {"rank": 5},
            lambda t, p: t.__setitem__("class.residual_variance", -1 * t["class.residual_variance"]),
        ),
        ("relative-mahalanobis", {"rank": 5}, lambda t, p: t.pop("class.residual_variance")),
        (
            "relative-mahalanobis",
            {"rank": 5},
            lambda t, p: t.__setitem__("background.means", t["background.means"].repeat(2, 1)),
        ),
        ("knn", {"k": 3}, lambda t, p: t.__setitem__("bank", 3 * t["bank"])),
        ("knn", {"k": 3}, lambda t, p: p.__setitem__("k", 10_000)),
        ("knn", {"k": 3}, lambda t, p: p.__setitem__("k", "3")),
        ("knn", {"k": 3}, lambda t, p: t.__setitem__("bank", t["bank"][0])),
    ],
    ids=[
        "negative residual variance",
        "missing residual variance",
        "two background means",
        "bank not unit length",
        "k larger than the bank",
        "k not an integer",
        "bank not a matrix",
    ],
)
def test_damaged_low_rank_relative_and_knn_states_are_refused(method, options, damage):
    x, labels = clusters()
    tensors, params = fit_ood_score(method, x.float(), labels, **options).state()
    tensors = dict(tensors)
    damage(tensors, params)
    with pytest.raises(OodStateError):
        OodScore.from_state(tensors, params)


# ------------------------------------------------------------------------------------------ p-values


def test_pvalue_is_the_conformal_fraction_and_monotone():
    generator = torch.Generator().manual_seed(0)
    validation = torch.randn(1000, generator=generator)
    reference = sorted_reference(validation)
    scores = torch.cat([torch.randn(500, generator=generator) * 2, validation[:50], torch.tensor([1e9, -1e9])])
    pvalues = ood_pvalue(scores, reference)
    expected = torch.tensor([(1 + int((validation >= s).sum())) / 1001 for s in scores], dtype=F64)
    torch.testing.assert_close(pvalues, expected)
    ordered = ood_pvalue(scores.sort().values, reference)
    assert (ordered[1:] <= ordered[:-1]).all()  # non-increasing in the score
    assert pvalues[-2] == pytest.approx(1 / 1001) and pvalues[-1] == 1.0
    assert torch.isnan(ood_pvalue(torch.tensor([float("nan"), 0.0]), reference)[0])


@pytest.mark.parametrize("n", [1000, 1234, 50])
def test_default_threshold_abstains_on_one_percent_of_validation(n):
    validation = torch.randn(n, generator=torch.Generator().manual_seed(n))
    reference = sorted_reference(validation)
    tau = pvalue_threshold(reference)
    abstains = ood_pvalue(validation, reference) < tau
    assert int(abstains.sum()) == n // 100
    if n // 100:  # exactly the highest scores abstain
        assert validation[abstains].min() > validation[~abstains].max()
    assert (ood_pvalue(validation, reference) < pvalue_threshold(reference, 0.1)).sum() == n // 10


def test_score_calibrates_and_flags_far_inputs():
    x, labels = clusters(n=1200)
    train, validation = x[:800].float(), x[800:].float()
    score = MahalanobisScore.fit(train, labels[:800]).calibrate(validation)
    tau = score.threshold()
    assert (score.pvalue(score.score(validation)) < tau).double().mean() == pytest.approx(0.01, abs=0.5 / 400)
    far = validation + 20 * torch.randn(validation.shape, generator=torch.Generator().manual_seed(3))
    assert (score.pvalue(score.score(far)) < tau).double().mean() > 0.9


# ---------------------------------------------------------------------------------------- bad input


def test_too_few_examples_for_a_class_conditional_gaussian():
    x, _ = clusters(n=40)
    labels = torch.zeros(40, dtype=torch.long)
    labels[0] = 1  # class 1 has a single example
    with pytest.raises(OodFitError, match="every class needs at least 2"):
        fit_ood_score("mahalanobis", x, labels)
    labels[0] = 2  # class 1 has none
    with pytest.raises(OodFitError, match="every class needs at least 2"):
        fit_ood_score("relative-mahalanobis", x, labels)


def test_too_few_examples_for_an_unshrunk_covariance():
    x, labels = clusters(n=20, dim=24)
    with pytest.raises(OodFitError, match="unshrunk covariance"):
        fit_ood_score("mahalanobis", x, labels, shrinkage=0.0)
    fit_ood_score("mahalanobis", x, labels, shrinkage=0.1)  # shrinkage makes it well posed


def test_too_few_examples_for_knn():
    x, labels = clusters(n=8)
    with pytest.raises(OodFitError, match="too few training examples"):
        KnnScore.fit(x, labels, k=10)


@pytest.mark.parametrize(
    ("features", "labels", "message"),
    [
        (torch.zeros(0, 4), None, "shape"),
        (torch.full((5, 4), float("nan")), None, "finite"),
        (torch.randn(5, 4), torch.zeros(4, dtype=torch.long), "labels"),
        (torch.randn(5, 4), torch.zeros(5), "labels"),
    ],
)
def test_bad_training_features_are_refused(features, labels, message):
    with pytest.raises(OodFitError, match=message):
        fit_ood_score("mahalanobis", features, labels)


def test_bad_options_are_refused():
    x, labels = clusters()
    with pytest.raises(ValueError, match="unknown OOD method 'entropy'"):
        fit_ood_score("entropy", x, labels)
    with pytest.raises(OodFitError, match="shrinkage"):
        fit_ood_score("mahalanobis", x, labels, shrinkage=1.5)
    with pytest.raises(OodFitError, match="rank"):
        fit_ood_score("mahalanobis", x, labels, rank=0)
    with pytest.raises(OodFitError, match="budget"):
        fit_ood_score("mahalanobis", x, labels, budget_bytes=100)
    score = fit_ood_score("mahalanobis", x, labels)
    with pytest.raises(ValueError, match=r"shape \(n, 24\)"):
        score.score(torch.randn(3, 23))
    with pytest.raises(ValueError, match="calibrate"):
        score.threshold()
    with pytest.raises(ValueError, match="fraction"):
        pvalue_threshold(sorted_reference(torch.randn(10)), 1.0)


def _skewed(vectors: torch.Tensor, angle: float) -> torch.Tensor:
    """Column 1 turned by ``angle`` towards column 0, kept at unit length: ``|v0·v1| = sin(angle)``."""
    skewed = vectors.clone()
    skewed[:, 1] = math.cos(angle) * vectors[:, 1] + math.sin(angle) * vectors[:, 0]
    return skewed


@pytest.mark.parametrize("angle", [0.0, 1e-5, 3e-3, 0.1, 1.0])
def test_the_probed_orthonormality_check_agrees_with_the_gram_matrix(angle):
    """The probes decide as ``|VᵀV - I|_max ≤ tol`` does, away from the tolerance's edge (both sides)."""
    vectors = torch.linalg.qr(torch.randn(768, 768, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    vectors = _skewed(vectors, angle).float()
    gram = vectors.double().T @ vectors.double()
    deviation = float((gram - torch.eye(768, dtype=torch.float64)).abs().max())
    assert deviation < ORTHONORMAL_TOL / 10 or deviation > ORTHONORMAL_TOL * 2  # the cases avoid the edge
    assert is_orthonormal(vectors) == (deviation <= ORTHONORMAL_TOL)

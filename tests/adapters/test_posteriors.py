"""Each posterior family: sample moments match the analytic ones, and state round-trips exactly."""

from __future__ import annotations

import math

import pytest
import torch

from adapters.errors import PosteriorValueError
from adapters.posteriors import (
    DiagPosterior,
    DropoutPosterior,
    EnsemblePosterior,
    FullPosterior,
    KronFactors,
    KronPosterior,
    LowRankDiagPosterior,
    MapPosterior,
    MatrixNormalPosterior,
    Posterior,
    flatten,
    make_generator,
)
from adapters.vocab import PosteriorFamily
from tests.adapters.test_matrix_normal import random_factors

NUM_SAMPLES = 200_000
SHAPES = {"layer.0.query": (3, 3), "layer.1.value": (2, 2), "head.bias": (2,)}


def _mean(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=g, dtype=torch.float64) for name, shape in SHAPES.items()}


def _spd(n: int, g: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T + 0.1 * torch.eye(n, dtype=torch.float64)


def _kron_with_precision() -> tuple[KronPosterior, torch.Tensor]:
    """A kron posterior and its precision built independently as ``N (F_G ⊗ F_A) + δ I`` per block."""
    g = torch.Generator().manual_seed(3)
    mean, scale, deltas = _mean(), 7.0, [0.5, 2.0, 1.0]
    factors, precisions = {}, []
    for (name, shape), delta in zip(SHAPES.items(), deltas, strict=True):
        mats = [_spd(n, g) for n in shape]
        factors[name] = KronFactors.from_matrices(*mats)
        curvature = mats[0] if len(mats) == 1 else torch.kron(mats[0], mats[1])
        precisions.append(scale * curvature + delta * torch.eye(curvature.shape[0], dtype=torch.float64))
    return KronPosterior(mean, factors, scale, deltas), torch.block_diag(*precisions)


def _build(family: str) -> Posterior:
    g = torch.Generator().manual_seed(1)
    mean = _mean()
    P = sum(t.numel() for t in mean.values())
    if family == "map":
        return MapPosterior(mean)
    if family == "diag":
        return DiagPosterior(
            mean, {n: torch.rand(t.shape, generator=g, dtype=torch.float64) + 0.1 for n, t in mean.items()}
        )
    if family == "kron":
        return _kron_with_precision()[0]
    if family == "full":
        return FullPosterior(mean, torch.linalg.cholesky(_spd(P, g)))
    if family == "lowrank_diag":
        deviations = torch.randn(4, P, generator=g, dtype=torch.float64)
        return LowRankDiagPosterior(mean, torch.rand(P, generator=g, dtype=torch.float64), deviations, scale=0.5)
    if family == "ensemble":
        return EnsemblePosterior(
            {n: torch.randn(5, *t.shape, generator=g, dtype=torch.float64) for n, t in mean.items()}
        )
    if family == "dropout":
        return DropoutPosterior(mean, rate=0.3)
    if family == "matrix_normal":
        return MatrixNormalPosterior(mean, {n: random_factors(t.shape, g, noise=0.3) for n, t in mean.items()})
    raise AssertionError(family)


def test_every_family_is_covered() -> None:
    assert (
        set(Posterior.registry)
        == set(PosteriorFamily)
        == {"map", "diag", "kron", "full", "lowrank_diag", "ensemble", "dropout", "matrix_normal"}
    )


@pytest.mark.parametrize("family", list(PosteriorFamily))
def test_sample_moments_match_analytic(family: str) -> None:
    posterior = _build(family)
    num_samples = NUM_SAMPLES if family != "ensemble" else 5 * 40_000  # a multiple of M: members weigh equally
    samples = posterior.sample(num_samples, make_generator(0))
    assert {n: tuple(t.shape) for n, t in samples.items()} == {n: (num_samples, *s) for n, s in SHAPES.items()}
    flat = torch.cat([t.reshape(num_samples, -1) for t in samples.values()], dim=1)
    analytic = posterior.covariance()
    scale = analytic.diagonal().max().clamp_min(1e-12)
    # Monte-Carlo error of a covariance entry is about σ²·sqrt(2/S) ≈ 0.003 σ²; allow a comfortable 2%.
    torch.testing.assert_close(flat.mean(dim=0), posterior.flat_mean(), atol=0.02 * scale.sqrt(), rtol=0)
    torch.testing.assert_close(torch.cov(flat.T, correction=0), analytic, atol=0.02 * scale, rtol=0)


def test_kron_covariance_is_inverse_of_kronecker_precision() -> None:
    posterior, precision = _kron_with_precision()
    torch.testing.assert_close(posterior.covariance(), torch.linalg.inv(precision), atol=1e-10, rtol=1e-8)


def test_swag_covariance_formula() -> None:
    mean = {"w": torch.zeros(3, dtype=torch.float64)}
    diag = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    deviations = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0], [-1.0, -2.0, 1.0]], dtype=torch.float64)
    posterior = LowRankDiagPosterior(mean, diag, deviations, scale=0.5)
    by_hand = 0.5 * (torch.diag(diag) + deviations.T @ deviations / 2)
    torch.testing.assert_close(posterior.covariance(), by_hand)


def test_map_samples_are_the_mean() -> None:
    posterior = MapPosterior(_mean())
    for name, t in posterior.sample(3).items():
        assert torch.equal(t, posterior.mean()[name].expand(3, *t.shape[1:]))


def test_ensemble_with_s_equal_m_returns_each_member_once() -> None:
    posterior = _build("ensemble")
    samples = posterior.sample(5, make_generator(4))["head.bias"]
    members = posterior.members["head.bias"]
    assert sorted(map(tuple, samples.tolist())) == sorted(map(tuple, members.tolist()))


@pytest.mark.parametrize("family", list(PosteriorFamily))
def test_state_round_trip_and_reproducible_sampling(family: str) -> None:
    posterior = _build(family)
    tensors, params = posterior.state()
    rebuilt = Posterior.from_state(tensors, params)
    assert type(rebuilt) is type(posterior)
    tensors_again, params_again = rebuilt.state()
    assert params_again == params
    assert tensors_again.keys() == tensors.keys()
    assert all(torch.equal(tensors_again[k], tensors[k]) for k in tensors)
    torch.testing.assert_close(rebuilt.covariance(), posterior.covariance(), atol=1e-12, rtol=0)
    first = flatten(posterior.sample(6, make_generator(11)))
    again = flatten(rebuilt.sample(6, make_generator(11)))
    assert torch.equal(first, again)
    if family != "map":
        other = flatten(posterior.sample(6, make_generator(12)))
        assert not torch.equal(first, other)


def test_samples_live_on_the_posteriors_device_and_dtype() -> None:
    posterior = _build("kron").to(dtype=torch.float32)
    samples = posterior.sample(2, make_generator(0, posterior.device))
    assert all(t.dtype == torch.float32 and t.device == posterior.device for t in samples.values())


def test_malformed_kron_factors_are_refused() -> None:
    mean = {"w": torch.zeros(3, 3)}
    factors = {"w": KronFactors.from_matrices(torch.eye(2), torch.eye(3))}
    with pytest.raises(ValueError, match="do not fit"):
        KronPosterior(mean, factors, 1.0, 1.0)


@pytest.mark.parametrize("family", list(PosteriorFamily))
def test_validate_refuses_non_finite_tensors_in_every_family(family: str) -> None:
    posterior = _build(family)
    posterior.validate()  # a sound posterior passes
    tensors, params = posterior.state()
    own = [k for k in tensors if not k.endswith("::mean")]  # an ensemble recomputes its mean from the members
    key = (own or list(tensors))[-1]
    tensors = {**tensors, key: tensors[key].clone().fill_(math.nan)}
    with pytest.raises(PosteriorValueError, match="NaN or infinite"):
        Posterior.from_state(tensors, params).validate()


@pytest.mark.parametrize(
    ("family", "field", "value", "message"),
    [
        ("kron", "eigvals_out", -1e6, "eigenvalues"),
        ("lowrank_diag", "variance", -1.0, "variances"),
    ],
)
def test_validate_refuses_values_out_of_range(family: str, field: str, value: float, message: str) -> None:
    tensors, params = _build(family).state()
    key = next(k for k in tensors if k.endswith(field))
    tensors = {**tensors, key: tensors[key].clone().fill_(value)}
    with pytest.raises(PosteriorValueError, match=message):
        Posterior.from_state(tensors, params).validate()


def test_validate_refuses_impossible_parameters() -> None:
    tensors, params = _build("kron").state()
    with pytest.raises(PosteriorValueError, match="prior precisions must be positive"):
        Posterior.from_state(tensors, {**params, "prior_precision": 0.0}).validate()
    with pytest.raises(PosteriorValueError, match="not finite"):
        Posterior.from_state(tensors, {**params, "scale": math.inf}).validate()
    dropout_tensors, dropout_params = _build("dropout").state()
    with pytest.raises(PosteriorValueError, match="dropout rate"):
        Posterior.from_state(dropout_tensors, {**dropout_params, "rate": math.nan})


@pytest.mark.parametrize("family", list(PosteriorFamily))
def test_sample_many_gives_each_request_its_own_samples(family: str) -> None:
    """The server's per-batch draw: request k gets exactly ``sample(S_k, generator(seed_k))`` (the noise of each
    from its own generator, the family's map applied once for all)."""
    posterior = _build(family)
    requests = [(3, 7), (1, 8), (5, 7)]  # a repeated seed repeats its samples
    together = posterior.sample_many([(S, make_generator(seed)) for S, seed in requests])
    for (S, seed), got in zip(requests, together, strict=True):
        alone = posterior.sample(S, make_generator(seed))
        assert got.keys() == alone.keys()
        torch.testing.assert_close(flatten(got), flatten(alone), rtol=1e-6, atol=1e-7)

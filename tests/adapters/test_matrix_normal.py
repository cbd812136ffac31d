"""The matrix-normal family (Bayesian-LoRA on LoRA-XS cores): its covariance convention, closed-form KL
against torch.distributions, reparameterised per-row samples and their gradients, and refused states."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from adapters import Bundle, BundleError, load_bundle, save_bundle
from adapters.errors import PosteriorValueError
from adapters.manifest import POSTERIOR_FILE
from adapters.posteriors import MatrixNormalFactors, MatrixNormalPosterior, Posterior, make_generator
from adapters.posteriors.matrix_normal import kl_divergence as matrix_normal_kl
from adapters.posteriors.matrix_normal import matrix_shape, sample_blocks, sample_matrix_normal, total_kl
from tests.adapters.test_bundle import _manifest, _replace_file, _trained_classifier
from tests.conftest import tiny_bert

NOISE_CAP = 2.0


def random_factors(shape: tuple[int, ...], g: torch.Generator, noise: float) -> MatrixNormalFactors:
    """Dense lower-triangular factors with a positive diagonal (float64)."""

    def tril(n: int) -> torch.Tensor:
        raw = torch.randn(n, n, generator=g, dtype=torch.float64).tril()
        return raw - torch.diag(raw.diagonal()) + torch.diag(raw.diagonal().abs() + 0.3)

    out, inp = matrix_shape(shape)
    return MatrixNormalFactors(tril(out), 0.7 * tril(inp), torch.tensor(noise, dtype=torch.float64))


def _column_stacked(values: torch.Tensor) -> torch.Tensor:
    """``(..., out, in)`` → ``(..., out·in)`` stacking columns: the literature's ``vec``."""
    return values.transpose(-1, -2).reshape(*values.shape[:-2], -1)


def test_covariance_is_row_major_kron_plus_isotropic_noise() -> None:
    """Over θ (row-major) the covariance is ``Σ_row ⊗ Σ_col + λ² I``; over the column-stacked vec it is
    ``Σ_col ⊗ Σ_row + λ² I``, both checked entry by entry from ``Cov(R_ij, R_kl) = U_ik V_jl + λ² δ δ``."""
    factors = random_factors((3, 2), torch.Generator().manual_seed(0), noise=0.4)
    row, col = factors.row @ factors.row.T, factors.col @ factors.col.T
    by_entry = torch.zeros(3, 2, 3, 2, dtype=torch.float64)
    for i, j, k, m in torch.cartesian_prod(*map(torch.arange, (3, 2, 3, 2))).tolist():
        by_entry[i, j, k, m] = row[i, k] * col[j, m] + 0.16 * (i == k and j == m)
    torch.testing.assert_close(factors.covariance(), by_entry.reshape(6, 6))
    column_stacked = by_entry.permute(1, 0, 3, 2).reshape(6, 6)
    torch.testing.assert_close(column_stacked, torch.kron(col, row) + 0.16 * torch.eye(6, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (4, 4), (3, 2), (3,)])
@pytest.mark.parametrize("noise", [0.0, 0.05, 0.8])
@pytest.mark.parametrize("prior_std", [0.3, 1.7])
def test_kl_equals_torch_distributions(shape, noise, prior_std) -> None:
    """The issue's convention verbatim: ``N(vec M, Σ_col ⊗ Σ_row + λ² I)`` on the column-stacked vec."""
    g = torch.Generator().manual_seed(sum(shape) + int(100 * noise))
    factors = random_factors(shape, g, noise)
    mean = torch.randn(shape, generator=g, dtype=torch.float64)
    matrix = mean.reshape(matrix_shape(shape))
    size = matrix.numel()
    row, col = factors.row @ factors.row.T, factors.col @ factors.col.T
    q = MultivariateNormal(_column_stacked(matrix), torch.kron(col, row) + noise**2 * torch.eye(size).double())
    prior = Normal(torch.zeros(size).double(), prior_std)
    expected = kl_divergence(q, MultivariateNormal(prior.loc, prior.variance.diag()))
    torch.testing.assert_close(matrix_normal_kl(mean, factors, prior_std), expected, atol=1e-10, rtol=1e-10)


def test_total_kl_sums_blocks_and_the_posterior_reports_it() -> None:
    g = torch.Generator().manual_seed(1)
    shapes = {"a": (3, 3), "b": (2, 2), "c": (2,), "d": (3, 3), "e": (2, 2)}  # stacked by shape inside
    means = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    factors = {n: random_factors(s, g, 0.2) for n, s in shapes.items()}
    per_block = sum(matrix_normal_kl(means[n], factors[n], 0.5) for n in shapes)
    torch.testing.assert_close(total_kl(means, factors, 0.5), per_block)
    torch.testing.assert_close(MatrixNormalPosterior(means, factors).kl(0.5), per_block)
    with pytest.raises(ValueError, match="positive"):
        total_kl(means, factors, 0.0)


def test_log_det_and_its_gradient_equal_the_dense_ones_also_at_the_isotropic_start() -> None:
    """``Σ log(s_a² t_b² + λ²)`` vs ``logdet`` of the dense matrix, values and gradients; at ``L = c I`` all
    singular values coincide (where eigenvector-based gradients would be NaN)."""
    g = torch.Generator().manual_seed(2)
    start = MatrixNormalFactors.isotropic((3, 3), std=0.1, noise=0.05, like=torch.zeros(1, dtype=torch.float64))
    for factors in (random_factors((3, 3), g, 0.3), start):
        leaves = [t.clone().requires_grad_(True) for t in (factors.row, factors.col, factors.noise)]
        ours = MatrixNormalFactors(*leaves).log_det()
        dense = torch.logdet(MatrixNormalFactors(*leaves).covariance())
        torch.testing.assert_close(ours, dense)
        grads, dense_grads = torch.autograd.grad(ours, leaves), torch.autograd.grad(dense, leaves)
        torch.testing.assert_close(grads, dense_grads, atol=1e-9, rtol=1e-7)


def _free_parameters(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, ...]:
    factors = random_factors(shape, torch.Generator().manual_seed(seed), noise=0.3)
    mean = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return tuple(t.clone().requires_grad_(True) for t in (mean, *factors.unconstrained(NOISE_CAP)))


def test_unconstrained_parameters_round_trip_and_stay_valid() -> None:
    factors = random_factors((4, 4), torch.Generator().manual_seed(3), noise=0.3)
    again = MatrixNormalFactors.from_unconstrained(*factors.unconstrained(NOISE_CAP), noise_cap=NOISE_CAP)
    for got, expected in zip(
        (again.row, again.col, again.noise), (factors.row, factors.col, factors.noise), strict=True
    ):
        torch.testing.assert_close(got, expected)
    wild = MatrixNormalFactors.from_unconstrained(
        torch.full((3, 3), -30.0).double(), torch.randn(3, 3).double() * 50, torch.tensor(80.0).double(), NOISE_CAP
    )
    MatrixNormalPosterior({"w": torch.zeros(3, 3).double()}, {"w": wild})  # valid whatever the free values
    assert float(wild.noise) <= NOISE_CAP and torch.equal(wild.row, wild.row.tril())
    for bad in (0.0, NOISE_CAP):
        with pytest.raises(ValueError, match="must lie in"):
            MatrixNormalFactors(factors.row, factors.col, torch.tensor(bad)).unconstrained(NOISE_CAP)


def test_reparameterised_rows_have_the_analytic_covariance_and_gradients_reach_every_parameter() -> None:
    mean, raw_row, raw_col, raw_noise = _free_parameters((3, 3), seed=4)
    factors = MatrixNormalFactors.from_unconstrained(raw_row, raw_col, raw_noise, NOISE_CAP)
    rows = sample_blocks({"core": mean}, {"core": factors}, 100_000, make_generator(0))["core"]
    assert rows.shape == (100_000, 3, 3)
    flat = rows.detach().reshape(100_000, 9)
    analytic = factors.covariance().detach()
    scale = analytic.diagonal().max()
    torch.testing.assert_close(flat.mean(0), mean.detach().reshape(-1), atol=0.03 * scale.sqrt(), rtol=0)
    torch.testing.assert_close(torch.cov(flat.T, correction=0), analytic, atol=0.03 * scale, rtol=0)
    # A nonlinear loss of the rows plus the KL: every free parameter gets a finite, non-zero gradient.
    loss = torch.tanh(rows[:64]).sum() + total_kl({"core": mean}, {"core": factors}, prior_std=1.0)
    grads = torch.autograd.grad(loss, [mean, raw_row, raw_col, raw_noise])
    for name, grad in zip(("mean", "row", "col", "noise"), grads, strict=True):
        assert bool(torch.isfinite(grad).all()) and grad.abs().sum() > 0, name


def test_each_row_draws_its_own_noise() -> None:
    """Rows are independent draws (the ELBO needs per-example noise), and a generator reproduces them."""
    factors = random_factors((2, 2), torch.Generator().manual_seed(5), noise=0.1)
    mean = torch.zeros(2, 2, dtype=torch.float64)
    rows = sample_matrix_normal(mean, factors, 8, make_generator(1))
    assert torch.unique(rows.reshape(8, -1), dim=0).shape[0] == 8
    assert torch.equal(rows, sample_matrix_normal(mean, factors, 8, make_generator(1)))


def test_noise_only_and_kronecker_only_limits() -> None:
    """``λ = 0`` leaves the pure matrix normal ``Σ_row ⊗ Σ_col``; vanishing factors leave ``λ² I``."""
    g = torch.Generator().manual_seed(6)
    factors = random_factors((2, 3), g, noise=0.0)
    kron = torch.kron(factors.row @ factors.row.T, factors.col @ factors.col.T)
    torch.testing.assert_close(factors.covariance(), kron)
    tiny = MatrixNormalFactors(1e-9 * torch.eye(2).double(), 1e-9 * torch.eye(3).double(), torch.tensor(0.5).double())
    torch.testing.assert_close(tiny.covariance(), 0.25 * torch.eye(6).double())


def _posterior() -> MatrixNormalPosterior:
    g = torch.Generator().manual_seed(7)
    shapes = {"layer.0.query": (3, 3), "layer.1.value": (3, 3)}
    means = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    return MatrixNormalPosterior(means, {n: random_factors(s, g, 0.2) for n, s in shapes.items()})


def _damaged(field: str, change) -> dict[str, torch.Tensor]:
    tensors, _ = _posterior().state()
    key = f"layer.0.query::{field}"
    tensors[key] = change(tensors[key].clone())
    return tensors


def _set(index, value):
    def change(t: torch.Tensor) -> torch.Tensor:
        t[index] = value
        return t

    return change


DAMAGE = {
    "nan factor": ("row_factor", _set((1, 0), float("nan")), "NaN"),
    "upper entry": ("col_factor", _set((0, 2), 0.5), "lower-triangular"),
    "zero diagonal": ("row_factor", _set((2, 2), 0.0), "diagonal"),
    "negative diagonal": ("col_factor", _set((0, 0), -1.0), "diagonal"),
    "negative noise": ("noise_scale", lambda t: -t, "≥ 0"),
    "infinite noise": ("noise_scale", lambda t: t * float("inf"), "finite"),
    "nan mean": ("mean", _set((0, 0), float("nan")), "mean"),
}


@pytest.mark.parametrize("case", DAMAGE, ids=list(DAMAGE))
def test_impossible_values_are_refused_with_a_typed_error(case: str) -> None:
    field, change, message = DAMAGE[case]
    _, params = _posterior().state()
    with pytest.raises(PosteriorValueError, match=message):
        Posterior.from_state(_damaged(field, change), params).validate()


def test_factor_shapes_must_fit_the_block() -> None:
    factors = random_factors((3, 3), torch.Generator().manual_seed(8), noise=0.1)
    with pytest.raises(ValueError, match=r"needs \(\(2, 2\), \(2, 2\), \(\)\)"):
        MatrixNormalPosterior({"w": torch.zeros(2, 2).double()}, {"w": factors})
    with pytest.raises(ValueError, match="not the mean blocks"):
        MatrixNormalPosterior({"w": torch.zeros(3, 3).double()}, {"v": factors})
    with pytest.raises(ValueError, match=r"float64.*the mean torch.float32"):
        MatrixNormalPosterior({"w": torch.zeros(3, 3)}, {"w": factors})
    with pytest.raises(ValueError, match="matrices or vectors"):
        MatrixNormalPosterior({"w": torch.zeros(3, 3, 1).double()}, {"w": factors})


def test_bundle_round_trip_and_a_damaged_posterior_is_a_bundle_error(tmp_path: Path) -> None:
    """Through save/load: a matrix-normal bundle loads back bit-exactly; one whose stored row factor has an
    upper-triangular entry (checksum updated) is refused with a bundle error naming the field."""
    model, names = _trained_classifier(tiny_bert())
    means = {n: p.detach().clone() for n, p in model.posterior_parameters().items()}
    g = torch.Generator().manual_seed(9)
    posterior = MatrixNormalPosterior(means, {n: random_factors(m.shape, g, 0.1).to(m.dtype) for n, m in means.items()})
    path = save_bundle(Bundle.from_classifier(model, posterior, _manifest(model.base, names)), tmp_path / "b")
    loaded = load_bundle(path)
    assert isinstance(loaded.posterior, MatrixNormalPosterior) and loaded.manifest.posterior.family == "matrix_normal"
    assert torch.equal(loaded.posterior.covariance(), posterior.covariance())
    tensors = load_file(path / POSTERIOR_FILE)
    tensors[f"{names[0]}::row_factor"][0, 1] = 1.0
    save_file(tensors, path / "tmp.safetensors")
    _replace_file(path, POSTERIOR_FILE, (path / "tmp.safetensors").read_bytes())
    with pytest.raises(BundleError, match="row_factor is not lower-triangular"):
        load_bundle(path)

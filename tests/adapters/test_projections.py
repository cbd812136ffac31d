"""Projection families: shapes, orthonormality, optimality, monotone error in rank, determinism."""

from __future__ import annotations

import itertools

import pytest
import scipy.fft
import torch

from adapters import InputMoments, LoraXSConfig, ProjectionSpecError, build_projection, inject_lora_xs
from adapters.projections import dct_matrix, parse_spec, part_ranks
from tests.conftest import random_batch

D_OUT, D_IN = 24, 40
SPECS = ["svd", "wsvd", "dct", "random", "dct-1/2_svd", "random-1/4_svd"]


@pytest.fixture
def weight() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # a matrix with decaying spectrum, like pretrained weights
    u, _ = torch.linalg.qr(torch.randn(D_OUT, D_OUT, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(D_IN, D_OUT, generator=g, dtype=torch.float64))
    return (u * torch.logspace(0, -2, D_OUT, dtype=torch.float64)) @ v.T


@pytest.fixture
def moment() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, D_IN, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, D_IN, dtype=torch.float64)
    return x.T @ x / 500


def _build(weight, rank, spec, moment, seed=0):
    return build_projection(weight, rank, spec, seed=seed, input_moment=moment if "wsvd" in spec else None)


@pytest.mark.parametrize("spec", SPECS)
def test_shapes_dtype_and_determinism(weight, moment, spec) -> None:
    p = _build(weight.float(), 6, spec, moment)
    assert p.A.shape == (6, D_IN) and p.B.shape == (D_OUT, 6) and p.A.dtype == torch.float32
    again = _build(weight.float(), 6, spec, moment)
    assert torch.equal(p.A, again.A) and torch.equal(p.B, again.B) and p.digest == again.digest


@pytest.mark.parametrize("spec", ["svd", "wsvd", "dct", "random"])
def test_output_basis_is_orthonormal(weight, moment, spec) -> None:
    B = _build(weight, 8, spec, moment).B
    torch.testing.assert_close(B.T @ B, torch.eye(8, dtype=torch.float64), atol=1e-10, rtol=0)


def test_svd_is_the_eckart_young_optimum(weight) -> None:
    singular = torch.linalg.svdvals(weight)
    for rank in (1, 4, 10):
        error = torch.linalg.matrix_norm(weight - build_projection(weight, rank, "svd").reconstruction())
        torch.testing.assert_close(error, singular[rank:].square().sum().sqrt())
        for other in ("dct", "random"):
            other_error = torch.linalg.matrix_norm(weight - build_projection(weight, rank, other).reconstruction())
            assert other_error >= error - 1e-12


def test_wsvd_minimises_the_input_weighted_error(weight, moment) -> None:
    def weighted_error(p) -> torch.Tensor:
        diff = weight - p.reconstruction()
        return torch.trace(diff @ moment @ diff.T)

    for rank in (2, 6):
        wsvd = weighted_error(build_projection(weight, rank, "wsvd", input_moment=moment))
        # The optimum: tail singular values of W Σ^{1/2}.
        evals, evecs = torch.linalg.eigh(moment)
        tail = torch.linalg.svdvals(weight @ (evecs * evals.sqrt()) @ evecs.T)[rank:]
        torch.testing.assert_close(wsvd, tail.square().sum())
        assert wsvd < weighted_error(build_projection(weight, rank, "svd"))


@pytest.mark.parametrize("spec", SPECS)
def test_reconstruction_error_falls_with_rank(weight, moment, spec) -> None:
    errors = [
        torch.linalg.matrix_norm(weight - _build(weight, rank, spec, moment).reconstruction()).item()
        for rank in (2, 6, 12, 24)
    ]
    assert all(later < earlier for earlier, later in itertools.pairwise(errors)), errors
    if spec in ("svd", "wsvd"):
        assert errors[-1] < 1e-8  # full rank reproduces the weight


def test_dct_matrix_is_scipys_orthonormal_dct_ii() -> None:
    D = dct_matrix(7)
    torch.testing.assert_close(D @ D.T, torch.eye(7, dtype=torch.float64), atol=1e-12, rtol=0)
    x = torch.randn(7, 3, dtype=torch.float64)
    expected = torch.from_numpy(scipy.fft.dct(x.numpy(), type=2, norm="ortho", axis=0))
    torch.testing.assert_close(D @ x, expected, atol=1e-12, rtol=0)


def test_random_depends_on_seed_only(weight) -> None:
    torch.manual_seed(123)
    a = build_projection(weight, 4, "random", seed=5)
    torch.manual_seed(999)
    b = build_projection(weight, 4, "random", seed=5)
    c = build_projection(weight, 4, "random", seed=6)
    assert torch.equal(a.A, b.A) and not torch.equal(a.A, c.A)


def test_hybrid_splits_rank_and_fits_the_residual(weight) -> None:
    parts = parse_spec("dct-1/2_svd")
    assert [p.family for p in parts] == ["dct", "svd"] and part_ranks(parts, 7) == [3, 4]
    hybrid = build_projection(weight, 7, "dct-1/2_svd")
    dct = build_projection(weight, 3, "dct")
    torch.testing.assert_close(hybrid.A[:3], dct.A)
    svd_of_residual = build_projection(weight - dct.reconstruction(), 4, "svd")
    torch.testing.assert_close(hybrid.A[3:], svd_of_residual.A)
    torch.testing.assert_close(hybrid.B[:, 3:], svd_of_residual.B)


@pytest.mark.parametrize(
    "spec", ["svdd", "dct-1/2", "dct-1/2_random-1/2", "svd_dct", "dct-3/2_svd", "dct-1/2_random-2/3_svd", ""]
)
def test_bad_specs_are_refused(spec) -> None:
    with pytest.raises(ProjectionSpecError):
        parse_spec(spec)


def test_wsvd_without_data_and_bad_rank_are_refused(weight) -> None:
    with pytest.raises(ProjectionSpecError, match="second moment"):
        build_projection(weight, 4, "wsvd")
    with pytest.raises(ProjectionSpecError, match="rank"):
        build_projection(weight, D_OUT + 1, "svd")
    with pytest.raises(ProjectionSpecError):
        LoraXSConfig(projection="bogus")


def test_input_moments_exclude_padding(bert) -> None:
    inject_lora_xs(bert, ("query",))
    name = "encoder.layer.0.attention.self.query"
    batch = random_batch(4, seed=3)
    captured = []
    handle = dict(bert.named_modules())[name].base.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    with InputMoments(bert, [name]) as moments, torch.no_grad():
        moments.set_mask(batch["attention_mask"])
        bert(**batch)
    handle.remove()
    tokens = captured[0][batch["attention_mask"].bool()].double()
    assert moments.num_tokens[name] == int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()
    torch.testing.assert_close(moments.moment(name), tokens.T @ tokens / tokens.shape[0])

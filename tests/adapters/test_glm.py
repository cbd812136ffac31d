"""The linearised (GLM) predictive: per-input Jacobians from batched rows, J Σ Jᵀ per posterior family, and
Monte-Carlo in logit space."""

from __future__ import annotations

import pytest
import torch

from adapters import LoraXSClassifier, LoraXSConfig, RowBlock, compute_projections, inject_lora_xs, target_names
from adapters.batching import AdapterWeights
from adapters.heads import HEAD_BIAS, HEAD_WEIGHT
from adapters.injection import lora_xs_layers
from adapters.ood.features import BaseFeatureTap, default_feature_layers
from adapters.posteriors import (
    DiagPosterior,
    FullPosterior,
    KronFactors,
    KronPosterior,
    LowRankDiagPosterior,
    MapPosterior,
    MatrixNormalPosterior,
)
from adapters.predictive import glm_predictive
from tests.adapters.test_matrix_normal import random_factors
from tests.conftest import random_batch, tiny_bert


def _single_mode(seed: int, patterns, rank: int, num_labels: int):
    base = tiny_bert()
    config = LoraXSConfig(rank=rank, alpha=2.0 * rank, target_modules=patterns, seed=seed)
    names = target_names(base, patterns)
    inject_lora_xs(base, patterns, compute_projections(base, names, config), alpha=config.alpha)
    model = LoraXSClassifier(base, num_labels=num_labels).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.lora_layers.values():
            layer.core.weight.copy_(torch.randn(rank, rank, generator=g))
        model.head.weight.copy_(torch.randn(num_labels, 32, generator=g))
    return model


@pytest.mark.parametrize("base_rows", [False, True], ids=["blocks", "base-rows"])
@pytest.mark.parametrize(
    ("second", "token_budget"), [(("key",), 20), (("key",), None), (("query",), None)],
    ids=["other-layers-packed", "other-layers", "same-layer"],
)  # fmt: skip
def test_batched_jacobians_equal_per_example_autograd(
    second: tuple[str, ...], token_budget: int | None, base_rows: bool
) -> None:
    """Two adapters (different ranks and label counts; on other layers, or both on ``query`` with different
    ranks) in one batched linearisation (one forward, or packed into several); with base rows (the OOD
    features') after the blocks, which change nothing of the blocks' logits and Jacobians."""
    batch = random_batch(5, seed=4)
    models = [_single_mode(0, ("query", "value"), 3, 2), _single_mode(1, second, 2, 3)]
    host_base = tiny_bert()
    inject_lora_xs(host_base, ("query", "key", "value"))
    host = LoraXSClassifier(host_base, num_labels=None).eval()
    inputs = [torch.tensor([0, 2, 4]), torch.tensor([1, 2])]
    blocks = [
        RowBlock(m.own_adapter(), {n: p.detach()[None] for n, p in m.posterior_parameters().items()}, i)
        for m, i in zip(models, inputs, strict=True)
    ]
    tap = BaseFeatureTap(default_feature_layers(2), host.pooling, range(5)) if base_rows else None
    results = host.forward_rows_jacobians(batch, blocks, token_budget=token_budget, tap=tap)
    assert tap is None or sorted(tap.features) == [0, 1, 2, 4]
    for model, rows, (logits, jacobians) in zip(models, inputs, results, strict=True):
        params = model.posterior_parameters(include_head=True)
        for p in params.values():
            p.requires_grad_(True)
        for k, i in enumerate(rows.tolist()):
            single = {key: v[i : i + 1, : int(batch["attention_mask"][i].sum())] for key, v in batch.items()}
            out = model(**single)[0]
            torch.testing.assert_close(logits[k], out.detach(), atol=1e-5, rtol=1e-5)
            for c in range(out.shape[0]):
                grads = torch.autograd.grad(out[c], list(params.values()), retain_graph=True)
                for name, grad in zip(params, grads, strict=True):
                    torch.testing.assert_close(jacobians[name][k, c], grad, atol=1e-5, rtol=1e-4)


def test_jacobians_need_one_sample_per_block() -> None:
    model = _single_mode(0, ("query",), 2, 2)
    samples = {n: p.detach().expand(2, -1, -1) for n, p in model.posterior_parameters().items()}
    with pytest.raises(ValueError, match="one sample"):
        model.forward_rows_jacobians(random_batch(2), [RowBlock(model.own_adapter(), samples, torch.arange(2))])


def _posteriors(mean: dict[str, torch.Tensor]) -> list:
    g = torch.Generator().manual_seed(0)
    P = sum(t.numel() for t in mean.values())
    factors = {}
    for name, t in mean.items():
        mats = [(lambda a: a @ a.T)(torch.randn(n, n, generator=g, dtype=torch.float64)) for n in t.shape]
        factors[name] = KronFactors.from_matrices(*mats)
    tril = torch.tril(torch.randn(P, P, generator=g, dtype=torch.float64)) / P
    return [
        DiagPosterior(mean, {n: torch.rand(t.shape, generator=g, dtype=torch.float64) for n, t in mean.items()}),
        KronPosterior(mean, factors, scale=3.0, prior_precision=[0.5 + i for i in range(len(mean))]),
        FullPosterior(mean, tril),
        LowRankDiagPosterior(
            mean,
            torch.rand(P, generator=g, dtype=torch.float64),
            torch.randn(4, P, generator=g, dtype=torch.float64),
            scale=0.7,
        ),
        MapPosterior(mean),
        MatrixNormalPosterior(mean, {n: random_factors(t.shape, g, noise=0.4) for n, t in mean.items()}),
    ]


@pytest.mark.parametrize("index", range(6))
def test_jacobian_covariance_equals_dense_j_sigma_jt(index) -> None:
    g = torch.Generator().manual_seed(1)
    mean = {"a": torch.zeros(3, 3, dtype=torch.float64), "b": torch.zeros(2, 4, dtype=torch.float64),
            "c": torch.zeros(3, dtype=torch.float64)}  # fmt: skip
    posterior = _posteriors(mean)[index]
    jacobians = {n: torch.randn(6, 3, *t.shape, generator=g, dtype=torch.float64) for n, t in mean.items()}
    flat = torch.cat([jacobians[n].flatten(start_dim=2) for n in mean], dim=2)
    expected = flat @ posterior.covariance() @ flat.transpose(1, 2)
    torch.testing.assert_close(posterior.jacobian_covariance(jacobians), expected)


def test_glm_predictive_draws_have_the_logit_covariance() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 3, generator=g, dtype=torch.float64)
    root = torch.randn(4, 3, 3, generator=g, dtype=torch.float64)
    covariance = root @ root.transpose(1, 2)
    covariance[3] = 0  # a point mass: every draw is the logits
    pred = glm_predictive(logits, covariance, 200_000, torch.Generator().manual_seed(0))
    draws = torch.log(pred.sample_probs.double())  # log-softmax of a draw = draw − logsumexp: centre per draw
    centred = draws - draws.mean(dim=-1, keepdim=True)
    for n in range(3):
        expected = covariance[n] - covariance[n].mean(0, keepdim=True) - covariance[n].mean(1, keepdim=True)
        expected = expected + covariance[n].mean()
        torch.testing.assert_close(torch.cov(centred[:, n].T), expected, atol=0.05 * expected.abs().max(), rtol=0)
    torch.testing.assert_close(pred.probs[3].double(), torch.softmax(logits[3], -1), atol=1e-6, rtol=0)
    assert pred.mutual_information[3] < 1e-6 and pred.mutual_information[:3].min() > 0


def test_head_jacobians_are_the_features() -> None:
    model = _single_mode(3, ("query",), 2, 3)
    samples = {n: p.detach()[None] for n, p in model.posterior_parameters(include_head=True).items()}
    batch = random_batch(2, seed=1)
    block = RowBlock(model.own_adapter(), samples, torch.arange(2))
    ((_, jac),) = model.forward_rows_jacobians(batch, [block])
    features = model.features(batch).detach()
    for c in range(3):
        torch.testing.assert_close(jac[HEAD_WEIGHT][:, c, c], features)
        assert jac[HEAD_WEIGHT][:, c].abs().sum() == pytest.approx(features.abs().sum().item(), rel=1e-5)
        torch.testing.assert_close(jac[HEAD_BIAS][:, c], torch.eye(3)[c].expand(2, 3))
    assert set(jac) == {*lora_xs_layers(model.base), HEAD_WEIGHT, HEAD_BIAS}
    assert isinstance(model.own_adapter(), AdapterWeights)

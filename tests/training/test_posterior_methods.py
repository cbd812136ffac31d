"""SWAG, VI, Bayesian-LoRA, ensembles, MC dropout and L-LoRA-S's MAP phase: oracles for their maths and
checks of their training phases (tiny random BERT with MiniLM's tokenizer)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from adapters import EnsemblePosterior, LoraXSClassifier, LoraXSConfig, compute_projections, inject_lora_xs
from adapters.heads import HEAD_BIAS, HEAD_WEIGHT
from adapters.injection import target_names
from adapters.layer import LoraXSLinear
from adapters.posteriors import drop_columns, flatten
from adapters.posteriors.matrix_normal import MatrixNormalFactors
from tests.service.bundles import save_tiny_base
from training.config import BayesianLoraConfig, OptimisationConfig, SwagConfig, ViConfig
from training.data import Example
from training.encoding import Encoder
from training.inference import predict
from training.map_training import train_map
from training.methods.bayesian_lora import MatrixNormalCores, MatrixNormalElbo, fit_bayesian_lora
from training.methods.swag import SwagMoments, fit_swag
from training.methods.vi import Elbo, GaussianCores, fit_vi
from training.objectives import AdapterDropout, row_cores
from training.scopes import trainable

PATTERNS = ("query", "value")
WORDS = ["good", "bad", "film", "plot", "dull", "witty", "boring", "great", "awful", "fun", "slow", "moving"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("tiny"))


def _model(tiny_dir: Path, seed: int = 0) -> LoraXSClassifier:
    base = AutoModel.from_pretrained(tiny_dir).eval()
    config = LoraXSConfig(rank=3, alpha=6.0, target_modules=PATTERNS)
    names = target_names(base, PATTERNS)
    inject_lora_xs(base, PATTERNS, compute_projections(base, names, config), alpha=config.alpha, seed=seed)
    torch.manual_seed(seed)
    model = LoraXSClassifier(base, num_labels=2).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.lora_layers.values():
            layer.core.weight.copy_(0.3 * torch.randn(3, 3, generator=g))
    model.freeze_base()
    return model


def _examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    return [Example(" ".join(rng.choices(WORDS, k=rng.randint(2, 9))), rng.randint(0, 1)) for n in range(n)]


def _encoder(tiny_dir: Path) -> Encoder:
    return Encoder(AutoTokenizer.from_pretrained(tiny_dir), 32)


# ------------------------------------------------------------------------------------------------- SWAG


def test_swag_moments_match_a_hand_run_on_a_toy_problem() -> None:
    """Noisy SGD on a quadratic; moments by hand from the kept snapshots (float64 lists)."""
    g = torch.Generator().manual_seed(0)
    curvature, centre = torch.tensor([1.0, 4.0, 0.5], dtype=torch.float64), torch.tensor([1.0, -2.0, 0.5])
    theta = torch.zeros(3, dtype=torch.float64)
    moments, snapshots, rank = SwagMoments(rank=4), [], 4
    for step in range(1, 61):
        grad = curvature * (theta - centre) + 0.5 * torch.randn(3, generator=g, dtype=torch.float64)
        theta = theta - 0.1 * grad
        if step > 20 and step % 4 == 0:  # burn-in, then a snapshot every 4 steps
            moments.update(theta)
            snapshots.append(theta.tolist())
    n = len(snapshots)
    mean = [sum(s[i] for s in snapshots) / n for i in range(3)]
    second = [sum(s[i] ** 2 for s in snapshots) / n for i in range(3)]
    running = [[sum(s[i] for s in snapshots[: k + 1]) / (k + 1) for i in range(3)] for k in range(n)]
    deviations = [[snapshots[k][i] - running[k][i] for i in range(3)] for k in range(n - rank, n)]
    torch.testing.assert_close(moments.mean, torch.tensor(mean, dtype=torch.float64))
    variance = [second[i] - mean[i] ** 2 for i in range(3)]
    torch.testing.assert_close(moments.variance(), torch.tensor(variance, dtype=torch.float64))
    posterior = moments.posterior({"w": torch.zeros(3, dtype=torch.float64)}, scale=0.5)
    torch.testing.assert_close(posterior.deviations, torch.tensor(deviations, dtype=torch.float64))
    D = torch.tensor(deviations, dtype=torch.float64)
    expected = 0.5 * (torch.diag(moments.variance()) + D.T @ D / (rank - 1))
    torch.testing.assert_close(posterior.covariance(), expected)


def test_fit_swag_collects_snapshots_and_restores_the_map(tiny_dir: Path) -> None:
    model = _model(tiny_dir)
    before = {n: p.detach().clone() for n, p in model.posterior_parameters(include_head=True).items()}
    settings = SwagConfig(epochs=2, lr=0.05, snapshots=6, rank=3)
    posterior, info = fit_swag(
        model, _examples(48), _encoder(tiny_dir), settings, batch_size=8, include_head=True, progress=False
    )
    assert info["snapshots"] == 6 and posterior.rank == 3 and posterior.names == list(before)
    after = model.posterior_parameters(include_head=True)
    assert all(torch.equal(after[n], before[n]) for n in before)  # the MAP is back in the model
    assert not torch.allclose(posterior.flat_mean(), flatten(before))  # SWA moved away from it
    assert bool((posterior.variance > 1e-12).all())


# --------------------------------------------------------------------------------------------------- VI


def test_vi_kl_equals_the_closed_form_and_the_learned_prior_is_its_optimum(tiny_dir: Path) -> None:
    model = _model(tiny_dir)
    q = GaussianCores(model, init_std=0.1)
    with torch.no_grad():
        for p in q.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    delta = 3.0
    expected = sum(
        torch.distributions.kl_divergence(
            torch.distributions.Normal(mean, q.stds()[name]), torch.distributions.Normal(0.0, delta**-0.5)
        ).sum()
        for name, mean in q.means().items()
    )
    torch.testing.assert_close(q.kl(delta), expected)
    best = q.optimal_prior_precision()
    with torch.no_grad():
        assert float(q.kl(best)) < min(float(q.kl(best * 1.05)), float(q.kl(best / 1.05)))


def test_low_rank_kl_and_covariance_equal_torch_distributions(tiny_dir: Path) -> None:
    model = _model(tiny_dir)
    q = GaussianCores(model, init_std=0.2, rank=3, seed=1)
    with torch.no_grad():
        q.factor.mul_(20.0)
    mean = flatten(q.means()).detach().double()
    variance = flatten(q.stds()).detach().double().square()
    factor = q.factor.detach().double()
    exact = torch.distributions.LowRankMultivariateNormal(mean, factor, variance)
    delta = 2.5
    prior = torch.distributions.MultivariateNormal(torch.zeros_like(mean), torch.eye(len(mean)).double() / delta)
    expected = torch.distributions.kl_divergence(exact, prior)
    torch.testing.assert_close(q.kl(delta).double(), expected, rtol=1e-4, atol=1e-4)
    posterior = q.posterior()  # the bundle's SWAG form carries the same Gaussian
    torch.testing.assert_close(posterior.covariance().double(), exact.covariance_matrix, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        rows = q.sample_rows(50_000)
    flat = torch.cat([rows[name].reshape(50_000, -1) for name in q.means()], dim=1).double()
    scale = float(exact.covariance_matrix.abs().max())  # Monte-Carlo error of an entry ≈ scale · √(2/S) ≈ 0.6%
    torch.testing.assert_close(torch.cov(flat.T), exact.covariance_matrix, atol=0.03 * scale, rtol=0)


def test_elbo_draws_noise_per_example(tiny_dir: Path) -> None:
    """Two copies of one input in a batch get different cores: the draw is not shared across the batch."""
    model = _model(tiny_dir)
    batch = _encoder(tiny_dir)([Example("a dull film", 0)] * 2)
    q = GaussianCores(model, init_std=0.5)
    with torch.no_grad(), row_cores(model, q.sample_rows(2)):
        logits = model(batch["input_ids"], batch["attention_mask"])
    assert not torch.allclose(logits[0], logits[1])
    loss = Elbo(q, num_data=100, prior_precision=None, kl_weight=1.0).loss(model, batch)
    loss.backward()
    assert all(p.grad is not None for p in q.parameters())


def test_fit_vi_learns_a_posterior_and_restores_the_map(tiny_dir: Path) -> None:
    model = _model(tiny_dir)
    cores = {n: p.detach().clone() for n, p in model.posterior_parameters().items()}
    head = model.head.weight.detach().clone()
    settings = ViConfig(epochs=2, lr=0.01, std_lr=0.05, init_std=0.01)
    posterior, info = fit_vi(model, _examples(48), _encoder(tiny_dir), settings, batch_size=8, progress=False)
    assert posterior.family == "diag" and posterior.names == list(cores)
    assert all(torch.equal(model.posterior_parameters()[n], cores[n]) for n in cores)
    assert torch.equal(model.head.weight, head)  # the head is not part of q and stays fixed
    stds = flatten(posterior.variance).sqrt()
    assert not torch.allclose(stds, torch.full_like(stds, 0.01))  # σ moved from its initial value
    assert info["prior_learned"] and info["prior_precision"] > 0


# --------------------------------------------------------------------------------------- ensemble, dropout


def test_ensemble_predictive_is_the_average_of_its_members(tiny_dir: Path) -> None:
    members = [_model(tiny_dir, seed) for seed in range(3)]
    for seed, member in enumerate(members):
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed)
            member.head.weight.copy_(torch.randn(member.head.weight.shape, generator=generator))
    params = [m.posterior_parameters(include_head=True) for m in members]
    ensemble = EnsemblePosterior({n: torch.stack([p[n].detach() for p in params]) for n in params[0]})
    assert {HEAD_WEIGHT, HEAD_BIAS} <= set(ensemble.names)
    examples, encoder = _examples(10, seed=1), _encoder(tiny_dir)
    served = predict(members[0], examples, encoder, posterior=ensemble, num_samples=3, progress=False)
    by_member = torch.stack(
        [predict(m, examples, encoder, progress=False).logits[0].softmax(-1) for m in members]
    ).mean(0)
    torch.testing.assert_close(served.distribution().probs, by_member, atol=1e-5, rtol=1e-4)


def test_dropped_core_columns_equal_dropout_on_the_adapter_input(tiny_dir: Path) -> None:
    """``R diag(m) / (1 − p)`` per row == masking the rank directions of ``A x`` for every token of the row."""
    layer: LoraXSLinear = next(iter(_model(tiny_dir).lora_layers.values()))
    x = torch.randn(4, 5, layer.in_features)
    rate, core = 0.4, layer.core.weight.detach()
    dropped = drop_columns(core.expand(4, -1, -1), rate, torch.Generator().manual_seed(7))
    keep = (torch.rand(4, 1, 3, generator=torch.Generator().manual_seed(7)) >= rate).float() / (1 - rate)
    expected = layer.base(x) + layer.scaling * ((x @ layer.lora_A.T) * keep) @ core.T @ layer.lora_B.T
    model_like = torch.nn.Module()
    model_like.lora_layers = {"only": layer}  # row_cores only needs the layers
    with torch.no_grad(), row_cores(model_like, {"only": dropped}):
        got = layer(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    objective = AdapterDropout(rate)
    with pytest.raises(ValueError, match="rate"):
        AdapterDropout(1.0)
    assert objective.rate == rate


# ------------------------------------------------------------------------------------------ Bayesian-LoRA


def test_bayesian_lora_draws_noise_per_example_and_trains_every_variational_parameter(tiny_dir: Path) -> None:
    """Two copies of one input get different logits (independent draws); the loss reaches M, both Cholesky
    factors and λ of every core."""
    model = _model(tiny_dir)
    batch = _encoder(tiny_dir)([Example("a dull film", 0)] * 2)
    settings = BayesianLoraConfig(init_std=0.5, noise_init=0.05, noise_cap=0.1, samples=2)
    q = MatrixNormalCores(model, settings)
    objective = MatrixNormalElbo(q, num_data=100, settings=settings)
    with torch.no_grad():
        logits, labels = objective.logits(model, batch)
    assert logits.shape == (4, 2) and labels.tolist() == [0, 0, 0, 0]  # 2 draws for each of 2 examples
    assert all(not torch.allclose(logits[i], logits[j]) for i in range(4) for j in range(i))
    cores = model.posterior_parameters()
    with trainable(model, cores.values()):
        objective.loss(model, batch).backward()
    for group in (list(cores.values()), list(q.row), list(q.col), list(q.noise)):
        assert len(group) == len(cores) and all(p.grad is not None and p.grad.abs().sum() > 0 for p in group)


def test_bayesian_lora_elbo_decreases_and_the_map_is_restored(tiny_dir: Path) -> None:
    model = _model(tiny_dir)
    cores = {n: p.detach().clone() for n, p in model.posterior_parameters().items()}
    head = model.head.weight.detach().clone()
    settings = BayesianLoraConfig(epochs=4, lr=0.01, factor_lr=0.05, prior_std=0.5)
    posterior, info = fit_bayesian_lora(
        model, _examples(48), _encoder(tiny_dir), settings, batch_size=8, progress=False
    )
    losses = info["negative_elbo_per_example"]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert posterior.family == "matrix_normal" and posterior.names == list(cores)
    assert all(torch.equal(model.posterior_parameters()[n], cores[n]) for n in cores)
    assert torch.equal(model.head.weight, head)  # the head is not part of q and stays fixed
    start = MatrixNormalFactors.isotropic((3, 3), settings.init_std, settings.noise_init, head)
    moved = [
        not torch.allclose(f.row, start.row) and abs(float(f.noise) - settings.noise_init) > 1e-5
        for f in posterior.factors.values()
    ]
    assert all(moved)
    assert 0 < info["noise_scale_mean"] < settings.noise_cap
    torch.testing.assert_close(float(posterior.kl(settings.prior_std)), info["kl"], atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------------------- L-LoRA-S (MAP)


@pytest.mark.parametrize("train_projections", [False, True])
def test_train_projections_trains_a_and_b_with_the_cores_and_freezes_them_again(
    tiny_dir: Path, train_projections: bool
) -> None:
    model = _model(tiny_dir)
    before = {n: (layer.lora_A.clone(), layer.lora_B.clone()) for n, layer in model.lora_layers.items()}
    cores = {n: p.detach().clone() for n, p in model.posterior_parameters().items()}
    settings = OptimisationConfig(
        epochs=2, lr=0.01, batch_size=8, train_projections=train_projections, projection_lr=0.01
    )
    train_map(model, _examples(32), _examples(16, seed=1), _encoder(tiny_dir), settings, progress=False)
    for name, layer in model.lora_layers.items():
        moved = [
            not torch.equal(now, then) for now, then in zip((layer.lora_A, layer.lora_B), before[name], strict=True)
        ]
        assert moved == [train_projections] * 2, name
        assert not torch.equal(layer.core.weight, cores[name])
        assert set(layer._buffers) == {"lora_A", "lora_B"}  # frozen buffers again, not parameters
    assert not any("lora_" in name for name, _ in model.named_parameters())
    if train_projections:  # the bundle's projections are the trained ones
        own = model.own_adapter().projections
        assert all(torch.equal(own[n].A, layer.lora_A) for n, layer in model.lora_layers.items())

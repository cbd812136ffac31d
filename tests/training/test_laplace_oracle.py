"""Our Laplace posteriors against laplace-torch on the same fitted model (tiny random BERT)."""

from __future__ import annotations

from collections import UserDict

import pytest
import torch

from adapters import (
    Bundle,
    LoraXSClassifier,
    LoraXSConfig,
    RowBlock,
    compute_projections,
    inject_lora_xs,
    load_bundle,
    make_generator,
    save_bundle,
    target_names,
)
from adapters.manifest import AdapterSpec, BaseModelSpec, BundleManifest, HeadSpec, PosteriorSpec, TaskSpec
from tests.conftest import random_batch, tiny_bert
from training.methods.exact_ggn import exact_ggn, log_marginal_likelihood
from training.methods.laplace_fit import fit_laplace, laplace_torch
from training.scopes import trainable

PATTERNS = ("query", "value")


def _model_and_loader(seed: int = 0):
    base = tiny_bert(seed)
    config = LoraXSConfig(rank=3, alpha=6.0, target_modules=PATTERNS)
    names = target_names(base, PATTERNS)
    inject_lora_xs(base, PATTERNS, compute_projections(base, names, config), alpha=config.alpha)
    model = LoraXSClassifier(base, num_labels=3).eval()
    model.freeze_base()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.lora_layers.values():
            layer.core.weight.copy_(0.5 * torch.randn(3, 3, generator=g))
    batch = random_batch(48, seed=seed)
    labels = torch.randint(0, 3, (48,), generator=g)
    items = [
        {"input_ids": batch["input_ids"][i], "attention_mask": batch["attention_mask"][i], "labels": labels[i]}
        for i in range(48)
    ]

    def collate(rows):
        from collections import UserDict

        return UserDict({k: torch.stack([r[k] for r in rows]) for k in rows[0]})

    return model, names, torch.utils.data.DataLoader(items, batch_size=16, collate_fn=collate), batch


def _laplace_torch(model, loader, structure: str, marglik_steps: int = 20, include_head: bool = False):
    """laplace-torch's own fit of the same model (the oracle), with the same trainable parameters."""
    with trainable(model, model.posterior_parameters(include_head=include_head).values()):
        model.base.set_attn_implementation("eager")  # curvlinops' full GGN uses forward-mode AD
        la = laplace_torch(model, structure)
        la.fit(loader)
        la.optimize_prior_precision(method="marglik", n_steps=marglik_steps)
        model.base.set_attn_implementation("sdpa")
    return la


def _laplace_covariance(la, structure: str) -> torch.Tensor:
    if structure == "kron":
        return torch.linalg.inv(la.posterior_precision.to_matrix().double())
    if structure == "diag":
        return torch.diag(la.posterior_variance.double())
    return la.posterior_covariance.double()


@pytest.mark.parametrize("include_head", [False, True])
def test_kron_covariance_equals_laplace_torch(include_head) -> None:
    model, _, loader, _ = _model_and_loader()
    fit = fit_laplace(model, loader, "kron", include_head=include_head, marglik_steps=20, progress=False)
    ours = fit.posterior.covariance().double()
    theirs = _laplace_covariance(fit.laplace, "kron")
    assert ours.shape == theirs.shape == (fit.laplace.n_params, fit.laplace.n_params)
    torch.testing.assert_close(ours, theirs, atol=1e-5 * theirs.abs().max().item(), rtol=1e-4)
    assert fit.info["prior_precision"] > 0 and fit.info["n_data"] == 48
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}  # restored after the fit
    assert trainable == {f"base.{n}.core.weight" for n in model.lora_layers} | {"head.weight", "head.bias"}


@pytest.mark.parametrize("structure", ["diag", "full"])
@pytest.mark.parametrize("include_head", [False, True])
def test_exact_ggn_and_evidence_equal_laplace_torch(structure, include_head) -> None:
    """Our exact GGN is laplace-torch's; our evidence is its evidence; our δ is at least as good."""
    model, _, loader, _ = _model_and_loader()
    params = model.posterior_parameters(include_head=include_head)
    with trainable(model, params.values()):
        ggn, loss, count = exact_ggn(model, loader, params, diagonal=structure == "diag")
    la = _laplace_torch(model, loader, structure, marglik_steps=100, include_head=include_head)
    assert count == 48 and loss == pytest.approx(float(la.loss), rel=1e-5)
    torch.testing.assert_close(ggn, la.H.double(), atol=1e-6 * la.H.abs().max().item(), rtol=1e-4)
    eigvals = ggn.clamp_min(0) if structure == "diag" else torch.linalg.eigvalsh(ggn).clamp_min(0)
    theta = la.mean.detach().double()
    for delta in (1e-3, 0.05, 3.0):
        ours = log_marginal_likelihood(
            torch.tensor(delta, dtype=torch.float64), eigvals, loss, float(theta @ theta), len(theta)
        )
        # laplace-torch works in float32: its log-determinants carry ~1e-3 absolute error
        assert float(ours) == pytest.approx(float(la.log_marginal_likelihood(torch.tensor([delta]))), abs=1e-2)
    fit = fit_laplace(model, loader, structure, include_head=include_head, progress=False)
    assert fit.info["log_marginal_likelihood"] >= float(la.log_marginal_likelihood()) - 1e-2
    as_matrix = torch.diag if structure == "diag" else (lambda m: m)
    # at laplace-torch's δ, the covariance is laplace-torch's
    precision = as_matrix(ggn) + la.prior_precision.item() * torch.eye(len(theta), dtype=torch.float64)
    theirs = _laplace_covariance(la, structure)
    torch.testing.assert_close(torch.linalg.inv(precision), theirs, atol=1e-4 * theirs.abs().max().item(), rtol=1e-3)
    # and our posterior is N(θ̂, (GGN + δ̂ I)⁻¹) at our δ̂
    ours = torch.linalg.inv(as_matrix(ggn) + fit.info["prior_precision"] * torch.eye(len(theta), dtype=torch.float64))
    torch.testing.assert_close(
        fit.posterior.covariance().double(), ours, atol=1e-5 * ours.abs().max().item(), rtol=1e-4
    )


def _bundle(model: LoraXSClassifier, names, posterior, tmp_path):
    manifest = BundleManifest(
        name="oracle",
        version="1",
        task=TaskSpec(labels=["a", "b", "c"]),
        base_model=BaseModelSpec(name_or_path="tiny", fingerprint="0" * 64, hidden_size=32),
        adapter=AdapterSpec(rank=3, alpha=6.0, target_modules=list(PATTERNS), modules=names),
        head=HeadSpec(in_features=32, num_labels=3),
        posterior=PosteriorSpec(family=posterior.family),
    )
    save_bundle(Bundle.from_classifier(model, posterior, manifest), tmp_path / "b")
    return load_bundle(tmp_path / "b")


def test_kron_bundle_samples_have_laplace_torchs_covariance(tmp_path) -> None:
    model, names, loader, _ = _model_and_loader(seed=1)
    fit = fit_laplace(model, loader, "kron", marglik_steps=20, progress=False)
    bundle = _bundle(model, names, fit.posterior, tmp_path)
    samples = bundle.posterior.sample(100_000, make_generator(0))
    flat = torch.cat([samples[n].reshape(100_000, -1) for n in bundle.posterior.names], dim=1).double()
    theirs = _laplace_covariance(fit.laplace, "kron")
    scale = theirs.diagonal().max()
    torch.testing.assert_close(torch.cov(flat.T), theirs, atol=0.03 * scale, rtol=0)
    torch.testing.assert_close(flat.mean(0), fit.laplace.mean.double(), atol=0.03 * scale.sqrt(), rtol=0)


def test_sampled_predictive_agrees_with_laplace_torch_nn_predictive(tmp_path) -> None:
    model, names, loader, batch = _model_and_loader(seed=2)
    fit = fit_laplace(model, loader, "kron", marglik_steps=20, progress=False)
    bundle = _bundle(model, names, fit.posterior, tmp_path)
    x = {k: v[:6] for k, v in batch.items()}
    num_samples = 4000
    torch.manual_seed(0)
    theirs = fit.laplace(
        dict(x) | {"labels": torch.zeros(6, dtype=torch.long)}, pred_type="nn", link_approx="mc", n_samples=num_samples
    )
    host_base = tiny_bert(2)
    inject_lora_xs(host_base, PATTERNS)
    host = LoraXSClassifier(host_base, num_labels=None).eval()
    samples = bundle.posterior.sample(num_samples, make_generator(1))
    with torch.no_grad():
        (logits,) = host.forward_rows(x, [RowBlock(bundle.adapter_weights(), samples, torch.arange(6))])
    per_sample = torch.softmax(logits, -1)
    ours = per_sample.mean(0)
    # two independent MC estimates: their difference has std ≈ sqrt(2)·σ/√S per entry
    stderr = per_sample.std(0) * (2 / num_samples) ** 0.5
    assert torch.all((ours - theirs.to(ours.dtype)).abs() <= 5 * stderr + 1e-4), (ours, theirs)
    assert per_sample.std(0).max() > 0.01  # the posterior is not degenerate: the check has power


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_subset_curvature_scaled_to_n_equals_fitting_on_n(structure) -> None:
    """Data repeated twice, fitted as is, equals the data fitted once and scaled to twice its size."""
    model, _, loader, _ = _model_and_loader(seed=3)
    doubled = torch.utils.data.DataLoader(
        list(loader.dataset) * 2, batch_size=16, collate_fn=loader.collate_fn, shuffle=False
    )
    on_all = fit_laplace(model, doubled, structure, marglik_steps=100, progress=False)
    scaled = fit_laplace(model, loader, structure, n_data=96, marglik_steps=100, progress=False)
    assert scaled.info["n_data"] == 96 and scaled.info["curvature_examples"] == 48
    assert scaled.info["prior_precision"] == pytest.approx(on_all.info["prior_precision"], rel=1e-3)
    reference = on_all.posterior.covariance()
    torch.testing.assert_close(scaled.posterior.covariance(), reference, atol=1e-4 * reference.abs().max(), rtol=1e-3)


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_posterior_at_another_prior_precision(structure) -> None:
    """``fit.with_prior(δ)`` rebuilds the posterior from the same curvature: at the tuned δ it is the fitted one."""
    model, _, loader, _ = _model_and_loader(seed=4)
    fit = fit_laplace(model, loader, structure, marglik_steps=20, progress=False)
    delta = fit.info["prior_precision"]
    torch.testing.assert_close(fit.with_prior(delta).covariance(), fit.posterior.covariance(), atol=1e-6, rtol=1e-5)
    wider, narrower = (
        fit.with_prior(delta / 10).covariance().diagonal(),
        fit.with_prior(delta * 10).covariance().diagonal(),
    )
    assert torch.all(wider > fit.posterior.covariance().diagonal()) and torch.all(narrower < wider)


@pytest.mark.parametrize("include_head", [False, True])
def test_glm_logit_covariance_equals_laplace_torch(include_head) -> None:
    """Our batched-rows Jacobians and kron J Σ Jᵀ against laplace-torch's GLM predictive (f_μ, f_var)."""
    model, _, loader, batch = _model_and_loader(seed=4)
    fit = fit_laplace(model, loader, "kron", include_head=include_head, marglik_steps=20, progress=False)
    x = {k: v[:5] for k, v in batch.items()}
    model.base.set_attn_implementation("eager")  # laplace-torch takes Jacobians with torch.func
    f_mu, f_var = fit.laplace._glm_predictive_distribution(UserDict(x))
    model.base.set_attn_implementation("sdpa")
    samples = {name: t[None] for name, t in fit.posterior.mean().items()}  # linearised at the MAP
    ((logits, jacobians),) = model.forward_rows_jacobians(x, [RowBlock(model.own_adapter(), samples, torch.arange(5))])
    torch.testing.assert_close(logits, f_mu.float(), atol=1e-5, rtol=1e-5)
    ours = fit.posterior.jacobian_covariance({k: v.double() for k, v in jacobians.items()})
    torch.testing.assert_close(ours, f_var.double(), atol=1e-6 * f_var.abs().max().item(), rtol=1e-4)
    assert f_var.diagonal(dim1=1, dim2=2).min() > 0  # a real variance: the check has power

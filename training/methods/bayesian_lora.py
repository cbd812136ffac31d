"""``--posterior bayesian-lora``: Bayesian-LoRA (Lin et al., arXiv 2601.21003) on the LoRA-XS cores
(docs/methods.md, Bayesian-LoRA).

Each core gets a matrix-normal variational posterior ``q(R) = MN(M, L_row L_rowᵀ, L_col L_colᵀ) ⊕ N(0, λ² I)``
(:mod:`adapters.posteriors.matrix_normal`). Starting from the MAP (``M`` *is* the core, the head stays fixed),
``M``, both Cholesky factors and λ are trained by minimising the negative ELBO against a zero-mean Gaussian
prior, with independent reparameterised draws for every training example (the batched-rows forward).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from adapters import LoraXSClassifier
from adapters.posteriors.matrix_normal import MatrixNormalFactors, MatrixNormalPosterior, sample_blocks, total_kl
from training.config import BayesianLoraConfig, PosteriorMethod
from training.data import Example
from training.encoding import Encoder, batch_logits
from training.methods.base import Fitted, Method, register, sampled
from training.methods.variational import train_variational
from training.objectives import row_cores
from training.scopes import Timer, restored, trainable
from training.session import Session


class BayesianLora(Method):
    name = PosteriorMethod.BAYESIAN_LORA

    def fit(self, session: Session) -> Fitted:
        config = session.config
        posterior, info = fit_bayesian_lora(
            session.model, session.train, session.encoder, config.posterior.bayesian_lora,
            batch_size=config.optimisation.batch_size, seed=config.seed, progress=config.progress,
        )  # fmt: skip
        return sampled(self.name, config, posterior, info)


class MatrixNormalCores(nn.Module):
    """The variational parameters: the means are the layers' core weights; per core, free parameters of
    ``L_row``, ``L_col`` (``(r, r)`` each) and ``ρ`` with ``λ = noise_cap · sigmoid(ρ)``
    (:meth:`MatrixNormalFactors.from_unconstrained`).

    Args:
        model: the classifier whose cores are the means (trained in place).
        settings: the initial ``L_row = L_col = √init_std · I``, the initial λ and its cap.
    """

    def __init__(self, model: LoraXSClassifier, settings: BayesianLoraConfig) -> None:
        super().__init__()
        self.layers = model.lora_layers  # a plain dict: the cores stay the model's parameters
        self.noise_cap = settings.noise_cap
        self.row, self.col, self.noise = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        for layer in self.layers.values():  # in the layers' order
            weight = layer.core.weight.detach()
            start = MatrixNormalFactors.isotropic(weight.shape, settings.init_std, settings.noise_init, weight)
            free = start.unconstrained(settings.noise_cap)
            for params, value in zip((self.row, self.col, self.noise), free, strict=True):
                params.append(nn.Parameter(value))

    def means(self) -> dict[str, Tensor]:
        return {name: layer.core.weight for name, layer in self.layers.items()}

    def factors(self) -> dict[str, MatrixNormalFactors]:
        """Valid factors of every core, differentiable in the free parameters."""
        return {
            name: MatrixNormalFactors.from_unconstrained(self.row[i], self.col[i], self.noise[i], self.noise_cap)
            for i, name in enumerate(self.layers)
        }

    def sample_rows(self, rows: int) -> dict[str, Tensor]:
        """One independent reparameterised core per row: layer → ``(rows, r, r)``."""
        return sample_blocks(self.means(), self.factors(), rows)

    def kl(self, prior_std: float) -> Tensor:
        return total_kl(self.means(), self.factors(), prior_std)

    def posterior(self) -> MatrixNormalPosterior:
        means = {name: mean.detach().clone() for name, mean in self.means().items()}
        return MatrixNormalPosterior(means, self.factors())


class MatrixNormalElbo:
    """Negative ELBO per example: ``E_q[−log p(y|x, R)] + β · KL(q ‖ N(0, σ_p² I)) / N``.

    The expectation averages ``samples`` draws per example, each example's own (never shared across the
    batch); ``β = 1`` is the ELBO proper.
    """

    def __init__(self, variational: MatrixNormalCores, num_data: int, settings: BayesianLoraConfig) -> None:
        self.variational = variational
        self.num_data = num_data
        self.settings = settings

    def logits(self, model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(samples · n, C)`` logits and their labels, sample-major: the batch repeated, every row under its
        own draw."""
        repeats = self.settings.samples
        rows = {k: v.repeat(repeats, *[1] * (v.ndim - 1)) for k, v in batch.items()}
        with row_cores(model, self.variational.sample_rows(len(rows["labels"]))):
            return batch_logits(model, rows).float(), rows["labels"]

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        logits, labels = self.logits(model, batch)
        nll = torch.nn.functional.cross_entropy(logits, labels)
        kl = self.variational.kl(self.settings.prior_std)
        return nll + self.settings.kl_weight * kl / self.num_data


def fit_bayesian_lora(
    model: LoraXSClassifier,
    train: list[Example],
    encoder: Encoder,
    settings: BayesianLoraConfig,
    *,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> tuple[MatrixNormalPosterior, dict[str, Any]]:
    """Fit ``q`` from the MAP in ``model``; the model's cores are restored to the MAP afterwards.

    Returns:
        The matrix-normal posterior over the cores and a record (final KL, the negative ELBO per epoch, λ and
        the Kronecker part's entry std, seconds).
    """
    cores = model.posterior_parameters()
    with Timer() as timer, restored(cores), trainable(model, cores.values()):
        variational = MatrixNormalCores(model, settings)
        objective = MatrixNormalElbo(variational, len(train), settings)
        groups = [
            {"params": list(cores.values()), "lr": settings.lr},
            {"params": list(variational.parameters()), "lr": settings.factor_lr},
        ]
        losses = train_variational(
            model, train, encoder, groups, objective, epochs=settings.epochs, batch_size=batch_size, seed=seed,
            name="Bayesian-LoRA", progress=progress,
        )  # fmt: skip
        posterior = variational.posterior()
        with torch.no_grad():
            kl = float(variational.kl(settings.prior_std))
    factors = posterior.factors.values()
    noise = torch.stack([f.noise for f in factors])
    kron_std = torch.stack([(f.trace() - f.size * f.noise.square()).div(f.size).sqrt() for f in factors])
    info = {
        "prior_std": settings.prior_std,
        "kl_weight": settings.kl_weight,
        "samples": settings.samples,
        "kl": round(kl, 3),
        "negative_elbo_per_example": [round(v, 5) for v in losses],
        "noise_scale_mean": float(noise.mean()),
        "kron_std_mean": float(kron_std.mean()),
        "seconds": timer.seconds,
    }
    return posterior, info


register(BayesianLora())

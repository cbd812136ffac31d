"""``--posterior vi``: variational inference over the cores (docs/methods.md, VI): a Gaussian (mean-field,
optionally plus a low-rank part) trained with the ELBO.

Starts from the MAP: the means are the cores themselves, the head stays fixed, and ``q`` is fitted by
minimising the negative ELBO with one reparameterised sample per example (:class:`Elbo`). The prior
``N(0, δ⁻¹ I)`` has a fixed precision, or one learned by maximising the ELBO over δ (closed form, updated
every step).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from adapters import DiagPosterior, LoraXSClassifier, LowRankDiagPosterior, Posterior
from adapters.posteriors import flatten
from adapters.posteriors.base import unflatten
from training.config import PosteriorMethod, ViConfig
from training.data import Example
from training.encoding import Encoder
from training.methods.base import Fitted, Method, register, sampled
from training.methods.variational import train_variational
from training.objectives import cross_entropy, row_cores
from training.scopes import Timer, restored, trainable
from training.session import Session


class Vi(Method):
    name = PosteriorMethod.VI

    def fit(self, session: Session) -> Fitted:
        config = session.config
        posterior, info = fit_vi(
            session.model, session.train, session.encoder, config.posterior.vi,
            batch_size=config.optimisation.batch_size, seed=config.seed, progress=config.progress,
        )  # fmt: skip
        return sampled(self.name, config, posterior, info)


class GaussianCores(nn.Module):
    """``q(θ) = N(μ, diag σ² + U Uᵀ)`` over the flat cores θ: mean-field (``rank = 0``) or low-rank plus
    diagonal. ``μ`` *is* the layers' core weights, ``σ = exp(log σ)`` per entry, ``U (P, k)`` shared by all
    layers (so the low-rank part correlates layers).

    Args:
        model: the classifier whose cores are the means (trained in place).
        init_std: the initial ``σ`` of every entry (``U`` starts at a tenth of it, random).
        rank: ``k``, columns of ``U`` (0: mean-field; otherwise at least 2, the bundle's SWAG-form minimum).
        seed: initialisation of ``U``.
    """

    def __init__(self, model: LoraXSClassifier, init_std: float, rank: int = 0, seed: int = 0) -> None:
        super().__init__()
        if rank == 1 or rank < 0:
            raise ValueError(f"the low-rank part needs rank 0 (mean-field) or at least 2, got {rank}")
        self.layers = model.lora_layers  # a plain dict: the cores stay the model's parameters
        self.log_std = nn.ParameterDict(
            {
                _key(name): nn.Parameter(torch.full_like(layer.core.weight.detach(), math.log(init_std)))
                for name, layer in self.layers.items()
            }
        )
        like = next(iter(self.layers.values())).core.weight
        size = sum(layer.core.weight.numel() for layer in self.layers.values())
        generator = torch.Generator().manual_seed(seed)
        factor = 0.1 * init_std * torch.randn(size, rank, generator=generator)
        self.factor = nn.Parameter(factor.to(like.device, like.dtype)) if rank else None

    @property
    def rank(self) -> int:
        return 0 if self.factor is None else self.factor.shape[1]

    def means(self) -> dict[str, Tensor]:
        return {name: layer.core.weight for name, layer in self.layers.items()}

    def stds(self) -> dict[str, Tensor]:
        return {name: self.log_std[_key(name)].exp() for name in self.layers}

    def sample_rows(self, rows: int) -> dict[str, Tensor]:
        """One reparameterised core per example: layer → ``(rows, r, r)``."""
        stds, means = self.stds(), self.means()
        low = None
        if self.factor is not None:
            z = torch.randn(rows, self.rank, device=self.factor.device, dtype=self.factor.dtype)
            low = unflatten(z @ self.factor.T, means)
        samples = {}
        for name, mean in means.items():
            noise = torch.randn(rows, *mean.shape, device=mean.device, dtype=mean.dtype)
            samples[name] = mean + stds[name] * noise + (0 if low is None else low[name])
        return samples

    def kl(self, prior_precision: float) -> Tensor:
        """``KL(q ‖ N(0, δ⁻¹ I))`` in closed form:
        ``½ [δ tr Σ + δ ‖μ‖² − P − log det(δ Σ)]``, with ``log det Σ = Σ log σ² + log det(I + Uᵀ D⁻¹ U)``."""
        log_var = torch.cat([2 * self.log_std[_key(name)].reshape(-1) for name in self.layers])
        mean = torch.cat([m.reshape(-1) for m in self.means().values()])
        trace, log_det = log_var.exp().sum(), log_var.sum()
        if self.factor is not None:
            scaled = self.factor * (-0.5 * log_var).exp().unsqueeze(1)  # D^{-1/2} U
            inner = torch.eye(self.rank, device=scaled.device, dtype=scaled.dtype) + scaled.T @ scaled
            trace, log_det = trace + self.factor.square().sum(), log_det + torch.linalg.slogdet(inner)[1]
        size = mean.numel()
        delta = prior_precision
        return 0.5 * (delta * trace + delta * mean.square().sum() - size - size * math.log(delta) - log_det)

    @torch.no_grad()
    def optimal_prior_precision(self) -> float:
        """``argmax_δ ELBO = P / (‖μ‖² + tr Σ)``."""
        means, stds = self.means(), self.stds()
        second = sum(float((means[n].square() + stds[n].square()).sum()) for n in means)
        if self.factor is not None:
            second += float(self.factor.square().sum())
        return sum(m.numel() for m in means.values()) / second

    def posterior(self) -> Posterior:
        """``diag`` (mean-field) or ``lowrank_diag`` with ``D̂ = √(k−1) Uᵀ`` and λ = 1, so that
        ``D̂ᵀD̂ / (k−1) = U Uᵀ``."""
        means = {name: mean.detach().clone() for name, mean in self.means().items()}
        variances = {name: std.detach().square() for name, std in self.stds().items()}
        if self.factor is None:
            return DiagPosterior(means, variances)
        deviations = (self.rank - 1) ** 0.5 * self.factor.detach().T
        return LowRankDiagPosterior(means, flatten(variances), deviations, scale=1.0)


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot contain dots


class Elbo:
    """Negative ELBO per example: ``E_q[−log p(y|x, R)] + β · KL(q ‖ p) / N``, one sample per example.

    ``β = 1`` is the ELBO proper (the KL spread evenly over the ``N`` training examples); ``β < 1`` tempers it.
    With ``prior_precision=None`` δ follows its closed-form optimum, refreshed before every step.
    """

    def __init__(
        self, variational: GaussianCores, num_data: int, prior_precision: float | None, kl_weight: float
    ) -> None:
        self.variational = variational
        self.num_data = num_data
        self.learn_prior = prior_precision is None
        self.prior_precision = prior_precision or variational.optimal_prior_precision()
        self.kl_weight = kl_weight

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        if self.learn_prior:
            self.prior_precision = self.variational.optimal_prior_precision()
        with row_cores(model, self.variational.sample_rows(len(batch["labels"]))):
            nll = cross_entropy(model, batch)
        return nll + self.kl_weight * self.variational.kl(self.prior_precision) / self.num_data


def fit_vi(
    model: LoraXSClassifier,
    train: list[Example],
    encoder: Encoder,
    settings: ViConfig,
    *,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Posterior, dict[str, Any]]:
    """Fit ``q`` from the MAP in ``model``; the model's cores are restored to the MAP afterwards.

    Returns:
        The posterior over the cores (``diag`` or ``lowrank_diag``) and a record (prior precision, final
        KL, mean σ, seconds).
    """
    cores = model.posterior_parameters()
    with Timer() as timer, restored(cores), trainable(model, cores.values()):
        variational = GaussianCores(model, settings.init_std, settings.rank, seed)
        objective = Elbo(variational, len(train), settings.prior_precision, settings.kl_weight)
        groups = [
            {"params": list(variational.means().values()), "lr": settings.lr},
            {"params": list(variational.log_std.parameters()), "lr": settings.std_lr},
        ]
        if variational.factor is not None:  # in the cores' own units, like the means
            groups.append({"params": [variational.factor], "lr": settings.lr})
        losses = train_variational(
            model, train, encoder, groups, objective, epochs=settings.epochs, batch_size=batch_size, seed=seed,
            name="VI", progress=progress,
        )  # fmt: skip
        posterior = variational.posterior()
        with torch.no_grad():
            kl = float(variational.kl(objective.prior_precision))
    stds = torch.cat([s.detach().reshape(-1) for s in variational.stds().values()])
    info = {
        "prior_precision": objective.prior_precision,
        "prior_learned": objective.learn_prior,
        "kl_weight": settings.kl_weight,
        "rank": settings.rank,
        "kl": round(kl, 3),
        "negative_elbo_per_example": [round(v, 5) for v in losses],
        "std_mean": float(stds.mean()),
        "std_max": float(stds.max()),
        "seconds": timer.seconds,
    }
    return posterior, info


register(Vi())

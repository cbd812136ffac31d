"""Variational inference over the cores (METHODS.md §3.3): a mean-field Gaussian trained with the ELBO.

Starts from the MAP: the means are the cores themselves, the head stays fixed, and ``q`` is fitted by
minimising the negative ELBO with one reparameterised sample per example (:class:`Elbo`). The prior
``N(0, δ⁻¹ I)`` has a fixed precision, or one learned by maximising the ELBO over δ (closed form, updated
every step).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from adapters import DiagPosterior, LoraXSClassifier
from training.data import Example
from training.encoding import Encoder, make_loader
from training.map_training import run_epoch, warmup_linear
from training.objectives import cross_entropy, per_row_cores


@dataclass
class ViSchedule:
    """ELBO training settings."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3  # of the means
    std_lr: float = 0.05  # of log σ (Adam: a step changes σ by about this fraction)
    init_std: float = 0.01
    prior_precision: float | None = None  # None: learned, δ = P / Σ(μ² + σ²) (the ELBO's optimum)
    kl_weight: float = 1.0
    seed: int = 0


class MeanFieldCores(nn.Module):
    """``q(R_l) = N(μ_l, diag σ_l²)`` for every core: ``μ`` *is* the layer's core weight, ``σ = exp(log σ)``.

    Args:
        model: the classifier whose cores are the means (trained in place).
        init_std: the initial ``σ`` of every entry.
    """

    def __init__(self, model: LoraXSClassifier, init_std: float) -> None:
        super().__init__()
        self.layers = model.lora_layers  # a plain dict: the cores stay the model's parameters
        self.log_std = nn.ParameterDict(
            {
                _key(name): nn.Parameter(torch.full_like(layer.core.weight.detach(), math.log(init_std)))
                for name, layer in self.layers.items()
            }
        )

    def means(self) -> dict[str, Tensor]:
        return {name: layer.core.weight for name, layer in self.layers.items()}

    def stds(self) -> dict[str, Tensor]:
        return {name: self.log_std[_key(name)].exp() for name in self.layers}

    def sample_rows(self, rows: int) -> dict[str, Tensor]:
        """One reparameterised core per example: layer → ``(rows, r, r)``."""
        stds = self.stds()
        return {
            name: mean + stds[name] * torch.randn(rows, *mean.shape, device=mean.device, dtype=mean.dtype)
            for name, mean in self.means().items()
        }

    def kl(self, prior_precision: float) -> Tensor:
        """``KL(q ‖ N(0, δ⁻¹ I))`` summed over every core entry (closed form)."""
        total = torch.zeros(())
        for name, mean in self.means().items():
            log_scaled_var = math.log(prior_precision) + 2 * self.log_std[_key(name)]  # log δσ²
            terms = log_scaled_var.exp() + prior_precision * mean.square() - 1 - log_scaled_var
            total = total.to(terms.device) + 0.5 * terms.sum()
        return total

    @torch.no_grad()
    def optimal_prior_precision(self) -> float:
        """``argmax_δ ELBO = P / Σ(μ² + σ²)``."""
        means, stds = self.means(), self.stds()
        second = sum(float((means[n].square() + stds[n].square()).sum()) for n in means)
        return sum(m.numel() for m in means.values()) / second

    def posterior(self) -> DiagPosterior:
        means = {name: mean.detach().clone() for name, mean in self.means().items()}
        return DiagPosterior(means, {name: std.detach().square() for name, std in self.stds().items()})


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot contain dots


class Elbo:
    """Negative ELBO per example: ``E_q[−log p(y|x, R)] + β · KL(q ‖ p) / N``, one sample per example.

    ``β = 1`` is the ELBO proper (the KL spread evenly over the ``N`` training examples); ``β < 1`` tempers it.
    With ``prior_precision=None`` δ follows its closed-form optimum, refreshed before every step.
    """

    def __init__(
        self, variational: MeanFieldCores, num_data: int, prior_precision: float | None, kl_weight: float
    ) -> None:
        self.variational = variational
        self.num_data = num_data
        self.learn_prior = prior_precision is None
        self.prior_precision = prior_precision or variational.optimal_prior_precision()
        self.kl_weight = kl_weight

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        if self.learn_prior:
            self.prior_precision = self.variational.optimal_prior_precision()
        with per_row_cores(model, self.variational.sample_rows(len(batch["labels"]))):
            nll = cross_entropy(model, batch)
        return nll + self.kl_weight * self.variational.kl(self.prior_precision) / self.num_data


def fit_vi(
    model: LoraXSClassifier,
    train: list[Example],
    encoder: Encoder,
    schedule: ViSchedule,
    progress: bool = True,
) -> tuple[DiagPosterior, dict[str, Any]]:
    """Fit ``q`` from the MAP in ``model``; the model's cores are restored to the MAP afterwards.

    Returns:
        The mean-field posterior over the cores and a record (prior precision, final KL, mean σ, seconds).
    """
    start = time.perf_counter()
    model.freeze_base()
    model.head.requires_grad_(False)
    variational = MeanFieldCores(model, schedule.init_std)
    map_cores = {name: mean.detach().clone() for name, mean in variational.means().items()}
    objective = Elbo(variational, len(train), schedule.prior_precision, schedule.kl_weight)
    optimizer = torch.optim.Adam(
        [
            {"params": list(variational.means().values()), "lr": schedule.lr},
            {"params": list(variational.parameters()), "lr": schedule.std_lr},
        ]
    )
    loader = make_loader(train, encoder, schedule.batch_size, shuffle=True, seed=schedule.seed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(schedule.epochs * len(loader), 0.0))
    device = next(model.parameters()).device
    model.train()
    torch.manual_seed(schedule.seed)
    losses = []
    for epoch in range(1, schedule.epochs + 1):
        loader.batch_sampler.set_epoch(epoch)
        loss = run_epoch(
            model, loader, optimizer, scheduler, objective, device=device,
            desc=f"VI epoch {epoch}/{schedule.epochs}", progress=progress,
        )  # fmt: skip
        losses.append(loss)
    model.eval()
    posterior = variational.posterior()
    with torch.no_grad():
        kl = float(variational.kl(objective.prior_precision))
        for name, core in map_cores.items():
            model.lora_layers[name].core.weight.copy_(core)
    model.head.requires_grad_(True)
    stds = torch.cat([s.detach().reshape(-1) for s in variational.stds().values()])
    info = {
        "prior_precision": objective.prior_precision,
        "prior_learned": objective.learn_prior,
        "kl_weight": schedule.kl_weight,
        "kl": round(kl, 3),
        "negative_elbo_per_example": [round(v, 5) for v in losses],
        "std_mean": float(stds.mean()),
        "std_max": float(stds.max()),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return posterior, info

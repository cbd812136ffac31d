"""``--posterior swag``: SWAG over the cores (B-LoRA-XS; docs/methods.md, SWAG).

From the MAP, training continues at a constant learning rate; every few steps a snapshot of θ updates the
running first and second moments and the list of the last K deviations ``θ_i − θ̄_i`` (θ̄_i the running mean
after snapshot i, as in Maddox et al.). The posterior is ``N(θ̄, λ (diag σ² + D̂ᵀD̂ / (K − 1)))``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import Tensor

from adapters import LoraXSClassifier, LowRankDiagPosterior
from adapters.posteriors import flatten
from adapters.posteriors.base import unflatten
from training.config import PosteriorMethod, SwagConfig
from training.data import Example
from training.encoding import Encoder, make_loader
from training.map_training import run_epochs
from training.methods.base import Fitted, Method, register, sampled
from training.objectives import CrossEntropy
from training.scopes import Timer, restored, trainable
from training.session import Session


class Swag(Method):
    name = PosteriorMethod.SWAG

    def fit(self, session: Session) -> Fitted:
        config = session.config
        posterior, info = fit_swag(
            session.model, session.train, session.encoder, config.posterior.swag,
            batch_size=config.optimisation.batch_size, seed=config.seed, include_head=config.posterior.head,
            progress=config.progress,
        )  # fmt: skip
        return sampled(self.name, config, posterior, info)


class SwagMoments:
    """Running moments of snapshots of θ ``(P,)``, in float64."""

    def __init__(self, rank: int) -> None:
        if rank < 2:
            raise ValueError(f"SWAG needs a rank K of at least 2, got {rank}")
        self.count = 0
        self.mean: Tensor | None = None
        self.second: Tensor | None = None
        self.deviations: deque[Tensor] = deque(maxlen=rank)

    def update(self, theta: Tensor) -> None:
        theta = theta.detach().to(torch.float64)
        self.count += 1
        if self.mean is None:
            self.mean, self.second = theta.clone(), theta.square()
        else:
            self.mean += (theta - self.mean) / self.count
            self.second += (theta.square() - self.second) / self.count
        self.deviations.append(theta - self.mean)

    def variance(self) -> Tensor:
        """``max(θ²̄ − θ̄², 1e-30)``."""
        return (self.second - self.mean.square()).clamp_min(1e-30)

    def posterior(self, like: dict[str, Tensor], scale: float) -> LowRankDiagPosterior:
        if len(self.deviations) < 2:
            raise ValueError(f"SWAG needs at least 2 snapshots, got {len(self.deviations)}")
        dtype = next(iter(like.values())).dtype
        mean = unflatten(self.mean.to(dtype), like)
        deviations = torch.stack(list(self.deviations)).to(dtype)
        return LowRankDiagPosterior(mean, self.variance().to(dtype), deviations, scale)


def fit_swag(
    model: LoraXSClassifier,
    train: list[Example],
    encoder: Encoder,
    settings: SwagConfig,
    *,
    batch_size: int = 32,
    seed: int = 0,
    include_head: bool = False,
    progress: bool = True,
) -> tuple[LowRankDiagPosterior, dict[str, Any]]:
    """Collect SWAG moments of the posterior parameters (the cores, and the head when asked) from the MAP in
    ``model``; the model is restored to the MAP afterwards. Parameters outside the posterior stay fixed."""
    params = model.posterior_parameters(include_head)
    with Timer() as timer, restored(params) as map_state, trainable(model, params.values()):
        optimizer = torch.optim.AdamW(list(params.values()), lr=settings.lr, weight_decay=0.0)
        loader = make_loader(train, encoder, batch_size, shuffle=True, seed=seed + 1)
        every = max(1, settings.epochs * len(loader) // settings.snapshots)
        moments, steps = SwagMoments(settings.rank), 0

        def on_step() -> None:
            nonlocal steps
            steps += 1
            if steps % every == 0:
                moments.update(flatten({n: p.detach() for n, p in params.items()}))

        run_epochs(
            model, loader, optimizer, None, CrossEntropy(), epochs=settings.epochs, seed=seed, name="SWAG",
            progress=progress, on_step=on_step,
        )  # fmt: skip
    posterior = moments.posterior(map_state, settings.scale)
    info = {
        "snapshots": moments.count,
        "every_steps": every,
        "rank": posterior.rank,
        "scale": settings.scale,
        "lr": settings.lr,
        "variance_mean": float(moments.variance().mean()),
        "drift_from_map": float((moments.mean - flatten(map_state).double()).norm()),
        "seconds": timer.seconds,
    }
    return posterior, info


register(Swag())

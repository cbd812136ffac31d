"""SWAG over the cores (B-LoRA-XS, METHODS.md §3.2).

From the MAP, training continues at a constant learning rate; every few steps a snapshot of θ updates the
running first and second moments and the list of the last K deviations ``θ_i − θ̄_i`` (θ̄_i the running mean
after snapshot i, as in Maddox et al.). The posterior is ``N(θ̄, λ (diag σ² + D̂ᵀD̂ / (K − 1)))``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from adapters import LoraXSClassifier, LowRankDiagPosterior
from adapters.posteriors import flatten
from adapters.posteriors.base import unflatten
from training.data import Example
from training.encoding import Encoder, make_loader
from training.map_training import run_epoch
from training.objectives import CrossEntropy


@dataclass
class SwagSchedule:
    """The SWAG phase after the MAP (the MAP training is the burn-in)."""

    epochs: int = 1
    lr: float = 1e-3  # constant
    snapshots: int = 20  # spread evenly over the phase
    rank: int = 10  # K, the deviations kept
    scale: float = 0.5  # λ
    batch_size: int = 32
    seed: int = 0


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
    schedule: SwagSchedule,
    include_head: bool = False,
    progress: bool = True,
) -> tuple[LowRankDiagPosterior, dict[str, Any]]:
    """Collect SWAG moments of the posterior parameters (the cores, and the head when asked) from the MAP in
    ``model``; the model is restored to the MAP afterwards. Parameters outside the posterior stay fixed."""
    start = time.perf_counter()
    params = model.posterior_parameters(include_head)
    map_state = {name: p.detach().clone() for name, p in params.items()}
    model.freeze_base()
    for param in model.parameters():
        param.requires_grad_(False)
    for param in params.values():
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(params.values()), lr=schedule.lr, weight_decay=0.0)
    loader = make_loader(train, encoder, schedule.batch_size, shuffle=True, seed=schedule.seed + 1)
    every = max(1, schedule.epochs * len(loader) // schedule.snapshots)
    moments, steps = SwagMoments(schedule.rank), 0

    def on_step() -> None:
        nonlocal steps
        steps += 1
        if steps % every == 0:
            moments.update(flatten({n: p.detach() for n, p in params.items()}))

    device = next(model.parameters()).device
    model.train()
    torch.manual_seed(schedule.seed)
    for epoch in range(1, schedule.epochs + 1):
        loader.batch_sampler.set_epoch(epoch)
        run_epoch(
            model, loader, optimizer, None, CrossEntropy(), device=device,
            desc=f"SWAG epoch {epoch}/{schedule.epochs}", progress=progress, on_step=on_step,
        )  # fmt: skip
    model.eval()
    posterior = moments.posterior(map_state, schedule.scale)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(map_state[name])
    model.freeze_base()
    info = {
        "snapshots": moments.count,
        "every_steps": every,
        "rank": posterior.rank,
        "scale": schedule.scale,
        "lr": schedule.lr,
        "variance_mean": float(moments.variance().mean()),
        "drift_from_map": float((moments.mean - flatten(map_state).double()).norm()),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return posterior, info

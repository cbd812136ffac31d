"""The training loop of the variational methods (VI, Bayesian-LoRA): a phase after the MAP that fits ``q`` by
minimising the negative ELBO; each method brings its parameter groups and its objective."""

from __future__ import annotations

from typing import Any

import torch

from training.data import Example
from training.encoding import Encoder, make_loader
from training.map_training import run_epochs, warmup_linear
from training.objectives import Objective


def train_variational(
    model: torch.nn.Module,
    train: list[Example],
    encoder: Encoder,
    groups: list[dict[str, Any]],
    objective: Objective,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    name: str,
    progress: bool = True,
) -> list[float]:
    """Adam over the parameter ``groups`` with a linear decay and no warm-up (it starts from the MAP), shuffled
    batches; returns each epoch's mean loss."""
    optimizer = torch.optim.Adam(groups)
    loader = make_loader(train, encoder, batch_size, shuffle=True, seed=seed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(epochs * len(loader), 0.0))
    return run_epochs(
        model, loader, optimizer, scheduler, objective, epochs=epochs, seed=seed, name=name, progress=progress
    )

"""Per-batch training losses: plain cross-entropy and MC dropout on the adapter input (the ELBO is in
:mod:`training.methods.vi`).

The stochastic ones give every example of a batch its own core per layer (a dropout mask or a variational
sample), through the layers' batched-rows path with differentiable cores: noise is drawn per example,
never shared across the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Protocol

import torch.nn.functional as F
from torch import Tensor, nn

from adapters import LoraXSClassifier
from adapters.batching import per_row_cores
from adapters.posteriors import drop_columns
from training.encoding import batch_logits


class Objective(Protocol):
    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """The scalar to minimise on one batch (``labels`` included)."""
        ...


def classifier(model: nn.Module) -> LoraXSClassifier:
    """The classifier inside an accelerate/DDP wrapper."""
    return getattr(model, "module", model)


def cross_entropy(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    return F.cross_entropy(batch_logits(model, batch).float(), batch["labels"])


def row_cores(model: nn.Module, cores: Mapping[str, Tensor]) -> AbstractContextManager[None]:
    """:func:`adapters.batching.per_row_cores` on the classifier inside an accelerate/DDP wrapper."""
    return per_row_cores(classifier(model).lora_layers, cores)


class CrossEntropy:
    """The MAP objective: mean cross-entropy of the model's own cores."""

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        return cross_entropy(model, batch)


class AdapterDropout:
    """MC dropout on the adapter input: each example drops rank directions of every layer's ``A x`` with
    probability ``rate`` (the same mask for all its tokens; :mod:`adapters.posteriors.dropout`)."""

    def __init__(self, rate: float) -> None:
        if not 0.0 < rate < 1.0:
            raise ValueError(f"adapter dropout rate must be in (0, 1), got {rate}")
        self.rate = rate

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        if not model.training:
            return cross_entropy(model, batch)
        rows = len(batch["labels"])
        cores = {
            name: drop_columns(layer.core.weight.expand(rows, -1, -1), self.rate)
            for name, layer in classifier(model).lora_layers.items()
        }
        with row_cores(model, cores):
            return cross_entropy(model, batch)

"""Sequence features from token states: how a classifier head reads a transformer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.vocab import Pooling

POOLER_WEIGHT, POOLER_BIAS = "pooler.weight", "pooler.bias"  # a DenseTanhPooler's tensors in a bundle
BASE_POOLER = "pooler.dense"  # BERT's own pooler layer, as the base model names it


def pool(hidden: Tensor, attention_mask: Tensor | None, pooling: str) -> Tensor:
    """Sequence features ``(N, H)`` from hidden states ``(N, T, H)``.

    ``mean`` averages non-padding tokens (encoders such as MiniLM), ``cls`` takes the first token, ``last``
    the last non-padding token (decoders; right padding assumed).
    """
    if pooling == Pooling.POOLER:
        raise ValueError("pooler features need the pooler's weights: read them with a DenseTanhPooler")
    if pooling == Pooling.CLS:
        return hidden[:, 0]
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if pooling == Pooling.MEAN:
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    if pooling == Pooling.LAST:
        last = attention_mask.long().sum(dim=1).clamp_min(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {[str(p) for p in Pooling]}")


@dataclass(frozen=True)
class DenseTanhPooler:
    """The first token through a frozen dense layer and tanh: BERT's pooler, and the first half of RoBERTa's
    sequence-classification head (whose ``out_proj`` is then the adapter's linear head). A readout
    (:data:`adapters.batching.Readout`): features ``(N, H)`` from hidden states ``(N, T, H)``.

    Attributes:
        weight: ``(H, H)``; bias: ``(H,)``. In a bundle either ``pooler.weight``, ``pooler.bias``, or the base's own
            layer (``head.pooler_module``).
    """

    weight: Tensor
    bias: Tensor

    def __call__(self, hidden: Tensor, batch: Mapping[str, Tensor] | None = None) -> Tensor:
        return torch.tanh(F.linear(hidden[:, 0].to(self.weight.dtype), self.weight, self.bias))

    def to(self, device: torch.device | str) -> DenseTanhPooler:
        return DenseTanhPooler(self.weight.to(device), self.bias.to(device))

    def state(self) -> dict[str, Tensor]:
        """The bundle's tensors of this pooler."""
        return {POOLER_WEIGHT: self.weight, POOLER_BIAS: self.bias}

    @classmethod
    def of_base(cls, base: nn.Module, module: str = BASE_POOLER) -> DenseTanhPooler | None:
        """The base's own pooler layer (BERT's ``pooler.dense``), its weights shared; ``None`` when it has none."""
        dense = dict(base.named_modules()).get(module)
        dense = getattr(dense, "base", dense)  # the frozen layer inside a wrapped one
        if not isinstance(dense, nn.Linear) or dense.bias is None:
            return None
        return cls(dense.weight.detach(), dense.bias.detach())

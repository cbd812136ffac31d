"""Sequence features from token states: how a classifier head reads a transformer."""

from __future__ import annotations

import torch
from torch import Tensor

from adapters.vocab import Pooling


def pool(hidden: Tensor, attention_mask: Tensor | None, pooling: str) -> Tensor:
    """Sequence features ``(N, H)`` from hidden states ``(N, T, H)``.

    ``mean`` averages non-padding tokens (encoders such as MiniLM), ``cls`` takes the first token, ``last``
    the last non-padding token (decoders; right padding assumed).
    """
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

"""Classifier heads of row blocks: each block's rows read its adapter's head (or sampled head parameters)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from adapters.batching import RowBlock

HEAD_WEIGHT, HEAD_BIAS = "head.weight", "head.bias"  # the head's block names in posteriors and bundles


def head_logits(features: Tensor, block: RowBlock) -> Tensor:
    """Logits ``(S, n, C)`` of one block from its rows' features ``(S·n, H)`` (sample-major)."""
    S, n = block.num_samples, block.num_inputs
    features = features.reshape(S, n, -1).to(block.adapter.head_weight.dtype)  # e.g. a float32 head on a bf16 base
    weight = block.samples.get(HEAD_WEIGHT)
    bias = block.samples.get(HEAD_BIAS)
    if weight is None and bias is None:
        return F.linear(features, block.adapter.head_weight, block.adapter.head_bias)
    weight = block.adapter.head_weight.expand(S, -1, -1) if weight is None else weight
    bias = block.adapter.head_bias.expand(S, -1) if bias is None else bias
    return torch.baddbmm(bias.unsqueeze(1), features, weight.transpose(1, 2))

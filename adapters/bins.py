"""The calibration bins the trainer's ECE and the server's online ECE both count in (docs/methods.md, metrics):
15 equal-width bins of the top probability, bin ``b`` holding ``(b/B, (b+1)/B]`` (a confidence of exactly 0 goes
to the first), so that an offline ECE and the one Prometheus computes from the server's counters agree exactly."""

from __future__ import annotations

import torch
from torch import Tensor

NUM_BINS = 15
NLL_FLOOR = 1e-12  # probabilities are clamped here before the log: one confident mistake stays finite


def bin_index(confidence: Tensor, num_bins: int = NUM_BINS) -> Tensor:
    """The bin ``(N,)`` of each top probability ``(N,)``."""
    return (torch.ceil(confidence.double() * num_bins).long() - 1).clamp(0, num_bins - 1)


def calibration_bins(probs: Tensor, labels: Tensor, num_bins: int = NUM_BINS) -> tuple[Tensor, Tensor, Tensor]:
    """Per bin: count, accuracy and mean confidence of the top label (``(num_bins,)`` each; empty bins 0)."""
    confidence, predicted = probs.double().max(dim=-1)
    correct = (predicted == labels).double()
    index = bin_index(confidence, num_bins)
    count = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(confidence))
    hits = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, correct)
    conf_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, confidence)
    safe = count.clamp_min(1)
    return count, hits / safe, conf_sum / safe

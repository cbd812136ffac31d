"""Policy shared by training and serving, in one place (the names are in ``adapters.vocab``, each predictive
mode's default draws in ``adapters.predictives``): token budgets, the core initialisation and how a tokenizer is
prepared for batched rows."""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapters.vocab import ClozeNormalisation

if TYPE_CHECKING:
    import torch


# Rows × padded tokens per batched-rows forward on a CPU: larger forwards fall out of cache
# (docs/benchmarks.md). A GPU gets no cap.
CPU_TOKEN_BUDGET = 4096

# Standard deviation of a fresh core's entries: a near-zero start, so the adapted model begins as the base.
CORE_INIT_STD = 1e-5

# What a cloze score's log-likelihood is divided by: the summed log-likelihood had the best zero-shot validation
# accuracy of SmolLM2 on ARC-Easy (0.547, against 0.480 per token and 0.463 per character; docs/results.md).
DEFAULT_CLOZE_NORMALISATION = ClozeNormalisation.NONE


def resolve_token_budget(device: torch.device, requested: int | None = None) -> int | None:
    """``requested`` if given, else the CPU budget on a CPU and no cap elsewhere."""
    if requested:
        return requested
    return CPU_TOKEN_BUDGET if device.type == "cpu" else None


def ensure_pad_token(tokenizer) -> None:
    """Decoders often ship without a padding token: pad with end-of-sequence (always masked out)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def prepare_tokenizer(tokenizer) -> None:
    """A padding token and right padding: batched rows and ``last`` pooling read the last non-padding token."""
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"

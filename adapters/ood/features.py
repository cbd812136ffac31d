"""The frozen base's OOD features: pooled hidden states of a middle and the last transformer layer.

Feature of an input = concat over the recorded layers of ``normalize(pool(h_layer))`` — each layer's pooled
state L2-normalised on its own, so neither layer dominates and long inputs (whose mean pooling drifts towards
the average token) are judged by direction, not length. Layers are 1-based (layer ``L`` is the last block's
output), read with forward hooks on the blocks, so only the rows asked for are kept.

The trainer and the server compute them with the same code: the server from the base rows of its batched
forward (:class:`BaseFeatureTap`, rows with no adapter), the trainer with every adapter bypassed
(:func:`adapters.batching.base_only`) — identical arithmetic on the base weights, so the scores agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.architectures import transformer_blocks
from adapters.pooling import pool


def default_feature_layers(num_layers: int) -> tuple[int, ...]:
    """A middle layer and the last: ``(L // 2, L)`` (``(L,)`` for a one-layer model)."""
    return tuple(sorted({max(1, num_layers // 2), num_layers}))


def check_layers(base: nn.Module, layers: Sequence[int]) -> None:
    count = base.config.num_hidden_layers
    if not layers or any(not 1 <= layer <= count for layer in layers):
        raise ValueError(f"OOD feature layers must be in 1..{count}, got {list(layers)}")


@contextmanager
def capture_states(base: nn.Module, layers: Sequence[int], rows: Tensor | slice) -> Iterator[dict[int, Tensor]]:
    """Inside the block, forwards of ``base`` store ``rows`` of each layer's output ``(n, T, H)`` in the
    yielded dict (layer → states; the last forward wins)."""
    check_layers(base, layers)
    blocks, states, handles = transformer_blocks(base), {}, []

    def hook(layer: int):
        def keep(_module: nn.Module, _args: object, output: object) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            states[layer] = hidden[rows].detach().clone()  # not a view: the whole batch's states can go

        return keep

    try:
        handles = [blocks[layer - 1].register_forward_hook(hook(layer)) for layer in layers]
        yield states
    finally:
        for handle in handles:
            handle.remove()


def pooled_features(states: Mapping[int, Tensor], attention_mask: Tensor | None, pooling: str) -> Tensor:
    """Per-layer states ``(n, T, H)`` → OOD features ``(n, len(layers)·H)`` float32, in layer order."""
    parts = [F.normalize(pool(states[k].float(), attention_mask, pooling), dim=-1) for k in sorted(states)]
    return torch.cat(parts, dim=-1)


class BaseFeatureTap:
    """Collects the frozen base's OOD features of some unique inputs during batched-rows forwards.

    A forward asks :meth:`take` which of its inputs still need a base row, appends one row per such input
    (no adapter), and stores their pooled states with :meth:`store`. Each input is computed once, however many
    adapters, samples or chunks read it.

    Args:
        layers: 1-based layers to read.
        pooling: how token states are pooled (the host's).
        wanted: indices of the unique inputs of the batch whose features are needed.
    """

    def __init__(self, layers: Sequence[int], pooling: str, wanted: Iterable[int]) -> None:
        self.layers = tuple(sorted(set(layers)))
        self.pooling = pooling
        self.pending = set(wanted)
        self.features: dict[int, Tensor] = {}

    def take(self, inputs: Tensor) -> Tensor:
        """Positions in ``inputs`` (global unique-input indices of one forward) that need a base row now."""
        local = [i for i, index in enumerate(inputs.tolist()) if index in self.pending]
        self.pending -= {inputs[i].item() for i in local}
        return torch.tensor(local, dtype=torch.long, device=inputs.device)

    @contextmanager
    def tapped(self, base: nn.Module, inputs: Tensor, attention_mask: Tensor | None) -> Iterator[Tensor | None]:
        """Around one batched-rows forward of unique ``inputs`` (global indices; ``attention_mask``
        ``(m, T)`` theirs): yields the positions that need a base row (``None``: none), which the plan must
        append *last*, and stores their features once the forward has run."""
        local = self.take(inputs)
        if local.numel() == 0:
            yield None
            return
        with capture_states(base, self.layers, slice(-local.numel(), None)) as states:
            yield local
        mask = None if attention_mask is None else attention_mask.index_select(0, local)
        self.store(inputs[local], states, mask)

    def store(self, inputs: Tensor, states: Mapping[int, Tensor], attention_mask: Tensor | None) -> None:
        """Pool the base rows' states (of global inputs ``inputs``) and keep them on the CPU."""
        if inputs.numel() == 0:
            return
        features = pooled_features(states, attention_mask, self.pooling).cpu()
        for index, feature in zip(inputs.tolist(), features, strict=True):
            self.features[index] = feature

    def select(self, layers: Sequence[int], indices: Sequence[int]) -> Tensor:
        """Features ``(n, len(layers)·H)`` of ``indices`` restricted to ``layers`` (a subset of the tap's)."""
        stacked = torch.stack([self.features[i] for i in indices])
        width = stacked.shape[1] // len(self.layers)
        columns = [self.layers.index(layer) for layer in layers]
        return torch.cat([stacked[:, c * width : (c + 1) * width] for c in columns], dim=1)

"""Multi-adapter, multi-sample batching: the one place that maps rows of a batch to cores.

A batched forward is a list of :class:`RowBlock` s. A block is one request's worth of work: ``n`` inputs
of one adapter, each evaluated under the same ``S`` posterior samples. Its rows are laid out sample-major
(row ``s·n + i`` is input ``i`` under sample ``s``) and blocks follow each other. :class:`RowPlan` turns the
blocks into, per adapted layer, one :class:`~adapters.layer.RowGroup` per distinct projection, holding the
gathered per-row cores with each adapter's scaling folded in. :func:`apply_row_plan` hands the groups to the
layers for the duration of one forward.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from adapters.layer import LoraXSLinear, RowGroup
from adapters.projections import Projection


@dataclass
class AdapterWeights:
    """The fixed part of one adapter, on the base model's device.

    Attributes:
        projections: adapted module name → its projection. Adapters that share a projection *object*
            share ``A x`` in a batched forward (the server interns identical projections).
        scaling: ``alpha / rank``.
        head_weight: ``(C, H)`` classifier weight (the MAP value).
        head_bias: ``(C,)`` classifier bias.
    """

    projections: Mapping[str, Projection]
    scaling: float
    head_weight: Tensor
    head_bias: Tensor


@dataclass
class RowBlock:
    """``inputs`` of one adapter, each under the same ``S`` posterior samples.

    Attributes:
        adapter: the adapter's fixed tensors.
        samples: parameter name → ``(S, ...)`` samples: every adapted module's core ``(S, r, r)``, and
            optionally ``head.weight (S, C, H)`` / ``head.bias (S, C)`` when the posterior covers the head.
        inputs: ``(n,)`` indices into the batch of unique inputs.
    """

    adapter: AdapterWeights
    samples: Mapping[str, Tensor]
    inputs: Tensor

    def __post_init__(self) -> None:
        sizes = {t.shape[0] for t in self.samples.values()}
        if len(sizes) != 1:
            raise ValueError(f"a row block needs samples with one common leading size S, got sizes {sizes}")
        missing = set(self.adapter.projections) - set(self.samples)
        if missing:
            raise ValueError(f"no sampled cores for adapted modules {sorted(missing)[:5]}")

    def sample_slice(self, start: int, stop: int) -> RowBlock:
        """The same inputs under samples ``start:stop`` only."""
        return RowBlock(self.adapter, {k: v[start:stop] for k, v in self.samples.items()}, self.inputs)

    @property
    def num_samples(self) -> int:
        return next(iter(self.samples.values())).shape[0]

    @property
    def num_inputs(self) -> int:
        return self.inputs.shape[0]

    @property
    def num_rows(self) -> int:
        return self.num_samples * self.num_inputs


@dataclass
class RowPlan:
    """Everything a batched-rows forward needs, computed once per forward.

    Attributes:
        row_inputs: ``(N_rows,)`` which unique input each row reads.
        block_rows: the slice of rows of each block.
        layer_groups: adapted module name → its row groups (one per distinct projection).
        base_rows: the rows after the blocks that run the frozen base alone (no adapter): one per input
            whose base features are wanted (the OOD score's), shared by every block that reads it.
    """

    row_inputs: Tensor
    block_rows: list[slice]
    layer_groups: dict[str, list[RowGroup]]
    base_rows: slice = field(default_factory=lambda: slice(0, 0))

    @classmethod
    def build(
        cls, blocks: Sequence[RowBlock], layer_names: Iterable[str], base_inputs: Tensor | None = None
    ) -> RowPlan:
        """``base_inputs``: ``(m,)`` unique inputs that also get a base row (none by default)."""
        if not blocks:
            raise ValueError("a batched forward needs at least one row block")
        block_rows, start = [], 0
        for block in blocks:
            block_rows.append(slice(start, start + block.num_rows))
            start += block.num_rows
        row_inputs = torch.cat([block.inputs.repeat(block.num_samples) for block in blocks])
        base_rows = slice(start, start)
        if base_inputs is not None and base_inputs.numel():
            row_inputs = torch.cat([row_inputs, base_inputs.to(row_inputs.device)])
            base_rows = slice(start, start + base_inputs.shape[0])
        total = row_inputs.shape[0]
        layer_groups = {name: _layer_groups(name, blocks, block_rows, total) for name in layer_names}
        unknown = {n for b in blocks for n in b.adapter.projections} - set(layer_groups)
        if unknown:
            raise ValueError(f"adapters project modules the base model does not wrap: {sorted(unknown)[:5]}")
        return cls(row_inputs=row_inputs, block_rows=block_rows, layer_groups=layer_groups, base_rows=base_rows)


def _layer_groups(name: str, blocks: Sequence[RowBlock], block_rows: list[slice], total_rows: int) -> list[RowGroup]:
    """Group the blocks that adapt ``name`` by projection and gather one scaled core per row."""
    by_projection: dict[int, tuple[Projection, list[Tensor], list[Tensor]]] = {}
    for block, rows in zip(blocks, block_rows, strict=True):
        projection = block.adapter.projections.get(name)
        if projection is None:
            continue  # this adapter leaves the layer as it is
        cores = block.samples[name].to(projection.A.dtype) * block.adapter.scaling  # (S, r, r)
        per_row = cores.repeat_interleave(block.num_inputs, dim=0)  # row s·n + i uses core s
        entry = by_projection.setdefault(id(projection), (projection, [], []))
        entry[1].append(rows)
        entry[2].append(per_row)
    groups = []
    for projection, row_slices, core_lists in by_projection.values():
        cores = torch.cat(core_lists)
        groups.append(RowGroup(projection.A, projection.B, cores, _group_rows(row_slices, total_rows, cores.device)))
    return groups


def _group_rows(row_slices: list[slice], total_rows: int, device: torch.device) -> Tensor | slice | None:
    """A group's rows as the layer reads them cheapest: ``None`` for every row, a slice for one run of rows
    (a view of the batch, no gather and no scatter: e.g. every block's rows ahead of the plan's base rows),
    else their indices."""
    contiguous = all(a.stop == b.start for a, b in itertools.pairwise(row_slices))
    if not contiguous:
        return torch.cat([torch.arange(r.start, r.stop, device=device) for r in row_slices])
    run = slice(row_slices[0].start, row_slices[-1].stop)
    return None if (run.start, run.stop) == (0, total_rows) else run


@dataclass
class Chunk:
    """One forward of a packed batch.

    Attributes:
        inputs: ``(m,)`` the unique inputs it reads (indices into the whole batch).
        width: tokens to keep (the longest of those inputs; right padding beyond it is dropped).
        parts: ``(index of the original block, block or sample slice of it)``; each part's ``inputs``
            index into this chunk's ``inputs``.
    """

    inputs: Tensor
    width: int
    parts: list[tuple[int, RowBlock]]


def pack_blocks(blocks: Sequence[RowBlock], input_lengths: Sequence[int], token_budget: int | None) -> list[Chunk]:
    """Pack blocks into forwards of at most ``token_budget`` padded tokens (rows × longest input).

    Blocks are taken shortest first, so short requests are not padded to the length of long ones, and a
    block that does not fit is split by samples. A single sample of a block is never split, so a chunk can
    exceed the budget only when one sample's inputs alone do. The sample slices of a block appear in order,
    so concatenating their outputs along S restores the block. ``token_budget=None`` gives one forward.

    Args:
        blocks: the row blocks of one batch.
        input_lengths: tokens of each unique input (without padding).
        token_budget: rows × width per forward, or ``None``.
    """
    widths = [max(input_lengths[i] for i in block.inputs.tolist()) for block in blocks]
    if token_budget is None:
        return [_localise(list(enumerate(blocks)), max(widths))]
    if token_budget < 1:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    groups: list[list[tuple[int, RowBlock]]] = [[]]
    group_widths = [0]
    rows = 0
    for index in sorted(range(len(blocks)), key=widths.__getitem__):
        block, start = blocks[index], 0
        while start < block.num_samples:
            free = token_budget // max(group_widths[-1], widths[index]) - rows
            if free < block.num_inputs and groups[-1]:
                groups.append([])
                group_widths.append(0)
                rows = 0
                continue
            take = min(block.num_samples - start, max(1, free // block.num_inputs))
            part = block if take == block.num_samples else block.sample_slice(start, start + take)
            groups[-1].append((index, part))
            group_widths[-1] = max(group_widths[-1], widths[index])
            rows += take * block.num_inputs
            start += take
    return [_localise(group, width) for group, width in zip(groups, group_widths, strict=True)]


def _localise(parts: list[tuple[int, RowBlock]], width: int) -> Chunk:
    """Re-index the parts' inputs into the unique inputs the chunk reads."""
    inputs, local = torch.unique(torch.cat([part.inputs for _, part in parts]), sorted=True, return_inverse=True)
    localised, start = [], 0
    for index, part in parts:
        stop = start + part.num_inputs
        localised.append((index, RowBlock(part.adapter, part.samples, local[start:stop])))
        start = stop
    return Chunk(inputs, width, localised)


@contextmanager
def apply_row_plan(layers: Mapping[str, LoraXSLinear], plan: RowPlan) -> Iterator[None]:
    """Put the layers in batched-rows mode for the forwards inside the block (not re-entrant)."""
    with _row_groups(layers, plan.layer_groups):
        yield


@contextmanager
def base_only(layers: Mapping[str, LoraXSLinear]) -> Iterator[None]:
    """Forwards inside run the frozen base alone: every LoRA-XS layer bypassed (batched-rows mode, no rows),
    the same arithmetic as a plan's base rows."""
    with _row_groups(layers, {}):
        yield


@contextmanager
def per_row_cores(layers: Mapping[str, LoraXSLinear], cores: Mapping[str, Tensor]) -> Iterator[None]:
    """Forwards inside use ``cores[layer] (N, r, r)`` for row ``n`` of the batch, with each layer's own
    projections and scaling (unscaled cores, like the layers' own); gradients flow into ``cores``. Training
    draws per-example noise this way (MC dropout masks, variational samples)."""
    groups = {
        name: [RowGroup(layer.lora_A, layer.lora_B, layer.scaling * cores[name], None)]
        for name, layer in layers.items()
    }
    with _row_groups(layers, groups):
        yield


@contextmanager
def _row_groups(layers: Mapping[str, LoraXSLinear], groups: Mapping[str, list[RowGroup]]) -> Iterator[None]:
    try:
        for name, layer in layers.items():
            layer.row_groups = groups.get(name, [])
        yield
    finally:
        for layer in layers.values():
            layer.row_groups = None

"""Multi-adapter, multi-sample batching: the one place that maps rows of a batch to cores.

A batched forward is a list of :class:`RowBlock` s. A block is one request's worth of work: ``n`` inputs
of one adapter, each evaluated under the same ``S`` posterior samples. Its rows are laid out sample-major
(row ``s·n + i`` is input ``i`` under sample ``s``) and blocks follow each other. :class:`RowPlan` turns the
blocks into, per adapted layer, one :class:`~adapters.layer.RowGroup` per distinct projection, holding the
gathered per-row cores with each adapter's scaling folded in. :func:`apply_row_plan` hands the groups to the
layers for the duration of one forward.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate, pairwise

import torch
from torch import Tensor

from adapters.layer import LoraXSLinear, RowGroup
from adapters.projections import Projection

Readout = Callable[[Tensor, Mapping[str, Tensor]], Tensor]  # hidden states (N, T, H) and their batch → features


@dataclass
class AdapterWeights:
    """The fixed part of one adapter, on the base model's device.

    Attributes:
        projections: adapted module name → its projection. Adapters that share a projection *object*
            share ``A x`` in a batched forward (the server interns identical projections).
        scaling: ``alpha / rank``.
        head_weight: ``(C, H)`` classifier weight (the MAP value); ``(K, K)`` identity for a cloze readout.
        head_bias: ``(C,)`` classifier bias.
        readout: how the rows' hidden states become the head's features: ``None`` pools them (the host's
            pooling); a :class:`~adapters.cloze.ClozeReadout` scores the choices of packed inputs.
    """

    projections: Mapping[str, Projection]
    scaling: float
    head_weight: Tensor
    head_bias: Tensor
    readout: Readout | None = None


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
        layouts = _Layouts(blocks, block_rows, total)
        layer_groups = {name: _layer_groups(name, blocks, layouts) for name in layer_names}
        unknown = {n for b in blocks for n in b.adapter.projections} - set(layer_groups)
        if unknown:
            raise ValueError(f"adapters project modules the base model does not wrap: {sorted(unknown)[:5]}")
        return cls(row_inputs=row_inputs, block_rows=block_rows, layer_groups=layer_groups, base_rows=base_rows)


@dataclass
class _Layout:
    """Where the rows of some blocks sit, shared by every layer whose projection groups those blocks.

    Attributes:
        rows: the group's rows (``None``: every row in order; a slice when contiguous).
        sample_index: ``(n_rows,)`` for each row, its sample in the concatenation of the blocks' samples.
        scaling: each sample's adapter scaling, ``(ΣS, 1, 1)``, or one float when the blocks share it.
    """

    rows: Tensor | slice | None
    sample_index: Tensor
    scaling: Tensor | float


class _Layouts:
    """Layouts by the tuple of blocks they cover, built once per plan: a layer then costs one ``cat`` of its
    cores and one gather, whatever the number of blocks."""

    def __init__(self, blocks: Sequence[RowBlock], block_rows: list[slice], total_rows: int) -> None:
        self.blocks, self.block_rows, self.total_rows = blocks, block_rows, total_rows
        self._cache: dict[tuple[int, ...], _Layout] = {}

    def get(self, members: tuple[int, ...]) -> _Layout:
        if members not in self._cache:
            self._cache[members] = self._build(members)
        return self._cache[members]

    def _build(self, members: tuple[int, ...]) -> _Layout:
        blocks = [self.blocks[i] for i in members]
        device = blocks[0].inputs.device
        offsets = list(accumulate((b.num_samples for b in blocks), initial=0))
        sample_index = torch.cat(
            [torch.arange(o, o + b.num_samples, device=device).repeat_interleave(b.num_inputs)
             for b, o in zip(blocks, offsets, strict=False)]
        )  # fmt: skip  # row s·n + i of a block uses its core s
        spans = [self.block_rows[i] for i in members]
        rows: Tensor | slice | None
        if any(a.stop != b.start for a, b in pairwise(spans)):
            rows = torch.cat([torch.arange(r.start, r.stop, device=device) for r in spans])
        elif spans[0].start == 0 and spans[-1].stop == self.total_rows:
            rows = None
        else:
            rows = slice(spans[0].start, spans[-1].stop)
        scalings = [b.adapter.scaling for b in blocks]
        if len(set(scalings)) == 1:
            return _Layout(rows, sample_index, scalings[0])
        per_sample = torch.tensor([s for b, s in zip(blocks, scalings, strict=True) for _ in range(b.num_samples)])
        return _Layout(rows, sample_index, per_sample.to(device).view(-1, 1, 1))


def _layer_groups(name: str, blocks: Sequence[RowBlock], layouts: _Layouts) -> list[RowGroup]:
    """Group the blocks that adapt ``name`` by projection; per group one ``cat`` of the blocks' sampled cores,
    scaled, and one gather of a core per row."""
    by_projection: dict[int, tuple[Projection, list[int]]] = {}
    for index, block in enumerate(blocks):
        projection = block.adapter.projections.get(name)
        if projection is not None:  # else this adapter leaves the layer as it is
            by_projection.setdefault(id(projection), (projection, []))[1].append(index)
    groups = []
    for projection, members in by_projection.values():
        layout = layouts.get(tuple(members))
        cores = (torch.cat([blocks[i].samples[name] for i in members]) * layout.scaling).to(projection.A.dtype)
        groups.append(RowGroup(projection.A, projection.B, cores.index_select(0, layout.sample_index), layout.rows))
    return groups


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


def pack_blocks(
    blocks: Sequence[RowBlock],
    input_lengths: Sequence[int],
    token_budget: int | None,
    split_padding: int | None = None,
) -> list[Chunk]:
    """Pack blocks into forwards of at most ``token_budget`` padded tokens (rows × longest input).

    Blocks are taken shortest first, so short requests are not padded to the length of long ones, and a
    block that does not fit is split by samples. A single sample of a block is never split, so a chunk can
    exceed the budget only when one sample's inputs alone do. The sample slices of a block appear in order,
    so concatenating their outputs along S restores the block. ``token_budget=None`` and
    ``split_padding=None`` give one forward.

    Args:
        blocks: the row blocks of one batch.
        input_lengths: tokens of each unique input (without padding).
        token_budget: rows × width per forward, or ``None``.
        split_padding: when given, a forward also ends where padding the rows it holds to the next block's
            width would add more than this many rows × tokens of padding: where padded tokens cost as much
            as real ones (a CPU), a second forward is cheaper than that much padding
            (:meth:`service.host.ModelHost.calibrate` measures the break-even).
    """
    widths = [max(input_lengths[i] for i in block.inputs.tolist()) for block in blocks]
    if token_budget is None and split_padding is None:
        return [_localise(list(enumerate(blocks)), max(widths))]
    if token_budget is not None and token_budget < 1:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    budget = sys.maxsize if token_budget is None else token_budget
    groups: list[list[tuple[int, RowBlock]]] = [[]]
    group_widths = [0]
    rows = own = 0  # the open chunk's rows, and its rows × tokens before padding across blocks
    for index in sorted(range(len(blocks)), key=widths.__getitem__):
        block, start, width = blocks[index], 0, widths[index]
        while start < block.num_samples:
            free = budget // max(group_widths[-1], width) - rows
            padded = split_padding is not None and rows * width - own > split_padding  # this block is the widest
            if groups[-1] and (free < block.num_inputs or padded):
                groups.append([])
                group_widths.append(0)
                rows = own = 0
                continue
            take = min(block.num_samples - start, max(1, free // block.num_inputs))
            part = block if take == block.num_samples else block.sample_slice(start, start + take)
            groups[-1].append((index, part))
            group_widths[-1] = max(group_widths[-1], width)
            rows += take * block.num_inputs
            own += take * block.num_inputs * width
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

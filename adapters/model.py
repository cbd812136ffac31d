"""The classifier: a base transformer with LoRA-XS layers, pooled features and a linear head.

In single mode it is the training model; in batched-rows mode (:meth:`LoraXSClassifier.forward_rows`) one
forward serves many adapters and posterior samples, each block of rows with its own cores and head.
Injection is :mod:`adapters.injection`, fingerprints :mod:`adapters.fingerprint`, pooling
:mod:`adapters.pooling` and the GLM Jacobians :mod:`adapters.linearisation`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from adapters import cloze
from adapters.batching import AdapterWeights, Readout, RowBlock, RowPlan, apply_row_plan, pack_blocks
from adapters.cloze import ClozeReadout
from adapters.heads import HEAD_BIAS, HEAD_WEIGHT, head_logits
from adapters.injection import lora_xs_layers
from adapters.layer import LoraXSLinear
from adapters.linearisation import row_jacobians
from adapters.ood.features import BaseFeatureTap
from adapters.pooling import DenseTanhPooler, pool
from adapters.projections import Projection
from adapters.vocab import Pooling

TOKEN_POOLINGS = [str(p) for p in Pooling if p != Pooling.POOLER]


class LoraXSClassifier(nn.Module):
    """Base transformer (with LoRA-XS layers) → pooling → dropout → linear head.

    Args:
        base: a model whose forward returns ``last_hidden_state`` (``AutoModel.from_pretrained``).
        num_labels: size of this model's own head, or ``None`` for a serving host whose heads come with
            each adapter.
        pooling: a :class:`~adapters.vocab.Pooling` name.
        dropout: before the head, in training only.
        train_head: whether :meth:`freeze_base` leaves the head trainable (a multiple-choice head, the LM's
            answer-letter rows, stays fixed).
        readout: how this model's own forward reads the hidden states: ``None`` pools them; a
            :class:`~adapters.pooling.DenseTanhPooler` reads the first token through its frozen dense layer and
            tanh (the architecture's own sequence-classification head; ``pooling`` still serves the OOD
            features); a :class:`~adapters.cloze.ClozeReadout` scores packed multiple-choice inputs (the head is
            then the fixed ``(K, K)`` identity, whatever ``num_labels`` and ``train_head`` say).
    """

    def __init__(
        self,
        base: nn.Module,
        num_labels: int | None,
        pooling: str = "mean",
        dropout: float = 0.1,
        train_head: bool = True,
        readout: ClozeReadout | DenseTanhPooler | None = None,
    ) -> None:
        super().__init__()
        if pooling not in tuple(Pooling) or pooling == Pooling.POOLER:
            raise ValueError(f"unknown token pooling {pooling!r}; choose one of {TOKEN_POOLINGS}")
        self.base = base
        self.pooling = pooling
        self.train_head = train_head
        cloze_readout = isinstance(readout, ClozeReadout)
        self._readout_choices = readout.num_choices if cloze_readout else None
        if cloze_readout:  # a buffer, so that .to(device) moves the LM head with the model
            self.register_buffer("output_embeddings", readout.output_embeddings, persistent=False)
        self._pooled = isinstance(readout, DenseTanhPooler)
        if self._pooled:  # frozen and outside the state dict: a MAP checkpoint holds the cores and the head
            self.register_buffer("pooler_weight", readout.weight, persistent=False)
            self.register_buffer("pooler_bias", readout.bias, persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(base.config.hidden_size, num_labels) if num_labels is not None else None
        if cloze_readout and self.head is not None:  # the choices' scores are the logits: a fixed identity
            self.train_head = False
            self.head = nn.Linear(readout.num_choices, readout.num_choices)
            with torch.no_grad():
                self.head.weight.copy_(torch.eye(readout.num_choices))
                self.head.bias.zero_()

    @property
    def readout(self) -> ClozeReadout | DenseTanhPooler | None:
        """This model's own readout (``None``: it pools)."""
        if self._pooled:
            return DenseTanhPooler(self.pooler_weight, self.pooler_bias)
        if self._readout_choices is None:
            return None
        return ClozeReadout(self.output_embeddings, self._readout_choices)

    @property
    def task_pooling(self) -> Pooling:
        """How the head reads the tokens, as a bundle records it (``task.pooling``)."""
        return Pooling.POOLER if self._pooled else Pooling(self.pooling)

    @property
    def lora_layers(self) -> dict[str, LoraXSLinear]:
        return lora_xs_layers(self.base)

    def hidden_states(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The base's last hidden states ``(N, T, H)`` of a tokenised batch (``input_ids``, ``attention_mask``,
        ...; a batch with packed multiple-choice inputs gets their block attention, :mod:`adapters.cloze`)."""
        return self.base(**cloze.decoder_inputs(batch, self.base.dtype)).last_hidden_state

    def features(self, batch: Mapping[str, Tensor]) -> Tensor:
        """This model's head features of a tokenised batch: pooled ``(N, H)``, or its readout's (cloze
        scores ``(N, K)``)."""
        return self._read(self.hidden_states(batch), batch, self.readout)

    def _read(self, hidden: Tensor, batch: Mapping[str, Tensor], readout: Readout | None) -> Tensor:
        if readout is None:
            return pool(hidden, batch.get("attention_mask"), self.pooling)
        return readout(hidden, batch)

    def block_features(
        self, batch: Mapping[str, Tensor], block_rows: Sequence[Tensor], blocks: Sequence[RowBlock]
    ) -> list[Tensor]:
        """One forward of the rows ``batch`` (adapters applied): each block's head features, read its
        adapter's way (pooled once for all the blocks that pool)."""
        hidden = self.hidden_states(batch)
        pooled: Tensor | None = None
        out = []
        for rows, block in zip(block_rows, blocks, strict=True):
            readout = block.adapter.readout
            if readout is None:
                pooled = self._read(hidden, batch, None) if pooled is None else pooled
                out.append(pooled[rows])
            else:
                out.append(readout(hidden[rows], {k: v[rows] for k, v in batch.items()}))
        return out

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **batch: Tensor) -> Tensor:
        """Single mode: logits ``(N, C)`` with each layer's own core and this model's head."""
        if self.head is None:
            raise RuntimeError("this classifier has no head of its own; use forward_rows with adapter heads")
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, **batch}
        features = self.features({k: v for k, v in batch.items() if v is not None})
        return self.head(self.dropout(features))

    def forward_rows(
        self,
        batch: Mapping[str, Tensor],
        blocks: Sequence[RowBlock],
        token_budget: int | None = None,
        tap: BaseFeatureTap | None = None,
        split_padding: int | None = None,
    ) -> list[Tensor]:
        """Batched-rows mode: every (input, posterior sample) of every block, in as few forwards as fit.

        Args:
            batch: tokenised unique inputs, each tensor ``(N_inputs, T)``, right-padded.
            blocks: row blocks (:class:`adapters.batching.RowBlock`), each naming its inputs, its adapter
                and its ``S`` sampled cores (and optionally sampled head parameters).
            token_budget: when given, forwards of at most this many padded tokens (rows × longest input),
                blocks packed shortest first and split by samples (:func:`adapters.batching.pack_blocks`).
                On a CPU very large forwards fall out of cache and get slower per row; on a GPU, leave it
                ``None`` for one forward.
            tap: when given, the inputs it wants get one base row each (no adapter) in the forward that
                first reads them, and their OOD features are stored in it.
            split_padding: when given, a forward also ends where more padding than this (rows × tokens)
                would join blocks of different lengths (:func:`adapters.batching.pack_blocks`).

        Returns:
            One logits tensor ``(S_b, n_b, C_b)`` per block.
        """
        outputs: list[list[Tensor]] = [[] for _ in blocks]
        for chunk in pack_blocks(blocks, _input_lengths(batch), token_budget, split_padding):
            rows = {k: v.index_select(0, chunk.inputs)[:, : chunk.width] for k, v in batch.items()}
            with _tapped(self.base, tap, chunk.inputs, rows) as base_inputs:
                logits = self._forward_plan(rows, [part for _, part in chunk.parts], base_inputs)
            for (index, _), part_logits in zip(chunk.parts, logits, strict=True):
                outputs[index].append(part_logits)
        return [torch.cat(parts) for parts in outputs]

    def forward_rows_jacobians(
        self,
        batch: Mapping[str, Tensor],
        blocks: Sequence[RowBlock],
        token_budget: int | None = None,
        tap: BaseFeatureTap | None = None,
        split_padding: int | None = None,
    ) -> list[tuple[Tensor, dict[str, Tensor]]]:
        """The GLM linearisation of every block: logits and their Jacobians w.r.t. each core and the head.

        Each block holds one sample (``S = 1``), the point the network is linearised at (the MAP cores); the
        maths is :func:`adapters.linearisation.row_jacobians`.

        Args:
            batch, token_budget, tap, split_padding: as for :meth:`forward_rows`.
            blocks: row blocks with ``S = 1``.

        Returns:
            Per block: logits ``(n, C)`` and block name → Jacobian ``(n, C, *shape)`` for every core the
            adapter has, ``head.weight`` ``(n, C, C, H)`` and ``head.bias`` ``(n, C, C)`` (float32).
        """
        if any(block.num_samples != 1 for block in blocks):
            raise ValueError("a GLM linearisation takes one sample (the MAP) per block")
        outputs: list[tuple[Tensor, dict[str, Tensor]]] = [None] * len(blocks)  # type: ignore[list-item]
        for chunk in pack_blocks(blocks, _input_lengths(batch), token_budget, split_padding):
            rows = {k: v.index_select(0, chunk.inputs)[:, : chunk.width] for k, v in batch.items()}
            parts = [part for _, part in chunk.parts]
            with _tapped(self.base, tap, chunk.inputs, rows) as base_inputs:
                results = row_jacobians(self.block_features, self.lora_layers, rows, parts, base_inputs)
            for (index, _), result in zip(chunk.parts, results, strict=True):
                outputs[index] = result
        return outputs

    def _forward_plan(
        self, batch: Mapping[str, Tensor], blocks: Sequence[RowBlock], base_inputs: Tensor | None = None
    ) -> list[Tensor]:
        plan = RowPlan.build(blocks, self.lora_layers.keys(), base_inputs)
        rows_batch = {k: v.index_select(0, plan.row_inputs) for k, v in batch.items()}
        with apply_row_plan(self.lora_layers, plan):
            features = self.block_features(rows_batch, plan.block_rows, blocks)
        return [head_logits(part, block) for part, block in zip(features, blocks, strict=True)]

    def own_adapter(self) -> AdapterWeights:
        """This model's own projections, scaling and head as batched-rows adapter weights (on its device)."""
        layers = self.lora_layers
        if self.head is None or not layers or any(layer.core is None for layer in layers.values()):
            raise ValueError("the classifier needs its own head and adapter cores")
        projections = {name: Projection(layer.lora_A, layer.lora_B) for name, layer in layers.items()}
        scaling = next(iter(layers.values())).scaling
        return AdapterWeights(projections, scaling, self.head.weight.detach(), self.head.bias.detach(), self.readout)

    def freeze_base(self) -> list[str]:
        """Make only the cores and this model's head (unless ``train_head`` is off) trainable; returns the
        trainable parameter names."""
        for param in self.parameters():
            param.requires_grad_(False)
        trainable = [layer.core.weight for layer in self.lora_layers.values() if layer.core is not None]
        if self.head is not None and self.train_head:
            trainable += list(self.head.parameters())
        for param in trainable:
            param.requires_grad_(True)
        return [name for name, param in self.named_parameters() if param.requires_grad]

    def posterior_parameters(self, include_head: bool = False) -> dict[str, nn.Parameter]:
        """The parameters a posterior covers, under the names bundles use: each adapted module's name for
        its core weight, and ``head.weight`` / ``head.bias``."""
        params = {name: layer.core.weight for name, layer in self.lora_layers.items() if layer.core is not None}
        if include_head and self.head is not None:
            params[HEAD_WEIGHT] = self.head.weight
            params[HEAD_BIAS] = self.head.bias
        return params


def _tapped(base: nn.Module, tap: BaseFeatureTap | None, inputs: Tensor, rows: Mapping[str, Tensor]):
    """The tap's context around one chunk's forward (``inputs`` its unique inputs, ``rows`` their tokens)."""
    return nullcontext() if tap is None else tap.tapped(base, inputs, cloze.prompt_mask(rows))


def _input_lengths(batch: Mapping[str, Tensor]) -> list[int]:
    """Tokens of each input (right padding required: batched rows trim forwards to their longest input)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return [batch["input_ids"].shape[1]] * batch["input_ids"].shape[0]
    if not torch.equal(mask.cumprod(dim=1).sum(dim=1), mask.sum(dim=1)):
        raise ValueError("batched rows need right-padded inputs (padding_side='right')")
    return mask.sum(dim=1).tolist()

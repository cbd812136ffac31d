"""Injection of LoRA-XS layers into any ``PreTrainedModel`` and the classifier model wrapper.

Layers wrap ``nn.Linear`` modules in place (``setattr`` on the parent), so the base model's own code runs
unchanged. :class:`LoraXSClassifier` puts a pooled linear head on the base model's hidden states: in
single mode it is the training model; in batched-rows mode (:meth:`LoraXSClassifier.forward_rows`) one
forward serves many adapters and posterior samples, each block of rows with its own head.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.batching import AdapterWeights, RowBlock, RowPlan, apply_row_plan, pack_blocks
from adapters.config import LoraXSConfig
from adapters.defaults import CORE_INIT_STD
from adapters.errors import TargetNotFoundError
from adapters.layer import LoraXSLinear
from adapters.projections import Projection, build_projection

POOLINGS = ("mean", "cls", "last")
DECODER_TYPES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox", "phi", "gemma")
HEAD_WEIGHT, HEAD_BIAS = "head.weight", "head.bias"


# ------------------------------------------------------------------------------------------- targeting


def _pattern_matches(pattern: str, name: str) -> bool:
    """``re:<regex>`` matches the full name; a plain pattern matches the name or a dotted suffix of it."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def find_targets(model: nn.Module, patterns: Sequence[str]) -> dict[str, list[str]]:
    """Map each pattern to the names of the ``nn.Linear`` modules (or wrapped layers) it selects.

    Raises:
        TargetNotFoundError: a pattern matches nothing, or matches a module that is not ``nn.Linear``.
    """
    modules = dict(model.named_modules())
    wrapped = {name for name, m in modules.items() if isinstance(m, LoraXSLinear)}
    linears, others = [], []
    for name, module in modules.items():
        inside_wrapper = name.rpartition(".")[0] in wrapped  # a wrapped layer's own base/core
        if name in wrapped or (isinstance(module, nn.Linear) and not inside_wrapper):
            linears.append(name)
        else:
            others.append(name)
    matches = {p: [n for n in linears if _pattern_matches(p, n)] for p in patterns}
    empty = [p for p, names in matches.items() if not names]
    if empty:
        wrong_type = {p: [n for n in others if _pattern_matches(p, n)][:3] for p in empty}
        hints = "; ".join(
            f"{p!r} matches non-linear modules {found}" if found else f"{p!r} matches nothing"
            for p, found in wrong_type.items()
        )
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise TargetNotFoundError(
            f"target patterns select no nn.Linear: {hints}. Linear module names end in: {suffixes}"
        )
    return matches


def target_names(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the modules the patterns select, each once, in model order."""
    selected = {n for names in find_targets(model, patterns).values() for n in names}
    return [name for name, _ in model.named_modules() if name in selected]


@dataclass
class InjectionReport:
    """What :func:`inject_lora_xs` wrapped: the module names, and which pattern selected which modules."""

    wrapped: list[str]
    matches: dict[str, list[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        per_pattern = ", ".join(f"{p}: {len(n)}" for p, n in self.matches.items())
        return f"wrapped {len(self.wrapped)} linear layers ({per_pattern})"


def inject_lora_xs(
    model: nn.Module,
    target_modules: Sequence[str],
    projections: Mapping[str, Projection] | None = None,
    *,
    alpha: float = 16.0,
    init_std: float = CORE_INIT_STD,
    seed: int = 0,
) -> InjectionReport:
    """Wrap the selected ``nn.Linear`` modules of ``model`` in :class:`LoraXSLinear`, in place.

    Args:
        model: any ``nn.Module`` (typically a ``PreTrainedModel``); names below are relative to it.
        target_modules: patterns, see :func:`find_targets`.
        projections: module name → its :class:`Projection` for single mode (training); ``None`` makes host
            layers that only serve batched rows.
        alpha, init_std, seed: single-mode scaling and core initialisation (a seeded generator).
    """
    matches = find_targets(model, target_modules)
    names = target_names(model, target_modules)
    missing = [n for n in names if projections is not None and n not in projections]
    if missing:
        raise TargetNotFoundError(f"no projection given for targeted modules {missing[:5]}")
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    for name in names:
        if isinstance(modules[name], LoraXSLinear):
            continue
        parent_name, _, child = name.rpartition(".")
        layer = LoraXSLinear(
            modules[name],
            projections[name] if projections is not None else None,
            alpha=alpha,
            init_std=init_std,
            generator=generator,
        )
        setattr(modules[parent_name] if parent_name else model, child, layer)
    return InjectionReport(wrapped=names, matches=matches)


def lora_xs_layers(model: nn.Module) -> dict[str, LoraXSLinear]:
    """Name → wrapped layer, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraXSLinear)}


def compute_projections(
    model: nn.Module,
    module_names: Iterable[str],
    config: LoraXSConfig,
    input_moments: Mapping[str, Tensor] | None = None,
) -> dict[str, Projection]:
    """Projection of every named linear layer from its pretrained weight (METHODS.md §2)."""
    modules = dict(model.named_modules())
    projections = {}
    for index, name in enumerate(module_names):
        linear = modules[name]
        linear = linear.base if isinstance(linear, LoraXSLinear) else linear
        projections[name] = build_projection(
            linear.weight,
            config.rank,
            config.projection,
            seed=config.seed + 1000 * index,
            input_moment=None if input_moments is None else input_moments.get(name),
        )
    return projections


def module_digests(model: nn.Module, module_names: Iterable[str] | None = None) -> dict[str, str]:
    """sha256 of each named linear layer's weight and bias (float32 bytes, with shapes); all linear layers
    when ``module_names`` is ``None``.

    A server computes these once, before casting the base to a lower precision, and can then fingerprint
    any adapter's module set without keeping float32 weights around.
    """
    modules = dict(model.named_modules())
    if module_names is None:
        module_names = [n for n, m in modules.items() if _is_adaptable_linear(n, m, modules)]
    digests = {}
    for name in module_names:
        linear = modules[name]
        linear = linear.base if isinstance(linear, LoraXSLinear) else linear
        digest = hashlib.sha256()
        for tensor in (linear.weight, linear.bias):
            if tensor is not None:
                digest.update(str(tuple(tensor.shape)).encode())
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        digests[name] = digest.hexdigest()
    return digests


def _is_adaptable_linear(name: str, module: nn.Module, modules: Mapping[str, nn.Module]) -> bool:
    """A wrapped layer, or a plain linear layer that is not the inside of a wrapped one."""
    if isinstance(module, LoraXSLinear):
        return True
    return isinstance(module, nn.Linear) and not isinstance(modules.get(name.rpartition(".")[0]), LoraXSLinear)


def combine_digests(digests: Mapping[str, str], module_names: Iterable[str]) -> str:
    """The fingerprint of a module set from per-module digests (order-independent)."""
    lines = "".join(f"{name}:{digests[name]}\n" for name in sorted(module_names))
    return hashlib.sha256(lines.encode()).hexdigest()


def base_fingerprint(model: nn.Module, module_names: Iterable[str]) -> str:
    """sha256 over the frozen tensors an adapter touches: the named layers' weights and biases.

    Computed on float32 copies, so fingerprint the model before casting it to a lower precision.
    """
    names = list(module_names)
    return combine_digests(module_digests(model, names), names)


# --------------------------------------------------------------------------------------------- pooling


def pool(hidden: Tensor, attention_mask: Tensor | None, pooling: str) -> Tensor:
    """Sequence features ``(N, H)`` from hidden states ``(N, T, H)``.

    ``mean`` averages non-padding tokens (encoders such as MiniLM), ``cls`` takes the first token, ``last``
    the last non-padding token (decoders; right padding assumed).
    """
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if pooling == "mean":
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    if pooling == "last":
        last = attention_mask.long().sum(dim=1).clamp_min(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")


def default_pooling(config) -> str:
    """``last`` for decoders (causal LMs), ``mean`` for encoders."""
    causal = any(name.endswith("ForCausalLM") for name in getattr(config, "architectures", None) or [])
    decoder = getattr(config, "is_decoder", False) or config.model_type in DECODER_TYPES or causal
    return "last" if decoder else "mean"


# ------------------------------------------------------------------------------------------ classifier


class LoraXSClassifier(nn.Module):
    """Base transformer (with LoRA-XS layers) → pooling → dropout → linear head.

    Args:
        base: a model whose forward returns ``last_hidden_state`` (``AutoModel.from_pretrained``).
        num_labels: size of this model's own head, or ``None`` for a serving host whose heads come with
            each adapter.
        pooling: one of :data:`POOLINGS`.
        dropout: before the head, in training only.
        train_head: whether :meth:`freeze_base` leaves the head trainable (a multiple-choice head, the LM's
            answer-letter rows, stays fixed).
    """

    def __init__(
        self,
        base: nn.Module,
        num_labels: int | None,
        pooling: str = "mean",
        dropout: float = 0.1,
        train_head: bool = True,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        self.base = base
        self.pooling = pooling
        self.train_head = train_head
        self.dropout = nn.Dropout(dropout)
        hidden = base.config.hidden_size
        self.head = nn.Linear(hidden, num_labels) if num_labels is not None else None

    @property
    def lora_layers(self) -> dict[str, LoraXSLinear]:
        return lora_xs_layers(self.base)

    def features(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Pooled features ``(N, H)`` of a tokenised batch (``input_ids``, ``attention_mask``, ...)."""
        hidden = self.base(**batch).last_hidden_state
        return pool(hidden, batch.get("attention_mask"), self.pooling)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **batch: Tensor) -> Tensor:
        """Single mode: logits ``(N, C)`` with each layer's own core and this model's head."""
        if self.head is None:
            raise RuntimeError("this classifier has no head of its own; use forward_rows with adapter heads")
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, **batch}
        features = self.features({k: v for k, v in batch.items() if v is not None})
        return self.head(self.dropout(features))

    def forward_rows(
        self, batch: Mapping[str, Tensor], blocks: Sequence[RowBlock], token_budget: int | None = None
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

        Returns:
            One logits tensor ``(S_b, n_b, C_b)`` per block.
        """
        outputs: list[list[Tensor]] = [[] for _ in blocks]
        for chunk in pack_blocks(blocks, _input_lengths(batch), token_budget):
            rows = {k: v.index_select(0, chunk.inputs)[:, : chunk.width] for k, v in batch.items()}
            logits = self._forward_plan(rows, [part for _, part in chunk.parts])
            for (index, _), part_logits in zip(chunk.parts, logits, strict=True):
                outputs[index].append(part_logits)
        return [torch.cat(parts) for parts in outputs]

    def forward_rows_jacobians(
        self, batch: Mapping[str, Tensor], blocks: Sequence[RowBlock], token_budget: int | None = None
    ) -> list[tuple[Tensor, dict[str, Tensor]]]:
        """The GLM linearisation of every block: logits and their Jacobians w.r.t. each core and the head.

        Each block holds one sample (``S = 1``), the point the network is linearised at (the MAP cores).
        Every row gets its own copy of each core, so one backward pass per class gives every input's own
        Jacobian (rows do not interact).

        Args:
            batch, token_budget: as for :meth:`forward_rows`.
            blocks: row blocks with ``S = 1``.

        Returns:
            Per block: logits ``(n, C)`` and block name → Jacobian ``(n, C, *shape)`` for every core the
            adapter has, ``head.weight`` ``(n, C, C, H)`` and ``head.bias`` ``(n, C, C)`` (float32).
        """
        if any(block.num_samples != 1 for block in blocks):
            raise ValueError("a GLM linearisation takes one sample (the MAP) per block")
        outputs: list[tuple[Tensor, dict[str, Tensor]]] = [None] * len(blocks)  # type: ignore[list-item]
        for chunk in pack_blocks(blocks, _input_lengths(batch), token_budget):
            rows = {k: v.index_select(0, chunk.inputs)[:, : chunk.width] for k, v in batch.items()}
            results = self._jacobian_plan(rows, [part for _, part in chunk.parts])
            for (index, _), result in zip(chunk.parts, results, strict=True):
                outputs[index] = result
        return outputs

    def _jacobian_plan(self, batch: Mapping[str, Tensor], blocks: Sequence[RowBlock]) -> list[tuple[Tensor, dict]]:
        plan = RowPlan.build(blocks, self.lora_layers.keys())
        leaves = [(name, group) for name, groups in plan.layer_groups.items() for group in groups]
        for _, group in leaves:
            group.cores = group.cores.detach().requires_grad_(True)
        rows_batch = {k: v.index_select(0, plan.row_inputs) for k, v in batch.items()}
        with torch.enable_grad(), apply_row_plan(self.lora_layers, plan):
            features = self.features(rows_batch)
            logits = [head_logits(features[r], b)[0] for r, b in zip(plan.block_rows, blocks, strict=True)]
        num_rows, num_classes = plan.row_inputs.shape[0], max(out.shape[-1] for out in logits)
        per_class = []  # per class: layer → (N_rows, r, r) gradient w.r.t. each row's (scaled) core
        for c in range(num_classes):
            target = sum(out[:, c].sum() for out in logits if out.shape[-1] > c)
            grads = torch.autograd.grad(
                target, [g.cores for _, g in leaves], retain_graph=c < num_classes - 1, allow_unused=True
            )
            per_layer: dict[str, Tensor] = {}
            for (name, group), grad in zip(leaves, grads, strict=True):
                if name not in per_layer:
                    per_layer[name] = torch.zeros(num_rows, *group.cores.shape[1:], device=group.cores.device)
                full = per_layer[name]
                if grad is not None:
                    full[slice(None) if group.rows is None else group.rows] = grad.float()
            per_class.append(per_layer)
        results = []
        for rows, block, out in zip(plan.block_rows, blocks, logits, strict=True):
            C = out.shape[-1]
            jacobians = {
                name: block.adapter.scaling * torch.stack([per_class[c][name][rows] for c in range(C)], dim=1)
                for name in block.adapter.projections
            }  # the rows hold scaling · R, so ∂f/∂R = scaling · ∂f/∂(row core)
            phi = features[rows].detach().float()
            eye = torch.eye(C, device=phi.device)
            jacobians[HEAD_WEIGHT] = torch.einsum("ij,nh->nijh", eye, phi)
            jacobians[HEAD_BIAS] = eye.expand(phi.shape[0], C, C)
            results.append((out.detach().float(), jacobians))
        return results

    def _forward_plan(self, batch: Mapping[str, Tensor], blocks: Sequence[RowBlock]) -> list[Tensor]:
        plan = RowPlan.build(blocks, self.lora_layers.keys())
        rows_batch = {k: v.index_select(0, plan.row_inputs) for k, v in batch.items()}
        with apply_row_plan(self.lora_layers, plan):
            features = self.features(rows_batch)
        return [head_logits(features[rows], block) for rows, block in zip(plan.block_rows, blocks, strict=True)]

    def own_adapter(self) -> AdapterWeights:
        """This model's own projections, scaling and head as batched-rows adapter weights (on its device)."""
        layers = self.lora_layers
        if self.head is None or not layers or any(layer.core is None for layer in layers.values()):
            raise ValueError("the classifier needs its own head and adapter cores")
        projections = {name: Projection(layer.lora_A, layer.lora_B) for name, layer in layers.items()}
        scaling = next(iter(layers.values())).scaling
        return AdapterWeights(projections, scaling, self.head.weight.detach(), self.head.bias.detach())

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


def _input_lengths(batch: Mapping[str, Tensor]) -> list[int]:
    """Tokens of each input (right padding required: batched rows trim forwards to their longest input)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return [batch["input_ids"].shape[1]] * batch["input_ids"].shape[0]
    if not torch.equal(mask.cumprod(dim=1).sum(dim=1), mask.sum(dim=1)):
        raise ValueError("batched rows need right-padded inputs (padding_side='right')")
    return mask.sum(dim=1).tolist()


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

"""The GLM linearisation of row blocks: logits and their exact per-input Jacobians w.r.t. each core and the
head (docs/methods.md, GLM predictive).

Every row gets its own copy of each core, so one backward pass per class gives every input's own Jacobian
(rows do not interact). Heads are linear, so their Jacobians are closed-form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from adapters.batching import RowBlock, RowPlan, apply_row_plan
from adapters.heads import HEAD_BIAS, HEAD_WEIGHT, head_logits
from adapters.layer import LoraXSLinear

# tokenised rows, each block's rows and the blocks → each block's head features (one forward, adapters applied)
BlockFeatures = Callable[[Mapping[str, Tensor], Sequence[Tensor], Sequence[RowBlock]], list[Tensor]]


def row_jacobians(
    features: BlockFeatures,
    layers: Mapping[str, LoraXSLinear],
    batch: Mapping[str, Tensor],
    blocks: Sequence[RowBlock],
    base_inputs: Tensor | None = None,
) -> list[tuple[Tensor, dict[str, Tensor]]]:
    """Per block (each with ``S = 1``): logits ``(n, C)`` and block name → Jacobian ``(n, C, *shape)`` for
    every core of its adapter, ``head.weight`` ``(n, C, C, H)`` and ``head.bias`` ``(n, C, C)`` (float32).

    Args:
        features: the model's head features of each block's rows
            (:meth:`adapters.model.LoraXSClassifier.block_features`).
        layers: the model's LoRA-XS layers by name.
        batch: tokenised unique inputs of this forward ``(N_inputs, T)``.
        blocks: row blocks with one sample, the point the network is linearised at.
        base_inputs: inputs that also get a frozen-base row (:meth:`RowPlan.build`); no gradient reaches them.
    """
    plan = RowPlan.build(blocks, layers.keys(), base_inputs)
    leaves = [(name, group) for name, groups in plan.layer_groups.items() for group in groups]
    for _, group in leaves:
        group.cores = group.cores.detach().requires_grad_(True)
    rows_batch = {k: v.index_select(0, plan.row_inputs) for k, v in batch.items()}
    with torch.enable_grad(), apply_row_plan(layers, plan):
        pooled = features(rows_batch, plan.block_rows, blocks)
        logits = [head_logits(part, b)[0] for part, b in zip(pooled, blocks, strict=True)]
    num_rows, num_classes = plan.row_inputs.shape[0], max(out.shape[-1] for out in logits)
    per_class = []  # per class: (layer, core shape) → (N_rows, r, r) gradient w.r.t. each row's (scaled) core
    for c in range(num_classes):
        target = sum(out[:, c].sum() for out in logits if out.shape[-1] > c)
        grads = torch.autograd.grad(
            target, [g.cores for _, g in leaves], retain_graph=c < num_classes - 1, allow_unused=True
        )
        per_layer: dict[tuple[str, torch.Size], Tensor] = {}  # adapters of other ranks on one layer: apart
        for (name, group), grad in zip(leaves, grads, strict=True):
            key = (name, group.cores.shape[1:])
            if key not in per_layer:
                per_layer[key] = torch.zeros(num_rows, *key[1], device=group.cores.device)
            if grad is not None:
                per_layer[key][slice(None) if group.rows is None else group.rows] = grad.float()
        per_class.append(per_layer)
    results = []
    for rows, block, out, phi in zip(plan.block_rows, blocks, logits, pooled, strict=True):
        C = out.shape[-1]
        jacobians = {
            name: block.adapter.scaling
            * torch.stack([per_class[c][name, block.samples[name].shape[1:]][rows] for c in range(C)], dim=1)
            for name in block.adapter.projections
        }  # the rows hold scaling · R, so ∂f/∂R = scaling · ∂f/∂(row core)
        phi = phi.detach().float()
        eye = torch.eye(C, device=phi.device)
        jacobians[HEAD_WEIGHT] = torch.einsum("ij,nh->nijh", eye, phi)
        jacobians[HEAD_BIAS] = eye.expand(phi.shape[0], C, C)
        results.append((out.detach().float(), jacobians))
    return results

"""The frozen base's OOD features in a batched-rows forward: one base row per wanted input, equal to a forward
of the base with every adapter bypassed, for encoders (mean pooling) and decoders (last token)."""

from __future__ import annotations

import pytest
import torch

from adapters import LoraXSClassifier, LoraXSConfig, RowBlock, compute_projections, inject_lora_xs, target_names
from adapters.batching import RowPlan, base_only
from adapters.ood.features import BaseFeatureTap, capture_states, default_feature_layers, pooled_features
from tests.conftest import random_batch, tiny_bert, tiny_llama


def test_default_layers_are_a_middle_one_and_the_last() -> None:
    assert default_feature_layers(6) == (3, 6) and default_feature_layers(2) == (1, 2)
    assert default_feature_layers(1) == (1,) and default_feature_layers(32) == (16, 32)


def _adapted(base: torch.nn.Module, targets: list[str], pooling: str) -> LoraXSClassifier:
    config = LoraXSConfig(rank=4, alpha=8.0, target_modules=tuple(targets), seed=0)
    projections = compute_projections(base, target_names(base, targets), config)
    inject_lora_xs(base, targets, projections, alpha=8.0, init_std=0.5, seed=1)  # cores far from zero
    return LoraXSClassifier(base, num_labels=3, pooling=pooling).eval()


@pytest.mark.parametrize(
    ("make", "targets", "pooling"),
    [(tiny_bert, ["query", "value"], "mean"), (tiny_llama, ["q_proj", "v_proj"], "last")],
)
def test_base_rows_equal_the_base_with_adapters_bypassed(make, targets: list[str], pooling: str) -> None:
    model = _adapted(make(), targets, pooling)
    batch = random_batch(6, seed=3)
    layers = default_feature_layers(model.base.config.num_hidden_layers)
    with torch.no_grad(), base_only(model.lora_layers), capture_states(model.base, layers, slice(None)) as states:
        model.base(**batch)
    expected = pooled_features(states, batch["attention_mask"], pooling)
    with torch.no_grad(), capture_states(model.base, layers, slice(None)) as adapted_states:
        model.base(**batch)  # the adapters change the features: the bypass is not a no-op
    assert not torch.allclose(pooled_features(adapted_states, batch["attention_mask"], pooling), expected, atol=1e-3)
    assert torch.allclose(expected.view(6, len(layers), -1).norm(dim=-1), torch.ones(6, len(layers)))
    adapter = model.own_adapter()
    cores = {name: layer.core.weight.detach()[None].repeat(2, 1, 1) for name, layer in model.lora_layers.items()}
    blocks = [RowBlock(adapter, cores, torch.tensor([0, 2, 4])), RowBlock(adapter, cores, torch.tensor([1, 2, 5]))]
    tap = BaseFeatureTap(layers, pooling, [0, 1, 2, 3, 5])  # input 3 is read by no block: never computed
    with torch.inference_mode():
        logits = model.forward_rows(batch, blocks, token_budget=20, tap=tap)
        plain = model.forward_rows(batch, blocks, token_budget=20)
    assert sorted(tap.features) == [0, 1, 2, 5] and tap.pending == {3}
    torch.testing.assert_close(tap.select(layers, [0, 1, 2, 5]), expected[[0, 1, 2, 5]], rtol=1e-5, atol=1e-5)
    for with_tap, without in zip(logits, plain, strict=True):  # the base rows leave the blocks' logits alone
        torch.testing.assert_close(with_tap, without, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tap.select(layers[-1:], [0]), expected[[0], -model.base.config.hidden_size :])


def test_a_plan_with_base_rows_leaves_them_out_of_every_group() -> None:
    model = _adapted(tiny_bert(), ["query"], "mean")
    cores = {name: layer.core.weight.detach()[None] for name, layer in model.lora_layers.items()}
    plan = RowPlan.build(
        [RowBlock(model.own_adapter(), cores, torch.tensor([0, 1]))], model.lora_layers, torch.tensor([1])
    )
    assert plan.row_inputs.tolist() == [0, 1, 1] and plan.base_rows == slice(2, 3)
    for groups in plan.layer_groups.values():
        assert all(group.rows == slice(0, 2) for group in groups)  # the blocks' rows, read as a view

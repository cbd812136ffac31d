"""Injection by name pattern, the injection report, and the single-mode layer maths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapters import (
    LoraXSClassifier,
    LoraXSConfig,
    LoraXSLinear,
    Projection,
    TargetNotFoundError,
    compute_projections,
    find_targets,
    inject_lora_xs,
    lora_xs_layers,
    target_names,
)
from tests.conftest import random_batch


def test_bert_patterns_select_query_and_value(bert) -> None:
    report = inject_lora_xs(bert, ("query", "value"))
    assert report.wrapped == [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.value",
        "encoder.layer.1.attention.self.query",
        "encoder.layer.1.attention.self.value",
    ]
    assert {p: len(n) for p, n in report.matches.items()} == {"query": 2, "value": 2}
    assert "wrapped 4 linear layers" in str(report)
    assert list(lora_xs_layers(bert)) == report.wrapped


def test_llama_patterns_and_regex(llama) -> None:
    report = inject_lora_xs(llama, ("q_proj", "v_proj"))
    assert report.wrapped == [f"layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    names = target_names(llama, ("re:layers\\.1\\.mlp\\..*_proj",))
    assert names == ["layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"]


def test_patterns_that_match_nothing_are_refused(bert) -> None:
    with pytest.raises(TargetNotFoundError, match="'q_proj' matches nothing") as info:
        inject_lora_xs(bert, ("query", "q_proj"))
    assert "query" in str(info.value)  # lists the available linear names
    assert not lora_xs_layers(bert), "a refused injection wraps nothing"
    with pytest.raises(TargetNotFoundError, match="non-linear"):
        find_targets(bert, ("attention",))


def test_reinjection_and_wrapped_layers_are_found_again(bert) -> None:
    inject_lora_xs(bert, ("query",))
    assert target_names(bert, ("query",)) == list(lora_xs_layers(bert))
    inject_lora_xs(bert, ("query",))  # idempotent: no layer wrapped twice
    assert not any(isinstance(m.base, LoraXSLinear) for m in lora_xs_layers(bert).values())


def test_single_mode_matches_the_formula() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    A, B = torch.randn(3, 6), torch.randn(5, 3)
    layer = LoraXSLinear(base, Projection(A, B), alpha=6.0)
    assert layer.core.weight.abs().max() < 1e-4  # near-zero start, N(0, 1e-5²)
    R = torch.randn(3, 3)
    with torch.no_grad():
        layer.core.weight.copy_(R)
    x = torch.randn(2, 4, 6)
    expected = x @ base.weight.T + base.bias + (6.0 / 3) * (x @ A.T @ R.T @ B.T)
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(ValueError, match="does not fit"):
        LoraXSLinear(base, Projection(torch.randn(3, 7), B))


def test_training_model_trains_only_cores_and_head(bert) -> None:
    config = LoraXSConfig(rank=4, alpha=8.0)
    names = target_names(bert, config.target_modules)
    inject_lora_xs(bert, config.target_modules, compute_projections(bert, names, config), alpha=config.alpha)
    model = LoraXSClassifier(bert, num_labels=2)
    trainable = model.freeze_base()
    assert sorted(trainable) == sorted([f"base.{n}.core.weight" for n in names] + ["head.weight", "head.bias"])
    assert sum(p.numel() for p in model.posterior_parameters().values()) == len(names) * 16
    # a gradient step changes the cores and leaves the projections and base weights alone
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = nn.functional.cross_entropy(model(**random_batch(4)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"base.{n}.core.weight" for n in names} | {"head.weight", "head.bias"}

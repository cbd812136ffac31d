"""The embedded MiniLM on real review snippets: batched-rows sampling equals the per-sample loop."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from adapters import (
    AdapterWeights,
    LoraXSClassifier,
    LoraXSConfig,
    RowBlock,
    compute_projections,
    inject_lora_xs,
    lora_xs_layers,
    target_names,
)
from adapters.embedded import resolve_model
from training.data import rotten_tomatoes_snippets

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    path = resolve_model("minilm")
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def test_minilm_batched_equals_loop(minilm) -> None:
    tokenizer, base = minilm
    texts = [e.text for e in rotten_tomatoes_snippets()[:6]]
    batch = dict(tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))
    config = LoraXSConfig(rank=8, alpha=16.0, target_modules=("query", "value"))
    names = target_names(base, config.target_modules)
    projections = compute_projections(base, names, config)
    g = torch.Generator().manual_seed(0)
    adapters = [
        AdapterWeights(projections, config.scaling, torch.randn(2, 384, generator=g), torch.randn(2, generator=g))
        for _ in range(2)
    ]
    samples = [{n: 0.05 * torch.randn(3, 8, 8, generator=g) for n in names} for _ in adapters]
    inputs = [torch.arange(0, 4), torch.arange(2, 6)]
    host_base = copy.deepcopy(base)
    inject_lora_xs(host_base, config.target_modules)
    host = LoraXSClassifier(host_base, num_labels=None).eval()
    blocks = [RowBlock(a, s, i) for a, s, i in zip(adapters, samples, inputs, strict=True)]
    with torch.no_grad():
        batched = [torch.softmax(x, -1) for x in host.forward_rows(batch, blocks)]
    for block, got in zip(blocks, batched, strict=True):
        single_base = copy.deepcopy(base)
        inject_lora_xs(single_base, config.target_modules, projections, alpha=config.alpha)
        model = LoraXSClassifier(single_base, num_labels=2).eval()
        model.head.load_state_dict({"weight": block.adapter.head_weight, "bias": block.adapter.head_bias})
        rows = {k: v[block.inputs] for k, v in batch.items()}
        for s in range(3):
            with torch.no_grad():
                for name, layer in lora_xs_layers(single_base).items():
                    layer.core.weight.copy_(block.samples[name][s])
                torch.testing.assert_close(got[s], torch.softmax(model(**rows), -1), atol=1e-5, rtol=0)
    assert batched[0].std(dim=0).max() > 1e-4  # the samples really differ

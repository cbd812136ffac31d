"""Oracle: one batched-rows forward equals running every (adapter, sample) separately in single mode."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters import (
    AdapterWeights,
    LoraXSClassifier,
    LoraXSConfig,
    RowBlock,
    compute_projections,
    find_targets,
    inject_lora_xs,
    lora_xs_layers,
    predictive,
)
from adapters.batching import RowPlan, pack_blocks
from adapters.heads import HEAD_BIAS, HEAD_WEIGHT
from adapters.projections import Projection
from tests.conftest import random_batch, tiny_bert, tiny_llama

TOL = 1e-5


def _targets(model: torch.nn.Module, patterns: tuple[str, ...]) -> list[str]:
    return list(dict.fromkeys(n for names in find_targets(model, patterns).values() for n in names))


def _make_adapter(base, patterns, rank, spec, alpha, num_labels, seed, projections=None) -> AdapterWeights:
    names = _targets(base, patterns)
    if projections is None:
        config = LoraXSConfig(rank=rank, alpha=alpha, target_modules=patterns, projection=spec, seed=seed)
        projections = compute_projections(base, names, config)
    generator = torch.Generator().manual_seed(seed)
    hidden = base.config.hidden_size
    return AdapterWeights(
        projections=projections,
        scaling=alpha / rank,
        head_weight=torch.randn(num_labels, hidden, generator=generator),
        head_bias=torch.randn(num_labels, generator=generator),
    )


def _sample_cores(adapter: AdapterWeights, num_samples: int, seed: int, head: bool = False) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    samples = {
        name: 0.5 * torch.randn(num_samples, p.rank, p.rank, generator=generator)
        for name, p in adapter.projections.items()
    }
    if head:
        samples[HEAD_WEIGHT] = adapter.head_weight + 0.3 * torch.randn(
            num_samples, *adapter.head_weight.shape, generator=generator
        )
        samples[HEAD_BIAS] = adapter.head_bias + 0.3 * torch.randn(
            num_samples, *adapter.head_bias.shape, generator=generator
        )
    return samples


def _loop_probs(base, adapter: AdapterWeights, samples, batch, inputs, pooling: str) -> torch.Tensor:
    """Single mode, one (adapter, sample) at a time: the way public code does it."""
    rows = {k: v[inputs] for k, v in batch.items()}
    num_samples = next(iter(samples.values())).shape[0]
    out = []
    for s in range(num_samples):
        model_base = copy.deepcopy(base)
        rank = next(iter(adapter.projections.values())).rank
        inject_lora_xs(model_base, list(adapter.projections), adapter.projections, alpha=adapter.scaling * rank)
        model = LoraXSClassifier(model_base, num_labels=adapter.head_weight.shape[0], pooling=pooling).eval()
        with torch.no_grad():
            for name, layer in lora_xs_layers(model_base).items():
                layer.core.weight.copy_(samples[name][s])
            model.head.weight.copy_(samples.get(HEAD_WEIGHT, adapter.head_weight[None].expand(s + 1, -1, -1))[s])
            model.head.bias.copy_(samples.get(HEAD_BIAS, adapter.head_bias[None].expand(s + 1, -1))[s])
            out.append(torch.softmax(model(**rows), dim=-1))
    return torch.stack(out)  # (S, n, C)


@pytest.mark.parametrize(
    ("make_base", "patterns", "pooling"),
    [(tiny_bert, ("query", "value"), "mean"), (tiny_llama, ("q_proj", "v_proj"), "last")],
    ids=["bert", "llama"],
)
def test_batched_rows_equals_loop(make_base, patterns, pooling) -> None:
    base = make_base()
    batch = random_batch(5, seed=1)
    # Adapters 0 and 1 share one projection object (same base, rank, spec): one projection group.
    first = _make_adapter(base, patterns, rank=4, spec="svd", alpha=8.0, num_labels=3, seed=0)
    second = _make_adapter(base, patterns, 4, "svd", 4.0, 3, seed=1, projections=first.projections)
    # Adapter 2 has another rank, projection family, label count, and targets one more module kind.
    wider = (*patterns, "re:.*\\.(key|k_proj)")
    third = _make_adapter(base, wider, rank=6, spec="dct-1/2_svd", alpha=12.0, num_labels=2, seed=2)
    blocks = [
        RowBlock(first, _sample_cores(first, 4, seed=10), torch.tensor([0, 1, 2])),
        RowBlock(second, _sample_cores(second, 3, seed=11), torch.tensor([1, 3])),
        RowBlock(third, _sample_cores(third, 5, seed=12, head=True), torch.tensor([0, 2, 3, 4])),
        RowBlock(first, _sample_cores(first, 2, seed=13), torch.tensor([4, 0])),  # its group's rows: two runs
    ]
    kinds = {type(g.rows) for groups in RowPlan.build(blocks, _targets(base, wider)).layer_groups.values()
             for g in groups}  # fmt: skip
    assert kinds == {torch.Tensor, slice}  # gathered rows and a run of rows (a view) are both checked below
    host_base = copy.deepcopy(base)
    inject_lora_xs(host_base, wider)  # host layers: no adapter of their own
    host = LoraXSClassifier(host_base, num_labels=None, pooling=pooling).eval()
    with torch.no_grad():
        batched = host.forward_rows(batch, blocks)
    for block, logits in zip(blocks, batched, strict=True):
        expected = _loop_probs(base, block.adapter, block.samples, batch, block.inputs, pooling)
        got = torch.softmax(logits, dim=-1)
        assert got.shape == expected.shape == (block.num_samples, block.num_inputs, block.adapter.head_weight.shape[0])
        torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
        torch.testing.assert_close(
            predictive(logits).probs, expected.mean(dim=0), atol=TOL, rtol=0, msg="predictive averages probabilities"
        )
    # The samples really differ: a batched forward that ignored the per-row cores would fail above.
    assert torch.softmax(batched[0], -1).std(dim=0).max() > 1e-3


def test_host_layers_leave_base_unchanged_outside_batched_mode(bert) -> None:
    batch = random_batch(3)
    with torch.no_grad():
        reference = bert(**batch).last_hidden_state
        inject_lora_xs(bert, ("query", "value"))
        wrapped = bert(**batch).last_hidden_state
    torch.testing.assert_close(wrapped, reference, atol=0, rtol=0)


def test_row_groups_are_cleared_after_forward(bert) -> None:
    inject_lora_xs(bert, ("query",))
    host = LoraXSClassifier(bert, num_labels=None).eval()
    adapter = _make_adapter(bert, ("query",), 2, "svd", 4.0, 2, seed=0)
    block = RowBlock(adapter, _sample_cores(adapter, 2, seed=0), torch.tensor([0]))
    with torch.no_grad():
        host.forward_rows(random_batch(1), [block])
    assert all(layer.row_groups is None for layer in lora_xs_layers(bert).values())


def test_pack_blocks_respects_the_token_budget_and_keeps_sample_order() -> None:
    base = tiny_bert()
    adapter = _make_adapter(base, ("query",), 2, "svd", 4.0, 2, seed=0)
    blocks = [
        RowBlock(adapter, _sample_cores(adapter, 5, seed=0), torch.tensor([0, 1, 2])),
        RowBlock(adapter, _sample_cores(adapter, 2, seed=1), torch.tensor([3])),
        RowBlock(adapter, _sample_cores(adapter, 4, seed=2), torch.tensor([0, 4])),
    ]
    lengths = [3, 5, 4, 9, 2]
    chunks = pack_blocks(blocks, lengths, token_budget=35)
    for chunk in chunks:
        assert chunk.width == max(lengths[i] for i in chunk.inputs.tolist())
        assert sum(part.num_rows for _, part in chunk.parts) * chunk.width <= 35
        for index, part in chunk.parts:  # local indices point at the same unique inputs
            assert torch.equal(chunk.inputs[part.inputs], blocks[index].inputs)
    for index, block in enumerate(blocks):
        parts = [part for chunk in chunks for i, part in chunk.parts if i == index]
        for name, samples in block.samples.items():
            assert torch.equal(torch.cat([p.samples[name] for p in parts]), samples)
    # shortest first: the 9-token block does not pad the others
    assert chunks[-1].width == 9 and all(c.width <= 5 for c in chunks[:-1])
    # one sample of 3 inputs of 5 tokens does not fit 10 tokens: it goes whole, alone in its forward
    tight = pack_blocks(blocks[:1], lengths, token_budget=10)
    assert [[p.num_rows for _, p in c.parts] for c in tight] == [[3]] * 5
    whole = pack_blocks(blocks, lengths, token_budget=None)
    assert len(whole) == 1 and whole[0].width == 9 and [i for i, _ in whole[0].parts] == [0, 1, 2]


def test_pack_blocks_splits_where_joining_lengths_pads_more_than_split_padding() -> None:
    base = tiny_bert()
    adapter = _make_adapter(base, ("query",), 2, "svd", 4.0, 2, seed=0)
    lengths = [10, 11, 40, 12]
    blocks = [RowBlock(adapter, _sample_cores(adapter, 4, seed=i), torch.tensor([i])) for i in range(4)]

    def layout(token_budget: int | None, split_padding: int | None) -> list[list[int]]:
        return [[i for i, _ in chunk.parts] for chunk in pack_blocks(blocks, lengths, token_budget, split_padding)]

    # 4 rows each, shortest first: joining 11 pads 4 × 1, joining 12 pads 8 × 1 more (12 in all), 40 pads 12 × 28
    assert layout(None, None) == [[0, 1, 2, 3]]  # one forward, blocks in their order
    assert layout(None, 1000) == [[0, 1, 3, 2]]
    assert layout(None, 12) == [[0, 1, 3], [2]]
    assert layout(None, 11) == [[0, 1], [3], [2]]
    assert layout(None, 0) == [[0], [1], [3], [2]]
    assert layout(100, 1000) == [[0, 1], [3], [2], [2]]  # the token budget still splits (12 rows × 12 > 100)
    widths = [chunk.width for chunk in pack_blocks(blocks, lengths, None, 12)]
    assert widths == [12, 40]


@pytest.mark.parametrize(
    ("token_budget", "split_padding"),
    [(1, None), (20, None), (60, None), (10_000, None), (None, 0), (None, 6), (60, 6)],
)
def test_packed_forward_equals_one_forward(token_budget, split_padding) -> None:
    base = tiny_bert()
    batch = random_batch(5, seed=2)
    adapter = _make_adapter(base, ("query", "value"), 4, "svd", 8.0, 3, seed=0)
    other = _make_adapter(base, ("query", "value"), 4, "random", 8.0, 2, seed=1)
    blocks = [
        RowBlock(adapter, _sample_cores(adapter, 6, seed=3), torch.tensor([0, 1, 4])),
        RowBlock(other, _sample_cores(other, 3, seed=4, head=True), torch.tensor([2, 3])),
        RowBlock(other, _sample_cores(other, 2, seed=5), torch.tensor([1])),
    ]
    inject_lora_xs(base, ("query", "value"))
    host = LoraXSClassifier(base, num_labels=None).eval()
    with torch.no_grad():
        whole = host.forward_rows(batch, blocks)
        packed = host.forward_rows(batch, blocks, token_budget=token_budget, split_padding=split_padding)
    for a, b in zip(whole, packed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_left_padding_is_refused(bert) -> None:
    inject_lora_xs(bert, ("query",))
    host = LoraXSClassifier(bert, num_labels=None).eval()
    adapter = _make_adapter(bert, ("query",), 2, "svd", 4.0, 2, seed=0)
    batch = random_batch(2)
    batch["attention_mask"] = batch["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        host.forward_rows(batch, [RowBlock(adapter, _sample_cores(adapter, 2, seed=0), torch.tensor([0, 1]))])


def test_low_precision_base_with_float32_samples_and_head() -> None:
    """A bf16 host (as on a GPU) takes float32 posterior samples and heads, close to the float32 result."""
    base = tiny_bert()
    adapter = _make_adapter(base, ("query", "value"), 4, "svd", 8.0, 3, seed=0)
    block = RowBlock(adapter, _sample_cores(adapter, 3, seed=5), torch.tensor([0, 1]))
    batch = random_batch(2, seed=4)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        host_base = copy.deepcopy(base).to(dtype)
        inject_lora_xs(host_base, ("query", "value"))
        low = AdapterWeights(
            {n: p.to(dtype=dtype) for n, p in adapter.projections.items()},
            adapter.scaling,
            adapter.head_weight,
            adapter.head_bias,
        )
        host = LoraXSClassifier(host_base, num_labels=None).eval()
        with torch.no_grad():
            (logits,) = host.forward_rows(batch, [RowBlock(low, block.samples, block.inputs)])
        assert logits.dtype == torch.float32
        results.append(torch.softmax(logits, -1))
    torch.testing.assert_close(results[1], results[0], atol=3e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_plan_gives_each_row_its_scaled_core(dtype: torch.dtype) -> None:
    """Blocks sharing a projection with other scalings and sample counts, and one with a projection of its own:
    row ``s·n + i`` of a block holds ``scaling · core_s`` (in the projection's dtype), whatever the grouping."""
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 8, generator=g, dtype=dtype), torch.randn(8, 4, generator=g, dtype=dtype)
    shared, own = Projection(A, B), Projection(A.clone(), B.clone())
    head = (torch.zeros(2, 8), torch.zeros(2))
    adapters = [AdapterWeights({"l": p}, scale, *head) for p, scale in ((shared, 1.0), (own, 2.0), (shared, 3.0))]
    cores = [torch.randn(S, 4, 4, generator=g) for S in (2, 1, 3)]
    inputs = [torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([2])]
    blocks = [RowBlock(a, {"l": c}, i) for a, c, i in zip(adapters, cores, inputs, strict=True)]
    plan = RowPlan.build(blocks, ["l"])
    expected = torch.cat([b.adapter.scaling * b.samples["l"].repeat_interleave(b.num_inputs, 0) for b in blocks])
    assert plan.row_inputs.tolist() == [0, 1, 0, 1, 1, 2, 2, 2]
    covered = []
    for group in plan.layer_groups["l"]:
        rows = range(8)[group.rows] if isinstance(group.rows, slice) else group.rows.tolist()
        assert group.cores.dtype == dtype
        torch.testing.assert_close(group.cores.float(), expected[list(rows)].to(dtype).float())
        covered += rows
    assert sorted(covered) == list(range(8))

"""Exact LoRA ↔ LoRA-XS conversion: the update is unchanged (float64 oracle), padding to a larger rank is exact, the
reverse is exact, and a PEFT LoRA converted into Caveat's layers computes PEFT's own outputs on a tiny BERT — per
module ranks and alphas (rank_pattern, alpha_pattern) and rsLoRA included."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from adapters import Projection, inject_lora_xs, lora_xs_layers, target_names
from adapters.lora_conversion import XsFactors, lora_scaling, lora_to_xs, xs_to_lora
from adapters.peft_lora import read_peft_lora
from tests.conftest import tiny_bert


def random_lora(r: int, d_out: int, d_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(r, d_in, generator=generator, dtype=torch.float64),
            torch.randn(d_out, r, generator=generator, dtype=torch.float64))  # fmt: skip


@pytest.mark.parametrize(("r", "rank"), [(4, 4), (2, 6), (1, 3)])
def test_the_update_is_unchanged_and_the_projections_orthonormal(r: int, rank: int) -> None:
    lora_A, lora_B = random_lora(r, 12, 10, seed=r + rank)
    factors = lora_to_xs(lora_A, lora_B, lora_scale=2.5, xs_scaling=0.5, rank=rank)
    assert factors.A.shape == (rank, 10) and factors.B.shape == (12, rank) and factors.core.shape == (rank, rank)
    torch.testing.assert_close(factors.delta(0.5), 2.5 * lora_B @ lora_A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(factors.A @ factors.A.T, torch.eye(rank, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(factors.B.T @ factors.B, torch.eye(rank, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (factors.core[r:] == 0).all() and (factors.core[:, r:] == 0).all()  # padding: zero core


def test_the_reverse_is_exact() -> None:
    generator = torch.Generator().manual_seed(3)
    factors = XsFactors(*(torch.randn(*shape, generator=generator, dtype=torch.float64)
                          for shape in ((4, 10), (4, 4), (12, 4))))  # fmt: skip
    lora_A, lora_B = xs_to_lora(factors, xs_scaling=1.7)
    torch.testing.assert_close(lora_scaling(4, 4) * lora_B @ lora_A, factors.delta(1.7), rtol=1e-12, atol=1e-12)
    again = lora_to_xs(lora_A, lora_B, lora_scale=1.0, xs_scaling=1.7)
    torch.testing.assert_close(again.delta(1.7), factors.delta(1.7), rtol=1e-12, atol=1e-12)


def test_rslora_scaling() -> None:
    assert lora_scaling(16, 8) == 0.5 and lora_scaling(16, 8, rslora=True) == 2.0


@pytest.mark.parametrize("bad", [dict(rank=1), dict(rank=40)])
def test_a_rank_that_cannot_hold_the_lora_is_refused(bad: dict) -> None:
    lora_A, lora_B = random_lora(2, 12, 10, seed=0)
    with pytest.raises(ValueError, match="rank"):
        lora_to_xs(lora_A, lora_B, 1.0, 1.0, **bad)


@pytest.mark.parametrize("rslora", [False, True])
def test_a_peft_lora_converted_computes_peft_outputs(rslora: bool, tmp_path: Path) -> None:
    base = tiny_bert(seed=1)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value", "dense"], rank_pattern={"value": 2},
        alpha_pattern={"query": 3}, use_rslora=rslora, init_lora_weights=False, lora_dropout=0.0,
    )  # fmt: skip
    peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).last_hidden_state
    rank, xs_alpha = 4, 4.0  # the bundle's rank (the largest), LoRA-XS scaling 1
    peft_model.save_pretrained(tmp_path / "lora")  # converted from the directory PEFT writes, as a user's would be
    projections, cores = {}, {}
    for name, module in read_peft_lora(tmp_path / "lora").modules.items():
        factors = lora_to_xs(module.A, module.B, module.scale, xs_alpha / rank, rank=rank)
        projections[name], cores[name] = Projection(factors.A, factors.B), factors.core
    assert {p.rank for p in projections.values()} == {4}  # every module padded to the bundle's rank
    assert set(projections) == set(target_names(base, ["query", "value", "dense"]))  # PEFT's modules are ours
    ours = copy.deepcopy(base)
    inject_lora_xs(ours, ["query", "value", "dense"], projections, alpha=xs_alpha)
    with torch.no_grad():
        for name, layer in lora_xs_layers(ours).items():
            layer.core.weight.copy_(cores[name])
        actual = ours(input_ids=ids).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)

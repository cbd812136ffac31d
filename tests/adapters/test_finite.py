"""The fused finiteness check names the same tensor as a loop over the tensors does."""

from __future__ import annotations

import math

import pytest
import torch

from adapters.finite import first_non_finite


def _loop(tensors: dict[str, torch.Tensor]) -> str | None:
    return next((k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)


@pytest.mark.parametrize("seed", range(20))
def test_first_non_finite_agrees_with_a_loop(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    tensors = {}
    for index in range(12):
        shape = tuple(int(d) for d in torch.randint(0, 5, (2,), generator=generator))  # empty tensors included
        dtype = dtypes[int(torch.randint(0, len(dtypes), (1,), generator=generator))]
        tensor = (torch.randn(shape, generator=generator) * 1e4).to(dtype)
        if tensor.numel() and float(torch.rand(1, generator=generator)) < 0.15:
            tensor.view(-1)[int(torch.randint(0, tensor.numel(), (1,), generator=generator))] = [
                math.nan,
                math.inf,
                -math.inf,
            ][index % 3]
        tensors[f"t{index}"] = tensor
    tensors["counts"] = torch.tensor([1, 2, 3])  # not floating point: not this check's business
    assert first_non_finite(tensors) == _loop(tensors)


def test_large_finite_values_are_finite() -> None:
    """A sum of squares would overflow to inf; the max-|x| reduction does not."""
    assert first_non_finite({"big": torch.full((1000,), 3e38)}) is None
    assert first_non_finite({"ok": torch.ones(3), "bad": torch.tensor([1.0, math.nan])}) == "bad"
    assert first_non_finite({}) is None

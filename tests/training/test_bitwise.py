"""Refactorings keep the numbers: every tensor of a ``--seed 0`` bundle is bit-identical to the reference.

The reference (``fixtures/bitwise.json``, sha256 per tensor) holds one set per machine class, made with the
test suite's thread count (``CAVEAT_TEST_THREADS``, 2): CPU kernels' rounding depends on the CPU and on the
thread count. A run passes when it equals one class's set exactly. How to regenerate or add a set:
:mod:`tests.training.bitwise`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapters.manifest import TENSOR_FILES
from tests.training.bitwise import RUNS, machine_class, references, tensor_hashes, train


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
def test_bundle_tensors_are_bit_identical_to_the_reference(run: str, tiny_base: Path, tmp_path: Path) -> None:
    if torch.get_num_threads() != 2:
        pytest.fail("the reference was made with 2 torch threads; run with CAVEAT_TEST_THREADS=2")
    sets = {machine: runs[run] for machine, runs in references().items() if run in runs}
    assert sets, f"no machine class has a reference for {run}: add one (tests/training/bitwise.py)"
    actual = tensor_hashes(train(run, tmp_path, tiny_base))
    if any(actual == expected for expected in sets.values()):
        return
    changed = {machine: sorted(n for n in expected.keys() | actual.keys() if actual.get(n) != expected.get(n))
               for machine, expected in sets.items()}  # fmt: skip
    nearest = min(changed, key=lambda machine: len(changed[machine]))
    pytest.fail(
        f"tensors changed against every machine class's reference; nearest ({nearest}): {changed[nearest]}. "
        f"This machine is {machine_class()!r}: without a reference of its own, add one (tests/training/bitwise.py)"
    )


def test_tensor_hashes_see_a_one_ulp_change(tmp_path: Path) -> None:
    """The check can fail: one ulp in one tensor changes its hash and no other."""
    tensors = {"w": torch.linspace(0, 1, 10), "v": torch.ones(3)}
    for name in TENSOR_FILES:
        save_file(tensors, tmp_path / name)
    before = tensor_hashes(tmp_path)
    bumped = tensors | {"w": torch.nextafter(tensors["w"], torch.full_like(tensors["w"], 2.0))}
    save_file(bumped, tmp_path / TENSOR_FILES[1])
    after = tensor_hashes(tmp_path)
    assert {k for k in before if before[k] != after[k]} == {f"{TENSOR_FILES[1]}::w"}

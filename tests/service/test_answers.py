"""Refactorings of the prediction path keep the answers: the fixed request set of :mod:`tests.service.answers`
(every predictive, overrides, text pairs, multiple choice, OOD inputs, V2, two adapters in one step; tiny models
and the embedded MiniLM) is answered exactly as the reference for this machine class records."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.service.answers import answers, references
from tests.training.bitwise import machine_class


@pytest.mark.slow
def test_served_answers_equal_the_reference(tmp_path: Path) -> None:
    if torch.get_num_threads() != 2:
        pytest.fail("the reference was made with 2 torch threads; run with CAVEAT_TEST_THREADS=2")
    sets = references()
    assert machine_class() in sets, (
        f"no reference of served answers for this machine class ({machine_class()!r}): add one from a commit whose "
        "answers another class's set vouches for (tests/service/answers.py)"
    )
    expected, actual = sets[machine_class()], answers(tmp_path)
    changed = sorted(name for name in expected.keys() | actual.keys() if expected.get(name) != actual.get(name))
    assert not changed, f"answers changed: {changed}"


def test_the_comparison_sees_a_one_ulp_change() -> None:
    """The check can fail: one ulp in one probability of one answer is a difference."""
    answer = {"results": [{"probs": [0.25, 0.75]}]}
    nudged = {"results": [{"probs": [0.25, float(torch.nextafter(torch.tensor(0.75), torch.tensor(1.0)))]}]}
    assert answer != nudged and answer == {"results": [{"probs": [0.25, 0.75]}]}

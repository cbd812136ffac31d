"""Refactorings of the prediction path keep the answers: the fixed request set of :mod:`tests.service.answers`
(every predictive, overrides, text pairs, multiple choice, OOD inputs, V2, two adapters in one step; tiny models
and the embedded MiniLM) is answered exactly as the reference for this machine class records.

On a machine class without a reference of its own (a new CI machine), the answers must be close to every
recorded class's instead: CPU kernels round differently by vector width, and the recorded classes differ by
at most 5e-4 relative (1.2e-7 absolute) on any number, while a change of the maths (a wrong temperature, sample
count or rule) moves answers by far more than :data:`ACROSS_CLASSES` allows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.service.answers import answers, references
from tests.training.bitwise import machine_class

ACROSS_CLASSES = {"rel_tol": 2e-3, "abs_tol": 1e-5}  # math.isclose tolerances between machine classes


def differences(expected: Any, actual: Any, path: str = "", rel_tol: float = 0.0, abs_tol: float = 0.0) -> list[str]:
    """Paths where ``actual`` differs from ``expected``: numbers beyond the tolerances (exact by default),
    anything else when unequal."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        return [
            found
            for key in sorted(expected.keys() | actual.keys())
            for found in differences(expected.get(key), actual.get(key), f"{path}/{key}", rel_tol, abs_tol)
        ]
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        return [
            found
            for i, (e, a) in enumerate(zip(expected, actual, strict=True))
            for found in differences(e, a, f"{path}[{i}]", rel_tol, abs_tol)
        ]
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (expected, actual))
    if numbers and math.isclose(expected, actual, rel_tol=rel_tol, abs_tol=abs_tol):
        return []
    return [] if expected == actual else [path]


@pytest.mark.slow
def test_served_answers_equal_the_reference(tmp_path: Path) -> None:
    if torch.get_num_threads() != 2:
        pytest.fail("the reference was made with 2 torch threads; run with CAVEAT_TEST_THREADS=2")
    sets, actual = references(), answers(tmp_path)
    if machine_class() in sets:
        changed = differences(sets[machine_class()], actual)
        assert not changed, f"answers changed: {changed}"
        return
    changed = {machine: differences(expected, actual, **ACROSS_CLASSES) for machine, expected in sets.items()}
    assert not any(changed.values()), (
        f"this machine class ({machine_class()!r}) has no reference of its own, and its answers are not close to "
        f"every recorded class's: {changed}; add one from a commit whose answers another class's set vouches for "
        "(tests/service/answers.py)"
    )


def test_the_comparison_sees_a_one_ulp_change() -> None:
    """The check can fail: one ulp in one probability of one answer is a difference."""
    answer = {"results": [{"probs": [0.25, 0.75]}]}
    nudged = {"results": [{"probs": [0.25, float(torch.nextafter(torch.tensor(0.75), torch.tensor(1.0)))]}]}
    assert differences(answer, nudged) == ["/results[0]/probs[1]"]
    assert differences(answer, {"results": [{"probs": [0.25, 0.75]}]}) == []


def test_across_classes_the_comparison_sees_a_change_of_the_maths() -> None:
    """Rounding between machine classes passes; a probability moved by 0.5% (a temperature of 1.01 moves a
    confident answer that much) or a changed flag does not."""
    answer = {"probs": [0.0355517, 0.9644483], "abstain": False, "mi": 2.4545e-4}
    rounded = {"probs": [0.0355541, 0.9644459], "abstain": False, "mi": 2.4557e-4}
    assert differences(answer, rounded, **ACROSS_CLASSES) == []
    moved = {"probs": [0.0355517 * 1.005, 0.9644483], "abstain": False, "mi": 2.4545e-4}
    assert differences(answer, moved, **ACROSS_CLASSES) == ["/probs[0]"]
    flipped = {**answer, "abstain": True}
    assert differences(answer, flipped, **ACROSS_CLASSES) == ["/abstain"]

"""Seeded splits and subsets: the only places examples are drawn at random."""

from __future__ import annotations

import random

from training.data.examples import DataError, Example

# --validation-size below 1 is a fraction of the training data, kept within these many examples
VALIDATION_FLOOR, VALIDATION_CAP = 100, 1000


def carved_size(size: float, available: int) -> int:
    """``--validation-size`` as a count: a whole number ≥ 1 is the count, a fraction in (0, 1) is that share
    of ``available`` examples, at least ``VALIDATION_FLOOR`` and at most ``VALIDATION_CAP``."""
    if size >= 1 and float(size).is_integer():
        return int(size)
    if not 0 < size < 1:
        raise DataError(f"--validation-size {size:g}: use a count (a whole number ≥ 1) or a fraction in (0, 1)")
    return min(VALIDATION_CAP, max(VALIDATION_FLOOR, round(size * available)))


def carve(examples: list[Example], size: int, seed: int, split: str = "validation") -> tuple[list[Example], list]:
    """Split off a seeded random ``size`` examples: ``(rest, carved)``."""
    if len(examples) < 2 * max(size, 1):
        raise DataError(
            f"{len(examples)} examples are too few to carve a {split} split of {size} from the training data: "
            f"lower --validation-size or pass --{split}-file"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    carved = set(order[:size])
    return [e for i, e in enumerate(examples) if i not in carved], [examples[i] for i in sorted(carved)]


def subset(examples: list, limit: int | None, seed: int) -> list:
    """At most ``limit`` items, a seeded random choice kept in their original order."""
    if limit is None or len(examples) <= limit:
        return examples
    chosen = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in chosen]

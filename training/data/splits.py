"""Seeded splits and subsets: the only places examples are drawn at random."""

from __future__ import annotations

import random

from training.data.examples import DataError, Example


def carve(examples: list[Example], size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Split off a seeded random ``size`` examples: ``(rest, carved)``."""
    if len(examples) < 2 * max(size, 1):
        raise DataError(f"{len(examples)} examples are too few to carve a split of {size}")
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

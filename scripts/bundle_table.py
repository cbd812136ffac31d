"""Markdown table of bundles' evaluation cards (MAP and posterior side by side), with the mean and spread.

.venv/bin/python scripts/bundle_table.py bundles/sst2-minilm runs/seeds/seed1 ...
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

COLUMNS = [
    ("test", "map", "accuracy", "MAP acc"),
    ("test", "posterior", "accuracy", "post. acc"),
    ("test", "map", "ece", "MAP ECE"),
    ("test", "posterior", "ece", "post. ECE"),
    ("test", "map", "nll", "MAP NLL"),
    ("test", "posterior", "nll", "post. NLL"),
    ("shift", "map", "ece", "shift MAP ECE"),
    ("shift", "posterior", "ece", "shift post. ECE"),
    ("shift", "map", "nll", "shift MAP NLL"),
    ("shift", "posterior", "nll", "shift post. NLL"),
    ("ood", "map", "max_prob", "OOD MAP 1−maxp"),
    ("ood", "posterior", "entropy", "OOD post. H"),
    ("ood", "posterior", "mutual_information", "OOD post. MI"),
]


def row(directory: Path) -> list[float | None]:
    card = json.loads((directory / "bundle.json").read_text())["eval"]
    return [card.get(split, {}).get(side, {}).get(key) for split, side, key, _ in COLUMNS]


def main(paths: list[str]) -> None:
    rows = {path: row(Path(path)) for path in paths}
    print("| bundle | " + " | ".join(label for *_, label in COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for path, values in rows.items():
        print(f"| {path} | " + " | ".join("—" if v is None else f"{v:.4f}" for v in values) + " |")
    columns = list(zip(*rows.values(), strict=True))
    means = [statistics.mean(c) if None not in c else None for c in columns]
    spreads = [statistics.stdev(c) if None not in c and len(c) > 1 else None for c in columns]
    print("| mean | " + " | ".join("—" if v is None else f"{v:.4f}" for v in means) + " |")
    print("| std | " + " | ".join("—" if v is None else f"{v:.4f}" for v in spreads) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])

"""The learning curve's table (docs/results.md): one row per training size and method, from the JSON files of
``scripts/learning_curve.sh``.

.venv/bin/python scripts/learning_curve_table.py docs/results/learning-curve-500.json ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [  # (split, metric, header)
    ("test", "accuracy", "test acc"),
    ("test", "ece", "test ECE"),
    ("test", "nll", "test NLL"),
    ("shift", "accuracy", "shift acc"),
    ("shift", "ece", "shift ECE"),
    ("shift", "nll", "shift NLL"),
    ("ood", "max_prob", "BBC AUROC 1−maxp"),
    ("ood", "mutual_information", "BBC AUROC MI"),
    ("ood", "ood_score", "BBC AUROC ood_score"),
    ("shift", "ood_score_auroc", "shift AUROC ood_score"),
]


def table(paths: list[str]) -> str:
    header = "| train size | method | " + " | ".join(h for *_, h in COLUMNS) + " | train s |"
    lines = [header, "|---:|---|" + "---:|" * (len(COLUMNS) + 1)]
    for path in paths:
        run = json.loads(Path(path).read_text())
        size = run["config"].get("train_limit") or "all"
        for row in run["rows"]:
            cells = [row.get(split, {}).get(key) for split, key, _ in COLUMNS]
            text = " | ".join("—" if v is None else f"{v:.3f}" for v in cells)
            lines.append(f"| {size} | {row['posterior']} | {text} | {row['train_seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1:]))

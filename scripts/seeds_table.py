"""Render the published-protocol table (docs/results.md) from scripts/seeds_table.sh's JSONs: per method, test
and shift ACC / ECE / NLL / Brier as mean ± std over the seeds found, the change of ECE and NLL from the same
run's MAP, and beside the Laplace rows the published MAP → Laplace change of the nearest setting.

Usage::

    python scripts/seeds_table.py SETTING            # e.g. longrun-glue-sst2-minilm-2000
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "seeds"
METRICS = ("accuracy", "ece", "nll", "brier")
MAIN_PART = "more"  # the main variant's methods run in further parts (-more-<methods>), each on the seed's MAP
# The published MAP → Laplace changes (ECE, NLL) of the nearest setting (docs/methods.md, published results)
PUBLISHED = {
    "sst2": ("RoBERTa-large SST-2, r=16, Laplace at epoch 20", (0.026, 0.141),
             {"laplace-diag": (0.017, 0.137), "laplace-kron": (0.015, 0.136)}),
    "arc": ("LLaMA-2-7B ARC-C, r=64", (0.228, 1.406),
            {"laplace-diag": (0.064, 1.000), "laplace-kron": (0.070, 1.001)}),
}  # fmt: skip


def load(setting: str) -> dict[str, list[dict]]:
    """Variant-qualified method name → its row in every seed's JSON."""
    rows: dict[str, list[dict]] = defaultdict(list)

    def name_parts(path: Path) -> tuple[str, int]:
        """``<setting>[-<part>]-seed<N>.json`` → (part, N)."""
        part, seed = path.stem[len(setting) :].rsplit("-seed", 1)
        return part.lstrip("-"), int(seed)

    def part(path: Path) -> str:
        return name_parts(path)[0]

    paths = RESULTS.glob(f"{setting}*-seed*.json")  # the main variant first (its MAP heads the table), its parts next

    def main_variant(name: str) -> bool:
        return name == "" or name.split("-")[0] == MAIN_PART

    for path in sorted(paths, key=lambda p: (part(p) != "", not main_variant(part(p)), part(p), p.name)):
        variant = "" if main_variant(part(path)) else part(path)
        seed = name_parts(path)[1]
        for row in json.loads(path.read_text())["rows"]:
            name = row["posterior"] if not variant else f"{row['posterior']} ({variant})"
            rows[name].append(row | {"seed": seed})
    return rows


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def change(found: list[dict], maps: dict[int, dict], metric: str) -> str:
    """The mean relative change of ``metric`` on test from the same seed's MAP (a row measured on some seeds only
    is compared with those seeds' MAPs)."""
    ratios = [
        row["test"][metric] / maps[row["seed"]]["test"][metric] - 1
        for row in found
        if row["seed"] in maps and maps[row["seed"]]["test"][metric]
    ]
    return f"{100 * statistics.mean(ratios):+.0f}%" if ratios else "—"


def render(setting: str) -> str:
    rows = load(setting)
    if "map" not in rows:
        raise SystemExit(f"no MAP row for {setting} in {RESULTS}")
    published = next((v for k, v in PUBLISHED.items() if k in setting), None)
    seeds = len(rows["map"])
    lines = [
        f"{setting}: {seeds} seed{'s' if seeds > 1 else ''} (mean ± std); ΔECE and ΔNLL from the same seed's MAP"
        + (f"; published: {published[0]}" if published else ""),
        "",
        "| method | test acc | ECE | NLL | Brier | ΔECE | ΔNLL | shift acc | shift ECE | shift NLL "
        "| published ΔECE / ΔNLL |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, found in rows.items():
        base = name.split(" (")[0]
        # a variant that trained its own MAP (L-LoRA-S: its projections move, another model) is compared with it
        own_map = rows.get(f"map{name[len(base) :]}", rows["map"])
        maps = {row["seed"]: row for row in own_map}
        test = {m: [r["test"][m] for r in found] for m in METRICS}
        shift = {m: [r["shift"][m] for r in found if "shift" in r] for m in METRICS}
        cited = "—"
        if published and base in published[2]:
            (map_ece, map_nll), (ece, nll) = published[1], published[2][base]
            cited = f"{100 * (ece / map_ece - 1):+.0f}% / {100 * (nll / map_nll - 1):+.0f}%"
        shift_cells = [cell(shift[m]) if shift[m] else "—" for m in ("accuracy", "ece", "nll")]
        label = name if base != "default" else f"default → {', '.join(sorted({r['calibration'] for r in found}))}"
        lines.append(
            f"| {label} | "
            + " | ".join(cell(test[m]) for m in METRICS)
            + f" | {change(found, maps, 'ece')} | {change(found, maps, 'nll')} | "
            + " | ".join(shift_cells)
            + f" | {cited} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(sys.argv[1]))

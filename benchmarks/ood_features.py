"""Which features and which score detect out-of-distribution inputs: a probe on the embedded MiniLM.

The frozen base's mean-pooled hidden states are extracted once per split and max length (every layer, cached
in ``--cache``), then each variant (features x normalisation x score) is fitted on ``--train-limit``
training snippets of the embedded SST-2 task, its p-value threshold is taken from the validation split
(:data:`adapters.ood.DEFAULT_FRACTION` of validation inputs abstain), and it is evaluated on the SST-2 test
split (in distribution) against BBC News (out of domain) and the drug reviews (domain shift)::

    python benchmarks/ood_features.py [--train-limit 3000] [--shift-limit 500] [--ood-limit 500] \
        [--max-lengths 128 64] [--cache /tmp/caveat-ood-features] [--json docs/results/ood-features-minilm-cpu.json]

Columns: AUROC of the score (in distribution = negatives), the fraction of SST-2 test inputs answered and of
BBC / drug reviews flagged at the validation threshold, fit time, state size and score time per input (the
score alone: the features come from the forward the server already runs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModel, AutoTokenizer

from adapters.embedded import resolve_model
from adapters.errors import OodFitError
from adapters.model import pool
from adapters.ood import FeatureNorm, OodMethod, fit_ood_score
from training.data import bbc_news, drug_reviews, sst2_task
from training.metrics import auroc


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-limit", type=int, default=3000, help="training snippets the scores are fitted on")
    parser.add_argument("--shift-limit", type=int, default=500, help="drug reviews (seeded subset)")
    parser.add_argument("--ood-limit", type=int, default=500, help="BBC News articles (seeded subset)")
    parser.add_argument("--max-lengths", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/caveat-ood-features"))
    parser.add_argument("--json", type=Path, default=Path("docs/results/ood-features-minilm-cpu.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extract-only", action="store_true", help="fill the feature cache and stop")
    return parser.parse_args()


# ------------------------------------------------------------------------------------------------ data


def seeded_subset(items: Sequence, limit: int | None, seed: int) -> list:
    """At most ``limit`` items, chosen as caveat-train chooses its evaluation subsets."""
    if limit is None or len(items) <= limit:
        return list(items)
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]


def texts(args: argparse.Namespace) -> dict[str, list[str]]:
    """The probe's splits as texts; the task is split as caveat-train splits it (1,000 validation, seed 0)."""
    task = sst2_task(validation_size=1000, seed=0)
    return {
        "train": [e.text for e in seeded_subset(task.train, args.train_limit, args.seed)],
        "validation": [e.text for e in task.validation],
        "test": [e.text for e in task.test],
        "shift": [e.text for e in seeded_subset(drug_reviews(task.labels), args.shift_limit, args.seed)],
        "ood": seeded_subset(bbc_news(), args.ood_limit, args.seed),
    }


def train_labels(args: argparse.Namespace) -> Tensor:
    task = sst2_task(validation_size=1000, seed=0)
    return torch.tensor([e.label for e in seeded_subset(task.train, args.train_limit, args.seed)])


# -------------------------------------------------------------------------------------------- features


@torch.no_grad()
def pooled_layers(model, tokenizer, batch: Sequence[str], max_length: int) -> Tensor:
    """Mean-pooled hidden states of every layer (embeddings first): ``(n, L + 1, H)``."""
    encoded = tokenizer(list(batch), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = model(**encoded, output_hidden_states=True).hidden_states
    return torch.stack([pool(h, encoded["attention_mask"], "mean") for h in hidden], dim=1)


def extract(model, tokenizer, items: Sequence[str], max_length: int, batch_size: int = 32) -> Tensor:
    """``(n, L + 1, H)`` in input order; batches of similar length so little is padding."""
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    out: list[Tensor | None] = [None] * len(items)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, row in zip(chunk, pooled_layers(model, tokenizer, [items[i] for i in chunk], max_length), strict=True):
            out[i] = row
    return torch.stack(out)  # type: ignore[arg-type]


def cached_features(args: argparse.Namespace, split_texts: dict[str, list[str]], max_length: int) -> dict:
    """Split → ``(n, L + 1, H)``, extracted once per content and max length."""
    args.cache.mkdir(parents=True, exist_ok=True)
    model = tokenizer = None
    features = {}
    for split, items in split_texts.items():
        digest = hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]
        path = args.cache / f"minilm-{split}-{max_length}-{digest}.pt"
        if not path.is_file():
            if model is None:
                folder = resolve_model("minilm")
                model, tokenizer = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
            start = time.perf_counter()
            torch.save(extract(model, tokenizer, items, max_length), path)
            print(f"extracted {split} ({len(items)} texts, {max_length} tokens) in {time.perf_counter() - start:.0f} s")
        features[split] = torch.load(path)
    return features


# -------------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    features: str  # the frozen base's mean-pooled layer(s): layer6 (last), layer3, layer3+6 (concatenated)
    norm: FeatureNorm
    method: OodMethod
    shrinkage: float | None = None  # None: Ledoit–Wolf
    rank: int | None = None  # None: dense when it fits the budget
    k: int = 10

    @property
    def options(self) -> dict:
        if self.method is OodMethod.KNN:
            return {"norm": self.norm, "k": self.k}
        return {"norm": self.norm, "shrinkage": self.shrinkage, "rank": self.rank}


def select(layers: Tensor, which: str, norm: FeatureNorm) -> Tensor:
    """``(n, L + 1, H)`` → the variant's features ``(n, D)``: ``layerI`` (0 = embeddings) or ``layerI+J``, the
    concatenation, each layer normalised first under l2 so that neither dominates."""
    parts = [layers[:, int(i)] for i in which.removeprefix("layer").split("+")]
    if len(parts) > 1 and norm is FeatureNorm.L2:
        parts = [torch.nn.functional.normalize(p, dim=-1) for p in parts]
    return torch.cat(parts, dim=1)


def variants() -> list[Variant]:
    grid = [
        Variant(features, norm, method)
        for features in ("layer6", "layer3", "layer3+6")
        for norm in FeatureNorm
        for method in OodMethod
    ]
    l2, mahalanobis = FeatureNorm.L2, OodMethod.MAHALANOBIS
    grid += [Variant(f"layer{i}", l2, mahalanobis) for i in (1, 2, 4, 5)]
    for features in ("layer6", "layer3"):
        grid += [Variant(features, l2, mahalanobis, shrinkage=s) for s in (0.0, 0.1, 0.5)]
        grid += [Variant(features, l2, mahalanobis, rank=r) for r in (16, 64)]
        grid += [Variant(features, l2, OodMethod.KNN, k=k) for k in (1, 50)]
    grid += [Variant("layer3+6", l2, mahalanobis, shrinkage=0.5)]
    grid += [Variant("layer3+6", l2, mahalanobis, rank=r) for r in (16, 64, 256)]
    return grid


def per_input_us(score, features: Tensor, repeats: int = 5) -> float:
    """Median time to score ``features`` in one call, per input (after one warm-up call)."""
    score.score(features)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        score.score(features)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / len(features) * 1e6


def evaluate(variant: Variant, features: dict[str, Tensor], labels: Tensor) -> dict:
    x = {split: select(layers, variant.features, variant.norm) for split, layers in features.items()}
    start = time.perf_counter()
    try:
        score = fit_ood_score(variant.method, x["train"], labels, **variant.options).calibrate(x["validation"])
    except OodFitError as exc:  # e.g. no shrinkage on features that span fewer than D directions
        return {**asdict(variant), "dim": x["train"].shape[1], "refused": str(exc)}
    fit_s = time.perf_counter() - start
    score_us = per_input_us(score, torch.cat([x["test"], x["shift"], x["ood"]]))
    scores = {split: score.score(x[split]) for split in ("validation", "test", "shift", "ood")}
    tau = score.threshold()
    flagged = {split: (score.pvalue(s) < tau).double().mean().item() for split, s in scores.items()}
    return {
        **asdict(variant),
        "dim": score.dim,
        "rank": getattr(getattr(score, "gaussian", None), "rank", None),
        "shrinkage": getattr(score, "shrinkage", None),
        "auroc_ood": auroc(scores["test"], scores["ood"]),
        "auroc_shift": auroc(scores["test"], scores["shift"]),
        "validation_flagged": flagged["validation"],
        "test_answered": 1.0 - flagged["test"],
        "ood_flagged": flagged["ood"],
        "shift_flagged": flagged["shift"],
        "fit_s": fit_s,
        "state_kb": score.nbytes / 1000,
        "score_us_per_input": score_us,
    }


def describe(row: dict) -> str:
    method = row["method"] if row["method"] != OodMethod.KNN else f"knn k={row['k']}"
    if row["method"] != OodMethod.KNN:
        alpha = "LW" if row["shrinkage"] is None else f"{row['shrinkage']:.3f}"
        method += f" α={alpha}" + (f" r={row['rank']}" if row["rank"] not in (None, row["dim"]) else "")
    return f"{row['max_length']} | {row['features']} | {row['norm']} | {method}"


def table(rows: Sequence[dict]) -> str:
    lines = [
        "| max len | features | norm | score | AUROC BBC | AUROC drug | SST-2 answered | BBC flagged | "
        "drug flagged | val flagged | fit s | state kB | score µs/input |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "refused" in row:
            lines.append(f"| {describe(row)} | refused: {row['refused']} |||||||||")
            continue
        lines.append(
            f"| {describe(row)} | {row['auroc_ood']:.3f} | {row['auroc_shift']:.3f} | {row['test_answered']:.3f} | "
            f"{row['ood_flagged']:.3f} | {row['shift_flagged']:.3f} | {row['validation_flagged']:.3f} | "
            f"{row['fit_s']:.2f} | {row['state_kb']:.0f} | {row['score_us_per_input']:.1f} |"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    split_texts = texts(args)
    labels = train_labels(args)
    rows = []
    for max_length in args.max_lengths:
        features = cached_features(args, split_texts, max_length)
        if args.extract_only:
            continue
        rows += [{"max_length": max_length, **evaluate(v, features, labels)} for v in variants()]
    if args.extract_only:
        return
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        sizes = {split: len(items) for split, items in split_texts.items()}
        machine = {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "platform": platform.platform(),
            "note": "2-core CPU shared with other work: times are upper bounds",
        }
        payload = {"command": vars(args) | {"cache": str(args.cache), "json": str(args.json)}, "sizes": sizes}
        args.json.write_text(json.dumps({**payload, "machine": machine, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Short out-of-domain texts against the feature-space OOD score: does the ``ood`` rule catch one-line headlines and
first sentences of news articles, and at what in-distribution cost — pooled p-values against p-values per input
length (Mondrian: each input compared with the validation inputs of its own length bucket)?

The score is the embedded default's (Mahalanobis, tied covariance, on the frozen MiniLM's mean-pooled layers 3 and
6, L2-normalised, fitted on 3,000 training snippets); thresholds come from the validation split only; the short
texts are built from BBC News (the title line of each article, and the first sentence of its body) and are never
fitted on::

    python -m benchmarks.short_ood [--json docs/results/short-ood-minilm-cpu.json]

``--variant LAYERS:METHOD`` (repeatable, e.g. ``4+6:knn``) measures other scores the trainer offers
(``--ood-layers``, ``--ood-method``) on the same sets instead, pooled p-values only.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoTokenizer

from adapters.embedded import resolve_model
from adapters.ood import fit_ood_score
from adapters.ood.features import default_feature_layers
from adapters.ood.pvalues import ood_pvalue, sorted_reference
from benchmarks.ood_features import cached_features, seeded_subset
from benchmarks.serve import machine
from training.data.embedded import bbc_news_articles, sst2_task

FRACTIONS = (0.01, 0.05, 0.10, 0.15)
BUCKETS = 4  # length buckets: quartiles of the validation inputs' token counts


def short_texts() -> dict[str, list[str]]:
    """Each BBC article's title line, and the first sentence of its body."""
    articles = bbc_news_articles()
    firsts = [re.split(r"(?<=[.!?])\s", body, maxsplit=1)[0] or title for title, body in articles]
    return {"bbc_titles": [title for title, _ in articles], "bbc_first_sentences": firsts}


def pvalues(scores: Tensor, lengths: Tensor, val_scores: Tensor, val_lengths: Tensor, edges: Tensor | None) -> Tensor:
    """Conformal p-values against all validation inputs (``edges`` None) or those of the same length bucket."""
    if edges is None:
        return ood_pvalue(scores, sorted_reference(val_scores))
    out = torch.empty_like(scores)
    bucket, val_bucket = torch.bucketize(lengths, edges), torch.bucketize(val_lengths, edges)
    for b in range(len(edges) + 1):
        mine = bucket == b
        out[mine] = ood_pvalue(scores[mine], sorted_reference(val_scores[val_bucket == b]))
    return out


def flat_features(features: dict[str, Tensor], layers: list[int]) -> dict[str, Tensor]:
    """As the trainer's features: each layer's pooled state L2-normalised, then concatenated (index 0: embeddings)."""
    return {split: F.normalize(f[:, layers], dim=-1).flatten(1) for split, f in features.items()}


def variant_row(variant: str, features: dict[str, Tensor], train_labels: Tensor) -> dict:
    """Shares flagged by one score (``LAYERS:METHOD``) with pooled p-values, at each validation fraction."""
    layer_text, method = variant.split(":")
    flat = flat_features(features, [int(layer) for layer in layer_text.split("+")])
    score = fit_ood_score(method, flat["train"], train_labels)
    reference = sorted_reference(score.score(flat["validation"]))
    p = {s: ood_pvalue(score.score(f), reference) for s, f in flat.items() if s != "train"}
    row: dict = {"variant": variant}
    for fraction in FRACTIONS:
        threshold = torch.quantile(p["validation"].double(), fraction).item()
        row[str(fraction)] = {s: float((values < threshold).double().mean()) for s, values in p.items()}
        print(variant, fraction, " ".join(f"{s}={v:.3f}" for s, v in row[str(fraction)].items()), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-limit", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/caveat-ood-features"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--variant", action="append", default=[], help="LAYERS:METHOD, e.g. 4+6:knn (repeatable)")
    args = parser.parse_args()
    task = sst2_task(validation_size=1000, seed=0)
    train = seeded_subset(task.train, args.train_limit, args.seed)
    split_texts = {"train": [e.text for e in train], "validation": [e.text for e in task.validation],
                   "test": [e.text for e in task.test], **short_texts()}  # fmt: skip
    features = cached_features(args, split_texts, max_length=128)
    train_labels = torch.tensor([e.label for e in train])
    if args.variant:
        result = {"machine": machine(), "rows": [variant_row(v, features, train_labels) for v in args.variant]}
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return
    layers = list(default_feature_layers(6))
    flat = flat_features(features, layers)
    score = fit_ood_score("mahalanobis", flat["train"], train_labels)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    lengths = {s: torch.tensor([len(tokenizer(t, truncation=True, max_length=128)["input_ids"]) for t in items])
               for s, items in split_texts.items()}  # fmt: skip
    scores = {split: score.score(f) for split, f in flat.items()}
    val_lengths = lengths["validation"].double()
    edges = torch.quantile(val_lengths, torch.linspace(0, 1, BUCKETS + 1)[1:-1].double()).round()
    result = {"machine": machine(), "edges": edges.tolist(), "rows": []}
    splits = ("validation", "test", "bbc_titles", "bbc_first_sentences")
    by_kind = {
        name: {s: pvalues(scores[s], lengths[s].double(), scores["validation"], val_lengths, bucket_edges)
               for s in splits}
        for name, bucket_edges in (("pooled", None), ("per length", edges))
    }  # fmt: skip
    # either: the smaller of the two p-values (flag when either reference finds the input unusual): what
    # caveat-train --ood-length-buckets 4 ships, computed by the library itself
    score.calibrate(flat["validation"], lengths["validation"], BUCKETS)
    by_kind["either"] = {s: score.pvalue(scores[s], lengths[s]) for s in splits}
    for name, p in by_kind.items():
        for fraction in FRACTIONS:
            if name == "either":  # the shipped rule's threshold
                threshold = score.threshold(fraction)
            else:  # abstain when p < τ on ~fraction of validation
                threshold = torch.quantile(p["validation"], fraction).item()
            flagged = {s: float((values < threshold).double().mean()) for s, values in p.items()}
            result["rows"].append({"p-values": name, "fraction": fraction, **flagged})
    print(f"{'p-values':>10} {'fraction':>8} " + " ".join(f"{s:>20}" for s in p))
    for row in result["rows"]:
        print(f"{row['p-values']:>10} {row['fraction']:>8} " + " ".join(f"{row[s]:>20.3f}" for s in p))
    median = {s: float(v.double().median()) for s, v in lengths.items()}
    result["median_tokens"] = median
    print("median tokens:", median)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

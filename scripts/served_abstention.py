"""How often a running caveat-serve answers, and why it abstains, on the embedded evaluation sets: SST-2 test
(in distribution), drug reviews (shift) and BBC News (out of distribution), with the bundle's own rules.

python scripts/served_abstention.py [--url http://127.0.0.1:8000] [--adapter sst2-minilm] [--limit 500]

The shift and OOD sets are the trainer's seeded subsets (same seed, same limit); texts are cut to the
server's per-text character limit (the model reads at most its max length in tokens anyway).
"""

from __future__ import annotations

import argparse
import json
import urllib.request
from collections import Counter

from training.data.embedded import bbc_news, drug_reviews, sst2_validation
from training.data.splits import subset

BATCH, MAX_CHARS = 32, 20_000


def served(url: str, adapter: str, texts: list[str]) -> Counter:
    """Counts of ``answered`` and of each abstention reason (its rule kind)."""
    counts: Counter = Counter()
    for start in range(0, len(texts), BATCH):
        inputs = [t[:MAX_CHARS] for t in texts[start : start + BATCH]]
        body = json.dumps({"adapter": adapter, "inputs": inputs}).encode()
        request = urllib.request.Request(f"{url}/v1/predict", body, {"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            for result in json.load(response)["results"]:
                counts[result["abstain_reason"].split(" ")[0] if result["abstain"] else "answered"] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--adapter", default="sst2-minilm")
    parser.add_argument("--limit", type=int, default=500, help="shift and OOD texts (the trainer's default)")
    parser.add_argument("--seed", type=int, default=0, help="the trainer's --seed")
    args = parser.parse_args()
    sets = {
        "sst2 test (in distribution)": [e.text for e in sst2_validation()],
        "drugreviews (shift)": [e.text for e in subset(drug_reviews(["negative", "positive"]), args.limit, args.seed)],
        "bbcnews (OOD)": subset(bbc_news(), args.limit, args.seed),
    }
    print("| set | inputs | answered | abstained | by reason |\n|---|---:|---:|---:|---|")
    for name, texts in sets.items():
        counts = served(args.url, args.adapter, texts)
        n = sum(counts.values())
        reasons = ", ".join(f"{k} {v / n:.1%}" for k, v in sorted(counts.items()) if k != "answered")
        print(f"| {name} | {n} | {counts['answered'] / n:.1%} | {1 - counts['answered'] / n:.1%} | {reasons} |")


if __name__ == "__main__":
    main()

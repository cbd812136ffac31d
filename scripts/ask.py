"""Send texts to a running caveat-serve and print one line per answer (used by scripts/main.sh).

python scripts/ask.py [--url http://127.0.0.1:8000] ADAPTER TEXT [TEXT ...]
"""

from __future__ import annotations

import argparse
import json
import urllib.request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("adapter")
    parser.add_argument("texts", nargs="+")
    args = parser.parse_args()
    body = json.dumps({"adapter": args.adapter, "inputs": args.texts}).encode()
    request = urllib.request.Request(f"{args.url}/v1/predict", body, {"content-type": "application/json"})
    with urllib.request.urlopen(request) as response:
        answer = json.load(response)
    for text, result in zip(args.texts, answer["results"], strict=True):
        u = result["uncertainty"]
        flag = f"ABSTAIN ({result['abstain_reason']})" if result["abstain"] else "answer"
        members = result.get("prediction_set")
        chosen = "" if members is None else "  set={" + ",".join(members) + "}"
        print(
            f"  {text[:58]!r:62} {result['label']:>8}  p={result['confidence']:.3f}  "
            f"entropy={u['entropy']:.3f}  MI={u['mutual_information']:.4f}{chosen}  {flag}"
        )
    adapter, timing = answer["adapter"], answer["timing"]
    print(f"  served by {adapter['name']}@{adapter['version']}, S={answer['num_samples']}, {timing['total_ms']:.0f} ms")


if __name__ == "__main__":
    main()

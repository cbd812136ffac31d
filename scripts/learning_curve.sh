#!/usr/bin/env bash
# The learning curve of docs/results.md (issue #17): the embedded default (caveat-train's own defaults) on
# SST-2 at 500, 2,000 and all training examples, comparing the MAP, temperature scaling, laplace-kron (the
# default prior) and SWAG on the test split, the drug-review shift and BBC News (the OOD score included).
# Usage: scripts/learning_curve.sh [SIZE ...]   (default: 500 2000 all; one
# docs/results/learning-curve-SIZE.json each; "all" takes ~15-20 min on a 2-core CPU, the others a few)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(500 2000 all)
for size in "${sizes[@]}"; do
  limit=()
  [ "$size" = all ] || limit=(--train-limit "$size")
  echo "== training size $size ($(date -u +%H:%M:%S) UTC; load average: $(cut -d' ' -f1-3 /proc/loadavg))"
  .venv/bin/caveat-train compare --shift drugreviews --ood bbcnews --posteriors map,temperature,laplace-kron,swag \
    --no-progress "${limit[@]}" --json "docs/results/learning-curve-$size.json"
  echo "== done $size ($(date -u +%H:%M:%S) UTC; load average: $(cut -d' ' -f1-3 /proc/loadavg))"
done

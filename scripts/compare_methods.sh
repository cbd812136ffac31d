#!/usr/bin/env bash
# The method comparison of docs/results.md on the embedded default (MiniLM, SST-2, drug reviews, BBC News):
#   1. the embedded default trained with seeds 1..4 on the data split of seed 0 (each a full Laplace-kron
#      bundle: these are the seed spread of the default run, and members 2..5 of the ensemble);
#   2. `caveat-train compare` of every method, the ensemble loading those four members.
# Usage: scripts/compare_methods.sh [OUT.json]   (about 2 h on a 2-core CPU; step 1 is skipped for bundles
# that exist already)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${1:-docs/results/compare-methods-sst2-minilm-cpu.json}
common=(--base-model minilm --dataset sst2 --shift drugreviews --ood bbcnews
  --targets query,key,value,intermediate.dense,output.dense --rank 16 --max-length 128 --data-seed 0 --no-progress)
members=()
for seed in 1 2 3 4; do
  bundle=runs/seeds/seed$seed
  if [ ! -f "$bundle/bundle.json" ]; then
    .venv/bin/caveat-train "${common[@]}" --posterior laplace-kron --seed "$seed" --out "$bundle"
  fi
  members+=("$bundle")
done
.venv/bin/caveat-train compare "${common[@]}" --seed 0 \
  --posteriors map,temperature,laplace-diag,laplace-kron,laplace-full,swag,vi,ensemble,mc-dropout \
  --members 5 --member-bundles "$(IFS=,; echo "${members[*]}")" --json "$out"

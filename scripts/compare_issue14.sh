#!/usr/bin/env bash
# The issue-#14 rows of docs/results.md on the embedded default (MiniLM, SST-2, drug reviews, BBC News), with
# the flags of the every-method table (scripts/compare_methods.sh):
#   a. Bayesian-LoRA beside that table's map, laplace-kron (marglik prior), SWAG and VI rows: one MAP, one run;
#   b. L-LoRA-S (--train-projections) map and laplace-kron rows (default prior), then L-LoRA-XS's with the same
#      flags (b-xs: only the latter).
#   slice: the same comparisons on a 2,000-example training slice (validation and test 500, shift and OOD
#      200; no OOD score), three runs that can go in parallel: L-LoRA-XS map and laplace-kron (default prior),
#      Bayesian-LoRA beside the same MAP, L-LoRA-S map and laplace-kron.
# Usage: scripts/compare_issue14.sh [a|b|b-xs|all|slice]   (a: 30-60 min, b: 30-60 min alone on a 2-core CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
part=${1:-all}
common=(--base-model minilm --dataset sst2 --shift drugreviews --ood bbcnews
  --targets query,key,value,intermediate.dense,output.dense --rank 16 --max-length 128 --data-seed 0 --seed 0
  --no-progress)
if [ "$part" = a ] || [ "$part" = all ]; then
  # no OOD score here: the every-method table predates it, and it reads the frozen base, so part b's is the same
  .venv/bin/caveat-train compare "${common[@]}" --posteriors map,laplace-kron,bayesian-lora,swag,vi \
    --prior marglik --ood-method none --json docs/results/compare-issue14-bayesian-lora-cpu.json
fi
if [ "$part" = b ] || [ "$part" = all ]; then
  .venv/bin/caveat-train compare "${common[@]}" --train-projections --posteriors map,laplace-kron \
    --json docs/results/compare-issue14-llora-s-cpu.json
fi
if [ "$part" = b-xs ] || [ "$part" = b ] || [ "$part" = all ]; then  # b's L-LoRA-XS counterpart (b-xs: it alone)
  .venv/bin/caveat-train compare "${common[@]}" --posteriors map,laplace-kron \
    --json docs/results/compare-issue14-llora-xs-cpu.json
fi
if [ "$part" = slice ]; then
  slice=(--train-limit 2000 --eval-limit 500 --shift-limit 200 --ood-limit 200 --ood-method none)
  .venv/bin/caveat-train compare "${common[@]}" "${slice[@]}" --posteriors map,laplace-kron \
    --json docs/results/compare-issue14-slice-llora-xs-cpu.json &
  .venv/bin/caveat-train compare "${common[@]}" "${slice[@]}" --posteriors map,bayesian-lora \
    --json docs/results/compare-issue14-slice-bayesian-lora-cpu.json &
  .venv/bin/caveat-train compare "${common[@]}" "${slice[@]}" --train-projections --posteriors map,laplace-kron \
    --json docs/results/compare-issue14-slice-llora-s-cpu.json &
  wait
fi

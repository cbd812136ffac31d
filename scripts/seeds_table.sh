#!/usr/bin/env bash
# The published-protocol table of docs/results.md (issue #25): one `caveat-train compare` per seed and variant
# of a checked-in setting (training/configs/*.yaml), each writing docs/results/seeds/<setting>[-variant]-seed<N>.json;
# scripts/seeds_table.py renders them as mean ± std.
# Usage: scripts/seeds_table.sh CONFIG [SEED ...]          (default seeds: 0 1 2)
#   VARIANTS="main marglik llora-s" (default): main = every method on one MAP (the checked prior);
#   marglik = Laplace diag/kron with the marginal-likelihood prior (the papers'); llora-s = trained projections;
#   more = the main variant's methods in further runs (MORE_METHODS, default swag,vi,bayesian-lora: the same
#   seed's MAP retrained; one file per method list, -more-<methods>; the table shows their rows beside main's).
#   METHODS overrides main's methods. Each variant trains its own MAP (on a 2-core CPU a 30-epoch MiniLM MAP on
#   2,000 sentences takes ~20 min; main adds the ensemble's and MC dropout's own MAPs).
# On a machine with a GPU (training and evaluation move to it through accelerate, nothing to set) one call runs the
# three-seed table of a setting: scripts/seeds_table.sh training/configs/longrun-llm-arc-easy-smollm2-cloze.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
config=$1; shift
seeds=("$@"); [ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2)
setting=$(basename "$config" .yaml)
main_methods=${METHODS:-map,temperature,default,laplace-diag,laplace-kron,swag,vi,bayesian-lora,mc-dropout,ensemble}
mkdir -p docs/results/seeds
for seed in "${seeds[@]}"; do
  for variant in ${VARIANTS:-main marglik llora-s}; do
    case $variant in
      main) methods=$main_methods; extra=(); suffix="" ;;
      marglik) methods=laplace-diag,laplace-kron; extra=(--prior marglik); suffix="-marglik" ;;
      llora-s) methods=map,laplace-kron; extra=(--train-projections); suffix="-llora-s" ;;
      more) methods=${MORE_METHODS:-swag,vi,bayesian-lora}; extra=(); suffix="-more-${methods//,/+}" ;;
      *) echo "unknown variant $variant" >&2; exit 2 ;;
    esac
    out="docs/results/seeds/$setting$suffix-seed$seed.json"
    echo "== $setting $variant seed $seed → $out ($(date -u +%H:%M:%S) UTC; load $(cut -d' ' -f1-3 /proc/loadavg))"
    .venv/bin/caveat-train compare --config "$config" --seed "$seed" --posteriors "$methods" "${extra[@]}" \
      --no-progress --json "$out"
  done
done
echo "== done ($(date -u +%H:%M:%S) UTC)"

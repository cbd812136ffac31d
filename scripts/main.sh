#!/usr/bin/env bash
# The main job on the embedded default: train the SST-2 MiniLM bundle with a Kronecker-factored Laplace
# posterior (when it is not there yet) and show its report.
#   scripts/main.sh [extra caveat-train flags]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
bundle=bundles/sst2-minilm
if [ ! -f "$bundle/bundle.json" ]; then
  .venv/bin/caveat-train --base-model minilm --dataset sst2 --shift drugreviews --ood bbcnews \
    --posterior laplace-kron --targets query,key,value,intermediate.dense,output.dense --rank 16 \
    --max-length 128 --out "$bundle" "$@"
fi
cat "$bundle/report.md"
echo
echo "bundle: $bundle (reliability diagrams: $bundle/reliability.png)"

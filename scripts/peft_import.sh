#!/usr/bin/env bash
# The PEFT import figures of docs/results.md (issue #27): a plain PEFT LoRA (r = 8 on query/value, the head in
# modules_to_save) trained on SST-2 (2,000 sentences) with the published long-run recipe (30 epochs, the last kept),
# imported exactly into Caveat with a Laplace-Kronecker posterior (timed: import + posterior + OOD score +
# calibration + evaluation), and compared with temperature scaling and the other posteriors on the same MAP.
# Usage: scripts/peft_import.sh [RUNS_DIR]        (default runs/; the PEFT training is skipped when present)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
runs=${1:-runs}
config=training/configs/longrun-glue-sst2-minilm-2000.yaml
lora=$runs/peft-minilm-sst2-r8
if [ ! -f "$lora/adapter_model.safetensors" ]; then
  .venv/bin/python -m benchmarks.peft_train --config "$config" --rank 8 --epochs 30 --out "$lora"
fi
cp "$lora/training.json" docs/results/peft-train-minilm-sst2-r8-cpu.json
.venv/bin/caveat-train --from-peft "$lora" --config "$config" --posterior laplace-kron --no-progress \
  --out "$runs/peft-import-kron" --overwrite
.venv/bin/python - "$runs/peft-import-kron" "$lora" <<'PY'
import json, sys
from pathlib import Path
bundle, lora = Path(sys.argv[1]), Path(sys.argv[2])
manifest = json.loads((bundle / "bundle.json").read_text())
own = ["bundle.json", "adapter.safetensors", "posterior.safetensors", "projections.safetensors"]
record = {
    "stage_seconds": manifest["eval"]["training"]["stage_seconds"],
    "imported": manifest["imported"],
    "bundle_kb_without_ood": sum((bundle / f).stat().st_size for f in own) / 1024,
    "ood_kb": (bundle / "ood.safetensors").stat().st_size / 1024,
    "peft_adapter_kb": (lora / "adapter_model.safetensors").stat().st_size / 1024,
    "calibration": manifest["calibration"].get("choice"),
    "test": manifest["eval"]["test"], "shift": manifest["eval"]["shift"],
}
Path("docs/results/peft-import-kron-minilm-sst2-cpu.json").write_text(json.dumps(record, indent=2) + "\n")
print(json.dumps({k: record[k] for k in ("stage_seconds", "bundle_kb_without_ood", "ood_kb", "peft_adapter_kb")}))
PY
.venv/bin/caveat-train compare --from-peft "$lora" --config "$config" --no-progress \
  --posteriors map,temperature,default,laplace-diag,laplace-kron,swag,vi \
  --json docs/results/peft-import-compare-minilm-sst2-cpu.json

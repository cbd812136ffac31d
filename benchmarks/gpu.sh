#!/usr/bin/env bash
# The serving-overhead benchmark on a GPU in one call (about 4 minutes): MiniLM, S = 16, concurrency 1/16/64,
# caveat-serve under wrk beside /health/live and the same batches in-process (benchmarks/overhead.py; the
# server and the in-process host pick CUDA by themselves), with the GPU's utilisation sampled by nvidia-smi.
#   benchmarks/gpu.sh [OUT.json]      (needs wrk on the PATH, e.g. `apt-get install -y wrk`)
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
out="${1:-docs/benchmarks/overhead-gpu-minilm.json}"
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install -y wrk)" >&2; exit 2; }
"$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'
util="$(mktemp)"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 >"$util" &
smi=$!
trap 'kill "$smi" 2>/dev/null || true; rm -f "$util"' EXIT
"$py" benchmarks/overhead.py --model minilm --threads 4 --concurrency 1 16 64 --duration 10 --repeats 5 --json "$out"
kill "$smi" 2>/dev/null || true
awk -F', ' '{s += $1; n++; if ($1 > m) m = $1} END {if (n) printf "GPU utilisation over the run: mean %.0f%%, max %d%% (%d samples)\n", s / n, m, n}' "$util"

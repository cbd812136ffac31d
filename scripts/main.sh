#!/usr/bin/env bash
# The main job on the embedded default: train the SST-2 MiniLM bundle with a Kronecker-factored Laplace
# posterior (when it is not there yet), show its report, then serve it with caveat-serve and send example
# requests. The server keeps running in the foreground (Ctrl-C stops it); CAVEAT_DEMO_SERVE=0 skips serving.
#   scripts/main.sh [extra caveat-train flags]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
bundle=bundles/sst2-minilm
port=${CAVEAT_PORT:-8000}
if [ ! -f "$bundle/bundle.json" ]; then
  # the embedded default: caveat-train's own defaults, plus the evaluation sets
  .venv/bin/caveat-train --shift drugreviews --ood bbcnews --out "$bundle" "$@"
fi
cat "$bundle/report.md"
echo
echo "bundle: $bundle (reliability diagrams: $bundle/reliability.png)"
[ "${CAVEAT_DEMO_SERVE:-1}" = "0" ] && exit 0

echo
echo "== serving bundles/ on http://127.0.0.1:$port (caveat-serve; Ctrl-C stops it)"
.venv/bin/caveat-serve --base-model minilm --adapter-dir bundles --port "$port" --log-level warning &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT INT TERM
until curl -sf "http://127.0.0.1:$port/health/ready" >/dev/null; do
  kill -0 $server 2>/dev/null || { echo "caveat-serve exited"; exit 1; }
  sleep 0.5
done
ask() {  # the request as curl would send it, then the answer, one line per input
  local body
  body=$(python3 -c 'import json, sys; print(json.dumps({"adapter": sys.argv[1], "inputs": sys.argv[2:]}))' "$@")
  echo; echo "\$ curl -s localhost:$port/v1/predict -H 'content-type: application/json' -d '$body'"
  .venv/bin/python scripts/ask.py --url "http://127.0.0.1:$port" "$@"
}
ask sst2-minilm "a gorgeous, witty, seductive movie." "the plot is a tired mess and the acting is worse."
# the news sentence is abstained on as out of distribution (the bundle's feature-space OOD score)
ask sst2-minilm "The central bank raised interest rates by a quarter point on Thursday, citing inflation in services."
echo
echo "try: curl -s localhost:$port/v1/adapters | python3 -m json.tool;  curl -s localhost:$port/metrics | grep caveat_"
wait $server

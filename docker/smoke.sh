#!/usr/bin/env bash
# Build the Caveat image and run the server container for real, then clean up everything this script
# started (container, volume, base-image build folder, and the Docker daemon if it started one).
#
#   docker/smoke.sh            (as root where the daemon has to be started)
#
# Works without Docker Hub and without a registry inside the build: when BASE_IMAGE cannot be pulled it
# builds a Debian bookworm base with Python 3.11 (debootstrap + docker import), and it installs the Python
# packages from a wheelhouse prepared on this host (docker/wheelhouse/, pip download with pyproject's pins).
# The bundle served is bundles/sst2-minilm (scripts/main.sh) when present, else a small one trained by the
# image's own caveat-train. Environment: BASE_IMAGE, IMAGE (tag to build), PORT (host port), KEEP_IMAGE=1.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
LOCAL_BASE=caveat-base:bookworm-py311
IMAGE=${IMAGE:-caveat:smoke}
PORT=${PORT:-18000}
NAME=caveat-smoke
VOLUME=caveat-smoke-bundles
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PY=${PYTHON:-.venv/bin/python}
PROJECT=caveatsmoke
daemon_pid="" rootfs="" compose=""

say() { printf '\n== %s\n' "$*"; }
cleanup() {
  say "cleaning up"
  docker rm -f "$NAME" > /dev/null 2>&1 || true
  [ -z "$compose" ] || $compose -p "$PROJECT" down -v > /dev/null 2>&1 || true
  docker volume rm "$VOLUME" > /dev/null 2>&1 || true
  [ "${KEEP_IMAGE:-1}" = "1" ] || docker rmi "$IMAGE" > /dev/null 2>&1 || true
  [ -z "$rootfs" ] || rm -rf "$rootfs"
  if [ -n "$daemon_pid" ]; then kill "$daemon_pid" 2> /dev/null; wait "$daemon_pid" 2> /dev/null || true; echo "stopped the daemon it started"; fi
}
trap cleanup EXIT

say "engine"
if ! docker info > /dev/null 2>&1; then
  command -v dockerd > /dev/null || { echo "no Docker engine: apt-get install docker.io (Debian) first"; exit 2; }
  dockerd > /tmp/caveat-smoke-dockerd.log 2>&1 &
  daemon_pid=$!
  for _ in $(seq 60); do docker info > /dev/null 2>&1 && break; sleep 1; done
  docker info > /dev/null 2>&1 || { echo "dockerd did not start: see /tmp/caveat-smoke-dockerd.log"; exit 1; }
  echo "started dockerd (pid $daemon_pid)"
fi
docker version --format 'client {{.Client.Version}}, server {{.Server.Version}}'

say "base image"
if timeout 60 docker pull -q "$BASE_IMAGE" > /dev/null 2>&1; then
  base=$BASE_IMAGE
elif docker image inspect "$LOCAL_BASE" > /dev/null 2>&1; then
  base=$LOCAL_BASE
else
  echo "$BASE_IMAGE cannot be pulled: building $LOCAL_BASE with debootstrap ($MIRROR)"
  command -v debootstrap > /dev/null || { echo "needs debootstrap: apt-get install debootstrap"; exit 2; }
  rootfs=$(mktemp -d /tmp/caveat-rootfs.XXXXXX)
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$MIRROR" \
    > /tmp/caveat-smoke-debootstrap.log 2>&1 || { echo "debootstrap failed: /tmp/caveat-smoke-debootstrap.log"; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - "$LOCAL_BASE" > /dev/null
  base=$LOCAL_BASE
fi
echo "base: $base ($(docker run --rm "$base" python3 --version))"

say "wheelhouse (docker/wheelhouse, from pyproject.toml's pins)"
"$PY" docker/pins.py requirements > /tmp/caveat-smoke-requirements.txt
"$PY" -m pip download -q -d docker/wheelhouse --only-binary=:all: "torch==$("$PY" docker/pins.py torch)" \
  setuptools wheel -r /tmp/caveat-smoke-requirements.txt
"$PY" -m pip download -q -d docker/wheelhouse --no-deps -r requirements/nodeps.txt
echo "$(ls docker/wheelhouse/*.whl | wc -l) wheels, $(du -sh docker/wheelhouse | cut -f1)"

say "build $IMAGE"
start=$(date +%s)
docker build -q --build-arg BASE_IMAGE="$base" -t "$IMAGE" . > /dev/null
echo "built in $(($(date +%s) - start)) s: $(docker image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"
docker run --rm --entrypoint pip "$IMAGE" freeze > /tmp/caveat-smoke-freeze.txt
"$PY" docker/pins.py check /tmp/caveat-smoke-freeze.txt
[ "$(docker run --rm --entrypoint id "$IMAGE" -u)" != "0" ] && echo "runs as a non-root user"

say "bundle volume"
docker volume create "$VOLUME" > /dev/null
if [ -f bundles/sst2-minilm/bundle.json ]; then
  docker run --rm -v "$VOLUME":/bundles -v "$PWD/bundles/sst2-minilm":/src:ro --entrypoint cp "$IMAGE" -r /src /bundles/sst2-minilm
  adapter=sst2-minilm
else
  docker run --rm -v "$VOLUME":/bundles --entrypoint caveat-train "$IMAGE" --out /bundles/smoke --train-limit 300 \
    --eval-limit 100 --validation-size 200 --epochs 1 --rank 4 --targets query,value --laplace-limit 100 \
    --shift-limit 50 --ood-limit 50 --no-progress > /tmp/caveat-smoke-train.log 2>&1
  adapter=smoke
fi
echo "serving adapter $adapter"

say "server container"
docker run -d --name "$NAME" -p "127.0.0.1:$PORT:8000" -v "$VOLUME":/bundles -e CAVEAT_ADMIN_TOKEN=smoke "$IMAGE" > /dev/null
for _ in $(seq 180); do
  curl -sf "http://127.0.0.1:$PORT/health/ready" > /dev/null && break
  [ "$(docker inspect -f '{{.State.Running}}' "$NAME")" = "true" ] || { docker logs "$NAME"; exit 1; }
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/health/ready" || { docker logs "$NAME"; exit 1; }
echo
answer=$(curl -sf "http://127.0.0.1:$PORT/v1/predict" -H 'content-type: application/json' \
  -d "{\"adapter\": \"$adapter\", \"inputs\": [\"a gorgeous, witty, seductive movie.\"], \"seed\": 1}")
echo "$answer" | "$PY" -c '
import json, sys
body = json.load(sys.stdin)
result = body["results"][0]
assert body["adapter"]["name"] == sys.argv[1] and abs(sum(result["probs"]) - 1) < 1e-4, body
print("predict:", result["label"], round(result["confidence"], 3), "MI", round(result["uncertainty"]["mutual_information"], 4))
' "$adapter"
curl -sf "http://127.0.0.1:$PORT/metrics" | grep -q "caveat_requests_total{adapter=\"$adapter\",endpoint=\"predict\",status=\"200\"}"
echo "metrics: caveat_requests_total counted the request"
for _ in $(seq 30); do
  health=$(docker inspect -f '{{.State.Health.Status}}' "$NAME")
  [ "$health" = "healthy" ] && break
  sleep 2
done
echo "container health: $health"
[ "$health" = "healthy" ]
docker rm -f "$NAME" > /dev/null

say "docker compose: the caveat service (env file, secret, volume, health check)"
if command -v docker-compose > /dev/null; then
  compose=docker-compose
elif docker compose version > /dev/null 2>&1; then
  compose="docker compose"
fi
if [ -n "$compose" ]; then
  $compose config -q && $compose -f docker-compose.yml -f docker-compose.gpu.yml config -q && echo "compose files valid"
  docker tag "$IMAGE" caveat:cpu
  docker volume create "${PROJECT}_bundles" > /dev/null
  docker run --rm -v "${PROJECT}_bundles":/bundles -v "$VOLUME":/from:ro --entrypoint cp "$IMAGE" -r "/from/$adapter" /bundles/
  $compose -p "$PROJECT" up -d --no-build caveat > /dev/null 2>&1
  for _ in $(seq 90); do
    [ "$(docker inspect -f '{{.State.Health.Status}}' "${PROJECT}_caveat_1" 2> /dev/null || \
         docker inspect -f '{{.State.Health.Status}}' "${PROJECT}-caveat-1")" = "healthy" ] && break
    sleep 2
  done
  token_ok=$(curl -s -o /dev/null -w '%{http_code}' -X DELETE "http://127.0.0.1:8000/v1/adapters/none" \
    -H "authorization: Bearer $(cat docker/admin_token)")
  no_token=$(curl -s -o /dev/null -w '%{http_code}' -X DELETE "http://127.0.0.1:8000/v1/adapters/none")
  predicted=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:8000/v1/predict" \
    -H 'content-type: application/json' -d "{\"adapter\": \"$adapter\", \"inputs\": [\"fine\"]}")
  echo "compose service healthy; predict $predicted; admin with the secret's token $token_ok (404: no such adapter), without $no_token"
  [ "$predicted" = 200 ] && [ "$token_ok" = 404 ] && [ "$no_token" = 401 ]
  $compose -p "$PROJECT" down -v > /dev/null 2>&1
  echo "Prometheus and Grafana were not started: their images come from Docker Hub"
else
  echo "no docker-compose: skipped"
fi
say "smoke test passed"

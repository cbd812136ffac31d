#!/usr/bin/env bash
# Install Caveat and its pinned stack into a virtual environment (default .venv), from scratch or on top.
#   scripts/install.sh [VENV_DIR]
# Uses pip: the CPU torch wheel some machines keep on local disk is only visible to pip.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
[ -x "$venv/bin/python" ] || python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
# torch is pinned in pyproject.toml; naming the pin in the same command keeps the resolver on it.
"$py" -m pip install --quiet "torch==2.13.0" -e ".[dev]"
"$py" -m pip install --quiet --no-deps -r requirements/nodeps.txt
# promtool (Debian's prometheus package) runs the alert rules' unit tests (tests/test_deploy.py); best effort
if ! command -v promtool >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  timeout 300 apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
    || { timeout 120 apt-get update -qq >/dev/null 2>&1 \
         && timeout 300 apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; } \
    || echo "note: promtool not installed (apt-get install prometheus); the alert rules' unit tests will be skipped"
fi
echo "installed into $venv ($("$py" -c 'import torch; print("torch", torch.__version__)'))"

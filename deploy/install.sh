#!/usr/bin/env bash
# Install the project into ./.venv. torch/torchvision are installed first, pinned to builds that exist offline here;
# on a GPU machine install the CUDA build you want before running this (it is kept if already present).
# Usage: bash deploy/install.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
fi
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
.venv/bin/python -m pip install -q -e ".${extra}"
echo "installed into $(pwd)/.venv"

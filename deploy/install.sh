#!/usr/bin/env bash
# Install the project into ./.venv. torch/torchvision are installed first, pinned to builds that exist offline here;
# on a GPU machine install the CUDA build you want before running this (it is kept if already present).
# Usage: bash deploy/install.sh [--test] [--with-nginx]
#   --with-nginx  also install Debian's nginx (the coordinator's TLS front; needs root; skipped when nginx is present)
set -euo pipefail
cd "$(dirname "$0")/.."
test_extra=0
for arg in "$@"; do
  case "$arg" in
    --test) test_extra=1 ;;
    --with-nginx)
      if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
        echo "nginx already installed"
      elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx
      else
        echo "nginx is needed by the coordinator (server): install it as root with: apt-get install -y nginx" >&2
        exit 1
      fi ;;
    *) echo "unknown option $arg (use --test, --with-nginx)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
fi
extra=""
[ "$test_extra" = 1 ] && extra="[test]"
.venv/bin/python -m pip install -q -e ".${extra}"
echo "installed into $(pwd)/.venv"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || \
  echo "note: nginx is not installed; the coordinator (server) needs it: bash deploy/install.sh --with-nginx"

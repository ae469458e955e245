#!/usr/bin/env bash
# Install the project into ./.venv. torch/torchvision are installed first, pinned to builds that exist offline here;
# on a GPU machine install the CUDA build you want before running this (it is kept if already present).
# Usage: bash deploy/install.sh [--test] [--with-nginx] [--offline WHEELHOUSE]
#   --offline DIR install only from DIR (made by deploy/wheelhouse.sh; pip --no-index): no network at all
#   --with-nginx  also install Debian's nginx (the coordinator's TLS front; needs root; skipped when nginx is present)
set -euo pipefail
cd "$(dirname "$0")/.."
test_extra=0
wheelhouse=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  arg=${args[$i]}
  case "$arg" in
    --offline)
      i=$((i + 1)); wheelhouse=${args[$i]:-}
      [ -d "$wheelhouse" ] || { echo "--offline needs the wheelhouse folder (deploy/wheelhouse.sh OUT)" >&2; exit 2; }
      wheelhouse=$(cd "$wheelhouse" && pwd) ;;
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
    *) echo "unknown option $arg (use --test, --with-nginx, --offline DIR)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pipi=(.venv/bin/python -m pip install -q)
# Offline: never reach an index; everything comes from the wheelhouse (which must match this OS/arch/Python).
[ -n "$wheelhouse" ] && pipi+=(--no-index --find-links "$wheelhouse")
"${pipi[@]}" --upgrade pip
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  "${pipi[@]}" "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
fi
extra=""
[ "$test_extra" = 1 ] && extra="[test]"
"${pipi[@]}" -e ".${extra}"
echo "installed into $(pwd)/.venv"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || \
  echo "note: nginx is not installed; the coordinator (server) needs it: bash deploy/install.sh --with-nginx"

#!/usr/bin/env bash
# The offline install, done for real: deploy/wheelhouse.sh on this (connected) machine, then deploy/install.sh
# --offline into a fresh .venv of a copy of the release, with a clean environment (no pip configuration, no index)
# and, where `unshare -n` works (root), no network at all; then the installed CLIs must start and `pip check` pass.
# Not part of the pytest suite: it takes minutes and, with torch, several GB of disk (a CUDA build of torch).
# Usage: bash deploy/check_offline_install.sh [--no-torch] [--keep] [--work DIR]
#   --no-torch  the wheelhouse leaves torch/torchvision out, as for a site that installs its own (CUDA) build first:
#               that build is installed into the fresh .venv online, before the offline step (SITE_IT.md §1)
#   --keep      keep the work folder (default: a temporary folder, removed at the end)
# Prints the wheelhouse's size and file count and the time of each step.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
torch=1; keep=0; work=""
while [ $# -gt 0 ]; do
  case "$1" in
    --no-torch) torch=0; shift ;;
    --keep) keep=1; shift ;;
    --work) work=$2; shift 2 ;;
    *) echo "unknown option $1 (use --no-torch, --keep, --work DIR)" >&2; exit 2 ;;
  esac
done
PY=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')
work=${work:-$(mktemp -d "${TMPDIR:-/tmp}/spinefed-offline.XXXXXX")}
mkdir -p "$work"
work=$(cd "$work" && pwd)
[ "$keep" = 1 ] || trap 'rm -rf "$work"' EXIT
step() { printf '%s: %s\n' "$(date +%H:%M:%S)" "$*"; }

# 1. The release as a site receives it: the checkout's files without .venv, caches or results.
step "copying the release to $work/release"
mkdir -p "$work/release"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
  | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$work/release"

# 2. The wheelhouse, on the connected machine (this one, with its usual pip configuration).
step "building the wheelhouse"
t0=$SECONDS
PYTHON=$PY bash "$work/release/deploy/wheelhouse.sh" "$work/wheelhouse" $([ "$torch" = 0 ] && echo --no-torch)
t_wheelhouse=$((SECONDS - t0))
size=$(du -sh "$work/wheelhouse" | cut -f1)
files=$(find "$work/wheelhouse" -name '*.whl' -o -name '*.tar.gz' | wc -l)
(cd "$work/wheelhouse" && sha256sum -c --quiet SHA256SUMS)

# 3. The site's own torch build, installed online first (only with --no-torch; install.sh keeps it).
if [ "$torch" = 0 ]; then
  step "installing the site's own torch into the fresh .venv (online)"
  "$PY" -m venv "$work/release/.venv"
  "$work/release/.venv/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" \
    "torchvision==${TORCHVISION_VERSION:-0.29.1}"
fi

# 4. The offline install: clean environment (no PIP_* variables, no pip.conf), no network where possible.
runner=(env -i "PATH=/usr/local/bin:/usr/bin:/bin" "HOME=$work/home" "LANG=C.UTF-8" "PYTHON=$PY"
        "PIP_CONFIG_FILE=/dev/null" "PIP_DISABLE_PIP_VERSION_CHECK=1")
network="network reachable (no unshare): isolation by --no-index and no pip configuration only"
if unshare -n true 2>/dev/null; then
  runner=(unshare -n "${runner[@]}")
  network="no network (own network namespace)"
fi
mkdir -p "$work/home"
step "installing offline: $network"
t0=$SECONDS
"${runner[@]}" bash "$work/release/deploy/install.sh" --offline "$work/wheelhouse"
t_install=$((SECONDS - t0))

# 5. The installed release starts (still without network).
step "checking the installed release"
venv=$work/release/.venv/bin
"${runner[@]}" "$venv/python" -m pip check
for cli in client server simulate; do
  "${runner[@]}" "$venv/$cli" --help > /dev/null
done
"${runner[@]}" "$venv/python" -c "import torch, torchvision, flwr, opacus, pydicom, gdcm, client.app, server.app
from client.approval import installed_version
print('imports ok: spinefed', installed_version(), 'torch', torch.__version__, 'flwr', flwr.__version__)"
venv_size=$(du -sh "$work/release/.venv" | cut -f1)
echo "offline install OK: wheelhouse $size in $files files (built in ${t_wheelhouse} s$([ "$torch" = 0 ] && echo ', without torch')); install ${t_install} s; .venv $venv_size; $network"
[ "$keep" = 1 ] && echo "kept: $work"
exit 0

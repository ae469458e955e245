#!/usr/bin/env bash
# Build a wheelhouse for an offline install (hospitals often have no internet): every wheel the project needs, downloaded
# on a connected machine with the SAME OS, CPU architecture and Python version as the target, then copied over.
# Usage: bash deploy/wheelhouse.sh OUT_DIR [--no-torch] [--torch-index URL] [--test]
#   --no-torch        leave torch/torchvision out (the target installs its own build first, e.g. a CUDA one)
#   --torch-index U   where torch comes from (default: PyPI; e.g. https://download.pytorch.org/whl/cu128 for CUDA)
#   --test            include the test extra
# Install on the target: bash deploy/install.sh --offline OUT_DIR
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 OUT_DIR [--no-torch] [--torch-index URL] [--test]" >&2; exit 2; }
out=$1; shift
torch=1; index=""; extra=""
while [ $# -gt 0 ]; do
  case "$1" in
    --no-torch) torch=0; shift ;;
    --torch-index) index=$2; shift 2 ;;
    --test) extra="[test]"; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p "$out"
"$PY" -m pip download -q -d "$out" pip "setuptools>=77" wheel  # the build backend pyproject.toml asks for
if [ "$torch" = 1 ]; then
  "$PY" -m pip download -q -d "$out" ${index:+--index-url "$index"} \
    "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
fi
# The project itself as a wheel, then its dependencies (torch excluded when --no-torch: pip would otherwise fetch it).
"$PY" -m pip wheel -q --no-deps -w "$out" .
reqs=$(mktemp); trap 'rm -f "$reqs" "$reqs.pins"' EXIT
"$PY" - "$extra" > "$reqs" <<'PY'
import sys, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = list(p["dependencies"]) + (p["optional-dependencies"]["test"] if sys.argv[1] else [])
print("\n".join(deps))
PY
pins=()
if [ "$torch" = 0 ]; then
  # Of the dependencies only opacus needs torch: fetch it without its dependencies, and its other one by name.
  sed -i -E '/^(torch|torchvision|opacus)([<>=!~ ]|$)/d' "$reqs"
  "$PY" -m pip download -q -d "$out" --no-deps "opacus==1.6.*"
  echo "opt-einsum" >> "$reqs"
else
  # The project asks for torch>=2.3: hold it to the build fetched above, or pip fetches a second, newer torch.
  printf 'torch==%s\ntorchvision==%s\n' "${TORCH_VERSION:-2.14.1}" "${TORCHVISION_VERSION:-0.29.1}" > "$reqs.pins"
  pins=(-c "$reqs.pins")
  if [ -n "$index" ]; then pins+=(--extra-index-url "$index"); fi
fi
"$PY" -m pip download -q -d "$out" "${pins[@]}" -r "$reqs"
(cd "$out" && sha256sum -- *.whl *.tar.gz 2>/dev/null > SHA256SUMS || true)
echo "wheelhouse: $out ($(ls "$out" | grep -c -E '\.(whl|tar\.gz)$') files, SHA256SUMS written); install with: bash deploy/install.sh --offline $out"

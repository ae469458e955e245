#!/usr/bin/env bash
# Quick start: install into ./.venv, then run the main job — ten virtual hospitals of synthetic spine MRI,
# federated training in quick (smoke-test) mode, and a report in results/quick/.
set -euo pipefail
cd "$(dirname "$0")"
bash deploy/install.sh
exec .venv/bin/simulate run --quick --out results/quick "$@"

#!/usr/bin/env bash
# The main job on embedded defaults: set-up, then `runbook serve` (Prefect UI on
# http://127.0.0.1:4200; a sandbox with planted incidents when no runbook.toml exists).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/runbook serve "$@"

#!/usr/bin/env bash
# The test command: set-up, then lint, types and the whole suite against real services.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy flows tasks deployments tests bench
.venv/bin/pytest "$@"

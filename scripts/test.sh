#!/usr/bin/env bash
# Set up (scripts/setup_env.sh) and run the checks CI runs: ruff lint + format check, then the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
ruff check .
ruff format --check .
HF_HUB_OFFLINE=1 WANDB_MODE=disabled python -m pytest tests "$@"

#!/usr/bin/env bash
# Set up (scripts/setup_env.sh) and run the whole quickstart distillation offline:
# precompute two real teachers -> three training stages -> export -> evaluate on STS-B dev.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
HF_HUB_OFFLINE=1 stella-distill run configs/quickstart.yaml "$@"

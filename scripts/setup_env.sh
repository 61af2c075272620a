#!/usr/bin/env bash
# Create .venv (if missing) and install stella-distill with its test tools and the offline models.
# torch is installed first and pinned, so pip takes the CPU wheel on this machine's disk instead of
# pulling a multi-GB CUDA build; on a GPU machine set STELLA_TORCH to the torch spec you want.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${STELLA_TORCH:-torch==2.13.0}"
python -m pip install -q -e ".[dev]"
python scripts/setup_offline_models.py

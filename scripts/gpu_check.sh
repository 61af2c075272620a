#!/usr/bin/env bash
# The one command to run on a GPU machine (a copy of this repository, with .whl/ filled beforehand):
#
#   bash scripts/gpu_check.sh
#
# Before it, on a machine with PyPI: `bash scripts/gpu_wheels.sh` fills .whl/ (DeepSpeed and the
# packages it needs that the GPU image lacks, as wheels, and a tokenizer folder). This installs the
# wheels into /tmp/site (nothing can be downloaded there), then runs scripts/gpu_check.py: every
# section in one 9-minute budget, results in $OUT/gpu_check.json and $OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
if ! ls .whl/*.whl >/dev/null 2>&1 || [ ! -d .whl/tokenizer ]; then
  echo "gpu_check.sh: .whl/ has no wheels or no tokenizer folder: run scripts/gpu_wheels.sh first" | tee "$OUT/gpu_check.log"
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_check.sh: installing .whl/*.whl failed" | tee -a "$OUT/gpu_check.log"; exit 3; }
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 scripts/gpu_check.py --tokenizer .whl/tokenizer --out "$OUT" --budget "${BUDGET:-540}" "$@"

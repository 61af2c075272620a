#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with what scripts/gpu_check.sh needs on the GPU machine, which has no
# network: DeepSpeed 0.19.8 as a pure-Python wheel (built here against the installed torch) and the
# packages it needs that the GPU image lacks (the versions seen working there), for Python 3.12 on
# x86-64; and a tokenizer folder (all-MiniLM-L6-v2's: any tokenizer serves random-weight models).
#
#   bash scripts/gpu_wheels.sh            # uses .venv/bin/python (torch installed), else python3
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
mkdir -p .whl
rm -f .whl/*.whl
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
for spec in hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
            typing-inspection==0.4.5 typing-extensions==4.16.0; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec"
done
HF_HUB_OFFLINE=1 "$PY" - <<'PYEOF'
from transformers import AutoTokenizer

AutoTokenizer.from_pretrained("sentence-transformers/all-MiniLM-L6-v2").save_pretrained(".whl/tokenizer")
PYEOF
ls -la .whl
du -sh .whl

#!/bin/bash
# The GPU measurements of #15 / #16 as one prepared run for a session lent a GPU machine
# (../shared/FACTS.md: the machine has torch and CUDA; mlflow, optuna and friends come as wheels
# in .whl/, the MEGC2019 images in data/, both carried). Each step has its own timeout so the
# whole stays under ~9 minutes of the device's 10-minute command limit; prints a table per step.
#   run: bash bench/gpu_round.sh        (carry: [".whl", "data"])
set -u
cd "$(dirname "$0")/.."
if [ -d .whl ]; then pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; fi
export PYTHONPATH=/tmp/site:$PWD MEXP_DATA=${MEXP_DATA:-$PWD/data} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
cd bench
step() { local t=$1; shift; echo "== $* (limit ${t}s)"; timeout "$t" python3 "$@" 2>&1 \
  | grep -E "^\||^RESULT|^stages|Traceback|Error" ; }
step 120 fold_batching.py --device cuda --paths batched --seeds 1 --workdir /tmp/fb1
step 150 fold_batching.py --device cuda --paths batched --seeds 3 --workdir /tmp/fb3
step 200 fold_batching.py --device cuda --paths serial --seeds 1 --workdir /tmp/fbs
step 100 fold_batching.py --device cuda --workload demo --paths batched --workdir /tmp/fbd

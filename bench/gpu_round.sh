#!/bin/bash
# The GPU measurements of #15 / #16 as one prepared run for a session lent a GPU machine
# (../shared/FACTS.md: the machine has torch and CUDA; mlflow, optuna and friends come as wheels
# in .whl/, the MEGC2019 images in data/, both carried). Each step has its own timeout so the
# whole stays under ~9.5 minutes of the device's 10-minute command limit, most telling first;
# prints each step's summary lines, keeps each step's full log under $OUT.
#   run: bash bench/gpu_round.sh        (carry: [".whl", "data"])
# Next, with device time left: python3 bench/trial_groups.py --device cuda (HPO trial groups).
set -u
cd "$(dirname "$0")/.."
LOGS=${OUT:-/tmp/gpu_round}; mkdir -p "$LOGS"
T0=$(date +%s)
if [ -d .whl ]; then pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; fi
export PYTHONPATH=/tmp/site:$PWD MEXP_DATA=${MEXP_DATA:-$PWD/data} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc; python3 -c "import torch, mlflow; print('torch', torch.__version__, 'mlflow', mlflow.__version__)"
cd bench
step() { local name=$1 t=$2; shift 2; echo "== $name: $* (limit ${t}s, at $(( $(date +%s) - T0 ))s)"
  timeout "$t" python3 "$@" > "$LOGS/$name.log" 2>&1; echo "rc $?"
  grep -E "^\||^RESULT|^stages|^phase|Traceback|Error" "$LOGS/$name.log" | tail -25; }
step batched1 60 fold_batching.py --device cuda --paths batched --seeds 1 --workdir /tmp/fb1
step serial1 190 fold_batching.py --device cuda --paths serial --seeds 1 --workdir /tmp/fbs
step batched3 90 fold_batching.py --device cuda --paths batched --seeds 3 --workdir /tmp/fb3
step nested1 150 fold_batching.py --device cuda --paths batched --seeds 1 \
  --config configs/megc2019_nested.yaml --workdir /tmp/fbn
step demo 70 fold_batching.py --device cuda --workload demo --paths batched --workdir /tmp/fbd
echo "== done at $(( $(date +%s) - T0 ))s"

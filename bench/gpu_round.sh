#!/bin/bash
# The GPU measurements of #15 as one prepared run for a session lent a GPU machine
# (../shared/FACTS.md: the machine has torch and CUDA; mlflow, optuna and friends come as wheels
# in .whl/, the MEGC2019 images in data/, both carried). Each step has its own timeout and runs
# only while its limit fits in the ~9.5 minutes left of the device's 10-minute command limit,
# most telling first; prints each step's summary lines, keeps each step's full log under $OUT.
#   run: bash bench/gpu_round.sh        (carry: [".whl", "data"])
# Prepare with bench/gpu_wheels.sh. Steps: the CUDA-graph tests; the step's cost eager /
# static / as a CUDA graph (step_overhead.py); MEGC2019 one seed batched (the step as a CUDA graph) and
# batched-eager (without it); three seeds batched; serial (the baseline on this card); HPO
# trial groups (4 trials one by one vs as one group); nested selection; the demo pipeline.
set -u
cd "$(dirname "$0")/.."
LOGS=${OUT:-/tmp/gpu_round}; mkdir -p "$LOGS"
T0=$(date +%s); BUDGET=${BUDGET:-565}
# a dry run of the script on a CPU box (no wheels installed):
#   DEVICE=cpu EPOCHS=1 BUDGET=1800 PYTHON=$PWD/.venv/bin/python bash bench/gpu_round.sh
DEV=${DEVICE:-cuda}; EP=${EPOCHS:+--epochs $EPOCHS}
PY=${PYTHON:-python3}
if [ -d .whl ] && [ "$DEV" = cuda ]; then pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; fi
export PYTHONPATH=/tmp/site:$PWD MEXP_DATA=${MEXP_DATA:-$PWD/data} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
nproc; $PY -c "import torch, mlflow; print('torch', torch.__version__, 'mlflow', mlflow.__version__)"
step() { local name=$1 t=$2; shift 2; local now=$(( $(date +%s) - T0 ))
  if [ $(( now + t )) -gt "$BUDGET" ]; then echo "== $name: skipped (${t}s limit, ${now}s gone)"; return; fi
  echo "== $name: $* (limit ${t}s, at ${now}s)"
  timeout "$t" "$@" > "$LOGS/$name.log" 2>&1; echo "rc $?"
  grep -E "^\||^RESULT|^stages|^phase|passed|failed|Traceback|Error" "$LOGS/$name.log" | tail -25; }
step graph_tests 60 $PY -m pytest -q -p no:cacheprovider tests/test_batched.py -k "(cuda_graph or static_step) and not asks_nothing"
cd bench
step overhead 45 $PY step_overhead.py --device $DEV ${EPOCHS:+--epochs 1 --replicas 8}
step batched1 60 $PY fold_batching.py --device $DEV $EP --paths batched --seeds 1 --workdir /tmp/fb1
step eager1 60 $PY fold_batching.py --device $DEV $EP --paths batched-eager --seeds 1 --workdir /tmp/fbe
step batched3 80 $PY fold_batching.py --device $DEV $EP --paths batched --seeds 3 --workdir /tmp/fb3
step serial1 230 $PY fold_batching.py --device $DEV $EP --paths serial --seeds 1 --workdir /tmp/fbs
step trials 170 $PY trial_groups.py --device $DEV $EP --trials 4 --groups 1,4 --workdir /tmp/fbt
step nested1 140 $PY fold_batching.py --device $DEV $EP --paths batched --seeds 1 \
  --config configs/megc2019_nested.yaml --workdir /tmp/fbn
step demo 70 $PY fold_batching.py --device $DEV $EP --workload demo --paths batched --workdir /tmp/fbd
echo "== done at $(( $(date +%s) - T0 ))s"

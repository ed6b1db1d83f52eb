#!/usr/bin/env bash
# Run on the lent GPU machine: install carried wheels, write full-size random weights, then one
# process per configuration. Usage: bash benchmarks/gpu_run.sh "ours:8 ours:12 ..." [images]
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DIFFSYNTH_SKIP_DOWNLOAD=True
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/tmp/flux-random
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmarks/random_weights.py $W || exit 1
for cfg in $1; do
  sys=${cfg%%:*}; b=${cfg##*:}
  echo "=== $sys budget=$b"
  python3 benchmarks/engine_bench.py --system $sys --budget $b --weights $W --images ${2:-3} \
     --json "$OUT/${sys}_${b}.json" 2>&1 | grep -v -E "Warning|warn\(" | tail -n 8
done

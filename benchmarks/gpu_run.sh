#!/usr/bin/env bash
# The whole side-by-side benchmark on one GPU machine, in one command:
#   bash benchmarks/gpu_run.sh                      # every system at every budget, then quality and the report
#   bash benchmarks/gpu_run.sh "ours:8 ours:none" 5 # chosen configurations, 5 timed images each
# Installs carried wheels (.whl/, on the lent machine), writes full-size random weights, then runs
# one process per configuration. Records land in $OUT (default /tmp/out).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DIFFSYNTH_SKIP_DOWNLOAD=True
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/tmp/flux-random
ALL="ours:8 ours:12 ours:24 ours:none seed-diffsynth:8 seed-diffsynth:12 seed-diffsynth:24 seed-diffsynth:none
     diffusers:8 diffusers:12 diffusers:24 diffusers:none"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ -f $W/done ] || { python3 benchmarks/random_weights.py $W && touch $W/done; } || exit 1
for cfg in ${1:-$ALL}; do
  sys=${cfg%%:*}; b=${cfg##*:}
  echo "=== $sys budget=$b"
  python3 benchmarks/engine_bench.py --system $sys --budget $b --weights $W --images ${2:-3} \
     --json "$OUT/${sys}_${b}.json" 2>&1 | grep -v -E "Warning|warn\(" | tail -n 8
done
if [ -z "${1:-}" ]; then
  echo "=== diffusers budget=8, allocator not capped (its time where it does not fit)"
  python3 benchmarks/engine_bench.py --system diffusers --budget 8 --no-cap --weights $W --images ${2:-3} \
     --json "$OUT/diffusers_8_uncapped.json" 2>&1 | grep -v -E "Warning|warn\(" | tail -n 3
  python3 benchmarks/quality.py --json "$OUT/quality.json" | tail -n 1
  python3 benchmarks/report.py --out-dir "$OUT" "$OUT"/ours_*.json "$OUT"/seed-diffsynth_*.json "$OUT"/diffusers_*.json
fi

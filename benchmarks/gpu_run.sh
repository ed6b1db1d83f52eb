#!/usr/bin/env bash
# The whole side-by-side benchmark on one GPU machine, in one command:
#   bash benchmarks/gpu_run.sh                      # every system at every budget, then quality and the report
#   bash benchmarks/gpu_run.sh "ours:8 ours:none" 5 # chosen configurations, 5 timed images each
# Installs carried wheels (.whl/, on the lent machine), writes full-size random weights, then runs
# one process per configuration (each stopped after CONFIG_TIMEOUT s, default 1200: a cold compile
# under the 8 GB budget takes up to ~3 minutes; a lent machine's 10-minute call limit needs lower).
# Records land in $OUT (default /tmp/out). Exits non-zero when a configuration crashed or timed out
# (a run that measured an out-of-memory failure still exits 0: its record says ok: false).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DIFFSYNTH_SKIP_DOWNLOAD=True
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/tmp/flux-random
# A configuration is system:budget; "+nocap" runs the setup without the allocator cap (diffusers'
# 8 GB setup, to show its time where it does not fit).
ALL="ours:8 ours:12 ours:24 ours:none seed-diffsynth:8 seed-diffsynth:12 seed-diffsynth:24 seed-diffsynth:none
     diffusers:8 diffusers:12 diffusers:24 diffusers:none diffusers:8+nocap"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ -f $W/done ] || { python3 benchmarks/random_weights.py $W && touch $W/done; } || exit 1
fail=0
for cfg in ${1:-$ALL}; do
  case $cfg in *:*) ;; *) echo "=== $cfg: not system:budget, skipped"; fail=1; continue;; esac
  sys=${cfg%%:*}; b=${cfg##*:}; extra=; name=${sys}_$b
  case $b in *+nocap) b=${b%+nocap}; extra=--no-cap; name=${sys}_${b}_uncapped;; esac
  echo "=== $sys budget=$b $extra"; SECONDS=0
  timeout ${CONFIG_TIMEOUT:-1200} python3 benchmarks/engine_bench.py --system $sys --budget $b $extra --weights $W --images ${2:-3} \
     --json "$OUT/$name.json" 2>&1 | grep -v -E "Warning|warn\(" | tail -n 8
  rc=${PIPESTATUS[0]}
  echo "($SECONDS s)"
  [ "$rc" = 0 ] || { echo "=== $cfg FAILED: exit $rc (124: timed out), no record"; fail=1; }
done
if [ -z "${1:-}" ]; then
  python3 benchmarks/quality.py --json "$OUT/quality.json" | tail -n 1
  python3 benchmarks/report.py --out-dir "$OUT" "$OUT"/ours_*.json "$OUT"/seed-diffsynth_*.json "$OUT"/diffusers_*.json
fi
exit $fail

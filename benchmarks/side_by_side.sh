#!/usr/bin/env bash
# One side-by-side run on one GPU machine, in parts that each fit a lent machine's 10-minute call:
#   OUT=out bash benchmarks/side_by_side.sh benchmarks/plans/ours.txt
#   OUT=out bash benchmarks/side_by_side.sh benchmarks/plans/seed-diffsynth.txt   # same machine, next
# A plan has one configuration per line (# starts a comment):
#   NAME SYSTEM BUDGET SETUPS [VAR=value ...] [-- engine_bench options]
# SETUPS is one setup, or several separated by "|" tried in order until one fits (each try leaves
# its record, NAME_1, NAME_2, ...): for DiffSynth's vram_limit, lowered until it fits. VAR=value
# set the environment of that run (ours' levers: H2D_GBPS, FP8_MATMUL, ...). Records land in
# $OUT/raw/; ours shares one compile cache across the run, as one machine's bot would.
# Then `python benchmarks/report.py $OUT/raw/*.json` picks, per system and budget, the fastest
# setup that fits.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DIFFSYNTH_SKIP_DOWNLOAD=True
OUT=${OUT:-/tmp/out}/raw; mkdir -p "$OUT"
W=${WEIGHTS:-/tmp/flux-random}  # full-size random weights, written once per machine
[ -f $W/done ] || [ -n "${WEIGHTS:-}" ] || { python3 benchmarks/random_weights.py $W && touch $W/done; } || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current \
  --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
fail=0
run_one() {  # record name, system, budget, setup, then env settings and -- engine_bench options
  local name=$1 system=$2 budget=$3 setup=$4; shift 4
  local envs=() opts=()
  while [ $# -gt 0 ]; do
    if [ "$1" = "--" ]; then shift; opts=("$@"); break; fi
    envs+=("$1"); shift
  done
  echo "=== $name: $system at $budget, setup $setup ${envs[*]:-} ${opts[*]:-}"; SECONDS=0
  env "${envs[@]}" timeout "${CONFIG_TIMEOUT:-420}" python3 benchmarks/engine_bench.py --system "$system" \
    --budget "$budget" --setup "$setup" --weights $W --images "${IMAGES:-2}" "${opts[@]}" --json "$OUT/$name.json" \
    </dev/null 2>&1 | grep -v -E "Warning|warn\(|kept in float32" | tail -n 4
  local rc=${PIPESTATUS[0]}
  echo "($SECONDS s)"
  [ "$rc" = 0 ] || { echo "=== $name FAILED: exit $rc (124: timed out), no record"; fail=1; return 1; }
  python3 -c "import json, sys; sys.exit(0 if json.load(open('$OUT/$name.json'))['ok'] else 3)"
}
while read -r name system budget setups rest; do
  case $name in ''|\#*) continue;; esac
  IFS='|' read -r -a tries <<<"$setups"
  if [ ${#tries[@]} -eq 1 ]; then
    # shellcheck disable=SC2086
    run_one "$name" "$system" "$budget" "$setups" $rest
    continue
  fi
  i=0
  for setup in "${tries[@]}"; do
    i=$((i + 1))
    # shellcheck disable=SC2086
    run_one "${name}_$i" "$system" "$budget" "$setup" $rest && break
  done
done <"$1"
exit $fail

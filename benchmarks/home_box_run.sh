#!/usr/bin/env bash
# Host memory and start-up on one GPU machine (issue #19), in one command:
#   OUT=out bash benchmarks/home_box_run.sh "8 none"        # budgets to measure (default: 8 12 24 none)
# For each budget: engine_bench with a cold compile cache, then again with the cache it left (warm),
# the second time with T5 read from its file ([model] t5_in_ram = "off": the 16 GB-RAM setting), so
# each record has peak_host_anon_gib, load_s and first_image_s. Then `fluxbot generate` at 8 GB,
# timed from the command's start, once the weights are in the page cache (a warm machine).
# Records land in $OUT/home/; the random weights are written first (benchmarks/random_weights.py).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DIFFSYNTH_SKIP_DOWNLOAD=True
OUT=${OUT:-/tmp/out}/home; mkdir -p "$OUT"
W=/tmp/flux-random
CACHE=$(mktemp -d)/compile  # cold at first, as on a new machine; the second run of a budget reuses it
[ -f $W/done ] || { python3 benchmarks/random_weights.py $W && touch $W/done; } || exit 1
fail=0
bench() {  # name, budget, then VAR=value settings for engine_bench
  local name=$1 budget=$2; shift 2
  echo "=== $name (budget $budget; $*)"; SECONDS=0
  env "$@" TORCHINDUCTOR_CACHE_DIR=$CACHE/$budget/inductor TRITON_CACHE_DIR=$CACHE/$budget/triton \
    timeout ${CONFIG_TIMEOUT:-400} python3 benchmarks/engine_bench.py --system ours --budget "$budget" \
    --weights $W --images ${IMAGES:-3} --json "$OUT/$name.json" 2>&1 | grep -v -E "Warning|warn\(" | tail -n 4
  local rc=${PIPESTATUS[0]}
  echo "($SECONDS s)"
  [ "$rc" = 0 ] || { echo "=== $name FAILED: exit $rc"; fail=1; }
}
for b in ${1:-8 12 24 none}; do
  bench "ours_${b}_cold" "$b" T5_IN_RAM=on
  bench "ours_${b}_warm_t5file" "$b" T5_IN_RAM=off
done
cat > /tmp/generate.toml <<EOF
[model]
preset = "majicflus"
dir = "$W"
vram_limit_gb = 8
[storage]
database = "/tmp/generate.db"
EOF
echo "=== fluxbot generate at 8 GB"
start=$(date +%s.%N)
python3 -c "from bot.cli import main; raise SystemExit(main())" generate "a lighthouse at dusk" --seed 7 \
  --config /tmp/generate.toml -o /tmp/generate.png 2>&1 | grep -v -E "Warning|warn\(" | tail -n 6
rc=${PIPESTATUS[0]}
wall=$(python3 -c "import time; print(round(time.time() - $start, 2))")
echo "generate wall: $wall s (exit $rc)"
echo "{\"command\": \"fluxbot generate\", \"budget_gb\": 8, \"wall_s\": $wall, \"exit\": $rc}" > "$OUT/generate_8.json"
[ "$rc" = 0 ] || fail=1
exit $fail

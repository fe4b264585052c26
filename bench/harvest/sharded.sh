#!/bin/bash
# Sharded harvesting speed: 2 processes x 1 thread (`crossdiff harvest --nproc 2`) against
# 1 process x 1 thread on the same data, layer 4 of a generated Llama-shaped pair (hidden 512,
# 8 layers, vocab 8192, seq 256). Prints the wall-clock tokens/s of each whole command (model
# loading, rendezvous and the merge of the parts included) and their ratio, and the steady rates the
# harvests report (1 process; the 2-process run's rate over all ranks, from the start of rank 0's
# loop to the end of the slowest rank's), REPEATS times, alternated. The 2-process run claims chunks
# of the data as each rank goes (the default); a third run with --fixed-ranges (each rank a fixed
# half) shows what claiming gains.
#
#   bench/harvest/sharded.sh [BUILD_DIR]       (env: TOKENS=65536 REPEATS=2)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BUILD=${1:-build}
TOKENS=${TOKENS:-65536}
REPEATS=${REPEATS:-2}
CLI="$BUILD/bin/crossdiff"
[[ -x "$CLI" ]] || { echo "missing $CLI (scripts/build.sh crossdiff)" >&2; exit 1; }
WORK=$(mktemp -d /tmp/crossdiff-bench-sharded.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
/usr/bin/python3 "$HERE/make_checkpoint.py" --out "$WORK/m" --sequences $(( (TOKENS + 255) / 256 ))
M="$WORK/m"
run() {  # nproc [flags] -> "wall_seconds reported_tokens_per_second" (over all ranks with --nproc 2)
  local out="$WORK/s$1" t0 t1 line
  rm -rf "$out"
  t0=$(date +%s.%N)
  line=$("$CLI" harvest --base "$M/base" --finetune "$M/finetune" --data "$M/tokens.safetensors" \
    --layer 4 --out "$out" --max-tokens "$TOKENS" --seq-len 256 --batch 8 --threads 1 \
    --nproc "$@" --quiet 2>&1 | grep "tokens/s" | tail -1)
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" -v l="$line" 'BEGIN{
    n = split(l, w, " "); r = 0; for (i = 2; i <= n; ++i) if (w[i] == "tokens/s" && r == 0) r = w[i - 1];
    printf "%.3f %s", b - a, r }'
}
for rep in $(seq 1 "$REPEATS"); do
  read -r one one_rate <<<"$(run 1)"
  read -r two all_rate <<<"$(run 2)"
  read -r fixed fixed_rate <<<"$(run 2 --fixed-ranges)"
  awk -v n="$TOKENS" -v a="$one" -v b="$two" -v r1="$one_rate" -v r2="$all_rate" \
      -v f="$fixed" -v rf="$fixed_rate" 'BEGIN{
    printf "run %d, %d tokens: wall 1 x 1 thread %.0f tokens/s, 2 x 1 thread %.0f tokens/s: %.2fx", '"$rep"', n, n / a, n / b, a / b
    printf " (fixed ranges %.2fx);", a / f
    printf " steady 1 process %.0f tokens/s, 2 processes %.0f tokens/s: %.2fx (fixed ranges %.2fx)\n", r1, r2, r2 / r1, rf / r1 }'
done

#!/bin/bash
# Crosscoder training benchmark: the C++ trainer (bench/crosscoder/crosscoder_bench) against the eager
# PyTorch reference (reference_batchtopk.py, /usr/bin/python3, torch 1.13) on the same synthetic store
# with the same hyper-parameters and threads, in the same run; plus a plain at::mm GFLOP/s and the
# resident memory against (parameters + Adam state + two batches).
#
#   bench/crosscoder/run.sh [BUILD_DIR] [THREADS]
#
# The machine may be shared: wall-clock tokens/s are noisy, so tokens per CPU-second are printed too
# and each configuration is run twice, interleaved.
set -euo pipefail
BUILD=${1:-build}
THREADS=${2:-1}
HERE=$(cd "$(dirname "$0")" && pwd)
BENCH=$BUILD/bin/crosscoder_bench
WORK=$(mktemp -d /tmp/crosscoder_bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS

run_config() {  # d dict k batch steps_cpp steps_ref rows
  local d=$1 dict=$2 k=$3 batch=$4 steps=$5 ref_steps=$6 rows=$7
  echo "== d=$d dict=$dict k=$k batch=$batch threads=$THREADS"
  "$BENCH" make-store --out "$WORK/s$d" --d "$d" --rows "$rows" > /dev/null
  "$BENCH" matmul --rows "$batch" --inner $((2 * d)) --cols "$dict" --threads "$THREADS"
  for rep in 1 2; do
    echo "-- run $rep"
    "$BENCH" train --store "$WORK/s$d" --out "$WORK/o$d" --dict "$dict" --k "$k" --batch "$batch" \
      --steps "$steps" --threads "$THREADS" | tee "$WORK/cpp$rep.txt"
    /usr/bin/python3 "$HERE/reference_batchtopk.py" --store "$WORK/s$d" --dict "$dict" --k "$k" \
      --batch "$batch" --steps "$ref_steps" --threads "$THREADS" | tee "$WORK/ref$rep.txt"
    /usr/bin/python3 - "$WORK/cpp$rep.txt" "$WORK/ref$rep.txt" <<'PY'
import sys
def read(p):
    return {l.split()[0]: float(l.split()[1]) for l in open(p) if len(l.split()) >= 2 and l.split()[1][0].isdigit()}
c, r = read(sys.argv[1]), read(sys.argv[2])
print(f"ratio_wall_tokens_per_second {c['tokens_per_second'] / r['reference_tokens_per_second']:.2f}")
print(f"ratio_cpu_tokens_per_second {c['tokens_per_cpu_second'] / r['reference_tokens_per_cpu_second']:.2f}")
PY
  done
  rm -rf "$WORK/s$d" "$WORK/o$d"
}

run_config 64 512 6 1024 300 120 131072
run_config 512 8192 32 2048 40 20 65536

#!/usr/bin/env bash
# The one list of system packages crossdiff needs (Debian 12). Used by the README's commands, .ci/run and
# the Dockerfile alike. Idempotent: packages already installed are skipped.
#
#   scripts/install-deps.sh                       build + test dependencies (default)
#   scripts/install-deps.sh --runtime-coordinator runtime libraries of crossdiff-coordinator (no LibTorch)
#   scripts/install-deps.sh --runtime-worker      runtime libraries of crossdiff-worker and crossdiff
set -euo pipefail

BUILD_PACKAGES=(
  build-essential cmake ninja-build pkg-config git ca-certificates
  libtorch-dev libopenblas0-pthread            # LibTorch 1.13 (CPU); OpenBLAS or it runs ~25x slower
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libsqlite3-dev nlohmann-json3-dev libyaml-cpp-dev
  libgloo-dev                                  # headers that c10d's ProcessGroupGloo.hpp includes
  libsentencepiece-dev sentencepiece
  libgtest-dev libgmock-dev libbenchmark-dev
  python3 python3-torch python3-numpy python3-yaml   # reference implementations in tests and bench/
  time procps                                        # /usr/bin/time -v and ps for memory figures in bench/
)
COORDINATOR_RUNTIME=(
  ca-certificates libgrpc++1.51 libgrpc29 libprotobuf32 libsqlite3-0 libyaml-cpp0.7
  libabsl20220623
)
WORKER_RUNTIME=(
  "${COORDINATOR_RUNTIME[@]}" libtorch1.13 libopenblas0-pthread libsentencepiece0
)

case "${1:-}" in
  "") PACKAGES=("${BUILD_PACKAGES[@]}") ;;
  --runtime-coordinator) PACKAGES=("${COORDINATOR_RUNTIME[@]}") ;;
  --runtime-worker) PACKAGES=("${WORKER_RUNTIME[@]}") ;;
  *) echo "usage: $0 [--runtime-coordinator|--runtime-worker]" >&2; exit 2 ;;
esac

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

#!/usr/bin/env bash
# Installs the system packages (scripts/install-deps.sh) and builds crossdiff into build/.
# Binaries land in build/bin/. Arguments name targets (default: all). BUILD_DIR, BUILD_TYPE, JOBS and
# CMAKE_ARGS may be overridden.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/install-deps.sh"
build="${BUILD_DIR:-$root/build}"
jobs="${JOBS:-$(nproc)}"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-RelWithDebInfo}" ${CMAKE_ARGS:-} >/dev/null
if (($#)); then
  cmake --build "$build" -j "$jobs" --target "$@"
else
  cmake --build "$build" -j "$jobs"
fi

#!/usr/bin/env bash
# The test command of the README: installs dependencies, builds from scratch if needed, runs ctest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/build.sh"
build="${BUILD_DIR:-$root/build}"
cd "$build"
ctest --output-on-failure -j "${TEST_JOBS:-2}" "$@"

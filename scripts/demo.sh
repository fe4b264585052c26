#!/usr/bin/env bash
# The main command of the README: builds crossdiff if needed, then runs the demo diff on the
# built-in model pair (made from the fixtures), printing progress and the report's summary.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/build.sh" crossdiff crossdiff-coordinator crossdiff-worker >/dev/null
exec "${BUILD_DIR:-$root/build}/bin/crossdiff" demo "$@"

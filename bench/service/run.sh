#!/usr/bin/env bash
# Builds and runs the coordinator benchmark: SubmitJob/GetJob p99 with 100 concurrent clients,
# WatchJob event-to-client p99 with 100 watchers, coordinator memory per idle watcher.
# Usage: bench/service/run.sh [BUILD_DIR] [service_bench flags...]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
build="${1:-$root/build}"
shift || true
cmake --build "$build" --target service_bench crossdiff-coordinator >/dev/null
exec "$build/bench/service_bench" --coordinator "$build/bin/crossdiff-coordinator" "$@"

#!/usr/bin/env bash
# Benchmark, run by hand (never by CI): per backend, throughput draining 10,000 /bin/true
# jobs with 1, 4 and 8 workers; pickup latency at idle; claim time with 1,000 vs 1,000,000
# queued jobs; a worker's idle RSS and CPU. Prints Markdown tables.
#   PJQ_BENCH_BACKENDS=sqlite,postgres   only these backends
#   PJQ_BENCH_QUICK=1                    100,000 instead of 1,000,000 queued, 10 s idle
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/services.sh

start_database_servers
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(date -u +%Y-%m-%d)"
cargo bench --quiet --bench fleet

#!/usr/bin/env bash
# Benchmark, run by hand (never by CI). Prints Markdown tables: the spawn ceiling (one
# `/bin/true` spawn + wait); per backend, the durable-commit latency and the limit
# 1 / (spawn + commit), throughput draining 10,000 /bin/true jobs with 1, 4 and 8 workers
# (also as a share of that limit), statements and durable commits per job and per idle
# second from the server's own counters, pickup latency at idle, claim time with 1,000 vs
# 1,000,000 queued jobs (and, at 1,000, with unique keys and with concurrency caps), a
# worker's idle RSS and CPU.
#   PJQ_BENCH_BACKENDS=sqlite,postgres   only these backends
#   PJQ_BENCH_ONLY=claims                the claim-time rows alone
#   PJQ_BENCH_QUICK=1                    100,000 instead of 1,000,000 queued, 10 s idle
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/services.sh

start_database_servers
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(date -u +%Y-%m-%d)"
cargo bench --quiet --bench fleet

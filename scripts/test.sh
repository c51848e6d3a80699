#!/usr/bin/env bash
# The whole test suite: unit tests and the integration tests that drive the real binary
# against real SQLite files, a real PostgreSQL and a real MariaDB. Installs and starts what
# the tests need (run it as root, or as a user with passwordless sudo, the first time).
# Under CI=true a backend that cannot be reached fails the run instead of being skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/services.sh

apt_install systemd util-linux
start_database_servers
cargo build --quiet
scripts/check-unit.sh target/debug/pim-job-queue
cargo test --all-targets -- --test-threads="${TEST_THREADS:-4}"

#!/usr/bin/env bash
# The whole test suite: unit tests and the integration tests that drive the real binary
# against real databases. Installs and starts what the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --all-targets -- --test-threads="${TEST_THREADS:-4}"

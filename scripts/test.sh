#!/usr/bin/env bash
# The whole test suite: unit tests and the integration tests that drive the real binary
# against real SQLite files, a real PostgreSQL and a real MariaDB. Installs and starts what
# the tests need (run it as root, or as a user with passwordless sudo, the first time).
# Under CI=true a backend that cannot be reached fails the run instead of being skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/services.sh

apt_install systemd util-linux faketime php-cli php-mysql php-symfony-messenger php-symfony-doctrine-messenger php-doctrine-dbal php-symfony-cache php-symfony-console php-symfony-event-dispatcher
start_database_servers
fetch_promtool
cargo build --quiet
scripts/check-unit.sh target/debug/pim-job-queue
cargo test --all-targets -- --test-threads="${TEST_THREADS:-4}"

# The package, and the end-to-end run on a real systemd (PID 1 in a container). It needs
# root; under CI that is a requirement, elsewhere a loud skip.
if [ "$(id -u)" = 0 ]; then
  deb=$(scripts/build-deb.sh)
  scripts/e2e-systemd.sh "$deb"
elif [ "${CI:-}" = true ]; then
  echo "CI must run the systemd end-to-end test, which needs root" >&2
  exit 1
else
  printf '\n!!! SKIPPED: scripts/e2e-systemd.sh needs root (run it with sudo) !!!\n\n' >&2
fi

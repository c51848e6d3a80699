#!/usr/bin/env bash
# Static checks of the systemd unit: `systemd-analyze verify` must print nothing (it exits 0
# on unknown or misplaced keys, so its output is what counts) and the hardening must score
# an exposure of 2.5 or better. The unit's ExecStart binary must exist for verify, so a copy
# of the unit points at the freshly built one.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=${1:-target/debug/pim-job-queue}
[ -x "$binary" ] || { echo "check-unit: build $binary first" >&2; exit 1; }
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
unit="$scratch/pim_job_queue@.service"
sed "s#/usr/bin/pim-job-queue#$(realpath "$binary")#" systemd/pim_job_queue@.service > "$unit"

output=$(systemd-analyze verify --man=no "$unit" 2>&1) || true
if [ -n "$output" ]; then
  echo "systemd-analyze verify complained:" >&2
  echo "$output" >&2
  exit 1
fi
echo "systemd-analyze verify: clean"

# The threshold is on a 0-100 scale: 25 means an exposure of 2.5.
if ! report=$(systemd-analyze security --offline=true --threshold=25 "$unit" 2>&1); then
  echo "$report" >&2
  echo "systemd-analyze security: exposure above 2.5" >&2
  exit 1
fi
echo "systemd-analyze security: $(echo "$report" | grep -o 'Overall exposure level.*')"

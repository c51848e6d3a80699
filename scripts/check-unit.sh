#!/usr/bin/env bash
# Static checks of the systemd units: `systemd-analyze verify` must print nothing (it exits 0
# on unknown or misplaced keys, so its output is what counts) and each service's hardening
# must score an exposure of 2.5 or better. A unit's ExecStart binary must exist for verify,
# so copies of the units point at the freshly built one.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=${1:-target/debug/pim-job-queue}
[ -x "$binary" ] || { echo "check-unit: build $binary first" >&2; exit 1; }
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for unit in systemd/*.service systemd/*.timer; do
  sed "s#/usr/bin/pim-job-queue#$(realpath "$binary")#" "$unit" > "$scratch/$(basename "$unit")"
done

for unit in "$scratch"/*.service "$scratch"/*.timer; do
  name=$(basename "$unit")
  output=$(systemd-analyze verify --man=no "$unit" 2>&1) || true
  if [ -n "$output" ]; then
    echo "systemd-analyze verify complained about $name:" >&2
    echo "$output" >&2
    exit 1
  fi
  echo "systemd-analyze verify $name: clean"
done

# The threshold is on a 0-100 scale: 25 means an exposure of 2.5.
for unit in "$scratch"/*.service; do
  name=$(basename "$unit")
  if ! report=$(systemd-analyze security --offline=true --threshold=25 "$unit" 2>&1); then
    echo "$report" >&2
    echo "systemd-analyze security: $name's exposure is above 2.5" >&2
    exit 1
  fi
  echo "systemd-analyze security $name: $(echo "$report" | grep -o 'Overall exposure level.*')"
done

#!/usr/bin/env bash
# The side-by-side of ../shared/bench/sidebyside/run.sh (Akeneo's PHP consumer and this
# worker in Akeneo mode on one messenger_messages table, rounds interleaved), against this
# build, with the stand-in PIM the worker's preflight needs (the harness predates it): a
# readable bin/console, a writable var/, and a php_binary that answers the preflight's
# `bin/console list akeneo:batch`. Every job is still the harness's: one bash start that
# appends its stamp, as its akeneo-stamp.sh does.
#   ROUNDS=1 scripts/sidebyside.sh        (default 2 rounds, about 12 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
shared="$(cd "${SIDEBYSIDE_DIR:-../shared/bench/sidebyside}" && pwd)"
export OUTROOT="${OUTROOT:-${TMPDIR:-/tmp}/pjq-sidebyside/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUTROOT/pjq-project/bin" "$OUTROOT/pjq-project/var"
touch "$OUTROOT/pjq-project/bin/console"
stamp="$OUTROOT/akeneo-stamp.sh"
cat >"$stamp" <<'SH'
#!/bin/bash
# The harness's akeneo-stamp.sh, plus the preflight's `bin/console list akeneo:batch`.
if [ "${2:-}" = list ]; then printf 'akeneo:batch:job\nakeneo:batch:watchdog\n'; exit 0; fi
last="${!#}"
printf '%s\t-\t%s\t-\t%s\t-\n' "${last##*=}" "$EPOCHREALTIME" "$PPID" >> "${BENCH_CHILD_LOG:-/dev/null}"
SH
chmod +x "$stamp"
grep -qF "printf '%s\t-\t%s\t-\t%s\t-\n'" "$shared/akeneo-stamp.sh" ||
  { echo "the harness's akeneo-stamp.sh changed: update $0" >&2; exit 1; }
runner="$OUTROOT/run.sh"
sed -e "s|^HERE=.*|HERE=\"$shared\"|" \
  -e "s|php_binary = \"\$HERE/akeneo-stamp.sh\"|php_binary = \"$stamp\"|" \
  "$shared/run.sh" >"$runner"
grep -qF "php_binary = \"$stamp\"" "$runner" ||
  { echo "the harness's run.sh changed: update $0" >&2; exit 1; }
cargo build --release --quiet
exec bash "$runner"

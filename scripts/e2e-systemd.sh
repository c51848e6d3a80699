#!/usr/bin/env bash
# End-to-end test on a real systemd: boots a Debian 12 container with systemd as PID 1
# (systemd-nspawn; debootstrap'd once into $ROOTFS and reused), installs the .deb with apt,
# and checks every promise of the systemd section of Akeneo's daemon documentation, first
# on the default SQLite store, then on the host's MariaDB over TCP with a second "host".
# Fails loudly on the first miss and prints the journal of the units involved.
#
#   scripts/e2e-systemd.sh [DEB]     (root; builds the .deb with scripts/build-deb.sh if no DEB)
#
# E2E_ONLY=akeneo runs only the Akeneo parts (a shortcut while working on them; CI runs all).
# Env: ROOTFS (default /var/tmp/pjq-e2e-rootfs), MIRROR (default: the first URI apt uses).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/services.sh

ROOTFS=${ROOTFS:-/var/tmp/pjq-e2e-rootfs}
STATE=$(mktemp -d /run/pjq-e2e.XXXXXX)
BOOT_LOG=$STATE/boot.log
HOSTNAME_IN=pimtest
START=$(date +%s)

log() { printf '[e2e %4ss] %s\n' "$(( $(date +%s) - START ))" "$*" >&2; }
fail() {
  log "FAIL: $*"
  exit 1
}
check() {
  local what=$1
  shift
  if "$@"; then log "ok   - $what"; else fail "$what"; fi
}

[ "$(id -u)" = 0 ] || fail "needs root (systemd-nspawn, debootstrap)"
[ -n "${PJQ_PROMTOOL:-}" ] || fetch_promtool

# ------------------------------------------------------------------ container

detect_mirror() {
  local mirror=""
  if ls /etc/apt/sources.list.d/*.sources >/dev/null 2>&1; then
    mirror=$(awk '/^URIs:/ {u=$2} /^Suites:/ {for (i=2;i<=NF;i++) if ($i=="bookworm") ok=1}
                  /^$/ {if (ok && u !~ /security/) {print u; exit} ok=0; u=""}
                  END {if (ok && u !~ /security/) print u}' /etc/apt/sources.list.d/*.sources | head -n 1)
  fi
  if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
  fi
  echo "${mirror:-http://deb.debian.org/debian}"
}

make_rootfs() {
  apt_install systemd-container debootstrap
  if [ ! -x "$ROOTFS/lib/systemd/systemd" ] || [ ! -x "$ROOTFS/usr/sbin/adduser" ]; then
    log "debootstrap bookworm into $ROOTFS (once; later runs reuse it)"
    rm -rf "$ROOTFS"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,sudo,adduser,procps \
      bookworm "$ROOTFS" "${MIRROR:-$(detect_mirror)}" >"$STATE/debootstrap.log" 2>&1 \
      || { tail -n 20 "$STATE/debootstrap.log"; fail "debootstrap"; }
  fi
  echo "$HOSTNAME_IN" >"$ROOTFS/etc/hostname"
  grep -q "$HOSTNAME_IN" "$ROOTFS/etc/hosts" 2>/dev/null \
    || printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$HOSTNAME_IN" >>"$ROOTFS/etc/hosts"
  for unit in console-getty.service getty@.service apt-daily.timer apt-daily-upgrade.timer \
              dpkg-db-backup.timer e2scrub_all.timer; do
    ln -sf /dev/null "$ROOTFS/etc/systemd/system/$unit"
  done
  # Docker-style images forbid service actions in maintainer scripts; a real host does not.
  printf '#!/bin/sh\nexit 0\n' >"$ROOTFS/usr/sbin/policy-rc.d"
  chmod 0755 "$ROOTFS/usr/sbin/policy-rc.d"
  # Leftovers of an earlier run.
  chroot "$ROOTFS" sh -c 'dpkg --purge pim-job-queue >/dev/null 2>&1; userdel akeneo 2>/dev/null; userdel intruder 2>/dev/null; true'
  rm -rf "$ROOTFS/etc/systemd/system/pim_job_queue@.service.d" \
    "$ROOTFS/etc/systemd/system/pim_job_queue@.service" "$ROOTFS/usr/local/bin/pim_job_queue_launcher.sh" \
    "$ROOTFS"/etc/systemd/system/*.wants/pim_job_queue@*.service
}

leader() { cat "$STATE/leader"; }

# Runs a command inside the container, in all its namespaces, with a clean environment.
cexec() {
  nsenter --target "$(leader)" --all --root --wd -- /usr/bin/env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root TERM=dumb LANG=C.UTF-8 SYSTEMD_PAGER=cat SYSTEMD_COLORS=0 "$@"
}

boot() {
  local extra=()
  [ -d /run/systemd/system ] || extra+=(--keep-unit)
  setsid bash -c 'echo $$ > "$0"; exec "$@"' "$STATE/nspawn" \
    systemd-nspawn --quiet -D "$ROOTFS" --boot --register=no "${extra[@]}" \
    --console=read-only --hostname="$HOSTNAME_IN" </dev/null >"$BOOT_LOG" 2>&1 &
  local nspawn="" pid1="" _
  for _ in $(seq 1 50); do nspawn=$(cat "$STATE/nspawn" 2>/dev/null) && [ -n "$nspawn" ] && break; sleep 0.1; done
  [ -n "$nspawn" ] || fail "systemd-nspawn did not start"
  for _ in $(seq 1 600); do
    kill -0 "$nspawn" 2>/dev/null || { cat "$BOOT_LOG"; fail "systemd-nspawn exited while booting"; }
    for child in $(ps --ppid "$nspawn" -o pid= 2>/dev/null); do
      [ "$(cat "/proc/$child/comm" 2>/dev/null)" = systemd ] && pid1=$child
    done
    [ -n "$pid1" ] && nsenter -t "$pid1" -a -- test -S /run/systemd/private 2>/dev/null && break
    sleep 0.1
  done
  [ -n "$pid1" ] || fail "no systemd in the container"
  echo "$pid1" >"$STATE/leader"
  local state
  state=$(timeout 60 nsenter -t "$pid1" -a -- systemctl is-system-running --wait 2>&1 || true)
  case "$state" in
    running | degraded) log "container booted ($state)" ;;
    *) cat "$BOOT_LOG"; fail "container did not boot: $state" ;;
  esac
}

shutdown_container() {
  local nspawn
  nspawn=$(cat "$STATE/nspawn" 2>/dev/null) || return 0
  kill -0 "$nspawn" 2>/dev/null || return 0
  cexec systemctl poweroff --no-block >/dev/null 2>&1 || kill -TERM "$nspawn" 2>/dev/null || true
  for _ in $(seq 1 300); do kill -0 "$nspawn" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$nspawn" 2>/dev/null || true
}

on_exit() {
  local rc=$?
  if [ $rc -ne 0 ] && [ -s "$STATE/leader" ]; then
    log "journal of the pim_job_queue units:"
    cexec journalctl --no-pager -o short-precise -u 'pim_job_queue@*' -n 150 || true
    cexec systemctl --no-pager list-units 'pim_job_queue@*' --all || true
    cexec systemctl --no-pager status -l -n 20 'pim_job_queue@*' || true
  fi
  [ -n "${HOST_WORKER:-}" ] && kill "$HOST_WORKER" 2>/dev/null
  shutdown_container
  [ -n "${E2E_DATABASE:-}" ] && mariadb_admin -e "DROP DATABASE IF EXISTS $E2E_DATABASE" 2>/dev/null
  rm -rf "$STATE"
  [ $rc -eq 0 ] && log "ALL OK" || log "FAILED (exit $rc)"
  exit $rc
}
trap on_exit EXIT

# ------------------------------------------------------------------ helpers

prop() { cexec systemctl show "$1" -p "$2" --value; }
# apt-get inside the container; its output goes to a log that is shown if it fails.
capt() {
  cexec env DEBIAN_FRONTEND=noninteractive apt-get -q "$@" >"$STATE/apt.log" 2>&1 \
    || { cat "$STATE/apt.log" >&2; return 1; }
}
pjq() { cexec pim-job-queue "$@"; }
# One top-level field of `show ID --json`, without quotes.
job_field() {
  pjq show "$1" --json | sed -n "s/^  \"$2\": \"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}\$/\1/p"
}
push() { pjq push "$1" "$2" --payload "{\"sleep\": ${3:-0}}"; }
wait_for() { # what seconds command...
  local what=$1 seconds=$2
  shift 2
  for _ in $(seq 1 $((seconds * 10))); do
    "$@" && { log "ok   - $what"; return 0; }
    sleep 0.1
  done
  fail "$what (waited ${seconds}s)"
}
is() { [ "$("${@:2}")" = "$1" ]; }
job_is() { is "$2" job_field "$1" status; }
as_user() { cexec su "$1" -c "$2" </dev/null; }
refused() { ! "$@" >/dev/null 2>&1; }
journal() { cexec journalctl --no-pager -q -o cat --boot "$@"; }
journal_has() { journal "${@:2}" | grep -F -- "$1" >/dev/null; }
# Whether `journalctl -x` shows the catalog's explanation text $1 for the entries selected.
explained() { cexec journalctl --no-pager -q -x --boot "${@:2}" | grep -F -- "$1" >/dev/null; }
status_shows() { cexec systemctl --no-pager status "$1" | grep -F -- "$2" >/dev/null; }
restarted() { [ "$(prop "$1" NRestarts)" -ge 1 ]; }
promtool_accepts() { cexec cat "$1" | "$PJQ_PROMTOOL" check metrics; }
# Whether the sample $2 of the metrics file $3 is at least $1.
metric_at_least() {
  local value
  value=$(cexec cat "$3" | awk -v series="$2" '$1 == series {print $2}')
  [ -n "$value" ] && awk -v v="$value" -v min="$1" 'BEGIN {exit !(v >= min)}'
}
workers_of_hosts() {
  local status host
  status=$(pjq status --json)
  for host in "$@"; do
    grep -F "\"host\": \"$host\"" <<<"$status" >/dev/null || return 1
  done
}

write_config() { # database_url or "" for the default SQLite store
  local url_line=""
  [ -n "$1" ] && url_line="database_url = \"$1\""
  cexec sh -c "cat > /etc/pim_job_queue/worker.toml" <<EOF
$url_line
poll_interval = "200ms"
heartbeat_interval = "500ms"
rescue_after = "3s"
stop_grace = "60s"
[job]
command = ["/bin/sh", "-c", "echo \"output of job \$0\"; sleep \"\$1\"; echo \"job \$0 done\"", "{id}", "{payload.sleep}"]
[jobs.retryable]
max_attempts = 2
EOF
  cexec mkdir -p /etc/systemd/system/pim_job_queue@.service.d
  # A short watchdog so a frozen worker is noticed within seconds.
  cexec sh -c 'cat > /etc/systemd/system/pim_job_queue@.service.d/e2e.conf' <<'EOF'
[Service]
WatchdogSec=3s
RestartSec=1s
TimeoutAbortSec=10s
EOF
  cexec systemctl daemon-reload
}

# ------------------------------------------------------------------ the checks

run_checks() { # label
  local label=$1
  log "== checks on $label"
  cexec sh -c 'printf "import_export_job\n" > /etc/pim_job_queue/1.conf; rm -f /etc/pim_job_queue/2.conf; printf "ui_job\nbogus_queue\n" > /etc/pim_job_queue/3.conf'

  # 1. start returns only after READY; status shows the STATUS line.
  check "1: systemctl start pim_job_queue@1" cexec systemctl start pim_job_queue@1
  check "1: active as soon as start returns" is active prop pim_job_queue@1 ActiveState
  check "1: StatusText after READY" is "Idle, waiting for jobs on import_export_job" prop pim_job_queue@1 StatusText
  check "1: systemctl status shows it" status_shows pim_job_queue@1 'Status: "Idle, waiting for jobs on import_export_job"'

  # 2. A missing 2.conf means all three queues, and the journal says so.
  check "2: systemctl start pim_job_queue@2" cexec systemctl start pim_job_queue@2
  check "2: instance 2 serves all queues" is "Idle, waiting for jobs on ui_job, import_export_job, data_maintenance_job" prop pim_job_queue@2 StatusText
  check "2: the journal says so" journal_has "does not exist or is empty, this consumer will support all job types" -u pim_job_queue@2

  # 3. Jobs pushed from the command line run; the journal shows start, output and end, and
  #    JOB_ID=<id> selects exactly one job.
  local first second
  first=$(push ui_job hello)
  second=$(push ui_job hello)
  wait_for "3: job $first ran" 15 job_is "$first" succeeded
  wait_for "3: job $second ran" 15 job_is "$second" succeeded
  check "3: instance 2 ran them (instance 1 only serves import_export_job)" is "$(prop pim_job_queue@2 MainPID)" job_field "$first" worker_pid
  check "3: journal shows the start" journal_has "job started" -u pim_job_queue@2 JOB_ID="$first"
  check "3: journal shows the output" journal_has "output of job $first" -u pim_job_queue@2
  check "3: journal shows the end" journal_has "job finished" -u pim_job_queue@2 JOB_ID="$first"
  check "3: JOB_ID=$first shows only that job" refused journal_has "job $second" -u pim_job_queue@2 JOB_ID="$first"
  check "3: JOB_ID=$first has its output" journal_has "output of job $first" -u pim_job_queue@2 JOB_ID="$first"
  check "3: the end has its MESSAGE_ID and result" journal_has "job finished" -u pim_job_queue@2 MESSAGE_ID=6ac29e07ec8f45c1b58f299e4e118cbd JOB_RESULT=succeeded JOB_ID="$first"
  check "3: journalctl -x explains it from the installed catalog" explained "Job $first (hello) ended: succeeded" -u pim_job_queue@2 JOB_ID="$first" MESSAGE_ID=6ac29e07ec8f45c1b58f299e4e118cbd
  check "3: one job's OOM kill does not stop the instance" is continue prop pim_job_queue@2 OOMPolicy

  # 3b. A fleet-wide pause reaches each worker's STATUS, and resume clears it.
  check "3b: pause import_export_job" pjq pause import_export_job --reason "feed broken"
  wait_for "3b: instance 1 says it is paused" 20 is "Idle, waiting for jobs on import_export_job; paused: import_export_job (feed broken)" prop pim_job_queue@1 StatusText
  check "3b: resume" pjq resume import_export_job
  wait_for "3b: instance 1 says it no more" 20 is "Idle, waiting for jobs on import_export_job" prop pim_job_queue@1 StatusText

  # 3c. The metrics timer (off by default) writes node_exporter's textfile, which promtool
  # accepts and which counts the jobs of 3.
  local textfile=/var/lib/prometheus/node-exporter/pim_job_queue.prom
  check "3c: the metrics timer is off by default" is disabled cexec systemctl is-enabled pim-job-queue-metrics.timer
  cexec mkdir -p /var/lib/prometheus/node-exporter
  cexec rm -f "$textfile"
  check "3c: systemctl start pim-job-queue-metrics.timer" cexec systemctl start pim-job-queue-metrics.timer
  wait_for "3c: the timer wrote $textfile" 20 cexec test -s "$textfile"
  check "3c: promtool check metrics accepts it" promtool_accepts "$textfile"
  check "3c: it counts the jobs of 3" metric_at_least 2 'pjq_jobs_finished_total{queue="ui_job",result="succeeded"}' "$textfile"
  check "3c: the service ran as pim-job-queue and succeeded" is success prop pim-job-queue-metrics.service Result
  check "3c: no temporary file is left" refused cexec sh -c "ls -A /var/lib/prometheus/node-exporter | grep -v '^pim_job_queue.prom\$'"
  cexec systemctl stop pim-job-queue-metrics.timer

  # 4. A bad 3.conf leaves instance 3 failed, the reason in its journal, no restart loop.
  check "4: start of instance 3 fails" refused cexec systemctl start pim_job_queue@3
  sleep 3
  check "4: instance 3 is failed" is failed prop pim_job_queue@3 ActiveState
  check "4: no restart loop" is 0 prop pim_job_queue@3 NRestarts
  check "4: exit status 78" is 78 prop pim_job_queue@3 ExecMainStatus
  check "4: the journal names the file and line" journal_has "3.conf:2: unknown queue \"bogus_queue\"" -u pim_job_queue@3
  cexec systemctl reset-failed pim_job_queue@3

  # 5. Watchdog: a frozen worker is restarted, and the job it held is rescued.
  cexec systemctl stop pim_job_queue@2
  local held frozen
  held=$(push import_export_job retryable 6)
  wait_for "5: instance 1 holds job $held" 15 job_is "$held" running
  frozen=$(prop pim_job_queue@1 MainPID)
  cexec kill -STOP "$frozen"
  wait_for "5: the watchdog restarted the frozen worker" 30 restarted pim_job_queue@1
  wait_for "5: active again" 15 is active prop pim_job_queue@1 ActiveState
  check "5: with a new MainPID" test "$(prop pim_job_queue@1 MainPID)" != "$frozen"
  wait_for "5: job $held rescued and run again" 60 job_is "$held" succeeded
  check "5: on its second attempt" is 2 job_field "$held" attempts
  check "5: the journal tells the watchdog story" journal_has "Watchdog timeout" -u pim_job_queue@1

  # 6. systemctl stop during a 10 s job waits for it; the job is recorded succeeded.
  local long
  long=$(push import_export_job hello 10)
  wait_for "6: job $long running" 15 job_is "$long" running
  local before after
  before=$(date +%s)
  check "6: systemctl stop pim_job_queue@1" cexec systemctl stop pim_job_queue@1
  after=$(date +%s)
  check "6: job $long recorded succeeded" job_is "$long" succeeded
  check "6: stop waited for the job ($((after - before)) s)" test $((after - before)) -ge 5
  check "6: the journal says it waited" journal_has "waiting up to" -u pim_job_queue@1

  # 7. reload after editing 1.conf changes the queues, same process.
  cexec systemctl start pim_job_queue@1
  local pid
  pid=$(prop pim_job_queue@1 MainPID)
  cexec sh -c 'printf "ui_job\n" > /etc/pim_job_queue/1.conf'
  check "7: systemctl reload pim_job_queue@1" cexec systemctl reload pim_job_queue@1
  wait_for "7: now serving ui_job" 10 is "Idle, waiting for jobs on ui_job" prop pim_job_queue@1 StatusText
  check "7: same MainPID" is "$pid" prop pim_job_queue@1 MainPID
  local reloaded
  reloaded=$(push ui_job hello)
  wait_for "7: instance 1 runs ui_job now" 15 job_is "$reloaded" succeeded
  check "7: on the reloaded process" is "$pid" job_field "$reloaded" worker_pid
}

sudo_checks() {
  log "== sudo rules"
  cexec sh -c 'id akeneo >/dev/null 2>&1 || useradd -m -s /bin/sh akeneo; id intruder >/dev/null 2>&1 || useradd -m -s /bin/sh intruder'
  cexec adduser --quiet akeneo pim-job-queue-ops
  check "8: visudo -c accepts the whole configuration" cexec visudo -c
  local verb
  for verb in start restart reload; do
    check "8: akeneo may $verb pim_job_queue@2" as_user akeneo "sudo -n systemctl $verb pim_job_queue@2"
  done
  check "8: akeneo may read status without a pager" as_user akeneo "sudo -n systemctl --no-pager status pim_job_queue@2"
  check "8: akeneo may stop pim_job_queue@2.service" as_user akeneo "sudo -n systemctl stop pim_job_queue@2.service"
  check "8: stopped" is inactive prop pim_job_queue@2 ActiveState
  local denied
  for denied in \
    "systemctl start ssh.service" \
    "systemctl start pim_job_queue@2 debug-shell.service" \
    "systemctl stop pim_job_queue@2 dbus.service" \
    "systemctl start --no-block pim_job_queue@2" \
    "systemctl --force start pim_job_queue@2" \
    "systemctl enable pim_job_queue@2" \
    "systemctl mask pim_job_queue@2" \
    "systemctl edit pim_job_queue@2" \
    "systemctl status pim_job_queue@2" \
    "systemctl start pim_job_queue@../../etc/shadow" \
    "systemctl start pim_job_queue@a-..-..-etc-shadow" \
    "systemctl start pim_job_queue@a\\\\x2fb" \
    "systemctl start pim_job_queue@1.timer" \
    "systemctl start pim_job_queue@-h" \
    "systemctl start pim_job_queue@--help" \
    "systemctl start debug-shell.service" \
    "/bin/sh -c id"; do
    # `sudo -l COMMAND` asks the policy without running anything, so a refusal here is the
    # rule's, never the command's own failure.
    check "8: akeneo may not: sudo $denied" refused as_user akeneo "sudo -n -l $denied"
  done
  check "8: a user outside the group gets nothing" refused as_user intruder "sudo -n -l systemctl start pim_job_queue@2"
  check "8: not even status" refused as_user intruder "sudo -n -l systemctl --no-pager status pim_job_queue@2"
  check "8: while the same query for akeneo is allowed" as_user akeneo "sudo -n -l systemctl start pim_job_queue@2"
  cexec systemctl stop pim_job_queue@2
}

# The wake-up directory, attacked by a real local user (`intruder`, made by sudo_checks).
wake_dir_of_store() { cexec sh -c 'for d in /run/pim_job_queue/*/; do echo "${d%/}"; done' | head -n 1; }
sockets_in() { cexec sh -c "ls $1/*.sock 2>/dev/null | wc -l"; }
wake_checks() {
  log "== the wake-up directory against a local user"
  cexec systemctl stop 'pim_job_queue@*'
  cexec systemctl start pim_job_queue@2
  local dir
  dir=$(wake_dir_of_store)
  check "14: /run/pim_job_queue is 0755, the service user's" is "755 pim-job-queue" cexec stat -c '%a %U' /run/pim_job_queue
  check "14: the database's directory too" is "755 pim-job-queue" cexec stat -c '%a %U' "$dir"
  check "14: the worker's socket is there" is 1 sockets_in "$dir"
  check "14: intruder cannot make a directory in the base" refused as_user intruder "mkdir /run/pim_job_queue/x"
  check "14: nor plant a symlink as a socket" refused as_user intruder "ln -s /etc/shadow $dir/evil.sock"
  check "14: nor delete the worker's socket" refused as_user intruder "rm $dir/*.sock"
  check "14: which any user may send a wake-up to (0666)" is 666 cexec sh -c "stat -c %a $dir/*.sock"
  # The takeover as it worked before: the base was 1777 and the database's directory name is
  # predictable, so after a reboot a user could make it first.
  cexec systemctl stop pim_job_queue@2
  cexec rm -rf "$dir"
  cexec chmod 1777 /run/pim_job_queue
  check "14: (stand-in: intruder makes the directory first)" as_user intruder "mkdir -m 0777 $dir"
  cexec systemctl start pim_job_queue@2
  check "14: the start made the base 0755 again" is "755 pim-job-queue" cexec stat -c '%a %U' /run/pim_job_queue
  check "14: the worker refuses the intruder's directory" journal_has "not used for wake-ups" -u pim_job_queue@2
  check "14: and binds nothing in it" is 0 sockets_in "$dir"
  local job
  job=$(push ui_job hello)
  wait_for "14: jobs still run, by polling (job $job)" 15 job_is "$job" succeeded
  cexec systemctl stop pim_job_queue@2
  cexec rm -rf "$dir"
}

fleet_checks() { # with the MariaDB store: a worker on the host is a second "host"
  log "== several hosts on one MariaDB database"
  local host_config=$STATE/host-worker.toml
  printf 'database_url = "%s"\nwake_dir = "%s/wake"\n[job]\ncommand = ["/bin/echo", "host-b ran {id}"]\n' \
    "$E2E_URL" "$STATE" >"$host_config"
  PIM_JOB_QUEUE_CONFIG=$host_config target/release/pim-job-queue consume data_maintenance_job \
    --host-id host-b >"$STATE/host-worker.log" 2>&1 &
  HOST_WORKER=$!
  cexec systemctl start pim_job_queue@2
  local job
  job=$(push data_maintenance_job hello)
  wait_for "10: job $job ran" 20 job_is "$job" succeeded
  wait_for "10: status lists workers of both hosts" 10 workers_of_hosts host-b "$HOSTNAME_IN"
  kill "$HOST_WORKER"
  wait "$HOST_WORKER" || true
  HOST_WORKER=""
  cexec systemctl stop pim_job_queue@2
}

package_lifecycle() { # deb upgraded_deb
  log "== upgrade, remove, purge"
  # Native jobs again, without the Akeneo drop-in of the checks before.
  cexec rm -rf /etc/systemd/system/pim_job_queue@.service.d
  write_config "$E2E_URL"
  cexec chgrp pim-job-queue /etc/pim_job_queue/worker.toml
  cexec systemctl start pim_job_queue@1 pim_job_queue@2
  local one two
  one=$(prop pim_job_queue@1 MainPID)
  two=$(prop pim_job_queue@2 MainPID)
  cp "$2" "$ROOTFS/var/tmp/upgrade.deb"
  # A job that outlasts the upgrade: apt must not wait for it (stop_grace could be 30 min).
  local draining before
  draining=$(push ui_job hello 12)
  wait_for "9: job $draining running before the upgrade" 15 job_is "$draining" running
  before=$(date +%s)
  check "9: apt installs the higher version" capt install -y /var/tmp/upgrade.deb
  check "9: without waiting for the running job ($(($(date +%s) - before)) s)" test $(($(date +%s) - before)) -lt 10
  check "9: and says the instances are draining" grep -F "each finishes its running job first" "$STATE/apt.log"
  check "9: the new version is installed" is "$UPGRADED_VERSION" cexec dpkg-query -W -f='${Version}' pim-job-queue
  wait_for "9: the running job finished, succeeded" 30 job_is "$draining" succeeded
  wait_for "9: instance 1 restarted" 30 test "$(prop pim_job_queue@1 MainPID)" != "$one"
  wait_for "9: instance 2 restarted" 30 test "$(prop pim_job_queue@2 MainPID)" != "$two"
  wait_for "9: instance 1 active again" 30 is active prop pim_job_queue@1 ActiveState
  wait_for "9: instance 2 active again" 30 is active prop pim_job_queue@2 ActiveState
  check "9: apt remove" capt remove -y pim-job-queue
  wait_for "9: remove stopped instance 1" 30 refused cexec systemctl is-active --quiet pim_job_queue@1
  wait_for "9: remove stopped instance 2" 30 refused cexec systemctl is-active --quiet pim_job_queue@2
  check "9: remove took the sudo grant away" refused cexec test -e /etc/sudoers.d/pim_job_queue
  check "9: the rules themselves are kept (conffile)" cexec test -e /etc/pim_job_queue/sudoers
  check "9: akeneo may no longer start instances" refused as_user akeneo "sudo -n -l systemctl start pim_job_queue@2"
  check "9: apt purge" capt purge -y pim-job-queue
  check "9: purge leaves no config" refused cexec test -e /etc/pim_job_queue
  check "9: purge leaves no sudo rules" refused cexec test -e /etc/sudoers.d/pim_job_queue
  check "9: purge leaves no state" refused cexec test -e /var/lib/pim_job_queue
}

# The package's users and sudo rules against what a machine may already have.
debug_lines() { grep -c "Bus " || true; }
akeneo_debug_lines() {
  as_user akeneo 'SYSTEMD_LOG_LEVEL=debug sudo -n systemctl --no-pager status pim_job_queue@2 2>&1' | debug_lines
}
packaging_checks() {
  log "== postinst on existing ordinary users, the sudo rules' lifecycle"
  # As a site may have them: made by hand, ordinary (uid/gid >= 1000), not system ones.
  cexec sh -c 'userdel pim-job-queue 2>/dev/null; groupdel pim-job-queue 2>/dev/null; groupdel pim-job-queue-ops 2>/dev/null;
               useradd -U -u 1500 -m pim-job-queue && groupadd -g 1501 pim-job-queue-ops'
  check "15: apt installs over an ordinary user and group of the same names" capt install -y /var/tmp/pim-job-queue.deb
  check "15: and says it reuses them" grep -F "reusing the existing user pim-job-queue" "$STATE/apt.log"
  check "15: the service user is the existing one" is 1500 cexec id -u pim-job-queue
  cexec adduser --quiet akeneo pim-job-queue-ops
  check "15: the checked copy of the rules is live" is "440 root:root" cexec stat -c '%a %U:%G' /etc/sudoers.d/pim_job_queue
  check "15: akeneo may start instances" as_user akeneo "sudo -n -l systemctl start pim_job_queue@2"

  # A site's env_keep must not reach the rules' commands: SYSTEMD_LOG_LEVEL=debug would make
  # systemctl print its D-Bus traffic (as it does for root, the control).
  cexec sh -c 'printf "Defaults env_keep += \"SYSTEMD_LOG_LEVEL SYSTEMD_PAGER\"\n" > /etc/sudoers.d/site && chmod 0440 /etc/sudoers.d/site'
  check "15: (control: the variable makes systemctl talk)" test "$(cexec env SYSTEMD_LOG_LEVEL=debug systemctl --no-pager status pim_job_queue@2 2>&1 | debug_lines)" -gt 0
  check "15: a site's env_keep does not reach the rules' commands" is 0 akeneo_debug_lines
  cexec rm -f /etc/sudoers.d/site

  # Rules this sudo cannot parse are never live; they come back when sudo can parse them
  # (here: fixed, then sudo reinstalled, which runs the package's trigger).
  cexec cp /etc/pim_job_queue/sudoers /var/tmp/sudoers.good
  cexec sh -c 'echo "this is not sudoers syntax" >> /etc/pim_job_queue/sudoers'
  check "15: dpkg-reconfigure with rules sudo cannot parse" cexec dpkg-reconfigure pim-job-queue
  check "15: no grant is live" refused cexec test -e /etc/sudoers.d/pim_job_queue
  check "15: the rejected copy is set aside" cexec test -e /etc/sudoers.d/pim_job_queue.disabled
  check "15: sudo still works for root" cexec sudo -n true
  check "15: akeneo gets nothing" refused as_user akeneo "sudo -n -l systemctl start pim_job_queue@2"
  cexec cp /var/tmp/sudoers.good /etc/pim_job_queue/sudoers
  check "15: sudo reinstalled (the package's trigger runs)" capt install -y --reinstall sudo
  check "15: the rules are back" is "440 root:root" cexec stat -c '%a %U:%G' /etc/sudoers.d/pim_job_queue
  check "15: nothing is left aside" refused cexec test -e /etc/sudoers.d/pim_job_queue.disabled
  check "15: akeneo may start instances again" as_user akeneo "sudo -n -l systemctl start pim_job_queue@2"
  check "15: apt purge" capt purge -y pim-job-queue
  check "15: purge deletes the rules" refused cexec sh -c 'ls /etc/sudoers.d/*pim_job_queue* /etc/pim_job_queue/sudoers 2>/dev/null | grep .'
  # Back to a machine without them, so the next run starts from system users again.
  cexec sh -c 'userdel -r pim-job-queue 2>/dev/null; groupdel pim-job-queue 2>/dev/null; groupdel pim-job-queue-ops 2>/dev/null; true'
}

. scripts/lib/e2e-akeneo.sh

# ------------------------------------------------------------------ main

deb=${1:-}
if [ -z "$deb" ]; then
  deb=$(scripts/build-deb.sh)
fi
[ -f "$deb" ] || fail "no .deb at $deb"
[ -x target/release/pim-job-queue ] || cargo build --release --locked

# The upgrade target: the same package with a higher version.
VERSION=$(dpkg-deb -f "$deb" Version)
UPGRADED_VERSION="$VERSION+e2e1"
rm -rf "$STATE/repack" && dpkg-deb -R "$deb" "$STATE/repack"
sed -i "s/^Version: .*/Version: $UPGRADED_VERSION/" "$STATE/repack/DEBIAN/control"
dpkg-deb --root-owner-group -b "$STATE/repack" "$STATE/upgrade.deb" >/dev/null

start_mariadb
provision_test_roles
E2E_DATABASE="pjq_e2e_$$"
mariadb_admin -e "CREATE DATABASE $E2E_DATABASE"
E2E_URL="mysql://pjq_test:$PJQ_TEST_PASSWORD@127.0.0.1:3306/$E2E_DATABASE"

make_rootfs
boot
cp "$deb" "$ROOTFS/var/tmp/pim-job-queue.deb"
check "apt installs $(basename "$deb")" capt install -y /var/tmp/pim-job-queue.deb
check "the sudoers file is 0440 root:root" is "440 root:root" cexec stat -c '%a %U:%G' /etc/sudoers.d/pim_job_queue
check "worker.toml is not world-readable" is "640 root:pim-job-queue" cexec stat -c '%a %U:%G' /etc/pim_job_queue/worker.toml

if [ "${E2E_ONLY:-}" = akeneo ]; then # a developer's shortcut: only the Akeneo parts
  akeneo_php_checks
  cexec systemctl stop 'pim_job_queue@*'
  capt purge -y pim-job-queue
  migration_checks
  exit 0
fi

write_config ""
run_checks "the default SQLite store"
sudo_checks
wake_checks
cexec systemctl stop 'pim_job_queue@*'

write_config "$E2E_URL"
run_checks "MariaDB over TCP"
fleet_checks
restart_checks
akeneo_php_checks
package_lifecycle "$deb" "$STATE/upgrade.deb"
packaging_checks
migration_checks

# The Akeneo parts of the container end-to-end test, sourced by scripts/e2e-systemd.sh after
# its helpers (cexec, check, wait_for, prop, journal_has, capt, ...):
#   * a real PHP console job as www-data under the unit plus examples/akeneo.conf;
#   * `stop-workers` restarts instances instead of leaving them stopped;
#   * Akeneo's documented systemd recipe, then the package, then the README's migration
#     commands exactly as the README gives them.
# The PIM is tests/fixtures/e2e-pim/console.php (Debian's Symfony Console) in
# /home/akeneo/pim, its tables (tests/fixtures/akeneo-tables.sql) in the host's MariaDB.

PIM_DIR=/home/akeneo/pim
EXPORT_CLASS='Akeneo\\Tool\\Component\\BatchQueue\\Queue\\ExportJobExecutionMessage'

pim_sql() { # statements; NO_BACKSLASH_ESCAPES so JSON backslashes pass as written
  mariadb_admin -N "$E2E_DATABASE" -e "SET SESSION sql_mode = 'NO_BACKSLASH_ESCAPES'; $1"
}

# A job instance, a STARTING execution and its message, as the PIM queues a job; prints the
# execution id.
queue_pim_job() { # queue code
  pim_sql "INSERT IGNORE INTO akeneo_batch_job_instance (code, job_name, type) VALUES ('$2', '$2', 'export');
    INSERT INTO akeneo_batch_job_execution (job_instance_id, status, exit_code, create_time, raw_parameters)
      SELECT id, 2, 'UNKNOWN', UTC_TIMESTAMP(), '{}' FROM akeneo_batch_job_instance WHERE code = '$2';
    SET @execution = LAST_INSERT_ID();
    INSERT INTO messenger_messages (body, headers, queue_name, created_at, available_at)
      VALUES (CONCAT('{\"job_execution_id\":', @execution, ',\"options\":{}}'),
              '{\"class\":\"$EXPORT_CLASS\"}', '$1', UTC_TIMESTAMP(), UTC_TIMESTAMP());
    SELECT @execution;"
}
execution_status() { pim_sql "SELECT status FROM akeneo_batch_job_execution WHERE id = $1"; }
execution_is() { [ "$(execution_status "$1")" = "$2" ]; }

install_pim() {
  log "installing PHP (php-cli, php-mysql, php-symfony-console) and Postfix in the container"
  cexec sh -c 'echo "postfix postfix/main_mailer_type select Local only" | debconf-set-selections;
               echo "postfix postfix/mailname string pimtest" | debconf-set-selections'
  check "apt installs PHP and Postfix" capt install -y --no-install-recommends \
    php-cli php-mysql php-symfony-console postfix
  cexec sh -c 'id akeneo >/dev/null 2>&1 || useradd -m -s /bin/sh akeneo; chmod 0755 /home/akeneo'
  cexec mkdir -p "$PIM_DIR/bin" "$PIM_DIR/var" "$PIM_DIR/public/media" /srv/pim-exports
  cp tests/fixtures/e2e-pim/console.php "$ROOTFS$PIM_DIR/bin/console"
  cexec chmod 0755 "$PIM_DIR/bin/console"
  cexec chown -R www-data:www-data "$PIM_DIR/var" "$PIM_DIR/public/media" /srv/pim-exports
  mariadb_admin -e "DROP DATABASE IF EXISTS $E2E_DATABASE; CREATE DATABASE $E2E_DATABASE"
  mariadb_admin "$E2E_DATABASE" <tests/fixtures/akeneo-tables.sql
}

write_akeneo_config() { # [--no-drop-in]
  cexec mkdir -p /etc/pim_job_queue
  cexec sh -c "cat > /etc/pim_job_queue/worker.toml" <<EOF
database_url = "$E2E_URL"
transport = "akeneo"
poll_interval = "200ms"
heartbeat_interval = "500ms"
rescue_after = "3s"
stop_grace = "60s"
[akeneo]
project_dir = "$PIM_DIR"
php_binary = "/usr/bin/php"
[akeneo.environment]
PIM_E2E_DSN = "mysql:host=127.0.0.1;port=3306;dbname=$E2E_DATABASE"
PIM_E2E_USER = "pjq_test"
PIM_E2E_PASSWORD = "$PJQ_TEST_PASSWORD"
EOF
  cexec chgrp www-data /etc/pim_job_queue/worker.toml
  [ "${1:-}" = --no-drop-in ] && return 0
  cexec mkdir -p /etc/systemd/system/pim_job_queue@.service.d
  cp examples/akeneo.conf "$ROOTFS/etc/systemd/system/pim_job_queue@.service.d/akeneo.conf"
  cexec systemctl daemon-reload
}

report_field() { # execution field
  cexec cat "$PIM_DIR/var/sandbox-$1.json" | sed -n "s/.*\"$2\":\"\{0,1\}\([^\",}]*\).*/\1/p"
}
mode_of() { cexec stat -c '%a %U' "$1"; }
mail_queued() { cexec sh -c "grep -rqs 'pim-e2e-mail-$1' /var/spool/postfix /var/mail"; }
# True when the command keeps succeeding for the whole window (systemd's IPC clean-up, for
# one, happens a moment after the unit stopped).
holds_for() { # seconds command...
  local seconds=$1
  shift
  for _ in $(seq 1 $((seconds * 10))); do
    "$@" >/dev/null 2>&1 || return 1
    sleep 0.1
  done
}
# `ipcs -s -i ID` exits 0 for a missing id too: look for it in the listing.
semaphore_exists() { cexec ipcs -s | awk -v id="$1" '$2 == id {found = 1} END {exit !found}'; }
reader_sees() { cexec su -s /bin/sh nobody -c "cat '$1'" >/dev/null 2>&1; }

# A drop-in with only the given settings (an older README's advice, say) instead of the
# shipped profile.
partial_drop_in() {
  cexec sh -c "mkdir -p /etc/systemd/system/pim_job_queue@.service.d; rm -f /etc/systemd/system/pim_job_queue@.service.d/*.conf;
               printf '[Service]\n%s\n' '$1' > /etc/systemd/system/pim_job_queue@.service.d/partial.conf"
  cexec systemctl daemon-reload
}
# `systemctl status` of a failed unit exits 3: keep its text, not its status.
failed_status_shows() { { cexec systemctl --no-pager --full status "$1" || true; } | grep -F -- "$2" >/dev/null; }
message_waits() { is 1 pim_sql "SELECT COUNT(*) FROM messenger_messages WHERE delivered_at IS NULL"; }

# The sandbox without the profile: the PIM under /home is hidden (ProtectHome=yes), or var/ is
# read-only (ProtectSystem=strict): the preflight refuses before READY and nothing is taken.
sandbox_refusals() {
  local id
  id=$(queue_pim_job import_export_job csv_product_export)
  partial_drop_in $'User=www-data\nGroup=www-data'
  check "11: without the profile, start fails" refused cexec systemctl start pim_job_queue@1
  check "11: exit 78" is 78 prop pim_job_queue@1 ExecMainStatus
  check "11: no restart loop" is 0 prop pim_job_queue@1 NRestarts
  check "11: systemctl status names ProtectHome" failed_status_shows pim_job_queue@1 "ProtectHome=yes hides /home"
  cexec systemctl reset-failed pim_job_queue@1
  partial_drop_in $'User=www-data\nGroup=www-data\nProtectHome=read-only'
  check "11: with /home visible but var/ read-only, start fails" refused cexec systemctl start pim_job_queue@1
  check "11: systemctl status says var/ is not writable" failed_status_shows pim_job_queue@1 "/var is not writable by this worker"
  cexec systemctl reset-failed pim_job_queue@1
  check "11: the message is still queued" message_waits
  check "11: its execution still waits to start" execution_is "$id" 2
  cexec rm -f /etc/systemd/system/pim_job_queue@.service.d/partial.conf
  pim_sql "DELETE FROM messenger_messages; DELETE FROM akeneo_batch_job_execution"
}

akeneo_php_checks() {
  log "== a real PHP job as www-data under the unit and examples/akeneo.conf"
  cexec systemctl stop 'pim_job_queue@*'
  install_pim
  write_akeneo_config --no-drop-in
  cexec sh -c 'printf "import_export_job\n" > /etc/pim_job_queue/1.conf'
  sandbox_refusals
  write_akeneo_config
  # Another www-data process's SysV semaphore, as PHP-FPM holds them.
  local semaphore
  semaphore=$(cexec su -s /bin/sh www-data -c 'ipcmk -S 1' | awk '{print $NF}')
  check "11: a www-data semaphore exists ($semaphore)" semaphore_exists "$semaphore"
  check "11: systemctl start pim_job_queue@1 (preflight runs the PIM's console)" cexec systemctl start pim_job_queue@1
  check "11: it runs as www-data" is www-data prop pim_job_queue@1 User
  check "11: the preflight detected Akeneo 7" journal_has "launching with akeneo7" -u pim_job_queue@1
  local id
  id=$(queue_pim_job import_export_job csv_product_export)
  wait_for "11: execution $id completed" 40 execution_is "$id" 1
  check "11: PCRE JIT on" is 1 report_field "$id" pcre.jit
  check "11: the long preg_match matched" is 1 report_field "$id" preg_match
  check "11: without error" is "No error" report_field "$id" preg_error
  check "11: no PHP warning in the journal" refused journal_has "Warning" -u pim_job_queue@1
  check "11: umask 0022" is 0022 report_field "$id" umask
  check "11: var/ file written, o+r" is "644 www-data" mode_of "$PIM_DIR/var/job-$id.txt"
  check "11: export path written, o+r" is "644 www-data" mode_of "/srv/pim-exports/export_$id.csv"
  check "11: /tmp/export_$id.csv is the host's, readable by others" reader_sees "/tmp/export_$id.csv"
  check "11: sendmail exited 0" is 0 report_field "$id" sendmail_exit
  wait_for "11: the mail reached Postfix" 20 mail_queued "$id"
  cexec systemctl start pim_job_queue@2
  cexec systemctl stop 'pim_job_queue@*'
  check "11: /tmp/export_$id.csv outlives the worker" reader_sees "/tmp/export_$id.csv"
  check "11: the www-data semaphore survives the stop of every instance" holds_for 5 semaphore_exists "$semaphore"
  cexec ipcrm -s "$semaphore"
}

restarts_above() { [ "$(prop "$1" NRestarts)" -gt "$2" ]; }

restart_checks() {
  log "== stop-workers restarts instead of stopping"
  cexec systemctl start pim_job_queue@2
  local pid restarts
  pid=$(prop pim_job_queue@2 MainPID)
  restarts=$(prop pim_job_queue@2 NRestarts)
  check "12: pim-job-queue stop-workers" pjq stop-workers
  wait_for "12: instance 2 restarted" 20 restarts_above pim_job_queue@2 "$restarts"
  wait_for "12: active again" 15 is active prop pim_job_queue@2 ActiveState
  check "12: with a new MainPID" test "$(prop pim_job_queue@2 MainPID)" != "$pid"
  check "12: the exit counted as success" is success prop pim_job_queue@2 Result
  check "12: the journal says why" journal_has "stop-workers requested" -u pim_job_queue@2
  cexec systemctl stop pim_job_queue@2
}

# Akeneo's "Option #2 - systemd", as pim-docs gives it, with its placeholders filled in. The
# documented launcher has no #! line, which systemd cannot execute: the bash it is written
# for is named.
install_akeneo_recipe() {
  cexec mkdir -p /home/akeneo/.systemd/pim_job_queue
  cexec sh -c 'printf "import_export_job\n" > /home/akeneo/.systemd/pim_job_queue/1.conf;
               printf "ui_job\n" > /home/akeneo/.systemd/pim_job_queue/2.conf'
  cexec sh -c 'cat > /etc/systemd/system/pim_job_queue@.service' <<'EOF'
[Unit]
Description=Akeneo PIM Job Queue Service (~/.systemd/pim_job_queue/%i.conf)

[Service]
Type=forking
User=root
WorkingDirectory=/home/akeneo/.systemd
ExecStart=/usr/local/bin/pim_job_queue_launcher.sh %i
After=apache2.service
Restart=always

[Install]
WantedBy=multi-user.target
EOF
  cexec sh -c 'cat > /usr/local/bin/pim_job_queue_launcher.sh && chmod 0755 /usr/local/bin/pim_job_queue_launcher.sh' <<'EOF'
#!/bin/bash
QUEUE_IDENTIFIER=${1}

JOB_TYPES=""
CONF_FILE=/home/akeneo/.systemd/pim_job_queue/${QUEUE_IDENTIFIER}.conf

if [ -f ${CONF_FILE} ]; then
while read job; do
    JOB_TYPES+="$job "
done <${CONF_FILE}
fi
if [ -z "${JOB_TYPES// }" ]; then
    echo "${CONF_FILE} does not exist or is empty, this consumer will support all job types"
    JOB_TYPES="ui_job import_export_job data_maintenance_job"
fi

su -c "/home/akeneo/pim/bin/console messenger:consume --env=prod ${JOB_TYPES} &" akeneo

exit 0
EOF
  cexec systemctl daemon-reload
}

# The PHP processes only: the launcher's transient `su -c` and `sh -c` carry the same words in
# their argv for a moment after each start.
php_consumers() { cexec pgrep -f '^php [^ ]*bin/console messenger:consume --env=prod' | sort | tr '\n' ' '; }
serves() { is "Idle, waiting for jobs on $2" prop "pim_job_queue@$1" StatusText; }
fragment_is_ours() {
  case "$(prop pim_job_queue@1 FragmentPath)" in
    /usr/lib/systemd/system/pim_job_queue@.service | /lib/systemd/system/pim_job_queue@.service) return 0 ;;
    *) return 1 ;;
  esac
}

migration_checks() {
  log "== Akeneo's systemd recipe, then the package, then the README's migration"
  # Drop-ins of the earlier checks would apply to the recipe's unit of the same name.
  cexec rm -rf /etc/systemd/system/pim_job_queue@.service.d
  install_akeneo_recipe
  check "13: the recipe's instances start" cexec systemctl enable --now pim_job_queue@1 pim_job_queue@2
  wait_for "13: two PHP consumers run" 20 test "$(php_consumers | wc -w)" = 2
  local consumers
  consumers=$(php_consumers)
  check "13: apt installs the package over the recipe" capt install -y /var/tmp/pim-job-queue.deb
  check "13: postinst warns about the recipe's unit" grep -F "is not this package's" "$STATE/apt.log"
  check "13: and gives the commands" grep -F "rm /etc/systemd/system/pim_job_queue@.service" "$STATE/apt.log"
  [ "$(php_consumers)" = "$consumers" ] \
    || log "PHP consumers before the install: $consumers; after: $(php_consumers); $(cexec ps -eo pid,ppid,lstart,args | grep -F messenger:consume)"
  check "13: the recipe's consumers were left alone" is "$consumers" php_consumers
  write_akeneo_config --no-drop-in
  local block
  block=$(sed -n '/<!-- migration:begin -->/,/<!-- migration:end -->/p' README.md | grep -v '^<!--' | grep -v '^```')
  [ -n "$block" ] || fail "13: no migration block in README.md"
  log "running the README's migration commands:"
  printf '%s\n' "$block" >&2
  check "13: the README's commands run" cexec bash -euc "$block"
  check "13: the recipe's launcher is gone" refused cexec test -e /usr/local/bin/pim_job_queue_launcher.sh
  check "13: the package's unit is in force" fragment_is_ours
  check "13: with the README's drop-in" is www-data prop pim_job_queue@1 User
  wait_for "13: no PHP consumer is left" 20 test -z "$(php_consumers)"
  check "13: instance 1 is enabled" cexec systemctl is-enabled --quiet pim_job_queue@1
  wait_for "13: instance 1 serves 1.conf's queue" 20 serves 1 import_export_job
  wait_for "13: instance 2 serves 2.conf's queue" 20 serves 2 ui_job
  local id
  id=$(queue_pim_job import_export_job csv_product_export)
  wait_for "13: a queued export ran (execution $id)" 30 execution_is "$id" 1
  check "13: on instance 1" journal_has "job started" -u pim_job_queue@1 JOB_ID="$id"
  cexec systemctl disable --now pim_job_queue@1 pim_job_queue@2
  check "13: apt purge" capt purge -y pim-job-queue
}

//! The Akeneo drop-in transport against a real MariaDB: Akeneo's tables created from the
//! DDL facts in the reference notes, messages in the exact JSON shapes Akeneo writes, and a
//! fake `bin/console` that records its argv, cwd and environment and updates the execution
//! row like the real commands.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use sqlx::Connection;

use crate::support::*;

pub(crate) const UI: &str = r"Akeneo\\Tool\\Component\\BatchQueue\\Queue\\UiJobExecutionMessage";
pub(crate) const IMPORT: &str =
    r"Akeneo\\Tool\\Component\\BatchQueue\\Queue\\ImportJobExecutionMessage";
pub(crate) const MAINTENANCE: &str =
    r"Akeneo\\Tool\\Component\\BatchQueue\\Queue\\DataMaintenanceJobExecutionMessage";
pub(crate) const SCHEDULED: &str =
    r"Akeneo\\Tool\\Component\\BatchQueue\\Queue\\ScheduledJobMessage";

/// Akeneo's DDL (installer and 7.0 schema dump), trimmed to the columns that matter.
pub(crate) const DDL: &str = include_str!("../fixtures/akeneo-tables.sql");

/// The fake console. `list akeneo:batch --raw` answers as Symfony Console does (Akeneo 7
/// has the watchdog, `FAKE_AKENEO=6` has not; `FAKE_LIST_FAILS` plays a PHP that cannot
/// boot). Every other call leaves one file with cwd, argv and environment and a line in the
/// shared order file; `akeneo:batch:job` and `akeneo:batch:watchdog --job_execution_id=N`
/// then move the execution row as the real commands do, per `FAKE_BEHAVIOUR`:
/// `boot-fails` exits 255 before touching the row, `crash-after-N` fails after N seconds,
/// `hang` runs until signalled (the watchdog forwards SIGTERM to its job as SIGUSR1, so a
/// SIGTERM the job gets directly shows in the `signals` file), anything else completes.
const FAKE_CONSOLE: &str = r#"#!/bin/sh
set -e
if [ "$1" = "list" ]; then
  if [ -n "$FAKE_LIST_FAILS" ]; then
    echo "PHP Fatal error:  Uncaught RuntimeException: Unable to write in the cache directory (var/cache/prod)" >&2
    exit 255
  fi
  echo "akeneo:batch:create-job   Create a job instance"
  echo "akeneo:batch:job          Launch a registered job instance"
  [ "$FAKE_AKENEO" = 6 ] || echo "akeneo:batch:watchdog     Launch a job execution and watch it"
  exit 0
fi
call="$FAKE_CONSOLE_DIR/call.$$"
{ echo "cwd=$(pwd)"; for a in "$@"; do echo "arg=$a"; done; env | sed 's/^/env=/'; } > "$call"
echo "$*" >> "$FAKE_CONSOLE_DIR/order"
case "$1 $3" in
  "akeneo:batch:job "*) id=$4 ;;
  "akeneo:batch:watchdog --job_execution_id="*) id=${3#--job_execution_id=} ;;
  *) exit 0 ;;
esac
if [ "$FAKE_BEHAVIOUR" = boot-fails ]; then
  echo 'Command "akeneo:batch:watchdog" is not defined.' >&2
  exit 255
fi
sql() { mariadb -h 127.0.0.1 -P "$FAKE_DB_PORT" -u "$FAKE_DB_USER" ${FAKE_DB_PASSWORD:+-p"$FAKE_DB_PASSWORD"} "$FAKE_DB_NAME" -e "$1"; }
sql "UPDATE akeneo_batch_job_execution SET status = 3, exit_code = 'EXECUTING', pid = $$ WHERE id = $id"
case "$FAKE_BEHAVIOUR" in
  crash-after-*) sleep "${FAKE_BEHAVIOUR#crash-after-}"; exit 1 ;;
  hang)
    signals="$FAKE_CONSOLE_DIR/signals"
    sh -c "trap 'echo job-usr1 >> $signals; exit 0' USR1; trap 'echo job-term >> $signals; exit 0' TERM; while :; do sleep 0.1; done" &
    job=$!
    trap "echo watchdog-term >> $signals; kill -USR1 $job; wait $job; exit 0" TERM
    wait $job
    exit 0 ;;
  *) sql "UPDATE akeneo_batch_job_execution SET status = 1, exit_code = 'COMPLETED' WHERE id = $id" ;;
esac
"#;

/// A PIM: its tables in a fresh MariaDB database, a project with the fake console, and a
/// worker.toml selecting the Akeneo transport.
pub(crate) struct Pim {
    pub(crate) scratch: Scratch,
    pub(crate) project: PathBuf,
    pub(crate) calls: PathBuf,
}

impl Pim {
    pub(crate) fn new(launcher: &str) -> Pim {
        Self::on(Scratch::new(Backend::Mariadb), launcher)
    }

    /// A PIM in the scratch's database.
    pub(crate) fn on(scratch: Scratch, launcher: &str) -> Pim {
        block_on(async {
            let mut conn = sqlx::MySqlConnection::connect(&scratch.url).await.unwrap();
            for statement in DDL.split(';').filter(|s| s.contains("CREATE")) {
                sqlx::query(statement).execute(&mut conn).await.unwrap();
            }
        });
        let project = scratch.path("pim");
        let calls = scratch.path("calls");
        std::fs::create_dir_all(project.join("bin")).unwrap();
        std::fs::create_dir_all(project.join("var")).unwrap();
        std::fs::create_dir_all(&calls).unwrap();
        std::fs::write(project.join("bin/console"), FAKE_CONSOLE).unwrap();
        // The "PHP binary" is a shell of the test's own, so a test can break it.
        std::fs::copy("/bin/sh", scratch.path("php")).unwrap();
        let pim = Pim {
            scratch,
            project,
            calls,
        };
        pim.configure("", &format!("launcher = \"{launcher}\""));
        pim
    }

    /// Rewrites worker.toml: `top` goes before the `[akeneo]` table, `akeneo` into it (its
    /// own `php_binary` replaces the test's shell).
    pub(crate) fn configure(&self, top: &str, akeneo: &str) {
        let php = if akeneo.contains("php_binary") {
            String::new()
        } else {
            format!("php_binary = \"{}\"\n", self.php().display())
        };
        self.scratch.write_raw_config(&format!(
            "database_url = \"{url}\"\ntransport = \"akeneo\"\npoll_interval = \"100ms\"\n\
             wake_dir = \"{dir}/wake\"\ninstance_dir = \"{dir}\"\n{top}\n\
             [akeneo]\nproject_dir = \"{project}\"\n{php}{akeneo}\n",
            url = self.scratch.url,
            dir = self.scratch.dir.path().display(),
            project = self.project.display(),
        ));
    }

    pub(crate) fn php(&self) -> PathBuf {
        self.scratch.path("php")
    }

    pub(crate) fn sql(&self, statement: &str) {
        block_on(async {
            let mut conn = sqlx::MySqlConnection::connect(&self.scratch.url)
                .await
                .unwrap();
            sqlx::query(statement).execute(&mut conn).await.unwrap();
        });
    }

    pub(crate) fn query_i64(&self, statement: &str) -> i64 {
        block_on(async {
            let mut conn = sqlx::MySqlConnection::connect(&self.scratch.url)
                .await
                .unwrap();
            sqlx::query_scalar::<_, i64>(statement)
                .fetch_one(&mut conn)
                .await
                .unwrap()
        })
    }

    pub(crate) fn query_text(&self, statement: &str) -> Option<String> {
        block_on(async {
            let mut conn = sqlx::MySqlConnection::connect(&self.scratch.url)
                .await
                .unwrap();
            sqlx::query_scalar::<_, Option<String>>(statement)
                .fetch_one(&mut conn)
                .await
                .unwrap()
        })
    }

    /// A job instance and a STARTING execution of it, as the PIM creates before queueing.
    pub(crate) fn execution(&self, code: &str) -> i64 {
        self.sql(&format!(
            "INSERT IGNORE INTO akeneo_batch_job_instance (code, job_name, type) VALUES ('{code}', '{code}', 'import')"
        ));
        self.sql(&format!(
            "INSERT INTO akeneo_batch_job_execution (job_instance_id, status, exit_code, create_time, raw_parameters)
             SELECT id, 2, 'UNKNOWN', UTC_TIMESTAMP(), '{{}}' FROM akeneo_batch_job_instance WHERE code = '{code}'"
        ));
        self.query_i64("SELECT MAX(id) FROM akeneo_batch_job_execution")
    }

    /// A message as Symfony's Doctrine transport sends it (UTC, second precision).
    pub(crate) fn message(&self, queue: &str, headers: &str, body: &str, delivered_at: &str) {
        block_on(async {
            let mut conn = sqlx::MySqlConnection::connect(&self.scratch.url)
                .await
                .unwrap();
            sqlx::query(&format!(
                "INSERT INTO messenger_messages (body, headers, queue_name, created_at, available_at, delivered_at)
                 VALUES (?, ?, ?, UTC_TIMESTAMP(), UTC_TIMESTAMP(), {delivered_at})"
            ))
            .bind(body)
            .bind(headers)
            .bind(queue)
            .execute(&mut conn)
            .await
            .unwrap();
        });
    }

    pub(crate) fn job_message(&self, queue: &str, class: &str, execution: i64, options: &str) {
        let headers = format!(r#"{{"class":"{class}","correlation_id":"6f0c2a"}}"#);
        let body = format!(
            r#"{{"id":"9b2d6c1e-0b4a-4c57-9f0e-2c1d1b1a0f00","job_execution_id":{execution},"created_time":"2024-04-08T15:00:00+00:00","updated_time":null,"options":{options}}}"#
        );
        self.message(queue, &headers, &body, "NULL");
    }

    /// `pim-job-queue consume ARGS` with the fake console's environment plus `envs`.
    pub(crate) fn consume_command(
        &self,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> std::process::Command {
        let mut all = vec!["consume"];
        all.extend_from_slice(args);
        let mut command = self.scratch.command(&all);
        self.fake_env(&mut command);
        command.envs(envs.iter().copied());
        command
    }

    pub(crate) fn consume(&self, args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
        self.consume_command(args, envs).output().unwrap()
    }

    pub(crate) fn fake_env(&self, command: &mut std::process::Command) {
        // mysql://USER[:PASSWORD]@127.0.0.1:PORT/DATABASE
        let url = &self.scratch.url;
        let rest = url.strip_prefix("mysql://").unwrap();
        let (credentials, location) = rest.split_once('@').unwrap();
        let (user, password) = credentials.split_once(':').unwrap_or((credentials, ""));
        let (address, database) = location.split_once('/').unwrap();
        let port = address.rsplit(':').next().unwrap();
        command
            .env("FAKE_CONSOLE_DIR", &self.calls)
            .env("FAKE_DB_PORT", port)
            .env("FAKE_DB_USER", user)
            .env("FAKE_DB_PASSWORD", password)
            .env("FAKE_DB_NAME", database)
            .env("SYMFONY_DOTENV_VARS", "APP_ENV,APP_DEBUG");
    }

    /// The commands run, in order, as "argv joined by spaces".
    pub(crate) fn order(&self) -> Vec<String> {
        std::fs::read_to_string(self.calls.join("order"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// Every recorded call: (cwd, args, env lines).
    pub(crate) fn calls(&self) -> Vec<(String, Vec<String>, Vec<String>)> {
        let mut calls = Vec::new();
        for entry in std::fs::read_dir(&self.calls).unwrap().flatten() {
            if !entry.file_name().to_string_lossy().starts_with("call.") {
                continue;
            }
            let text = std::fs::read_to_string(entry.path()).unwrap();
            let field = |prefix: &str| -> Vec<String> {
                text.lines()
                    .filter_map(|l| l.strip_prefix(prefix).map(String::from))
                    .collect()
            };
            calls.push((field("cwd=").remove(0), field("arg="), field("env=")));
        }
        calls
    }

    pub(crate) fn execution_status(&self, execution: i64) -> i64 {
        self.query_i64(&format!(
            "SELECT status FROM akeneo_batch_job_execution WHERE id = {execution}"
        ))
    }

    pub(crate) fn exit_description(&self, execution: i64) -> String {
        self.query_text(&format!(
            "SELECT exit_description FROM akeneo_batch_job_execution WHERE id = {execution}"
        ))
        .unwrap_or_default()
    }

    /// Messages nobody has taken: still in the table, `delivered_at` empty.
    pub(crate) fn undelivered_messages(&self) -> i64 {
        self.query_i64("SELECT COUNT(*) FROM messenger_messages WHERE delivered_at IS NULL")
    }

    /// Spawns a consumer with the fake console's environment, its log in `<name>.log`.
    pub(crate) fn spawn(
        &self,
        name: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> std::process::Child {
        let log = std::fs::File::create(self.scratch.path(&format!("{name}.log"))).unwrap();
        self.consume_command(args, envs)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    pub(crate) fn remaining_messages(&self) -> i64 {
        self.query_i64("SELECT COUNT(*) FROM messenger_messages")
    }
}

#[test]
fn akeneo7_queue_order_argv_cwd_and_environment() {
    if !Backend::Mariadb.available() {
        return;
    }
    let pim = Pim::new("akeneo7");
    let import = pim.execution("csv_product_import");
    let ui = pim.execution("mass_edit_product");
    let maintenance = pim.execution("compute_completeness");
    pim.job_message("data_maintenance_job", MAINTENANCE, maintenance, "{}");
    pim.job_message(
        "import_export_job",
        IMPORT,
        import,
        r#"{"env":"prod","email":["a@b.c"],"no-log":true}"#,
    );
    pim.job_message(
        "ui_job",
        UI,
        ui,
        r#"{"env":"prod","user_to_notify":"admin","zero":0,"zero_text":"0","empty":"","off":false,"none":null,"emails":["x@y.z",""]}"#,
    );
    let output = pim.consume(&["--limit", "3"], &[]);
    assert_eq!(exit_code(&output), 0, "{}", stderr(&output));
    let expected = [
        format!(
            "akeneo:batch:watchdog --quiet --job_execution_id={ui} --emails=x@y.z --env=prod --user_to_notify=admin"
        ),
        format!(
            "akeneo:batch:watchdog --quiet --job_execution_id={import} --email=a@b.c --env=prod --no-log"
        ),
        format!("akeneo:batch:watchdog --quiet --job_execution_id={maintenance}"),
    ];
    assert_eq!(
        pim.order(),
        expected,
        "strict priority, Akeneo's option rule"
    );
    for (cwd, _, env) in pim.calls() {
        assert_eq!(cwd, pim.project.display().to_string());
        assert!(
            env.contains(&"APP_ENV=prod".to_string()),
            "the consumer's --env: {env:?}"
        );
        assert!(
            !env.iter().any(|e| e.starts_with("SYMFONY_DOTENV_VARS=")),
            "SYMFONY_DOTENV_VARS reached the job"
        );
        assert!(
            !env.iter()
                .any(|e| e.starts_with("PIM_JOB_QUEUE_DATABASE_URL="))
        );
    }
    assert_eq!(pim.remaining_messages(), 0, "acknowledged once started");
    for execution in [ui, import, maintenance] {
        assert_eq!(
            pim.execution_status(execution),
            1,
            "the jobs finished their rows"
        );
    }
    let log = String::from_utf8_lossy(&output.stdout);
    assert!(
        log.contains(&format!("job_id={ui}")) && log.contains("job_code=mass_edit_product"),
        "{log}"
    );
    let status = pim.scratch.ok(&["status"]);
    assert!(
        status.contains("messenger_messages at mysql://pjq_test:***@"),
        "{status}"
    );
}

#[test]
fn scheduled_tenant_bad_rows_and_unknown_classes() {
    if !Backend::Mariadb.available() {
        return;
    }
    let pim = Pim::new("akeneo7");
    pim.message("ui_job", &format!(r#"{{"class":"{UI}""#), "{}", "NULL");
    pim.message(
        "ui_job",
        r#"{"class":"App\\Message\\SomethingElse"}"#,
        r#"{"id":1}"#,
        "NULL",
    );
    pim.message(
        "ui_job",
        &format!(r#"{{"class":"{UI}"}}"#),
        r#"{"job_execution_id":"not a number"}"#,
        "NULL",
    );
    pim.message(
        "ui_job",
        &format!(r#"{{"class":"{SCHEDULED}","tenant_id":"tenant-7"}}"#),
        r#"{"job_code":"nightly_export","options":{"env":"prod"}}"#,
        "NULL",
    );
    let output = pim.consume(&["--limit", "1"], &[]);
    assert_eq!(
        exit_code(&output),
        0,
        "bad rows never stop the worker: {}",
        stderr(&output)
    );
    assert_eq!(
        pim.order(),
        ["akeneo:batch:watchdog --quiet --job_code=nightly_export --env=prod"]
    );
    let (_, _, env) = pim.calls().remove(0);
    assert!(
        env.contains(&"APP_TENANT_ID=tenant-7".to_string()),
        "{env:?}"
    );
    let log = String::from_utf8_lossy(&output.stdout);
    assert!(
        log.contains("set aside message 1 of ui_job, which cannot be run: headers are not JSON"),
        "{log}"
    );
    assert!(
        log.contains(
            "set aside message 2 of ui_job, which cannot be run: unknown message class App"
        ),
        "{log}"
    );
    assert!(
        log.contains("set aside message 3 of ui_job, which cannot be run: body has no integer `job_execution_id`"),
        "{log}"
    );
    assert_eq!(
        pim.remaining_messages(),
        3,
        "rows that cannot run are kept for a person, never deleted"
    );
    let status = pim.scratch.status_json();
    let ui = &status["queues"].as_array().unwrap()[0];
    assert_eq!(
        (ui["queue"].as_str(), ui["set_aside"].as_i64()),
        (Some("ui_job"), Some(3)),
        "{status}"
    );
    // A second worker (or a PHP consumer) does not see them again.
    let again = pim.consume(&["--time-limit", "1"], &[]);
    assert!(!String::from_utf8_lossy(&again.stdout).contains("set aside"));
    assert_eq!(pim.remaining_messages(), 3);
}

#[test]
fn soft_deleted_in_flight_and_redelivered_rows() {
    if !Backend::Mariadb.available() {
        return;
    }
    let pim = Pim::new("akeneo7");
    let soft_new = pim.execution("a");
    let soft_old = pim.execution("b");
    let in_flight = pim.execution("c");
    let stale = pim.execution("d");
    let fresh = pim.execution("e");
    pim.job_message("import_export_job", IMPORT, fresh, "{}");
    for (execution, delivered) in [
        (soft_new, "'9999-12-31 23:59:59'"),
        (soft_old, "'9999-12-31'"),
        (in_flight, "UTC_TIMESTAMP() - INTERVAL 1 HOUR"),
        (stale, "UTC_TIMESTAMP() - INTERVAL 2 DAY"),
    ] {
        let headers = format!(r#"{{"class":"{IMPORT}"}}"#);
        let body = format!(r#"{{"job_execution_id":{execution},"options":{{}}}}"#);
        pim.message("import_export_job", &headers, &body, delivered);
    }
    let output = pim.consume(&["--time-limit", "2"], &[]);
    assert_eq!(exit_code(&output), 0, "{}", stderr(&output));
    let ran: Vec<String> = pim.order();
    assert_eq!(
        ran,
        [
            format!("akeneo:batch:watchdog --quiet --job_execution_id={fresh}"),
            format!("akeneo:batch:watchdog --quiet --job_execution_id={stale}"),
        ],
        "only the due row and the one past the redeliver timeout"
    );
    let left = pim.query_i64("SELECT COUNT(*) FROM messenger_messages");
    assert_eq!(
        left, 1,
        "soft-deleted rows were purged, the in-flight one kept"
    );
    let kept = pim
        .query_text("SELECT body FROM messenger_messages")
        .unwrap();
    assert!(kept.contains(&format!(":{in_flight},")), "{kept}");
}

#[test]
fn akeneo6_heartbeat_and_failure_fix_up() {
    if !Backend::Mariadb.available() {
        return;
    }
    let pim = Pim::new("akeneo6");
    let crashing = pim.execution("csv_product_import");
    let fine = pim.execution("csv_product_export");
    pim.job_message("import_export_job", IMPORT, crashing, r#"{"env":"prod"}"#);
    let mut command = pim.scratch.command(&["consume", "--limit", "1"]);
    pim.fake_env(&mut command);
    let mut worker = command
        .env("FAKE_BEHAVIOUR", "crash-after-11")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Sample health_check_time while the 11 s job runs: written at the start, then at
    // least every 5 s.
    let mut seen: Vec<(Instant, String)> = Vec::new();
    let started = Instant::now();
    while worker.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(30) {
        let sql = format!(
            "SELECT CAST(health_check_time AS CHAR) FROM akeneo_batch_job_execution WHERE id = {crashing}"
        );
        if let Some(value) = pim.query_text(&sql)
            && seen.last().is_none_or(|(_, last)| *last != value)
        {
            seen.push((Instant::now(), value));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(wait_exit(&mut worker, Duration::from_secs(10)), 0);
    assert!(seen.len() >= 3, "heartbeats: {seen:?}");
    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1].0 - w[0].0).collect();
    assert!(
        gaps.iter().all(|gap| *gap <= Duration::from_millis(5500)),
        "gaps {gaps:?}"
    );
    assert_eq!(
        pim.order(),
        [format!(
            "akeneo:batch:job --quiet csv_product_import {crashing} --env=prod"
        )]
    );
    let status = pim.query_i64(&format!(
        "SELECT status FROM akeneo_batch_job_execution WHERE id = {crashing}"
    ));
    let exit = pim.query_text(&format!(
        "SELECT exit_code FROM akeneo_batch_job_execution WHERE id = {crashing}"
    ));
    assert_eq!(
        (status, exit.as_deref()),
        (6, Some("FAILED")),
        "the fix-up marks it failed"
    );
    // `check` counts the PIM's failed executions.
    let check = pim.scratch.run(&["check", "--max-failed", "1h=0:5"]);
    let line = String::from_utf8_lossy(&check.stdout).to_string();
    assert_eq!(exit_code(&check), 1, "{line}");
    assert!(line.contains("1 jobs failed in the last 1h"), "{line}");

    pim.job_message("import_export_job", IMPORT, fine, "{}");
    let output = pim.consume(&["--limit", "1"], &[]);
    assert_eq!(exit_code(&output), 0);
    let status = pim.query_i64(&format!(
        "SELECT status FROM akeneo_batch_job_execution WHERE id = {fine}"
    ));
    assert_eq!(status, 1, "a completed job is left as the job wrote it");
}

/// A PHP consumer as Symfony 5.4.14 runs it: plain FOR UPDATE, delivered_at = now, then the
/// soft-delete ack (Akeneo acks on receipt). A deadlock rolls the attempt back and tries
/// again, as the Doctrine transport's retry of DBAL's RetryableException does. Returns the
/// executions it took.
async fn php_consumer(url: String, until: Instant) -> Vec<i64> {
    let mut conn = sqlx::MySqlConnection::connect(&url).await.unwrap();
    let mut taken = Vec::new();
    while Instant::now() < until {
        match php_get_and_ack(&mut conn).await {
            Ok(Some(execution)) => taken.push(execution),
            Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(error) if is_deadlock(&error) => {}
            Err(error) => panic!("PHP consumer: {error}"),
        }
    }
    taken
}

fn is_deadlock(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db)
        if db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>().is_some_and(|e| e.number() == 1213))
}

/// One `get()` and `ack()` of Symfony's Doctrine connection; the execution taken, if any.
async fn php_get_and_ack(conn: &mut sqlx::MySqlConnection) -> Result<Option<i64>, sqlx::Error> {
    let _ =
        sqlx::query("DELETE FROM messenger_messages WHERE delivered_at = '9999-12-31 23:59:59'")
            .execute(&mut *conn)
            .await;
    let mut tx = conn.begin().await?;
    let row: Option<(i64, String)> = sqlx::query_as(
        "SELECT m.id, m.body FROM messenger_messages m
         WHERE (m.delivered_at is null OR m.delivered_at < UTC_TIMESTAMP() - INTERVAL 1 DAY)
           AND (m.available_at <= UTC_TIMESTAMP()) AND (m.queue_name = 'import_export_job')
         ORDER BY available_at ASC LIMIT 1 FOR UPDATE",
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some((id, body)) = row else {
        tx.commit().await?;
        return Ok(None);
    };
    sqlx::query("UPDATE messenger_messages SET delivered_at = UTC_TIMESTAMP() WHERE id = ?")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    sqlx::query("UPDATE messenger_messages SET delivered_at = '9999-12-31 23:59:59' WHERE id = ?")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    let value: serde_json::Value = serde_json::from_str(&body).unwrap();
    Ok(value["job_execution_id"].as_i64())
}

#[test]
fn beside_a_php_consumer_and_a_second_worker_no_message_twice() {
    if !Backend::Mariadb.available() {
        return;
    }
    const MESSAGES: i64 = 150;
    let pim = Pim::new("akeneo7");
    let mut executions = Vec::new();
    for n in 0..MESSAGES {
        let id = pim.execution(&format!("job_{}", n % 5));
        pim.job_message("import_export_job", IMPORT, id, "{}");
        executions.push(id);
    }
    let spawn = |name: &str| {
        let mut command = pim
            .scratch
            .command(&["consume", "--sleep", "50ms", "--host-id", name]);
        pim.fake_env(&mut command);
        command
            .stdout(std::fs::File::create(pim.scratch.path(&format!("{name}.log"))).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut ours = [spawn("a"), spawn("b")];
    let php_taken = block_on(php_consumer(
        pim.scratch.url.clone(),
        Instant::now() + Duration::from_secs(8),
    ));
    wait_until(Duration::from_secs(30), "the queue to drain", || {
        pim.query_i64("SELECT COUNT(*) FROM messenger_messages WHERE delivered_at IS NULL") == 0
    });
    for worker in &mut ours {
        send_signal(worker, Signal::SIGTERM);
        assert_eq!(wait_exit(worker, Duration::from_secs(10)), 0);
    }
    let mut all: Vec<i64> = pim
        .order()
        .iter()
        .map(|line| line.rsplit('=').next().unwrap().parse().unwrap())
        .collect();
    let ours_count = all.len();
    all.extend(&php_taken);
    all.sort();
    let before = all.len();
    all.dedup();
    assert_eq!(before, all.len(), "a message was taken twice");
    assert_eq!(all, executions, "every message was taken");
    assert!(
        ours_count > 0 && !php_taken.is_empty(),
        "both sides worked: ours {ours_count}, php {}",
        php_taken.len()
    );
    for name in ["a", "b"] {
        let log = pim.scratch.log_of(name);
        assert!(!log.contains("eadlock"), "{name}: {log}");
    }
}

/// One import message and one ui_job message, each with its execution; returns the ui_job
/// one's execution id.
fn import_and_ui_messages(pim: &Pim) -> i64 {
    let import = pim.execution("csv_product_import");
    let ui = pim.execution("mass_edit");
    pim.job_message("import_export_job", IMPORT, import, "{}");
    pim.job_message("ui_job", UI, ui, "{}");
    ui
}

#[test]
fn instance_conf_selects_queues_and_status_shows_depth() {
    if !Backend::Mariadb.available() {
        return;
    }
    let pim = Pim::new("akeneo7");
    std::fs::write(pim.scratch.path("4.conf"), "ui_job\n").unwrap();
    let ui = import_and_ui_messages(&pim);
    let status = pim.scratch.status_json();
    let queues = status["queues"].as_array().unwrap();
    assert_eq!(queues[0]["queue"], "ui_job");
    assert_eq!(queues[0]["waiting"], 1);
    assert_eq!(queues[1]["waiting"], 1);
    let output = pim.consume(&["--instance", "4", "--time-limit", "1"], &[]);
    assert_eq!(exit_code(&output), 0);
    assert_eq!(
        pim.order(),
        [format!(
            "akeneo:batch:watchdog --quiet --job_execution_id={ui}"
        )]
    );
    assert_eq!(
        pim.remaining_messages(),
        1,
        "the import is left for its own workers"
    );
    let refused = pim.scratch.run(&["push", "ui_job", "x"]);
    assert_eq!(exit_code(&refused), 64);
    assert!(
        stderr(&refused).contains("transport = \"akeneo\""),
        "{}",
        stderr(&refused)
    );
}

/// A paused PIM queue is passed over by our workers (the others run), `metrics` and
/// `check` report its wait (without alerting), and `resume` lets it run.
#[test]
fn a_paused_pim_queue_waits_until_resumed() {
    if !Backend::Mariadb.available() {
        return;
    }
    let pim = Pim::new("akeneo7");
    let ui = import_and_ui_messages(&pim);
    pim.scratch
        .ok(&["pause", "import_export_job", "--reason", "supplier feed"]);
    let output = pim.consume(&["--time-limit", "1"], &[]);
    assert_eq!(exit_code(&output), 0);
    assert_eq!(
        pim.order(),
        [format!(
            "akeneo:batch:watchdog --quiet --job_execution_id={ui}"
        )]
    );
    assert_eq!(
        pim.remaining_messages(),
        1,
        "the paused queue's message waits"
    );
    let metrics = pim.scratch.ok(&["metrics"]);
    crate::metrics::check_with_promtool(&metrics);
    let value = |series: &str| crate::metrics::value(&metrics, series);
    assert_eq!(
        value("pjq_jobs{queue=\"import_export_job\",state=\"waiting\"}"),
        1.0
    );
    assert_eq!(value("pjq_jobs{queue=\"ui_job\",state=\"waiting\"}"), 0.0);
    assert_eq!(value("pjq_queue_paused{queue=\"import_export_job\"}"), 1.0);
    assert!(value("pjq_queue_latency_seconds{queue=\"import_export_job\"}") >= 0.0);
    assert!(
        !metrics.contains("pjq_jobs_finished_total"),
        "the PIM counts its own results"
    );
    let check = pim.scratch.run(&["check", "--max-latency", "1ms"]);
    let line = String::from_utf8_lossy(&check.stdout).to_string();
    assert_eq!(exit_code(&check), 0, "{line}");
    assert!(line.contains("(paused)"), "{line}");
    pim.scratch.ok(&["resume", "import_export_job"]);
    let output = pim.consume(&["--time-limit", "1"], &[]);
    assert_eq!(exit_code(&output), 0);
    assert_eq!(pim.remaining_messages(), 0, "resumed: taken");
}

/// Real Symfony Messenger code (Debian's packages) dispatches the messages; we consume them.
#[test]
fn messages_dispatched_by_real_symfony_messenger_are_consumed() {
    if !Backend::Mariadb.available() {
        return;
    }
    let php_ready = std::process::Command::new("php")
        .args(["-r", "exit(is_file('/usr/share/php/Symfony/Component/Messenger/Bridge/Doctrine/autoload.php') ? 0 : 1);"])
        .status()
        .is_ok_and(|s| s.success());
    if !php_ready {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "CI must run the Symfony Messenger test (scripts/test.sh installs php-symfony-messenger)"
        );
        eprintln!("\n!!! SKIPPED: php and php-symfony-doctrine-messenger are not installed !!!\n");
        return;
    }
    let pim = Pim::new("akeneo7");
    let import = pim.execution("csv_product_import");
    let ui = pim.execution("mass_edit");
    let plain = |class: &str| class.replace("\\\\", "\\");
    let messages = serde_json::json!([
        {"queue": "import_export_job", "class": plain(IMPORT), "body": {
            "id": "9b2d6c1e-0b4a-4c57-9f0e-2c1d1b1a0f00", "job_execution_id": import,
            "created_time": "2024-04-08T15:00:00+00:00", "updated_time": null,
            "options": {"env": "prod", "email": ["a@b.c"]}}},
        {"queue": "ui_job", "class": plain(UI), "body": {
            "id": "1c2d6c1e-0b4a-4c57-9f0e-2c1d1b1a0f00", "job_execution_id": ui,
            "created_time": "2024-04-08T15:00:00+00:00", "updated_time": null,
            "options": {"env": "prod", "no-log": true}}}
    ]);
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/symfony-dispatch.php"
    );
    let dispatched = std::process::Command::new("php")
        .arg(fixture)
        .arg(messages.to_string())
        .env("DATABASE_URL", &pim.scratch.url)
        .output()
        .unwrap();
    assert!(
        dispatched.status.success(),
        "{}{}",
        String::from_utf8_lossy(&dispatched.stdout),
        String::from_utf8_lossy(&dispatched.stderr)
    );
    assert_eq!(pim.remaining_messages(), 2);
    let output = pim.consume(&["--limit", "2"], &[]);
    assert_eq!(exit_code(&output), 0, "{}", stderr(&output));
    assert_eq!(
        pim.order(),
        [
            format!("akeneo:batch:watchdog --quiet --job_execution_id={ui} --env=prod --no-log"),
            format!(
                "akeneo:batch:watchdog --quiet --job_execution_id={import} --email=a@b.c --env=prod"
            ),
        ]
    );
    assert_eq!(pim.remaining_messages(), 0);
}

/// Another consumer redelivers the message between this worker's claim and its
/// acknowledgement (its redeliver timeout passed): the acknowledgement says "not held", and
/// this worker's ending of its copy changes nothing: neither the message, now the other's,
/// nor the execution the other consumer runs.
#[test]
fn a_message_taken_over_before_its_acknowledgement_is_left_to_its_new_holder() {
    use pim_job_queue::store::{Timestamp, WorkerIdentity};
    if !Backend::Mariadb.available() {
        return;
    }
    let pim = Pim::new("akeneo7");
    let execution = pim.execution("csv_product_import");
    pim.job_message("import_export_job", IMPORT, execution, "{}");
    let config = pim_job_queue::config::Config::load(Some(&pim.scratch.config_path())).unwrap();
    let taken_over = "2030-01-01 00:00:00";
    block_on(async {
        let store = pim_job_queue::store::open_configured(
            &config,
            &pim.scratch.url,
            pim_job_queue::store::CallLimits::for_rescue_after(config.rescue_after),
        )
        .await
        .unwrap()
        .into_worker();
        // The worker's own tables (the stop-workers generation is read with every claim).
        store.migrate().await.unwrap();
        let worker = WorkerIdentity::for_this_process(None, Some("host-a".into()));
        let queues = vec!["import_export_job".to_string()];
        let job = store.claim(&queues, &worker).await.unwrap().unwrap();
        let mut other = sqlx::MySqlConnection::connect(&pim.scratch.url)
            .await
            .unwrap();
        sqlx::query("UPDATE messenger_messages SET delivered_at = ? WHERE id = ?")
            .bind(taken_over)
            .bind(job.id)
            .execute(&mut other)
            .await
            .unwrap();
        assert!(
            !store.acknowledge_start(&job.lease).await.unwrap(),
            "the acknowledgement must see the message is someone else's"
        );
        // What the executor does next: it ends its copy and gives the job up.
        store
            .release(
                &job.lease,
                "the job is no longer held by this worker",
                Timestamp::now(),
            )
            .await
            .unwrap();
    });
    assert_eq!(
        pim.remaining_messages(),
        1,
        "the other consumer's message stays"
    );
    assert_eq!(
        pim.query_text("SELECT CAST(delivered_at AS CHAR) FROM messenger_messages")
            .as_deref(),
        Some(taken_over)
    );
    assert_eq!(
        pim.execution_status(execution),
        2,
        "the execution the other consumer runs is left STARTING"
    );
}

/// `cancel EXECUTION_ID` in Akeneo mode does what the PIM's "stop job" does: STOPPING (status
/// and exit code) for a running execution, which the job's steps read and stop on; a
/// finished one is exit 65, an unknown one 66.
#[test]
fn cancel_stops_a_running_execution_as_the_pim_does() {
    if !Backend::Mariadb.available() {
        return;
    }
    let pim = Pim::new("akeneo7");
    let running = pim.execution("csv_product_import");
    pim.sql(&format!(
        "UPDATE akeneo_batch_job_execution SET status = 3, exit_code = 'EXECUTING' WHERE id = {running}"
    ));
    let said = pim.scratch.ok(&["cancel", &running.to_string()]);
    assert!(said.contains("STOPPING"), "{said}");
    assert_eq!(pim.execution_status(running), 4);
    let exit = pim.query_text(&format!(
        "SELECT exit_code FROM akeneo_batch_job_execution WHERE id = {running}"
    ));
    assert_eq!(exit.as_deref(), Some("STOPPING"));
    // Asking again is harmless.
    pim.scratch.ok(&["cancel", &running.to_string()]);

    let done = pim.execution("csv_product_export");
    pim.sql(&format!(
        "UPDATE akeneo_batch_job_execution SET status = 1, exit_code = 'COMPLETED' WHERE id = {done}"
    ));
    let refused = pim.scratch.run(&["cancel", &done.to_string()]);
    assert_eq!(exit_code(&refused), 65, "{}", stderr(&refused));
    assert_eq!(pim.execution_status(done), 1, "left as it was");
    assert_eq!(exit_code(&pim.scratch.run(&["cancel", "999999"])), 66);
}

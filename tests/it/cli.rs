//! One-shot commands: push, status, jobs, show, retry, cancel, migrate, and their errors.

use crate::backend_tests;
use crate::support::*;
use std::time::Duration;

backend_tests!(
    push_prints_only_the_id,
    push_refuses_bad_input_and_stores_nothing,
    status_counts_per_queue_in_priority_order,
    jobs_filters_and_show_reports,
    retry_and_cancel_follow_the_rules,
    migrate_is_idempotent,
    prune_keeps_failed_jobs_longer,
    retry_and_delete_in_bulk,
    concurrent_pushes_of_one_unique_key_make_one_job,
);

/// Eight processes push one unique key at once: one job, and every push prints its id. While
/// it waits, `--fail-if-exists` is exit 75; once it has finished, the key is free again.
fn concurrent_pushes_of_one_unique_key_make_one_job(backend: Backend) {
    let scratch = Scratch::new(backend);
    scratch.ok(&["migrate"]);
    let args = [
        "push",
        "ui_job",
        "nightly_export",
        "--unique-key",
        "export:2026-12-06",
    ];
    let pushes: Vec<_> = (0..8)
        .map(|_| {
            scratch
                .command(&args)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let ids: Vec<String> = pushes
        .into_iter()
        .map(|push| {
            let output = push.wait_with_output().unwrap();
            assert_eq!(exit_code(&output), 0, "{}", stderr(&output));
            String::from_utf8(output.stdout).unwrap().trim().to_string()
        })
        .collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    let listed = scratch.ok(&["jobs", "--json"]);
    let jobs: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(jobs.as_array().unwrap().len(), 1, "{listed}");

    let mut fail = args.to_vec();
    fail.push("--fail-if-exists");
    let refused = scratch.run(&fail);
    assert_eq!(exit_code(&refused), 75, "{}", stderr(&refused));
    assert_eq!(String::from_utf8_lossy(&refused.stdout).trim(), ids[0]);

    scratch.ok(&["consume", "--limit", "1"]);
    let again = scratch.ok(&args);
    assert_ne!(again.trim(), ids[0], "a finished job frees its key");
    let other = scratch.ok(&["push", "ui_job", "nightly_export", "--unique-key", "other"]);
    assert_ne!(other.trim(), again.trim());
    let long = "k".repeat(256);
    let too_long = scratch.run(&["push", "ui_job", "x", "--unique-key", &long]);
    assert_eq!(exit_code(&too_long), 65);
}

fn push_prints_only_the_id(backend: Backend) {
    let scratch = Scratch::new(backend);
    let first = scratch.ok(&["push", "ui_job", "mass_edit"]);
    assert_eq!(first, "1\n");
    let second = scratch.ok(&[
        "push",
        "import_export_job",
        "csv_export",
        "--payload",
        "{\"a\":1}",
    ]);
    assert_eq!(second, "2\n");
    let job = scratch.show(2);
    assert_eq!(job["queue"], "import_export_job");
    assert_eq!(job["code"], "csv_export");
    assert_eq!(job["payload"], "{\"a\":1}");
    assert_eq!(job["status"], "waiting");
}

fn push_refuses_bad_input_and_stores_nothing(backend: Backend) {
    let scratch = Scratch::new(backend);
    let cases: &[&[&str]] = &[
        &["push", "no_such_queue", "x"],
        &["push", "ui_job", "x", "--payload", "[1, 2]"],
        &["push", "ui_job", "x", "--payload", "\"text\""],
        &["push", "ui_job", "x", "--payload", "{broken"],
        &["push", "ui_job", ""],
    ];
    for args in cases {
        let output = scratch.run(args);
        assert_eq!(exit_code(&output), 65, "{args:?}: {}", stderr(&output));
        assert!(output.stdout.is_empty(), "{args:?} printed to stdout");
        assert!(stderr(&output).contains("pim-job-queue: "), "{args:?}");
    }
    let unknown = stderr(&scratch.run(&["push", "nope", "x"]));
    assert!(
        unknown.contains("ui_job, import_export_job, data_maintenance_job"),
        "{unknown}"
    );
    let status = scratch.status_json();
    let total: i64 = status["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["waiting"].as_i64().unwrap())
        .sum();
    assert_eq!(total, 0, "a refused push stored a job");
}

fn status_counts_per_queue_in_priority_order(backend: Backend) {
    let scratch = Scratch::new(backend);
    scratch.push("data_maintenance_job", "a");
    scratch.push("ui_job", "b");
    scratch.push("ui_job", "c");
    scratch.push_with(&["import_export_job", "d", "--delay", "1h"]);
    let status = scratch.status_json();
    assert!(!status["database"].as_str().unwrap().is_empty());
    let queues = status["queues"].as_array().unwrap();
    let names: Vec<&str> = queues
        .iter()
        .map(|q| q["queue"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["ui_job", "import_export_job", "data_maintenance_job"]
    );
    assert_eq!(queues[0]["waiting"], 2);
    assert_eq!(queues[1]["waiting"], 0);
    assert_eq!(queues[1]["delayed"], 1);
    assert_eq!(queues[2]["waiting"], 1);
    let text = scratch.ok(&["status"]);
    assert!(text.contains("Database: "), "{text}");
    assert!(text.contains("Running jobs: 0"), "{text}");
}

fn jobs_filters_and_show_reports(backend: Backend) {
    let scratch = Scratch::new(backend);
    for _ in 0..3 {
        scratch.push("ui_job", "u");
    }
    scratch.push("import_export_job", "i");
    let listed: serde_json::Value =
        serde_json::from_str(&scratch.ok(&["jobs", "--queue", "ui_job", "--json"])).unwrap();
    let ids: Vec<i64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [3, 2, 1], "newest first, one queue");
    let limited: serde_json::Value =
        serde_json::from_str(&scratch.ok(&["jobs", "--limit", "1", "--json"])).unwrap();
    assert_eq!(limited.as_array().unwrap().len(), 1);
    let none: serde_json::Value =
        serde_json::from_str(&scratch.ok(&["jobs", "--status", "failed", "--json"])).unwrap();
    assert!(none.as_array().unwrap().is_empty());
    assert_eq!(exit_code(&scratch.run(&["jobs", "--status", "lost"])), 64);
    let ids_of = |args: &[&str]| -> Vec<i64> {
        let mut all = vec!["jobs", "--json"];
        all.extend_from_slice(args);
        let listed: serde_json::Value = serde_json::from_str(&scratch.ok(&all)).unwrap();
        listed
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(ids_of(&["--code", "i"]), [4], "one code");
    assert_eq!(ids_of(&["--code", "nothing"]), Vec::<i64>::new());
    assert_eq!(
        ids_of(&["--since", "1h"]).len(),
        4,
        "all created within the hour"
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    let fifth = scratch.push("ui_job", "u");
    assert_eq!(ids_of(&["--since", "200ms"]), [fifth], "only the newest");
    let text = scratch.ok(&["show", "4"]);
    assert!(text.contains("queue:     import_export_job"), "{text}");
    let missing = scratch.run(&["show", "999"]);
    assert_eq!(exit_code(&missing), 66);
    assert!(stderr(&missing).contains("no job with id 999"));
}

fn retry_and_cancel_follow_the_rules(backend: Backend) {
    let scratch = Scratch::new(backend);
    let id = scratch.push("ui_job", "u").to_string();
    scratch.ok(&["cancel", &id]);
    assert_eq!(scratch.show(1)["status"], "cancelled");
    let again = scratch.run(&["cancel", &id]);
    assert_eq!(exit_code(&again), 65, "cancelling a cancelled job");
    assert!(stderr(&again).contains("is cancelled"));
    scratch.ok(&["retry", &id]);
    assert_eq!(scratch.show(1)["status"], "waiting");
    assert_eq!(
        exit_code(&scratch.run(&["retry", &id])),
        65,
        "retrying a waiting job"
    );
    assert_eq!(exit_code(&scratch.run(&["retry", "42"])), 66);
    assert_eq!(exit_code(&scratch.run(&["cancel", "42"])), 66);
    // The retried job runs normally.
    scratch.ok(&["consume", "--limit", "1"]);
    assert_eq!(scratch.show(1)["status"], "succeeded");
}

fn migrate_is_idempotent(backend: Backend) {
    let scratch = Scratch::new(backend);
    // PostgreSQL's schema 2 replaced an index the planner misused after bulk loads; then
    // each added the pauses, then the tallies and cancel requests.
    let latest = if backend == Backend::Postgres { 5 } else { 4 };
    let first = scratch.ok(&["migrate"]);
    assert!(
        first.contains(&format!(
            "schema at version {latest} ({latest} migration(s) applied, "
        )),
        "{first}"
    );
    // Every statement the store runs is prepared against the schema it just migrated.
    assert!(first.contains(" statements checked)"), "{first}");
    let second = scratch.ok(&["migrate"]);
    assert!(second.contains("(0 migration(s) applied, "), "{second}");
}

/// `prune` applies both retentions now: succeeded jobs go after `retention`, failed ones
/// stay until `failed_retention`; 0 keeps a kind.
fn prune_keeps_failed_jobs_longer(backend: Backend) {
    let scratch = Scratch::new(backend);
    scratch.write_config(
        "retention = \"1s\"\nfailed_retention = \"1h\"\n[jobs.broken]\ncommand = [\"/bin/false\"]",
    );
    let ok = scratch.push("ui_job", "fine");
    let failed = scratch.push("ui_job", "broken");
    scratch.ok(&["consume", "--limit", "2"]);
    let stats: serde_json::Value =
        serde_json::from_str(&scratch.ok(&["jobs", "--status", "failed", "--stats", "--json"]))
            .unwrap();
    assert_eq!(stats[0]["code"], "broken", "{stats}");
    assert_eq!(stats[0]["count"], 1, "{stats}");
    assert!(
        stats[0]["reason"].as_str().unwrap().contains("exit"),
        "{stats}"
    );
    assert_eq!(stats.as_array().unwrap().len(), 1, "{stats}");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let said = scratch.ok(&["prune"]);
    assert!(
        said.contains("succeeded or cancelled jobs: 1 removed"),
        "{said}"
    );
    assert!(said.contains("failed jobs: 0 removed"), "{said}");
    assert!(said.contains("(failed_retention = 1h)"), "{said}");
    assert_eq!(exit_code(&scratch.run(&["show", &ok.to_string()])), 66);
    assert_eq!(scratch.show(failed)["status"], "failed");
    scratch.write_config("retention = 0\nfailed_retention = \"1ms\"");
    let said = scratch.ok(&["prune"]);
    assert!(
        said.contains("succeeded or cancelled jobs: kept (retention = 0)"),
        "{said}"
    );
    assert!(said.contains("failed jobs: 1 removed"), "{said}");
}

/// `retry --status failed …` requeues what the filter selects; `delete` removes jobs by id
/// or by status and age, never a running one.
fn retry_and_delete_in_bulk(backend: Backend) {
    let scratch = Scratch::new(backend);
    scratch.write_config("[jobs.broken]\ncommand = [\"/bin/false\"]");
    let broken: Vec<i64> = (0..3).map(|_| scratch.push("ui_job", "broken")).collect();
    let fine = scratch.push("ui_job", "fine");
    scratch.ok(&["consume", "--limit", "4"]);
    let said = scratch.ok(&["retry", "--status", "failed", "--code", "fine"]);
    assert!(said.contains("0 failed job(s) queued again"), "{said}");
    let said = scratch.ok(&[
        "retry", "--status", "failed", "--code", "broken", "--since", "1h",
    ]);
    assert!(said.contains("3 failed job(s) queued again"), "{said}");
    for id in &broken {
        assert_eq!(scratch.show(*id)["status"], "waiting");
        assert_eq!(scratch.show(*id)["attempts"], 0);
    }
    assert_eq!(
        exit_code(&scratch.run(&["retry", "--status", "succeeded"])),
        65
    );
    assert_eq!(
        exit_code(&scratch.run(&["retry", "1", "--status", "failed"])),
        64
    );
    assert_eq!(exit_code(&scratch.run(&["retry"])), 64);

    let said = scratch.ok(&["delete", &fine.to_string()]);
    assert!(said.contains(&format!("Job #{fine} deleted.")), "{said}");
    assert_eq!(exit_code(&scratch.run(&["show", &fine.to_string()])), 66);
    assert_eq!(exit_code(&scratch.run(&["delete", "999"])), 66);
    scratch.ok(&["consume", "--limit", "3"]);
    let said = scratch.ok(&["delete", "--status", "failed", "--before", "1h"]);
    assert!(
        said.contains("0 failed job(s) older than 1h deleted"),
        "{said}"
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    let said = scratch.ok(&["delete", "--status", "failed", "--before", "100ms"]);
    assert!(
        said.contains("3 failed job(s) older than 100ms deleted"),
        "{said}"
    );
    assert_eq!(
        exit_code(&scratch.run(&["delete", "--status", "running", "--before", "1s"])),
        65
    );
}

#[test]
fn usage_errors_exit_64() {
    let scratch = Scratch::new(Backend::Sqlite);
    assert_eq!(exit_code(&scratch.run(&["frobnicate"])), 64);
    assert_eq!(exit_code(&scratch.run(&["push", "ui_job"])), 64);
    assert_eq!(exit_code(&scratch.run(&["consume", "--sleep", "soon"])), 64);
    assert_eq!(
        exit_code(&scratch.run(&["consume", "--memory-limit", "12X"])),
        64
    );
    assert_eq!(
        exit_code(&scratch.run(&["consume", "ui_job", "--instance", "1"])),
        64
    );
    assert_eq!(
        exit_code(&scratch.run(&["consume", "nope", "--limit", "1"])),
        64
    );
    assert_eq!(exit_code(&scratch.run(&["--help"])), 0);
}

#[test]
fn unreachable_sqlite_file_exits_69_for_one_shot_commands() {
    let scratch = Scratch::new(Backend::Sqlite);
    let output = scratch
        .command(&["push", "ui_job", "x"])
        .env(
            "PIM_JOB_QUEUE_DATABASE_URL",
            "sqlite:///proc/no-such-dir/jobs.sqlite",
        )
        .output()
        .unwrap();
    assert_eq!(exit_code(&output), 69, "{}", stderr(&output));
    assert!(
        stderr(&output).contains("database unavailable"),
        "{}",
        stderr(&output)
    );
}

/// A command is not fenced like a worker's heartbeat: it waits out a writer that holds
/// SQLite's lock longer than a worker's call may (1 s with `rescue_after = 3s`), as workers
/// starting up on a loaded host do, instead of failing with "database is locked".
#[test]
fn a_command_waits_out_a_long_sqlite_write_lock() {
    let scratch = Scratch::new(Backend::Sqlite);
    scratch.write_config("heartbeat_interval = \"500ms\"\nrescue_after = \"3s\"");
    scratch.ok(&["migrate"]);
    let (locked, release) = std::sync::mpsc::channel();
    let url = scratch.url.clone();
    let holder = std::thread::spawn(move || {
        block_on(async {
            use sqlx::Connection;
            let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
            sqlx::query("BEGIN IMMEDIATE")
                .execute(&mut conn)
                .await
                .unwrap();
            locked.send(()).unwrap();
            tokio::time::sleep(Duration::from_millis(2500)).await;
            sqlx::query("COMMIT").execute(&mut conn).await.unwrap();
        })
    });
    release.recv().unwrap();
    let started = std::time::Instant::now();
    let id = scratch.push("ui_job", "x");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the lock was held"
    );
    holder.join().unwrap();
    assert_eq!(scratch.show(id)["status"], "waiting");
}

#[test]
fn schema_newer_than_the_binary_is_refused() {
    let scratch = Scratch::new(Backend::Sqlite);
    scratch.ok(&["migrate"]);
    block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&scratch.url).await.unwrap();
        sqlx::query("INSERT INTO pjq_schema_migrations (version, applied_at) VALUES (99, 0)")
            .execute(&mut conn)
            .await
            .unwrap();
    });
    for args in [&["status"][..], &["consume", "--limit", "1"]] {
        let output = scratch.run(args);
        assert_eq!(exit_code(&output), 78, "{args:?}");
        let all = format!(
            "{}{}",
            stderr(&output),
            String::from_utf8_lossy(&output.stdout)
        );
        assert!(all.contains("upgrade pim-job-queue"), "{all}");
    }
}

#[test]
fn auto_migrate_off_requires_migrate_first() {
    let scratch = Scratch::new(Backend::Sqlite);
    scratch.write_config("auto_migrate = false");
    let output = scratch.run(&["push", "ui_job", "x"]);
    assert_eq!(exit_code(&output), 78);
    assert!(
        stderr(&output).contains("run `pim-job-queue migrate`"),
        "{}",
        stderr(&output)
    );
    scratch.ok(&["migrate"]);
    scratch.push("ui_job", "x");
}

#[test]
fn default_database_lives_in_the_users_data_directory() {
    let scratch = Scratch::new(Backend::Sqlite);
    scratch.write_raw_config("[job]\ncommand = [\"/bin/true\"]\n");
    let home = scratch.path("home");
    let run = |args: &[&str]| {
        scratch
            .command(args)
            .env("XDG_DATA_HOME", &home)
            .env_remove("STATE_DIRECTORY")
            .output()
            .unwrap()
    };
    if nix::unistd::geteuid().is_root() {
        // As root the default is /var/lib/pim_job_queue; point STATE_DIRECTORY there instead,
        // as systemd's StateDirectory= would.
        let output = scratch
            .command(&["status"])
            .env("STATE_DIRECTORY", &home)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            text.contains(&format!("{}/jobs.sqlite", home.display())),
            "{text}"
        );
        return;
    }
    let output = run(&["status"]);
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains(&format!("{}/pim_job_queue/jobs.sqlite", home.display())),
        "{text}"
    );
}

/// The harness itself: a test that fails before stopping its workers (here: one that just
/// forgets) leaves no worker polling behind once its scratch is dropped.
#[test]
fn a_dropped_scratch_ends_the_workers_it_started() {
    let mut worker = {
        let scratch = Scratch::new(Backend::Sqlite);
        let worker = scratch.spawn_consumer("forgotten", &[]);
        wait_until(Duration::from_secs(10), "the worker to start", || {
            scratch.log_of("forgotten").contains("consuming queues")
        });
        worker
    };
    let pid = worker.id() as i32;
    wait_until(Duration::from_secs(5), "the worker to be gone", || {
        process_is_gone(pid)
    });
    worker.wait().unwrap();
}

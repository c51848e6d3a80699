//! The Akeneo drop-in on a PIM that cannot run its jobs, or that is told to stop: nothing
//! queued is lost to a bad launch, the PIM's execution rows tell the truth, and Symfony's
//! own stop signal is honoured. Real MariaDB, the fake console of `akeneo.rs`, and real
//! Symfony code from Debian's packages where the PIM's side is PHP.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::akeneo::{IMPORT, Pim, UI};
use crate::support::*;

/// One queued import, as the PIM leaves it: the execution STARTING, its message waiting.
fn queued_import(pim: &Pim) -> i64 {
    let execution = pim.execution("csv_product_import");
    pim.job_message("import_export_job", IMPORT, execution, "{}");
    execution
}

fn log_text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs a consumer that must refuse to start, and checks it took nothing.
fn refuses(pim: &Pim, execution: i64, envs: &[(&str, &str)], expected: &str) {
    let started = Instant::now();
    let output = pim.consume(&["--time-limit", "5"], envs);
    let log = log_text(&output);
    assert_eq!(exit_code(&output), 78, "{log}");
    assert!(log.contains(expected), "expected {expected:?} in {log}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(pim.undelivered_messages(), 1, "the message was not taken");
    assert_eq!(
        pim.execution_status(execution),
        2,
        "the execution still waits to start"
    );
    assert!(pim.order().is_empty(), "no job ran: {:?}", pim.order());
}

#[test]
fn a_launch_that_cannot_work_takes_nothing() {
    if !Backend::Mariadb.available() {
        return;
    }
    let pim = Pim::new("auto");
    let execution = queued_import(&pim);

    pim.configure("", "php_binary = \"/usr/bin/php-not-installed\"");
    refuses(&pim, execution, &[], "php-not-installed does not exist");

    pim.configure("", "launcher = \"auto\"");
    refuses(
        &pim,
        execution,
        &[("FAKE_LIST_FAILS", "1")],
        "Unable to write in the cache directory",
    );

    pim.configure("", "launcher = \"akeneo7\"");
    refuses(
        &pim,
        execution,
        &[("FAKE_AKENEO", "6")],
        "has no akeneo:batch:watchdog (Akeneo 6.0?)",
    );

    std::fs::rename(pim.project.join("var"), pim.project.join("var.away")).unwrap();
    refuses(&pim, execution, &[], "/var is not writable by this worker");
    std::fs::rename(pim.project.join("var.away"), pim.project.join("var")).unwrap();

    std::fs::rename(
        pim.project.join("bin/console"),
        pim.project.join("bin/console.away"),
    )
    .unwrap();
    refuses(&pim, execution, &[], "bin/console: ");
    std::fs::rename(
        pim.project.join("bin/console.away"),
        pim.project.join("bin/console"),
    )
    .unwrap();

    // Fixed, it runs the queued job.
    let output = pim.consume(&["--limit", "1"], &[]);
    assert_eq!(exit_code(&output), 0, "{}", log_text(&output));
    assert_eq!(pim.execution_status(execution), 1);
    assert_eq!(pim.remaining_messages(), 0);
}

#[test]
fn auto_detects_akeneo_6_and_7() {
    if !Backend::Mariadb.available() {
        return;
    }
    let pim = Pim::new("auto");
    let seven = queued_import(&pim);
    let output = pim.consume(&["--limit", "1"], &[]);
    assert_eq!(exit_code(&output), 0, "{}", log_text(&output));
    assert!(log_text(&output).contains("launching with akeneo7"));
    let six = queued_import(&pim);
    let output = pim.consume(&["--limit", "1"], &[("FAKE_AKENEO", "6")]);
    assert_eq!(exit_code(&output), 0, "{}", log_text(&output));
    assert!(log_text(&output).contains("launching with akeneo6"));
    assert_eq!(
        pim.order(),
        [
            format!("akeneo:batch:watchdog --quiet --job_execution_id={seven}"),
            format!("akeneo:batch:job --quiet csv_product_import {six}"),
        ]
    );
}

/// PHP disappears under a running worker: each launch gives its message back at once, the
/// breaker opens after three, the preflight then fails, and the worker exits 78 with every
/// message still queued.
#[test]
fn a_spawn_failure_gives_the_message_back() {
    if !Backend::Mariadb.available() {
        return;
    }
    let pim = Pim::new("auto");
    let mut worker = pim.spawn("w", &[], &[]);
    wait_until(Duration::from_secs(20), "the worker to start", || {
        pim.scratch.log_of("w").contains("consuming queues")
    });
    std::fs::set_permissions(pim.php(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let executions: Vec<i64> = (0..3).map(|_| queued_import(&pim)).collect();
    let code = wait_exit(&mut worker, Duration::from_secs(40));
    let log = pim.scratch.log_of("w");
    assert_eq!(code, 78, "{log}");
    assert!(
        log.contains("job put back in its queue: its process never started"),
        "{log}"
    );
    assert!(log.contains("launches in a row failed at start"), "{log}");
    assert!(log.contains("is not executable"), "{log}");
    assert_eq!(
        pim.undelivered_messages(),
        3,
        "every message is still queued"
    );
    for execution in executions {
        assert_eq!(pim.execution_status(execution), 2);
    }
}

/// PHP starts but cannot boot the kernel: three executions fail (and say so), then the
/// worker stops claiming instead of walking down the queue.
#[test]
fn the_breaker_stops_a_worker_whose_launches_fail_at_start() {
    if !Backend::Mariadb.available() {
        return;
    }
    let pim = Pim::new("auto");
    let executions: Vec<i64> = (0..6).map(|_| queued_import(&pim)).collect();
    let output = pim.consume(&["--time-limit", "6"], &[("FAKE_BEHAVIOUR", "boot-fails")]);
    let log = log_text(&output);
    assert_eq!(exit_code(&output), 0, "{log}");
    assert_eq!(pim.order().len(), 3, "{:?}", pim.order());
    assert_eq!(pim.undelivered_messages(), 3, "the rest stays queued");
    let ids: Vec<String> = executions[..3].iter().map(i64::to_string).collect();
    assert!(
        log.contains(&format!(
            "3 launches in a row failed at start (jobs {}",
            ids.join(", ")
        )),
        "{log}"
    );
    assert!(
        log.contains("is not defined"),
        "the output names the cause: {log}"
    );
    for execution in &executions[..3] {
        assert_eq!(
            pim.execution_status(*execution),
            6,
            "the PIM shows it failed"
        );
        let description = pim.exit_description(*execution);
        assert!(
            description.contains("pim-job-queue: the job ended: exit code 255"),
            "{description}"
        );
    }
    for execution in &executions[3..] {
        assert_eq!(pim.execution_status(*execution), 2);
    }
}

/// The worker ends a watchdog job (stop grace): SIGTERM to the watchdog first, which
/// forwards it; the execution the job left running is marked failed with the reason.
#[test]
fn an_ended_watchdog_job_is_marked_failed_and_signalled_once() {
    if !Backend::Mariadb.available() {
        return;
    }
    let pim = Pim::new("akeneo7");
    pim.configure(
        "stop_grace = \"1s\"",
        "launcher = \"akeneo7\"\nkill_grace = \"6s\"",
    );
    let execution = queued_import(&pim);
    let mut worker = pim.spawn("w", &[], &[("FAKE_BEHAVIOUR", "hang")]);
    wait_until(Duration::from_secs(20), "the job to start", || {
        pim.execution_status(execution) == 3
    });
    send_signal(&worker, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut worker, Duration::from_secs(20)), 0);
    let signals = std::fs::read_to_string(pim.calls.join("signals")).unwrap_or_default();
    assert_eq!(
        signals.lines().collect::<Vec<_>>(),
        ["watchdog-term", "job-usr1"],
        "the job heard of the stop once, through its watchdog"
    );
    assert_eq!(pim.execution_status(execution), 6);
    let description = pim.exit_description(execution);
    assert!(
        description.contains("the worker ended the job: the stop grace period ran out"),
        "{description}"
    );
}

#[test]
fn the_consumers_environment_reaches_the_job() {
    if !Backend::Mariadb.available() {
        return;
    }
    let pim = Pim::new("auto");
    pim.configure(
        "",
        "env = \"staging\"\ndebug = true\n[akeneo.environment]\nPIM_EXTRA = \"x y\"",
    );
    queued_import(&pim);
    let output = pim.consume(&["--limit", "1"], &[("APP_ENV", "dev")]);
    assert_eq!(exit_code(&output), 0, "{}", log_text(&output));
    let (_, _, env) = pim.calls().remove(0);
    for expected in ["APP_ENV=staging", "APP_DEBUG=1", "PIM_EXTRA=x y"] {
        assert!(env.contains(&expected.to_string()), "{expected}: {env:?}");
    }
    let (_, args, _) = pim.calls().remove(0);
    assert!(
        !args.iter().any(|a| a.contains("staging")),
        "not in argv: {args:?}"
    );
}

#[test]
fn only_job_queues_are_consumed() {
    if !Backend::Mariadb.available() {
        return;
    }
    let pim = Pim::new("auto");
    pim.configure("queues = [\"ui_job\", \"default\"]", "");
    pim.message(
        "default",
        r#"{"class":"Akeneo\\Webhook\\Message"}"#,
        "{}",
        "NULL",
    );
    let output = pim.consume(&["--time-limit", "1"], &[]);
    let log = log_text(&output);
    assert_eq!(exit_code(&output), 78, "{log}");
    assert!(
        log.contains("\"default\", which is not one of Akeneo's job queues"),
        "{log}"
    );
    assert_eq!(
        pim.undelivered_messages(),
        1,
        "the webhook message is untouched"
    );
    pim.configure(
        "queues = [\"ui_job\", \"default\"]",
        "allow_other_queues = true",
    );
    let status = pim.scratch.run(&["status"]);
    assert_eq!(exit_code(&status), 0, "{}", stderr(&status));
}

#[test]
fn unknown_classes_run_or_are_set_aside_never_deleted() {
    if !Backend::Mariadb.available() {
        return;
    }
    let pim = Pim::new("auto");
    let custom = r"Acme\\Queue\\PriorityImportMessage";
    let waiting = pim.execution("custom_import");
    let finished = pim.execution("custom_import");
    pim.sql(&format!(
        "UPDATE akeneo_batch_job_execution SET status = 1, exit_code = 'COMPLETED' WHERE id = {finished}"
    ));
    let broken = pim.execution("csv_product_import");
    pim.job_message("ui_job", custom, waiting, "{}");
    pim.job_message("ui_job", custom, finished, "{}");
    pim.job_message("ui_job", UI, broken, "7");
    let output = pim.consume(&["--time-limit", "2"], &[]);
    let log = log_text(&output);
    assert_eq!(exit_code(&output), 0, "{log}");
    assert_eq!(
        pim.order(),
        [format!(
            "akeneo:batch:watchdog --quiet --job_execution_id={waiting}"
        )],
        "a class we do not know, naming a waiting execution, is run"
    );
    assert_eq!(pim.execution_status(waiting), 1);
    assert!(
        log.contains(&format!(
            "names job execution {finished}, which is not waiting"
        )),
        "{log}"
    );
    assert!(log.contains("`options` is not an object"), "{log}");
    assert_eq!(pim.remaining_messages(), 2, "set aside, not deleted");
    assert_eq!(pim.execution_status(finished), 1, "left as it was");
    assert_eq!(pim.execution_status(broken), 6, "the PIM is told");
    assert!(pim.exit_description(broken).contains("set aside message"));
}

/// `transport` and `[akeneo]` are restart-only: a reload keeps the running values.
#[test]
fn a_reload_keeps_the_running_akeneo_settings() {
    if !Backend::Mariadb.available() {
        return;
    }
    let pim = Pim::new("auto");
    let mut worker = pim.spawn("w", &["--sleep", "100ms"], &[]);
    wait_until(Duration::from_secs(20), "the worker to start", || {
        pim.scratch.log_of("w").contains("consuming queues")
    });
    pim.configure(
        "",
        "php_binary = \"/usr/bin/php-not-installed\"\nlauncher = \"akeneo6\"",
    );
    send_signal(&worker, Signal::SIGHUP);
    wait_until(Duration::from_secs(10), "the reload", || {
        pim.scratch
            .log_of("w")
            .contains("take effect at the next restart")
    });
    let execution = queued_import(&pim);
    wait_until(Duration::from_secs(20), "the job to run", || {
        pim.execution_status(execution) == 1
    });
    assert_eq!(
        pim.order(),
        [format!(
            "akeneo:batch:watchdog --quiet --job_execution_id={execution}"
        )]
    );
    send_signal(&worker, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut worker, Duration::from_secs(10)), 0);
}

/// A PIM reinstall drops our tables: the worker creates them again and carries on.
#[test]
fn dropped_tables_are_created_again() {
    if !Backend::Mariadb.available() {
        return;
    }
    let pim = Pim::new("auto");
    let mut worker = pim.spawn("w", &["--sleep", "100ms"], &[]);
    wait_until(Duration::from_secs(20), "the worker to start", || {
        pim.scratch.log_of("w").contains("consuming queues")
    });
    pim.sql("DROP TABLE pjq_control, pjq_workers, pjq_jobs, pjq_schema_migrations");
    let execution = queued_import(&pim);
    wait_until(Duration::from_secs(30), "the job to run", || {
        pim.execution_status(execution) == 1
    });
    assert!(pim.scratch.log_of("w").contains("creating them again"));
    wait_until(
        Duration::from_secs(15),
        "the worker to register again",
        || pim.query_i64("SELECT COUNT(*) FROM pjq_workers") == 1,
    );
    send_signal(&worker, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut worker, Duration::from_secs(10)), 0);
}

/// Symfony's own `messenger:stop-workers`, as Akeneo's runbooks run it, stops our workers
/// after their job (exit 75, which the unit restarts); a request older than the worker does
/// not.
#[test]
fn symfonys_stop_workers_is_honoured() {
    if !Backend::Mariadb.available() || !php_has("Symfony/Component/Cache/autoload.php") {
        return;
    }
    let pim = Pim::new("auto");
    let stop_workers = || {
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/symfony-stop-workers.php"
        );
        let output = std::process::Command::new("php")
            .arg(fixture)
            .arg(&pim.project)
            .args(["prod", "hK1a+Qf0-Z"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", log_text(&output));
    };
    stop_workers();
    // Symfony compares with the worker's start time, at microsecond precision; keep clear of it.
    std::thread::sleep(Duration::from_millis(1100));
    let execution = pim.execution("slow_export");
    pim.job_message("import_export_job", IMPORT, execution, "{}");
    let mut worker = pim.spawn(
        "w",
        &["--sleep", "100ms"],
        &[("FAKE_BEHAVIOUR", "crash-after-2")],
    );
    wait_until(Duration::from_secs(20), "the job to start", || {
        pim.execution_status(execution) == 3
    });
    let next = queued_import(&pim);
    stop_workers();
    let asked = Instant::now();
    assert_eq!(wait_exit(&mut worker, Duration::from_secs(20)), 75);
    assert!(
        asked.elapsed() >= Duration::from_millis(500),
        "the job was let finish"
    );
    let log = pim.scratch.log_of("w");
    assert!(
        log.contains("messenger:stop-workers was run in the PIM"),
        "{log}"
    );
    assert_eq!(pim.order().len(), 1, "no job taken after the request");
    assert_eq!(pim.execution_status(next), 2);
}

/// Whether PHP and a Debian PHP package file are there; under CI they must be.
fn php_has(file: &str) -> bool {
    let present = std::path::Path::new("/usr/share/php").join(file).is_file()
        && std::process::Command::new("php")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !present {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "CI must run this test: scripts/test.sh installs php-cli and /usr/share/php/{file}"
        );
        eprintln!("\n!!! SKIPPED: php or /usr/share/php/{file} is missing !!!\n");
    }
    present
}

/// A server whose binary log is statement-based rejects every write at READ COMMITTED
/// (error 1665): the worker sees it at start and claims at REPEATABLE READ instead.
#[test]
fn a_statement_based_binary_log_still_consumes() {
    if !Backend::Mariadb.available() {
        return;
    }
    let server = PrivateMariadb::start(&["--log-bin=binlog", "--binlog-format=STATEMENT"]);
    let pim = Pim::on(Scratch::on_url(server.database("pim")), "auto");
    let executions: Vec<i64> = (0..2).map(|_| queued_import(&pim)).collect();
    let output = pim.consume(&["--limit", "2"], &[]);
    let log = log_text(&output);
    assert_eq!(exit_code(&output), 0, "{log}");
    assert!(log.contains("binlog_format=STATEMENT"), "{log}");
    assert!(!log.contains("1665"), "{log}");
    for execution in executions {
        assert_eq!(pim.execution_status(execution), 1, "{log}");
    }
    assert_eq!(pim.remaining_messages(), 0);
}

/// What systemd is told (`STATUS=`, shown by `systemctl status`) when the PIM cannot run
/// jobs: at start, the preflight's reason and no READY; after launches keep failing, why the
/// worker stopped claiming.
#[test]
fn systemd_hears_why_no_job_is_taken() {
    if !Backend::Mariadb.available() {
        return;
    }
    let pim = Pim::new("akeneo7");
    queued_import(&pim);
    let socket = NotifySocket::new();
    let output = pim
        .consume_command(&["--time-limit", "5"], &[("FAKE_AKENEO", "6")])
        .env("NOTIFY_SOCKET", &socket.path)
        .output()
        .unwrap();
    assert_eq!(exit_code(&output), 78);
    socket.wait_for("STATUS=Cannot launch jobs: `akeneo.launcher = \"akeneo7\"` but this PIM has no akeneo:batch:watchdog", Duration::from_secs(5));
    assert!(
        !socket.messages().iter().any(|m| m.contains("READY=1")),
        "{:?}",
        socket.messages()
    );

    let socket = NotifySocket::new();
    for _ in 0..2 {
        queued_import(&pim);
    }
    let output = pim
        .consume_command(&["--time-limit", "4"], &[("FAKE_BEHAVIOUR", "boot-fails")])
        .env("NOTIFY_SOCKET", &socket.path)
        .output()
        .unwrap();
    assert_eq!(exit_code(&output), 0, "{}", log_text(&output));
    socket.wait_for(
        "STATUS=Not taking jobs: 3 launches in a row failed at start",
        Duration::from_secs(5),
    );
}

/// A message whose launch cannot even be prepared (a scheduled job on Akeneo 6, which has no
/// watchdog to create its execution) is set aside, not left in flight nor deleted.
#[test]
fn a_message_that_cannot_be_launched_is_set_aside() {
    if !Backend::Mariadb.available() {
        return;
    }
    let pim = Pim::new("akeneo6");
    pim.message(
        "ui_job",
        r#"{"class":"Akeneo\\Tool\\Component\\BatchQueue\\Queue\\ScheduledJobMessage"}"#,
        r#"{"job_code":"nightly_export","options":{}}"#,
        "NULL",
    );
    let output = pim.consume(&["--time-limit", "2"], &[]);
    let log = log_text(&output);
    assert_eq!(exit_code(&output), 0, "{log}");
    assert!(log.contains("Akeneo 6 has no watchdog"), "{log}");
    assert!(log.contains("set aside message"), "{log}");
    assert_eq!(pim.remaining_messages(), 1);
    let status = pim.scratch.status_json();
    assert_eq!(status["queues"][0]["set_aside"], 1, "{status}");
}

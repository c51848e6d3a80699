//! Instance conf files and configuration errors, with their exit codes.

use std::time::Duration;

use crate::support::*;

/// Runs `consume --instance=NAME --limit N`, as the unit passes `%i`, and returns (exit
/// code, combined output).
fn consume_instance(scratch: &Scratch, name: &str, limit: &str) -> (i32, String) {
    let instance = format!("--instance={name}");
    let output = scratch.run(&["consume", &instance, "--limit", limit]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (exit_code(&output), text)
}

fn push_one_each(scratch: &Scratch) {
    scratch.push("data_maintenance_job", "m");
    scratch.push("import_export_job", "i");
    scratch.push("ui_job", "u");
}

#[test]
fn listed_queues_are_the_only_ones_consumed() {
    let scratch = Scratch::new(Backend::Sqlite);
    std::fs::write(
        scratch.path("1.conf"),
        "# imports only\nimport_export_job\n\nimport_export_job\n",
    )
    .unwrap();
    push_one_each(&scratch);
    let (code, log) = consume_instance(&scratch, "1", "1");
    assert_eq!(code, 0, "{log}");
    assert_eq!(scratch.ran(), [("import_export_job".to_string(), 2)]);
    assert!(log.contains("lists the queues import_export_job"), "{log}");
    let output = scratch.run(&["consume", "--instance", "1", "--time-limit", "0.3"]);
    assert_eq!(exit_code(&output), 0);
    assert_eq!(scratch.ran().len(), 1, "the other queues are left alone");
}

#[test]
fn listed_queues_keep_the_priority_order() {
    let scratch = Scratch::new(Backend::Sqlite);
    std::fs::write(scratch.path("2.conf"), "data_maintenance_job\nui_job\n").unwrap();
    push_one_each(&scratch);
    let (code, log) = consume_instance(&scratch, "2", "2");
    assert_eq!(code, 0, "{log}");
    let queues: Vec<String> = scratch.ran().into_iter().map(|(q, _)| q).collect();
    assert_eq!(queues, ["ui_job", "data_maintenance_job"]);
}

#[test]
fn missing_or_empty_conf_means_all_queues() {
    for content in [None, Some(""), Some("# nothing here\n\n   \n")] {
        let scratch = Scratch::new(Backend::Sqlite);
        if let Some(text) = content {
            std::fs::write(scratch.path("7.conf"), text).unwrap();
        }
        push_one_each(&scratch);
        let (code, log) = consume_instance(&scratch, "7", "3");
        assert_eq!(code, 0, "{log}");
        assert!(
            log.contains("does not exist or is empty, this consumer will support all job types"),
            "{log}"
        );
        let queues: Vec<String> = scratch.ran().into_iter().map(|(q, _)| q).collect();
        assert_eq!(
            queues,
            ["ui_job", "import_export_job", "data_maintenance_job"],
            "{content:?}"
        );
    }
}

#[test]
fn unknown_queue_exits_78_with_file_line_and_known_names() {
    let scratch = Scratch::new(Backend::Sqlite);
    std::fs::write(scratch.path("3.conf"), "ui_job\n# comment\nimport_job\n").unwrap();
    let id = scratch.push("ui_job", "u");
    let (code, log) = consume_instance(&scratch, "3", "1");
    assert_eq!(code, 78);
    let expected = format!(
        "{}:3: unknown queue \"import_job\"",
        scratch.path("3.conf").display()
    );
    assert!(log.contains(&expected), "{log}");
    assert!(
        log.contains("ui_job, import_export_job, data_maintenance_job"),
        "{log}"
    );
    assert_eq!(scratch.show(id)["status"], "waiting");
}

#[test]
fn invalid_instance_names_exit_78_before_any_file_is_read() {
    let scratch = Scratch::new(Backend::Sqlite);
    // A conf file that would be read if the name were used as a path.
    std::fs::write(scratch.dir.path().join("x.conf"), "ui_job\n").unwrap();
    for name in [
        "../x",
        "a/b",
        "x.conf",
        "",
        "a b",
        &"9".repeat(65),
        "pim_job_queue@1",
        // `--instance %i` made these a clap error (64) and a restart loop.
        "-h",
        "--limit",
        "-1",
    ] {
        let (code, log) = consume_instance(&scratch, name, "1");
        assert_eq!(code, 78, "{name:?}: {log}");
        assert!(log.contains("invalid instance name"), "{name:?}: {log}");
    }
}

#[test]
fn unreadable_conf_exits_78() {
    let scratch = Scratch::new(Backend::Sqlite);
    std::fs::create_dir(scratch.path("4.conf")).unwrap();
    let (code, log) = consume_instance(&scratch, "4", "1");
    assert_eq!(code, 78, "{log}");
    assert!(log.contains("cannot read instance conf"), "{log}");
}

#[test]
fn conf_dir_option_overrides_the_config() {
    let scratch = Scratch::new(Backend::Sqlite);
    let other = scratch.path("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("5.conf"), "data_maintenance_job\n").unwrap();
    push_one_each(&scratch);
    let output = scratch.run(&[
        "consume",
        "--instance",
        "5",
        "--limit",
        "1",
        "--conf-dir",
        other.to_str().unwrap(),
    ]);
    assert_eq!(exit_code(&output), 0);
    assert_eq!(scratch.ran(), [("data_maintenance_job".to_string(), 1)]);
}

#[test]
fn bad_worker_config_exits_78_naming_the_key() {
    let scratch = Scratch::new(Backend::Sqlite);
    let config = scratch.config_path();
    let cases = [
        (
            "pol_interval = \"1s\"\n[job]\ncommand = [\"/bin/true\"]",
            "pol_interval",
        ),
        (
            "poll_interval = [1]\n[job]\ncommand = [\"/bin/true\"]",
            "poll_interval",
        ),
        ("[job]\ncommand = []", "job.command"),
        ("[job]\ncommand = \"/bin/true\"", "command"),
        (
            "[job]\ncommand = [\"/bin/true\"]\ntimeout = \"forever\"",
            "timeout",
        ),
        (
            "[job]\ncommand = [\"/bin/true\", \"{jobid}\"]",
            "job.command[1]",
        ),
        (
            "[job]\ncommand = [\"/bin/true\"]\nmax_attempts = 0",
            "job.max_attempts",
        ),
        ("queues = [\"ui job\"]", "queues[0]"),
        ("this is not toml", "worker.toml"),
        ("", "no job command is configured"),
    ];
    for (text, needle) in cases {
        scratch.write_raw_config(text);
        let output = scratch.run(&["consume", "--limit", "1"]);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            stderr(&output)
        );
        assert_eq!(exit_code(&output), 78, "{text:?}: {all}");
        assert!(
            all.contains(needle),
            "{text:?} should name {needle:?}: {all}"
        );
        if needle != "no job command is configured" {
            assert!(
                all.contains(config.to_str().unwrap()),
                "{text:?} should name the file: {all}"
            );
        }
    }
    let missing = scratch
        .command(&["status"])
        .env("PIM_JOB_QUEUE_CONFIG", scratch.path("nope.toml"))
        .output()
        .unwrap();
    assert_eq!(exit_code(&missing), 78);
    assert!(stderr(&missing).contains("nope.toml"));
}

#[test]
fn declared_queues_extend_the_set() {
    let scratch = Scratch::new(Backend::Sqlite);
    scratch.write_config(
        "queues = [\"ui_job\", \"import_export_job\", \"data_maintenance_job\", \"reports\"]",
    );
    std::fs::write(scratch.path("8.conf"), "reports\n").unwrap();
    scratch.push("ui_job", "u");
    let id = scratch.push("reports", "r");
    let (code, log) = consume_instance(&scratch, "8", "1");
    assert_eq!(code, 0, "{log}");
    assert_eq!(scratch.ran(), [("reports".to_string(), id)]);
}

#[test]
fn unreachable_database_is_waited_for_not_a_crash_loop() {
    let scratch = Scratch::new(Backend::Sqlite);
    let mut consumer = scratch
        .command(&["consume"])
        .env(
            "PIM_JOB_QUEUE_DATABASE_URL",
            "sqlite:///proc/no-such-dir/jobs.sqlite",
        )
        .stdout(std::fs::File::create(scratch.path("c.log")).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(10), "a second attempt", || {
        scratch.log_of("c").contains("attempt 2")
    });
    assert!(consumer.try_wait().unwrap().is_none(), "the worker exited");
    let log = scratch.log_of("c");
    assert!(log.contains("waiting for the database sqlite:///proc/no-such-dir/jobs.sqlite (attempt 1, next in 1s)"), "{log}");
    send_signal(&consumer, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(wait_exit(&mut consumer, Duration::from_secs(5)), 0);
}

//! The property suite: config files, instance confs, durations, payloads and argv templates
//! from generators, with a fixed seed and a fixed budget so CI is repeatable. The property:
//! an answer in the documented set (a value, or a clear error with its exit code), never a
//! panic, and nothing half-written (a refused `push` stores nothing).

use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

use pim_job_queue::config::Config as WorkerConfig;
use pim_job_queue::exit::ExitCode;
use pim_job_queue::template::{ArgvTemplate, JobFacts};
use pim_job_queue::units::{MAX_DURATION, parse_duration, parse_poll_interval};

use crate::support::*;

fn budget(cases: u32) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(0x5eed_2026_1203),
        failure_persistence: None,
        ..Config::default()
    }
}

/// Keys of worker.toml and values of every shape, including the hostile ones.
fn config_line() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "database_url",
        "poll_interval",
        "heartbeat_interval",
        "rescue_after",
        "stop_grace",
        "retention",
        "queues",
        "auto_migrate",
        "wake_dir",
        "instance_dir",
        "transport",
        "unknown_key",
    ]);
    let value = prop_oneof![
        "\"[0-9]{1,25}(ms|s|m|h|d|y)?\"",
        "[0-9]{1,25}(\\.[0-9]{1,5})?(e[0-9]{1,3})?",
        "-[0-9]{1,5}",
        "\"[ -~]{0,40}\"",
        Just("[\"ui_job\", \"ui_job\"]".to_string()),
        Just("[]".to_string()),
        Just("true".to_string()),
        Just("\"akeneo\"".to_string()),
        "[ -~]{0,20}",
    ];
    (key, value).prop_map(|(key, value)| format!("{key} = {value}"))
}

fn job_table() -> impl Strategy<Value = String> {
    let element = prop_oneof![
        "[a-z/]{1,10}",
        Just("{id}".to_string()),
        Just("{payload.x}".to_string()),
        Just("--x={payload.x}".to_string()),
        "\\{[a-z.]{0,8}\\}?",
        "[ -~]{0,10}",
    ];
    (
        prop::collection::vec(element, 0..4),
        prop::option::of("[0-9]{1,22}(ms|s|y)?"),
        prop::option::of(any::<bool>()),
    )
        .prop_map(|(argv, timeout, allow)| {
            let argv: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
            let mut table = format!("[job]\ncommand = [{}]\n", argv.join(", "));
            if let Some(timeout) = timeout {
                table.push_str(&format!("timeout = \"{timeout}\"\n"));
            }
            if let Some(allow) = allow {
                table.push_str(&format!("allow_option_values = {allow}\n"));
            }
            table
        })
}

proptest! {
    #![proptest_config(budget(2000))]

    #[test]
    fn any_config_text_is_a_config_or_a_config_error(
        lines in prop::collection::vec(config_line(), 0..6),
        job in prop::option::of(job_table()),
        noise in "[ -~\n]{0,30}",
    ) {
        let mut text = lines.join("\n");
        text.push('\n');
        if let Some(job) = job {
            text.push_str(&job);
        }
        for candidate in [text.clone(), format!("{text}{noise}")] {
            match WorkerConfig::from_toml(&candidate, Some(Path::new("/etc/x/worker.toml"))) {
                Ok(config) => {
                    prop_assert!(config.poll_interval <= MAX_DURATION);
                    prop_assert!(config.stop_grace <= MAX_DURATION);
                    prop_assert!(config.rescue_after <= MAX_DURATION);
                }
                Err(failure) => {
                    prop_assert_eq!(failure.exit, ExitCode::Config);
                    prop_assert!(failure.message.starts_with("/etc/x/worker.toml"), "{}", failure.message);
                }
            }
        }
    }

    #[test]
    fn any_duration_text_is_bounded_or_refused(text in "[0-9.e+-]{0,30}(ns|us|ms|s|m|h|d|w|M|y)?( [0-9]{1,20}[a-z]{1,2})?") {
        if let Ok(duration) = parse_duration(&text) {
            prop_assert!(duration <= MAX_DURATION, "{} -> {:?}", text, duration);
        }
        if let Ok(interval) = parse_poll_interval(&text) {
            prop_assert!(interval >= std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn any_instance_conf_is_queues_or_a_located_error(text in "([a-z_]{0,20}|#[ -~]{0,10}|[ -~]{0,20})(\n([a-z_]{0,20}|[ -~]{0,10})){0,6}") {
        let config = WorkerConfig::from_toml("", None).unwrap();
        let path = Path::new("/etc/pim_job_queue/1.conf");
        match pim_job_queue::instance::parse_queue_lines(&text, path, &config) {
            Ok(queues) => {
                for queue in &queues {
                    prop_assert!(config.knows_queue(queue));
                }
            }
            Err(failure) => {
                prop_assert_eq!(failure.exit, ExitCode::Config);
                prop_assert!(failure.message.contains("1.conf:"), "{}", failure.message);
            }
        }
    }

    #[test]
    fn a_rendered_argument_never_becomes_an_option(
        value in "[ -~]{0,12}",
        prefix in prop::option::of("[a-z-]{1,4}="),
    ) {
        let element = match &prefix {
            Some(prefix) => format!("{prefix}{{payload.x}}"),
            None => "{payload.x}".to_string(),
        };
        let template = ArgvTemplate::parse(&["/bin/echo".to_string(), element], "job.command").unwrap();
        let payload = serde_json::json!({ "x": value }).as_object().unwrap().clone();
        let facts = JobFacts { id: 1, queue: "ui_job", code: "c", payload: &payload };
        match template.render(&facts) {
            Ok(argv) => {
                prop_assert_eq!(&argv[0], "/bin/echo");
                prop_assert!(prefix.is_some() || !argv[1].starts_with('-'));
            }
            Err(reason) => {
                prop_assert!(prefix.is_none() && value.starts_with('-'), "{}", reason);
            }
        }
    }
}

/// The real binary: `push` with generated payloads and delays answers 0 (and stores one job)
/// or 64/65 (and stores nothing).
#[test]
fn push_answers_in_the_documented_set_and_never_half_writes() {
    let scratch = Scratch::new(Backend::Sqlite);
    let payload = prop_oneof![
        "\\{\"[a-z]{1,5}\": [0-9]{1,5}\\}",
        "[ -~]{0,30}",
        Just("[1, 2]".to_string()),
        Just("null".to_string()),
        Just(format!("{{\"big\": \"{}\"}}", "y".repeat(1 << 20))),
    ];
    let delay = prop::option::of(prop_oneof![
        "[0-9]{1,3}(s|m)?",
        "[0-9]{5,25}(y|d)",
        "-[0-9]{1,3}",
        "1e[0-9]{1,3}",
    ]);
    let stored = std::cell::Cell::new(0usize);
    let mut runner = proptest::test_runner::TestRunner::new(budget(60));
    runner
        .run(&(payload, delay), |(payload, delay)| {
            let file = scratch.path("payload.json");
            std::fs::write(&file, &payload).unwrap();
            let mut args = vec![
                "push".to_string(),
                "ui_job".into(),
                "x".into(),
                "--payload-file".into(),
                file.display().to_string(),
            ];
            if let Some(delay) = &delay {
                args.push(format!("--delay={delay}"));
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let output = scratch.run(&args);
            let code = exit_code(&output);
            prop_assert!(
                [0, 64, 65].contains(&code),
                "{:?}: exit {} {}",
                args,
                code,
                stderr(&output)
            );
            if code == 0 {
                stored.set(stored.get() + 1);
            }
            let listed: serde_json::Value =
                serde_json::from_str(&scratch.ok(&["jobs", "--json", "--limit", "1000"])).unwrap();
            prop_assert_eq!(
                listed.as_array().unwrap().len(),
                stored.get(),
                "a refused push stored a job"
            );
            Ok(())
        })
        .unwrap();
}

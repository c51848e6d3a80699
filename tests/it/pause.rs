//! `pause` and `resume`: fleet-wide, stored in the database, kept across restarts.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::backend_tests;
use crate::support::*;

backend_tests!(a_paused_queue_waits_while_the_others_run_on_every_host);

/// Two hosts share the store. A paused queue's job waits 30 s (and across a restart of every
/// worker) while a `ui_job` job pushed meanwhile runs within 1 s; `resume` lets it run
/// within a poll interval or so.
fn a_paused_queue_waits_while_the_others_run_on_every_host(backend: Backend) {
    let scratch = Scratch::new(backend);
    scratch.write_config("heartbeat_interval = \"200ms\"\nrescue_after = \"2s\"");
    scratch.ok(&[
        "pause",
        "import_export_job",
        "--reason",
        "supplier feed broken",
    ]);
    let status = scratch.status_json();
    assert_eq!(status["paused"][0]["queue"], "import_export_job");
    assert_eq!(status["paused"][0]["reason"], "supplier feed broken");
    assert_ne!(status["paused"][0]["paused_by"], "");
    let import = scratch.push("import_export_job", "csv_product_import");
    let import_pushed = Instant::now();
    let mut a = scratch.spawn_consumer("a", &["--host-id", "host-a"]);
    let mut b = scratch.spawn_consumer("b", &["--host-id", "host-b"]);
    wait_until(Duration::from_secs(10), "both workers registered", || {
        scratch.status_json()["workers"]
            .as_array()
            .is_some_and(|workers| workers.len() == 2)
    });
    let ui = scratch.push("ui_job", "mass_edit");
    let pushed = Instant::now();
    wait_until(Duration::from_secs(5), "the ui_job job to run", || {
        scratch.ran().contains(&("ui_job".to_string(), ui))
    });
    assert!(
        pushed.elapsed() < Duration::from_secs(1),
        "{:?}",
        pushed.elapsed()
    );
    let thirty = import_pushed + Duration::from_secs(30);
    while Instant::now() < thirty {
        assert_eq!(scratch.show(import)["status"], "waiting");
        std::thread::sleep(Duration::from_secs(2));
    }
    assert_eq!(scratch.show(import)["status"], "waiting");
    for worker in [&mut a, &mut b] {
        send_signal(worker, Signal::SIGTERM);
        assert_eq!(wait_exit(worker, Duration::from_secs(5)), 0);
    }
    let mut c = scratch.spawn_consumer("c", &["--host-id", "host-a"]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        scratch.show(import)["status"],
        "waiting",
        "a restart keeps the pause"
    );
    let resumed = scratch.ok(&["resume", "import_export_job"]);
    assert!(resumed.contains("1 of them paused"), "{resumed}");
    let resumed_at = Instant::now();
    wait_until(Duration::from_secs(3), "the resumed job to run", || {
        scratch.show(import)["status"] == "succeeded"
    });
    assert!(
        resumed_at.elapsed() < Duration::from_secs(2),
        "{:?}",
        resumed_at.elapsed()
    );
    assert_eq!(scratch.status_json()["paused"], serde_json::json!([]));
    send_signal(&c, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut c, Duration::from_secs(5)), 0);
}

#[test]
fn pause_and_resume_name_known_queues_or_all() {
    let scratch = Scratch::new(Backend::Sqlite);
    for command in ["pause", "resume"] {
        let output = scratch.run(&[command, "ui_job", "no_such_queue"]);
        assert_eq!(exit_code(&output), 65, "{command}");
        assert!(stderr(&output).contains("unknown queue \"no_such_queue\""));
    }
    assert_eq!(scratch.status_json()["paused"], serde_json::json!([]));
    scratch.ok(&["pause"]);
    let paused = scratch.status_json()["paused"].as_array().unwrap().len();
    assert_eq!(paused, 3, "no queue named: every configured queue");
    let text = scratch.ok(&["status"]);
    assert!(text.contains("Paused: ui_job since "), "{text}");
    assert!(text.contains(": no reason given"), "{text}");
    scratch.ok(&["resume"]);
    assert_eq!(scratch.status_json()["paused"], serde_json::json!([]));
}

//! `check`: one monitoring-plugin line and its state as the exit code, on every backend.

use std::time::{Duration, Instant};

use crate::backend_tests;
use crate::support::*;

backend_tests!(check_says_each_state_with_its_exit_code);

/// Runs `check` with `args`; returns its exit code and its one line.
fn check(scratch: &Scratch, args: &[&str]) -> (i32, String) {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    let output = scratch.run(&all);
    let line = String::from_utf8(output.stdout.clone()).unwrap();
    assert_eq!(line.lines().count(), 1, "one line: {line:?}");
    assert!(stderr(&output).is_empty(), "{}", stderr(&output));
    (exit_code(&output), line.trim_end().to_string())
}

fn check_says_each_state_with_its_exit_code(backend: Backend) {
    let scratch = Scratch::new(backend);
    let (code, line) = check(&scratch, &["--max-latency", "1m"]);
    assert_eq!(code, 0, "{line}");
    assert!(line.starts_with("OK - waiting: ui_job 0s, "), "{line}");
    assert!(line.contains("|'ui_job_latency'=0.000s;;60;0"), "{line}");

    // A job nobody takes: its queue's wait grows with the wall clock.
    scratch.push("import_export_job", "csv_product_import");
    std::thread::sleep(Duration::from_millis(1500));
    let (code, line) = check(&scratch, &["--max-latency", "1s:1h"]);
    assert_eq!(code, 1, "{line}");
    let queues = scratch.status_json()["queues"].clone();
    let import = queues
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "import_export_job");
    let waited = import.unwrap()["latency_seconds"].as_f64().unwrap();
    assert!((1.0..60.0).contains(&waited), "status says {waited} s");
    assert!(
        line.starts_with("WARNING - import_export_job's oldest due job has waited 1s"),
        "{line}"
    );
    let (code, line) = check(&scratch, &["--max-latency", "1h,import_export_job=500ms"]);
    assert_eq!(code, 2, "{line}");
    assert!(line.starts_with("CRITICAL - "), "{line}");
    // A paused queue waits on purpose: reported, never alerting.
    scratch.ok(&["pause", "import_export_job"]);
    let (code, line) = check(&scratch, &["--max-latency", "500ms"]);
    assert_eq!(code, 0, "{line}");
    assert!(line.contains("(paused)"), "{line}");
    scratch.ok(&["resume"]);

    // Nobody serves ui_job.
    let (code, line) = check(&scratch, &["--min-workers", "ui_job=1"]);
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("0 live workers on ui_job"), "{line}");
    assert!(line.contains("'ui_job_workers'=0;;1:;0"), "{line}");

    // One failed job in the last hour.
    scratch.write_config("[jobs.broken]\ncommand = [\"/bin/false\"]");
    scratch.push("ui_job", "broken");
    scratch.run(&["consume", "ui_job", "--limit", "1"]);
    let (code, line) = check(&scratch, &["--max-failed", "1h=0:5"]);
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("1 jobs failed in the last 1h"), "{line}");
    let (code, line) = check(&scratch, &["--max-failed", "1h=0"]);
    assert_eq!(code, 2, "{line}");

    let (code, line) = check(&scratch, &["--max-latency", "soon"]);
    assert_eq!(code, 3, "{line}");
    assert!(
        line.starts_with("UNKNOWN - --max-latency \"soon\": "),
        "{line}"
    );
}

mod shared {
    use super::*;

    use crate::shared_backend_tests;

    shared_backend_tests!(a_black_holed_database_is_unknown_within_ten_seconds);

    /// A server that accepts and never answers: UNKNOWN within 10 s, never a hang.
    fn a_black_holed_database_is_unknown_within_ten_seconds(backend: Backend) {
        let scratch = Scratch::new(backend);
        let proxy = FaultProxy::new(backend.server_port());
        proxy.black_hole();
        let url = proxy.url_for(&scratch.url, backend.server_port());
        let started = Instant::now();
        let output = scratch.run(&["--database-url", &url, "check"]);
        let took = started.elapsed();
        let line = String::from_utf8_lossy(&output.stdout).to_string();
        assert_eq!(exit_code(&output), 3, "{line}");
        assert!(line.starts_with("UNKNOWN - "), "{line}");
        assert!(took < Duration::from_secs(10), "took {took:?}");
    }
}

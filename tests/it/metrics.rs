//! `metrics`: the Prometheus text, checked by Debian's promtool, from every backend.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::backend_tests;
use crate::support::*;

backend_tests!(
    promtool_accepts_the_metrics_and_counters_survive_a_prune,
    latency_of_an_unconsumed_job_grows_with_wall_time,
    a_killed_workers_heartbeat_stops_and_the_rescue_counter_grows,
);

/// Debian's promtool (scripts/test.sh fetches it into `PJQ_PROMTOOL`): a must under CI,
/// elsewhere a loud skip.
fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PJQ_PROMTOOL")
        .map(PathBuf::from)
        .filter(|path| path.is_file());
    if found.is_none() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI checks the metrics with promtool, and PJQ_PROMTOOL names none");
        }
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "\n!!! SKIPPED: promtool check (run scripts/test.sh, which fetches it) !!!\n"
        );
    }
    found
}

pub fn check_with_promtool(text: &str) {
    let Some(promtool) = promtool() else { return };
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    let output = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(file.path()).unwrap())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The value of the one sample `series` (name and labels, exactly as printed).
pub fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

fn finished(result: &str) -> String {
    format!("pjq_jobs_finished_total{{queue=\"ui_job\",result=\"{result}\"}}")
}

fn promtool_accepts_the_metrics_and_counters_survive_a_prune(backend: Backend) {
    let scratch = Scratch::new(backend);
    scratch.write_config(
        "retention = \"1s\"\nfailed_retention = \"1s\"\n[jobs.fail]\ncommand = [\"/bin/false\"]",
    );
    for _ in 0..3 {
        scratch.push("ui_job", "ok");
    }
    scratch.push("ui_job", "fail");
    scratch.ok(&["consume", "--limit", "4"]);
    let before = scratch.ok(&["metrics"]);
    check_with_promtool(&before);
    assert_eq!(value(&before, &finished("succeeded")), 3.0);
    assert_eq!(value(&before, &finished("failed")), 1.0);
    let count = "pjq_job_duration_seconds_count{queue=\"ui_job\"}";
    assert_eq!(value(&before, count), 4.0);
    assert!(before.ends_with("# EOF\n"));

    std::thread::sleep(Duration::from_millis(1100));
    let pruned = scratch.ok(&["prune"]);
    assert!(pruned.contains("3 removed"), "{pruned}");
    let after = scratch.ok(&["metrics"]);
    check_with_promtool(&after);
    let gauge = "pjq_jobs{queue=\"ui_job\",state=\"succeeded\"}";
    assert_eq!(value(&after, gauge), 0.0, "the rows are gone");
    assert_eq!(
        value(&after, &finished("succeeded")),
        3.0,
        "the count is not"
    );
    assert_eq!(value(&after, &finished("failed")), 1.0);
    assert_eq!(value(&after, count), 4.0);
}

fn latency_of_an_unconsumed_job_grows_with_wall_time(backend: Backend) {
    let scratch = Scratch::new(backend);
    scratch.write_config("");
    scratch.push("import_export_job", "x");
    let latency = "pjq_queue_latency_seconds{queue=\"import_export_job\"}";
    let first = value(&scratch.ok(&["metrics"]), latency);
    std::thread::sleep(Duration::from_millis(1500));
    let output = scratch.path("pim_job_queue.prom");
    scratch.ok(&["metrics", "--output", output.to_str().unwrap()]);
    let text = std::fs::read_to_string(&output).unwrap();
    let second = value(&text, latency);
    assert!(second >= first + 1.4, "{first} then {second}");
    assert_eq!(
        value(&text, "pjq_queue_latency_seconds{queue=\"ui_job\"}"),
        0.0
    );
    let leftovers: Vec<_> = std::fs::read_dir(scratch.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A `kill -9`ed worker's heartbeat timestamp stops moving, and once another worker
/// rescues its job the rescue counter says so.
fn a_killed_workers_heartbeat_stops_and_the_rescue_counter_grows(backend: Backend) {
    let scratch = Scratch::new(backend);
    scratch.write_config(
        "heartbeat_interval = \"500ms\"\nrescue_after = \"3s\"\n\
         [jobs.long]\ncommand = [\"/bin/sleep\", \"60\"]\nmax_attempts = 2",
    );
    let id = scratch.push("ui_job", "long");
    let mut doomed = scratch.spawn_consumer("doomed", &["--host-id", "host-a"]);
    wait_until_started(&scratch, id);
    let heartbeat = format!(
        "pjq_worker_heartbeat_timestamp_seconds{{host=\"host-a\",instance=\"\",pid=\"{}\"}}",
        doomed.id()
    );
    let alive = value(&scratch.ok(&["metrics"]), &heartbeat);
    std::thread::sleep(Duration::from_millis(1200));
    let later = value(&scratch.ok(&["metrics"]), &heartbeat);
    assert!(
        later > alive,
        "a live worker's heartbeat moves: {alive} {later}"
    );
    send_signal(&doomed, Signal::SIGKILL);
    doomed.wait().unwrap();
    let dead = value(&scratch.ok(&["metrics"]), &heartbeat);
    std::thread::sleep(Duration::from_millis(1200));
    let text = scratch.ok(&["metrics"]);
    assert_eq!(value(&text, &heartbeat), dead, "a dead worker's does not");
    assert_eq!(
        value(&text, "pjq_jobs_rescued_total{queue=\"ui_job\"}"),
        0.0
    );

    let mut rescuer = scratch.spawn_consumer("rescuer", &["--host-id", "host-b"]);
    wait_until(Duration::from_secs(15), "the rescue", || {
        let text = scratch.ok(&["metrics"]);
        value(&text, "pjq_jobs_rescued_total{queue=\"ui_job\"}") == 1.0
    });
    send_signal(&rescuer, Signal::SIGKILL);
    rescuer.wait().unwrap();
}

/// One HTTP exchange with `address`: the status line and the body.
fn http_get(address: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// `metrics --listen` answers each scrape with what the database holds at that moment,
/// 404 elsewhere, and stops on SIGTERM.
#[test]
fn listen_serves_a_fresh_scrape_at_each_request() {
    use std::io::BufRead;
    let scratch = Scratch::new(Backend::Sqlite);
    scratch.write_config("");
    scratch.ok(&["migrate"]);
    let mut server = scratch
        .command(&["metrics", "--listen", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    std::io::BufReader::new(server.stderr.take().unwrap())
        .read_line(&mut said)
        .unwrap();
    let address = said
        .trim()
        .strip_prefix("pim-job-queue: serving metrics on http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("{said}"))
        .to_string();
    let waiting = "pjq_jobs{queue=\"ui_job\",state=\"waiting\"}";
    let (status, body) = http_get(&address, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    check_with_promtool(&body);
    assert_eq!(value(&body, waiting), 0.0);
    scratch.push("ui_job", "x");
    let (_, body) = http_get(&address, "/metrics");
    assert_eq!(value(&body, waiting), 1.0, "read again at each scrape");
    let (status, _) = http_get(&address, "/elsewhere");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    send_signal(&server, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut server, Duration::from_secs(5)), 0);
}

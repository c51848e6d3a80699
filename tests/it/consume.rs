//! The daemon: priority, limits, stop requests, failures, timeouts, placeholders, bad rows and
//! concurrent workers.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::backend_tests;
use crate::support::*;

backend_tests!(
    strict_priority_across_the_three_queues,
    a_burst_in_ui_job_overtakes_older_lower_jobs,
    limit_exits_after_n_jobs,
    time_limit_stops_an_idle_worker,
    memory_limit_stops_the_worker_between_jobs,
    stop_workers_stops_running_consumers_only,
    stop_workers_lets_the_running_job_finish,
    failing_jobs_record_exit_code_signal_and_output,
    timeout_kills_the_whole_process_group,
    placeholders_and_environment_reach_the_job,
    malformed_rows_fail_alone,
    delayed_jobs_wait_their_turn,
    sigterm_lets_the_running_job_finish,
    four_workers_run_2000_jobs_exactly_once,
    a_jobs_peak_memory_and_cpu_time_are_recorded,
    opt_in_retries_back_off_and_keep_their_history,
);

/// `retry_on_exit_codes = [75]` with a 1 s backoff doubling: a job that exits 75, 75, then 0
/// ends succeeded on its third attempt, its starts at least 1 s then 2 s apart, its history
/// listing the two failures; an exit code not listed fails at once; a job that keeps
/// exiting 75 says its attempts ran out.
fn opt_in_retries_back_off_and_keep_their_history(backend: Backend) {
    let scratch = Scratch::new(backend);
    let counter = scratch.path("count");
    let starts = scratch.path("starts");
    scratch.write_config(&format!(
        r#"[jobs.flaky]
command = ["/bin/sh", "-c", "n=$(($(cat {count} 2>/dev/null || echo 0) + 1)); echo $n > {count}; date +%s.%N >> {starts}; [ $n -ge 3 ] || exit 75"]
max_attempts = 3
retry_on_exit_codes = [75]
backoff = "1s"
backoff_multiplier = 2
jitter = 0
[jobs.broken]
command = ["/bin/sh", "-c", "exit 1"]
max_attempts = 3
retry_on_exit_codes = [75]
[jobs.tired]
command = ["/bin/sh", "-c", "exit 75"]
max_attempts = 2
retry_on_exit_codes = "any"
backoff = "1s"
jitter = 0
"#,
        count = counter.display(),
        starts = starts.display()
    ));
    let flaky = scratch.push("ui_job", "flaky");
    let broken = scratch.push("ui_job", "broken");
    let tired = scratch.push("ui_job", "tired");
    let mut worker = scratch.spawn_consumer("w", &[]);
    wait_until(Duration::from_secs(20), "the three jobs to end", || {
        [flaky, broken, tired].iter().all(|id| {
            !matches!(
                scratch.show(*id)["status"].as_str(),
                Some("waiting" | "running")
            )
        })
    });
    send_signal(&worker, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut worker, Duration::from_secs(10)), 0);

    let job = scratch.show(flaky);
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["attempts"], 3);
    let history = job["earlier_attempts"].as_array().unwrap();
    assert_eq!(history.len(), 2, "{job:#}");
    assert_eq!(history[0]["exit_code"], 75);
    assert_eq!(history[1]["attempt"], 2);
    let times: Vec<f64> = std::fs::read_to_string(&starts)
        .unwrap()
        .lines()
        .map(|line| line.parse().unwrap())
        .collect();
    assert_eq!(times.len(), 3);
    assert!(times[1] - times[0] >= 1.0, "{times:?}");
    assert!(times[2] - times[1] >= 2.0, "{times:?}");
    let shown = scratch.ok(&["show", &flaky.to_string()]);
    assert!(shown.contains("attempt 1: "), "{shown}");

    let job = scratch.show(broken);
    assert_eq!(
        (job["status"].as_str(), job["attempts"].as_i64()),
        (Some("failed"), Some(1))
    );
    let job = scratch.show(tired);
    assert_eq!(job["status"], "failed");
    assert_eq!(job["attempts"], 2);
    let reason = job["reason"].as_str().unwrap();
    assert_eq!(reason, "exit code 75 (attempts exhausted: 2)");
}

/// The kernel's measure of a job (`wait4`: the main process and the children it waited
/// for) is stored with its result: here `tail` holds 50 MB of its input.
fn a_jobs_peak_memory_and_cpu_time_are_recorded(backend: Backend) {
    let scratch = Scratch::new(backend);
    scratch.write_config(
        r#"[jobs.hungry]
command = ["/bin/sh", "-c", "head -c 60000000 /dev/zero | tail -c 50000000 > /dev/null"]
"#,
    );
    let id = scratch.push("ui_job", "hungry");
    scratch.ok(&["consume", "--limit", "1"]);
    let job = scratch.show(id);
    assert_eq!(job["status"], "succeeded");
    let peak = job["usage"]["peak_rss_bytes"].as_i64().unwrap();
    assert!((50_000_000..1_000_000_000).contains(&peak), "{peak}");
    assert!(job["usage"]["cpu_usec"].as_i64().unwrap() > 0);
    let shown = scratch.ok(&["show", &id.to_string()]);
    assert!(shown.contains("resources: peak RSS "), "{shown}");
}

fn strict_priority_across_the_three_queues(backend: Backend) {
    let scratch = Scratch::new(backend);
    let mut expected = Vec::new();
    let maintenance: Vec<i64> = (0..3)
        .map(|_| scratch.push("data_maintenance_job", "m"))
        .collect();
    let imports: Vec<i64> = (0..3)
        .map(|_| scratch.push("import_export_job", "i"))
        .collect();
    let ui: Vec<i64> = (0..3).map(|_| scratch.push("ui_job", "u")).collect();
    expected.extend(ui.iter().map(|id| ("ui_job".to_string(), *id)));
    expected.extend(
        imports
            .iter()
            .map(|id| ("import_export_job".to_string(), *id)),
    );
    expected.extend(
        maintenance
            .iter()
            .map(|id| ("data_maintenance_job".to_string(), *id)),
    );
    scratch.ok(&["consume", "--limit", "9"]);
    assert_eq!(scratch.ran(), expected);
}

fn a_burst_in_ui_job_overtakes_older_lower_jobs(backend: Backend) {
    let scratch = Scratch::new(backend);
    scratch.write_config(&format!(
        r#"[jobs.slow]
command = ["/bin/sh", "-c", "while [ ! -e \"$0\" ]; do sleep 0.02; done; echo \"$PIM_JOB_QUEUE $PIM_JOB_ID\" >> \"$1\"", "{gate}", "{log}"]
"#,
        gate = scratch.path("gate").display(),
        log = scratch.path("ran.log").display()
    ));
    let slow = scratch.push("import_export_job", "slow");
    let older: Vec<i64> = (0..3)
        .map(|_| scratch.push("import_export_job", "i"))
        .collect();
    let mut consumer = scratch.spawn_consumer("c", &["--limit", "7"]);
    wait_until(Duration::from_secs(10), "the slow job to start", || {
        scratch.show(slow)["status"] == "running"
    });
    let burst: Vec<i64> = (0..3).map(|_| scratch.push("ui_job", "u")).collect();
    std::fs::write(scratch.path("gate"), "").unwrap();
    assert_eq!(wait_exit(&mut consumer, Duration::from_secs(20)), 0);
    let order: Vec<i64> = scratch.ran().iter().map(|(_, id)| *id).collect();
    let mut expected = vec![slow];
    expected.extend(&burst);
    expected.extend(&older);
    assert_eq!(order, expected);
}

fn limit_exits_after_n_jobs(backend: Backend) {
    let scratch = Scratch::new(backend);
    for _ in 0..3 {
        scratch.push("ui_job", "u");
    }
    let output = scratch.run(&["consume", "--limit", "1"]);
    assert_eq!(exit_code(&output), 0);
    assert_eq!(scratch.ran().len(), 1);
    let log = String::from_utf8_lossy(&output.stdout);
    assert!(log.contains("job limit reached"), "{log}");
    assert_eq!(scratch.status_json()["queues"][0]["waiting"], 2);
}

fn time_limit_stops_an_idle_worker(backend: Backend) {
    let scratch = Scratch::new(backend);
    let started = Instant::now();
    let output = scratch.run(&["consume", "--time-limit", "1", "--sleep", "5"]);
    let took = started.elapsed();
    assert_eq!(exit_code(&output), 0);
    assert!(took >= Duration::from_secs(1), "exited after {took:?}");
    assert!(
        took < Duration::from_secs(4),
        "the 5 s sleep was not cut short: {took:?}"
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("time limit reached"));
}

fn memory_limit_stops_the_worker_between_jobs(backend: Backend) {
    let scratch = Scratch::new(backend);
    let id = scratch.push("ui_job", "u");
    let output = scratch.run(&["consume", "--memory-limit", "1K"]);
    assert_eq!(exit_code(&output), 0);
    assert!(String::from_utf8_lossy(&output.stdout).contains("memory limit reached"));
    assert_eq!(
        scratch.show(id)["status"],
        "waiting",
        "nothing taken, nothing lost"
    );
}

fn stop_workers_stops_running_consumers_only(backend: Backend) {
    let scratch = Scratch::new(backend);
    scratch.ok(&["migrate"]);
    let mut first = scratch.spawn_consumer("a", &["--sleep", "100ms"]);
    let mut second = scratch.spawn_consumer("b", &["--sleep", "100ms", "--host-id", "other-host"]);
    wait_until(Duration::from_secs(10), "both consumers to start", || {
        scratch.log_of("a").contains("consuming queues")
            && scratch.log_of("b").contains("consuming queues")
    });
    let said = scratch.ok(&["stop-workers"]);
    assert!(said.contains("Stop requested"), "{said}");
    let asked = Instant::now();
    // 75: a graceful restart, which the unit's RestartForceExitStatus= turns into a restart.
    assert_eq!(wait_exit(&mut first, Duration::from_secs(5)), 75);
    assert_eq!(wait_exit(&mut second, Duration::from_secs(5)), 75);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "took {:?}",
        asked.elapsed()
    );
    assert!(scratch.log_of("a").contains("stop-workers requested"));
    // A consumer started after the request is not affected.
    let mut late = scratch.spawn_consumer("late", &["--sleep", "100ms"]);
    wait_until(
        Duration::from_secs(10),
        "the late consumer to start",
        || scratch.log_of("late").contains("consuming queues"),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        late.try_wait().unwrap().is_none(),
        "the late consumer exited"
    );
    let id = scratch.push("ui_job", "u");
    wait_until(
        Duration::from_secs(5),
        "the late consumer to run a job",
        || scratch.show(id)["status"] == "succeeded",
    );
    send_signal(&late, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut late, Duration::from_secs(5)), 0);
}

fn stop_workers_lets_the_running_job_finish(backend: Backend) {
    let scratch = Scratch::new(backend);
    scratch.write_config("[jobs.slow]\ncommand = [\"/bin/sleep\", \"1\"]");
    let id = scratch.push("ui_job", "slow");
    let next = scratch.push("ui_job", "u");
    let mut consumer = scratch.spawn_consumer("c", &[]);
    wait_until(Duration::from_secs(10), "the job to start", || {
        scratch.show(id)["status"] == "running"
    });
    scratch.ok(&["stop-workers"]);
    assert_eq!(wait_exit(&mut consumer, Duration::from_secs(10)), 75);
    assert_eq!(scratch.show(id)["status"], "succeeded");
    assert_eq!(
        scratch.show(next)["status"],
        "waiting",
        "no new job after the request"
    );
}

fn failing_jobs_record_exit_code_signal_and_output(backend: Backend) {
    let scratch = Scratch::new(backend);
    scratch.write_config(
        r#"[jobs.exit3]
command = ["/bin/sh", "-c", "echo to stdout; echo to stderr >&2; exit 3"]
[jobs.killed]
command = ["/bin/sh", "-c", "kill -9 $$"]
[jobs.missing]
command = ["/no/such/binary"]
"#,
    );
    let exit3 = scratch.push("ui_job", "exit3");
    let killed = scratch.push("ui_job", "killed");
    let missing = scratch.push("ui_job", "missing");
    let fine = scratch.push("ui_job", "fine");
    let output = scratch.run(&["consume", "--limit", "4"]);
    assert_eq!(
        exit_code(&output),
        0,
        "one failing job never stops the worker"
    );
    let job = scratch.show(exit3);
    assert_eq!(job["status"], "failed");
    assert_eq!(job["exit_code"], 3);
    assert_eq!(job["reason"], "exit code 3");
    let lines: Vec<&str> = job["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert!(
        lines.contains(&"to stdout") && lines.contains(&"to stderr"),
        "{lines:?}"
    );
    let job = scratch.show(killed);
    assert_eq!(job["exit_signal"], 9);
    assert_eq!(job["reason"], "killed by signal SIGKILL");
    let job = scratch.show(missing);
    assert_eq!(job["status"], "failed");
    assert!(
        job["reason"]
            .as_str()
            .unwrap()
            .contains("cannot start /no/such/binary")
    );
    assert_eq!(scratch.show(fine)["status"], "succeeded");
    let log = String::from_utf8_lossy(&output.stdout);
    assert!(
        log.contains("to stderr"),
        "the job's output is logged: {log}"
    );
    assert!(log.contains("result=\"failed\""), "{log}");
}

fn timeout_kills_the_whole_process_group(backend: Backend) {
    let scratch = Scratch::new(backend);
    let pidfile = scratch.path("grandchild.pid");
    scratch.write_config(&format!(
        r#"[jobs.hang]
command = ["/bin/sh", "-c", "sleep 300 & echo $! > \"$0\"; wait", "{pidfile}"]
timeout = "1s"
"#,
        pidfile = pidfile.display()
    ));
    let id = scratch.push("ui_job", "hang");
    let started = Instant::now();
    scratch.ok(&["consume", "--limit", "1"]);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let job = scratch.show(id);
    assert_eq!(job["status"], "failed");
    assert_eq!(job["reason"], "timeout");
    let grandchild: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_until(Duration::from_secs(5), "the grandchild to be gone", || {
        process_is_gone(grandchild)
    });
}

fn placeholders_and_environment_reach_the_job(backend: Backend) {
    let scratch = Scratch::new(backend);
    let out = scratch.path("argv.txt");
    scratch.write_config(&format!(
        r#"[jobs.echo]
command = ["/bin/sh", "-c", "printf '%s\n' \"$@\" \"$PIM_JOB_ID\" \"$PIM_JOB_QUEUE\" \"$PIM_JOB_CODE\" \"$PIM_JOB_PAYLOAD\" \"$APP_ENV\" \"$PWD\" \"${{{{NOTIFY_SOCKET-unset}}}}\" > \"$0\"", "{out}", "{{id}}", "{{queue}}", "{{code}}", "--file={{payload.file}}", "{{payload.n}}", "{{payload.opts.deep}}"]
working_directory = "/tmp"
[jobs.echo.env]
APP_ENV = "prod"
"#,
        out = out.display()
    ));
    let id = scratch.push_with(&[
        "import_export_job",
        "echo",
        "--payload",
        r#"{"file": "a b;c.csv", "n": 5, "opts": {"deep": "x"}}"#,
    ]);
    scratch
        .command(&["consume", "--limit", "1"])
        .env("NOTIFY_SOCKET", "/nonexistent/socket")
        .output()
        .unwrap();
    assert_eq!(scratch.show(id)["status"], "succeeded");
    let lines: Vec<String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let id = id.to_string();
    assert_eq!(
        lines[..6],
        [
            &id,
            "import_export_job",
            "echo",
            "--file=a b;c.csv",
            "5",
            "x"
        ]
    );
    assert_eq!(lines[6..9], [&id, "import_export_job", "echo"]);
    let payload: serde_json::Value = serde_json::from_str(&lines[9]).unwrap();
    assert_eq!(payload["file"], "a b;c.csv");
    assert_eq!(lines[10..], ["prod", "/tmp", "unset"]);
}

fn malformed_rows_fail_alone(backend: Backend) {
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = scratch.store().await;
        for payload in ["not json", "[1,2]", "{\"file\": null}"] {
            store
                .push(&new_job("ui_job", "needs_file", payload))
                .await
                .unwrap();
        }
    });
    scratch.write_config("[jobs.needs_file]\ncommand = [\"/bin/echo\", \"{payload.file}\"]");
    let good = scratch.push("ui_job", "fine");
    let output = scratch.run(&["consume", "--limit", "4"]);
    assert_eq!(exit_code(&output), 0);
    assert!(
        scratch.show(1)["reason"]
            .as_str()
            .unwrap()
            .starts_with("invalid payload")
    );
    assert_eq!(
        scratch.show(2)["reason"],
        "invalid payload: not a JSON object"
    );
    assert_eq!(
        scratch.show(3)["reason"],
        "payload field `file` is missing or null"
    );
    assert_eq!(scratch.show(good)["status"], "succeeded");
}

fn delayed_jobs_wait_their_turn(backend: Backend) {
    let scratch = Scratch::new(backend);
    // The delay counts from when the database stored the job, which is after this instant.
    let before_push = Instant::now();
    let later = scratch.push_with(&["ui_job", "later", "--delay", "1"]);
    let now = scratch.push("import_export_job", "now");
    scratch.ok(&["consume", "--limit", "2"]);
    assert!(before_push.elapsed() >= Duration::from_millis(990));
    let order: Vec<i64> = scratch.ran().iter().map(|(_, id)| *id).collect();
    assert_eq!(order, [now, later]);
}

fn sigterm_lets_the_running_job_finish(backend: Backend) {
    let scratch = Scratch::new(backend);
    scratch.write_config("[jobs.slow]\ncommand = [\"/bin/sleep\", \"1\"]");
    let id = scratch.push("ui_job", "slow");
    let next = scratch.push("ui_job", "u");
    let mut consumer = scratch.spawn_consumer("c", &[]);
    wait_until_started(&scratch, id);
    send_signal(&consumer, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut consumer, Duration::from_secs(10)), 0);
    assert_eq!(scratch.show(id)["status"], "succeeded");
    assert_eq!(scratch.show(next)["status"], "waiting");
}

fn four_workers_run_2000_jobs_exactly_once(backend: Backend) {
    const JOBS: usize = 2000;
    let scratch = Scratch::new(backend);
    let markers = seed_marker_jobs(&scratch, JOBS);
    let mut workers: Vec<_> = (0..4)
        .map(|n| scratch.spawn_consumer(&format!("w{n}"), &["--sleep", "50ms"]))
        .collect();
    wait_until(Duration::from_secs(240), "all jobs to finish", || {
        queues_drained(&scratch)
    });
    scratch.ok(&["stop-workers"]);
    for worker in &mut workers {
        assert_eq!(wait_exit(worker, Duration::from_secs(10)), 75);
    }
    let status = scratch.status_json();
    let succeeded: i64 = status["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["succeeded"].as_i64().unwrap())
        .sum();
    let failed: i64 = status["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["failed"].as_i64().unwrap())
        .sum();
    assert_eq!((succeeded, failed), (JOBS as i64, 0));
    assert_eq!(std::fs::read_dir(&markers).unwrap().count(), JOBS);
    let per_worker: Vec<usize> = (0..4)
        .map(|n| {
            scratch
                .log_of(&format!("w{n}"))
                .matches("job finished")
                .count()
        })
        .collect();
    assert_eq!(per_worker.iter().sum::<usize>(), JOBS, "{per_worker:?}");
    assert!(
        per_worker.iter().filter(|&&n| n > 0).count() >= 2,
        "work was shared: {per_worker:?}"
    );
}

/// A memory cgroup of the test's own, capped, for one worker: cgroup v1's `memory`
/// hierarchy or a v2 child of the test's cgroup. Removed when dropped.
struct MemoryCgroup {
    dir: std::path::PathBuf,
}

impl MemoryCgroup {
    fn create(limit: u64) -> Result<MemoryCgroup, String> {
        let membership = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let name = format!("pjq-oom-test-{}", std::process::id());
        let v1 = membership.lines().find_map(|line| {
            line.split_once(":memory:")
                .map(|(_, path)| path.to_string())
        });
        let (dir, limit_file) = match v1 {
            Some(path) => (
                std::path::Path::new("/sys/fs/cgroup/memory")
                    .join(path.trim_start_matches('/'))
                    .join(&name),
                "memory.limit_in_bytes",
            ),
            None => {
                let path = membership
                    .lines()
                    .find_map(|line| line.strip_prefix("0::"))
                    .ok_or("no cgroup")?;
                (
                    std::path::Path::new("/sys/fs/cgroup")
                        .join(path.trim_start_matches('/'))
                        .join(&name),
                    "memory.max",
                )
            }
        };
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let cgroup = MemoryCgroup { dir };
        std::fs::write(cgroup.dir.join(limit_file), limit.to_string())
            .map_err(|e| format!("{limit_file}: {e}"))?;
        // No swap to escape into, where the file exists.
        let _ = std::fs::write(cgroup.dir.join("memory.swap.max"), "0");
        Ok(cgroup)
    }

    /// Makes `command`'s process join the cgroup before it runs anything ("0" moves the
    /// writer, in both versions), so every job it starts is inside too.
    fn run_inside(&self, command: &mut std::process::Command) {
        use std::os::fd::IntoRawFd;
        use std::os::unix::process::CommandExt;
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(self.dir.join("cgroup.procs"))
            .unwrap()
            .into_raw_fd();
        // SAFETY: between fork and exec, only write(2) on a descriptor opened before.
        unsafe {
            command.pre_exec(move || {
                if nix::libc::write(procs, b"0".as_ptr().cast(), 1) == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A job the kernel's OOM killer takes (a real kill: the worker runs in a memory cgroup
/// capped at 64 MiB, the job wants 300) fails saying so, with its peak memory, and the worker
/// goes on with the next job.
#[test]
fn an_oom_killed_job_says_so_and_the_worker_goes_on() {
    if !running_as_root("the OOM test (it creates a memory cgroup)") {
        return;
    }
    let cgroup = match MemoryCgroup::create(64 << 20) {
        Ok(cgroup) => cgroup,
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI runs the OOM test, and no memory cgroup could be made: {why}")
        }
        Err(why) => {
            eprintln!("\n!!! SKIPPED: the OOM test needs a memory cgroup: {why} !!!\n");
            return;
        }
    };
    let scratch = Scratch::new(Backend::Sqlite);
    scratch.write_config(
        r#"[jobs.hog]
command = ["/usr/bin/perl", "-e", "my $x = 'x' x (300 * 1024 * 1024); sleep 1"]
"#,
    );
    let hog = scratch.push("ui_job", "hog");
    let fine = scratch.push("ui_job", "fine");
    let mut worker = scratch.command(&["consume", "--limit", "2"]);
    cgroup.run_inside(&mut worker);
    let output = worker.output().unwrap();
    assert_eq!(exit_code(&output), 0, "{}", stderr(&output));
    let job = scratch.show(hog);
    assert_eq!(job["status"], "failed");
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.contains(
            "killed by signal SIGKILL (the kernel's OOM killer killed 1 process(es) of this job)"
        ),
        "{reason}"
    );
    // The kernel's peak RSS counts pages the cgroup does not charge (the shared
    // libraries): near the cap, never the 300 MiB asked for.
    let peak = job["usage"]["peak_rss_bytes"].as_i64().unwrap();
    assert!((30 << 20..=128 << 20).contains(&peak), "{peak}");
    assert_eq!(
        scratch.show(fine)["status"],
        "succeeded",
        "the worker went on"
    );
}

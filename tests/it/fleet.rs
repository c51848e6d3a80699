//! Many workers on one database: heartbeats, crash rescue, the fence, outages, wake-ups,
//! priority under load, and a fleet draining 20,000 jobs on the shared backends.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::backend_tests;
use crate::support::*;

backend_tests!(
    status_lists_registered_workers,
    a_crashed_workers_job_fails_as_worker_lost,
    a_crashed_workers_job_runs_again_with_attempts_left,
    a_slow_but_alive_worker_keeps_its_job,
    reloads_during_a_long_job_never_let_it_be_rescued,
    push_wakes_an_idle_worker_on_the_same_host,
    a_steady_ui_stream_keeps_lower_queues_waiting,
    a_running_job_is_cancelled_from_another_process,
);

/// Fast heartbeats so rescue happens in about two seconds (the fence after 1.3 s, each call
/// bounded by 0.67 s: margins a loaded 2-core machine keeps).
const FAST_FLEET: &str = "heartbeat_interval = \"200ms\"\nrescue_after = \"2s\"";

fn pid_in(path: &std::path::Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn assert_rescued_nothing(scratch: &Scratch, worker: &str) {
    let log = scratch.log_of(worker);
    assert!(!log.contains("rescued"), "{worker} rescued a job: {log}");
}

fn workers(scratch: &Scratch) -> Vec<Value> {
    scratch.status_json()["workers"].as_array().unwrap().clone()
}

fn status_lists_registered_workers(backend: Backend) {
    let scratch = Scratch::new(backend);
    scratch.write_config(FAST_FLEET);
    let mut consumer = scratch.spawn_consumer("a", &["--host-id", "host-a"]);
    // The worker creates the store meanwhile: under load its migration may hold SQLite's
    // write lock longer than this fleet's busy wait (500 ms), and `status` then says
    // "unavailable" (69), which here means "not yet".
    wait_until(Duration::from_secs(10), "the worker to register", || {
        let output = scratch.run(&["status", "--json"]);
        output.status.success()
            && serde_json::from_slice::<Value>(&output.stdout).unwrap()["workers"]
                .as_array()
                .is_some_and(|workers| workers.len() == 1)
    });
    let worker = &workers(&scratch)[0];
    assert_eq!(worker["host"], "host-a");
    assert_eq!(worker["pid"], consumer.id());
    assert!(
        worker["heartbeat_age_seconds"].as_f64().unwrap() < 1.0,
        "{worker}"
    );
    let text = scratch.ok(&["status"]);
    assert!(
        text.contains("Workers: 1") && text.contains("host-a/-/"),
        "{text}"
    );
    send_signal(&consumer, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut consumer, Duration::from_secs(5)), 0);
    assert!(
        workers(&scratch).is_empty(),
        "a clean exit removes the worker's row"
    );
}

/// Starts a job on worker A, starts worker B, kills A with SIGKILL; returns the job id, the
/// job's own pid and B.
fn crash_worker_mid_job(scratch: &Scratch, max_attempts: u32) -> (i64, i32, std::process::Child) {
    let marker = scratch.path("second-run");
    let pidfile = scratch.path("job.pid");
    scratch.write_config(&format!(
        r#"{FAST_FLEET}
[jobs.slow]
command = ["/bin/sh", "-c", "if [ -e \"$0\" ]; then exit 0; fi; echo $$ > \"$1\"; touch \"$0\"; exec sleep 60", "{marker}", "{pidfile}"]
max_attempts = {max_attempts}
"#,
        marker = marker.display(),
        pidfile = pidfile.display(),
    ));
    let id = scratch.push("import_export_job", "slow");
    let mut a = scratch.spawn_consumer("a", &["--host-id", "host-a"]);
    wait_until(Duration::from_secs(10), "the job to start on A", || {
        pidfile.exists()
    });
    let b = scratch.spawn_consumer("b", &["--host-id", "host-b"]);
    wait_until(Duration::from_secs(10), "B to register", || {
        workers(scratch).len() == 2
    });
    let job_pid = pid_in(&pidfile);
    send_signal(&a, Signal::SIGKILL);
    a.wait().unwrap();
    (id, job_pid, b)
}

fn a_crashed_workers_job_fails_as_worker_lost(backend: Backend) {
    let scratch = Scratch::new(backend);
    let (id, job_pid, mut b) = crash_worker_mid_job(&scratch, 1);
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(2),
        "the job's process to die with its worker",
        || process_is_gone(job_pid),
    );
    wait_until(Duration::from_secs(15), "the rescue", || {
        scratch.show(id)["status"] != "running"
    });
    let rescue_took = killed.elapsed();
    let job = scratch.show(id);
    assert_eq!(job["status"], "failed");
    assert_eq!(job["reason"], "worker lost");
    assert!(
        rescue_took < Duration::from_secs(8),
        "rescue took {rescue_took:?}"
    );
    wait_until(
        Duration::from_secs(5),
        "the dead worker's row to go",
        || workers(&scratch).len() == 1,
    );
    assert_eq!(workers(&scratch)[0]["host"], "host-b");
    assert!(
        scratch
            .log_of("b")
            .contains(&format!("rescued job {id} from lost worker host-a"))
    );
    send_signal(&b, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut b, Duration::from_secs(5)), 0);
}

fn a_crashed_workers_job_runs_again_with_attempts_left(backend: Backend) {
    let scratch = Scratch::new(backend);
    let (id, _, mut b) = crash_worker_mid_job(&scratch, 2);
    wait_until(Duration::from_secs(15), "the job to run again on B", || {
        scratch.show(id)["status"] == "succeeded"
    });
    let job = scratch.show(id);
    assert_eq!(job["attempts"], 2);
    assert_eq!(job["worker_host"], "host-b");
    send_signal(&b, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut b, Duration::from_secs(5)), 0);
}

fn a_slow_but_alive_worker_keeps_its_job(backend: Backend) {
    let scratch = Scratch::new(backend);
    // Wider than FAST_FLEET: the fence rightly stops a job whose worker cannot reach the
    // database for 2/3 of rescue_after, and a MariaDB shared with the 20,000-job tests on a
    // 2-core machine can stall for a second. B may rescue 4 s after it starts; the job runs
    // on for about 3 s more.
    scratch.write_config(
        "heartbeat_interval = \"250ms\"\nrescue_after = \"4s\"\n\
         [jobs.slow]\ncommand = [\"/bin/sleep\", \"7\"]",
    );
    let id = scratch.push("ui_job", "slow");
    let mut a = scratch.spawn_consumer("a", &["--host-id", "host-a", "--limit", "1"]);
    wait_until(Duration::from_secs(10), "the job to start on A", || {
        scratch.show(id)["status"] == "running"
    });
    // B watches A's job for longer than rescue_after; A is slow but alive.
    let mut b = scratch.spawn_consumer("b", &["--host-id", "host-b"]);
    assert_eq!(wait_exit(&mut a, Duration::from_secs(20)), 0);
    let job = scratch.show(id);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 1);
    assert_rescued_nothing(&scratch, "b");
    send_signal(&b, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut b, Duration::from_secs(5)), 0);
}

/// Reloads that change a worker's queues while it runs a job older than `rescue_after`: the
/// job stays its worker's (its registration keeps naming it), so the other worker, rescuing
/// every heartbeat, never takes it back. SQLite's registration used to clear the job it
/// named until the next heartbeat; six reloads made that window hard to miss.
fn reloads_during_a_long_job_never_let_it_be_rescued(backend: Backend) {
    let scratch = Scratch::new(backend);
    let runs = scratch.path("runs");
    scratch.write_config(&format!(
        "heartbeat_interval = \"500ms\"\nrescue_after = \"3s\"\n\
         [jobs.long]\ncommand = [\"/bin/sh\", \"-c\", \"echo run >> {}; sleep 8\"]",
        runs.display()
    ));
    let conf = scratch.path("1.conf");
    std::fs::write(&conf, "ui_job\n").unwrap();
    std::fs::write(scratch.path("2.conf"), "data_maintenance_job\n").unwrap();
    let mut b = scratch.spawn_consumer("b", &["--instance", "2", "--host-id", "host-b"]);
    let mut a = scratch.spawn_consumer(
        "a",
        &["--instance", "1", "--host-id", "host-a", "--limit", "1"],
    );
    let id = scratch.push("ui_job", "long");
    wait_until(Duration::from_secs(10), "the job to start", || {
        std::fs::read_to_string(&runs).is_ok_and(|text| !text.is_empty())
    });
    // From now on the job is older than rescue_after, and B may rescue.
    std::thread::sleep(Duration::from_millis(3200));
    for round in 0..6 {
        let queues = if round % 2 == 0 {
            "ui_job\nimport_export_job\n"
        } else {
            "ui_job\n"
        };
        std::fs::write(&conf, queues).unwrap();
        send_signal(&a, Signal::SIGHUP);
        std::thread::sleep(Duration::from_millis(600));
    }
    assert_eq!(wait_exit(&mut a, Duration::from_secs(15)), 0);
    let job = scratch.show(id);
    assert_eq!(
        (job["status"].as_str(), job["attempts"].as_i64()),
        (Some("succeeded"), Some(1)),
        "{job}"
    );
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n");
    assert_rescued_nothing(&scratch, "b");
    send_signal(&b, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut b, Duration::from_secs(5)), 0);
}

fn push_wakes_an_idle_worker_on_the_same_host(backend: Backend) {
    let scratch = Scratch::new(backend);
    let mut consumer = scratch.spawn_consumer("c", &["--sleep", "30"]);
    wait_until(Duration::from_secs(10), "the consumer to idle", || {
        scratch.log_of("c").contains("consuming queues")
    });
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..3 {
        let pushed = Instant::now();
        let id = scratch.push("ui_job", "u");
        wait_until(Duration::from_secs(5), "the pushed job to run", || {
            scratch.show(id)["status"] == "succeeded"
        });
        assert!(
            pushed.elapsed() < Duration::from_secs(3),
            "not woken: {:?}",
            pushed.elapsed()
        );
    }
    send_signal(&consumer, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut consumer, Duration::from_secs(5)), 0);
}

fn a_steady_ui_stream_keeps_lower_queues_waiting(backend: Backend) {
    let scratch = Scratch::new(backend);
    scratch.write_config("[jobs.work]\ncommand = [\"/bin/sleep\", \"0.05\"]");
    for _ in 0..5 {
        scratch.push("import_export_job", "work");
    }
    let mut consumer = scratch.spawn_consumer("c", &[]);
    let stream_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < stream_until {
        scratch.push("ui_job", "work");
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_until(Duration::from_secs(30), "everything to run", || {
        queues_drained(&scratch)
    });
    send_signal(&consumer, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut consumer, Duration::from_secs(5)), 0);
    let jobs: Value =
        serde_json::from_str(&scratch.ok(&["jobs", "--limit", "1000", "--json"])).unwrap();
    let jobs = jobs.as_array().unwrap();
    let of = |queue: &'static str| jobs.iter().filter(move |j| j["queue"] == queue);
    // A ui_job that was committed and waiting when a lower job was claimed is a violation;
    // 200 ms of slack covers the gap between a push's timestamp (taken by its INSERT) and its
    // commit, which a loaded machine's fsync can stretch.
    for lower in of("import_export_job") {
        let claimed = lower["claimed_at"].as_i64().unwrap();
        for ui in of("ui_job") {
            let created = ui["created_at"].as_i64().unwrap();
            let ui_claimed = ui["claimed_at"].as_i64().unwrap();
            assert!(
                !(created < claimed - 200_000 && ui_claimed > claimed),
                "import job {} was claimed while ui job {} waited",
                lower["id"],
                ui["id"]
            );
        }
    }
}

// --- Shared backends only: the proxy cuts TCP, and the fleet is sized for a server. ---

/// `cancel` of a running job, from another process (any host): the worker that runs it
/// reads the request with its next heartbeat and ends the job's whole process group (here
/// both processes ignore SIGTERM, so SIGKILL after kill_grace); the job is recorded
/// cancelled with who asked, and the worker goes on with the next job.
fn a_running_job_is_cancelled_from_another_process(backend: Backend) {
    let scratch = Scratch::new(backend);
    let pids = scratch.path("pids");
    scratch.write_config(&format!(
        "heartbeat_interval = \"500ms\"\nrescue_after = \"3s\"\n\
         [jobs.stubborn]\n\
         command = [\"/bin/sh\", \"-c\", \"trap '' TERM; sleep 60 & echo $! >> {0}; echo $$ >> {0}; wait\"]\n\
         kill_grace = \"1s\"",
        pids.display()
    ));
    let mut worker = scratch.spawn_consumer("a", &["--host-id", "host-a"]);
    let id = scratch.push("ui_job", "stubborn");
    wait_until(Duration::from_secs(10), "the job and its child", || {
        std::fs::read_to_string(&pids).is_ok_and(|text| text.lines().count() == 2)
    });
    let processes: Vec<i32> = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|line| line.trim().parse().unwrap())
        .collect();
    let said = scratch.ok(&["cancel", &id.to_string()]);
    assert!(said.contains("is running"), "{said}");
    // heartbeat_interval + kill_grace + 1 s.
    wait_until(
        Duration::from_millis(2500),
        "no process of the job left",
        || processes.iter().all(|pid| process_is_gone(*pid)),
    );
    wait_until(Duration::from_secs(5), "the job recorded cancelled", || {
        scratch.show(id)["status"] == "cancelled"
    });
    let job = scratch.show(id);
    let reason = job["reason"].as_str().unwrap();
    assert!(reason.starts_with("cancelled by operator ("), "{reason}");
    let next = scratch.push("ui_job", "after");
    wait_until(Duration::from_secs(10), "the next job to run", || {
        scratch.show(next)["status"] == "succeeded"
    });
    let again = scratch.run(&["cancel", &id.to_string()]);
    assert_eq!(exit_code(&again), 65, "{}", stderr(&again));
    assert_eq!(exit_code(&scratch.run(&["cancel", "999999"])), 66);
    send_signal(&worker, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut worker, Duration::from_secs(10)), 0);
}

mod shared {
    use super::*;

    use crate::shared_backend_tests;

    shared_backend_tests!(
        a_short_outage_records_the_result_once,
        a_worker_cut_off_stops_its_job_before_anyone_rescues_it,
        a_black_holed_connection_never_freezes_the_worker,
        hosts_with_skewed_clocks_agree_on_when_a_job_is_due,
        eight_workers_on_two_hosts_run_20000_jobs_exactly_once,
    );

    /// Points the config at the proxy for the consumer, keeps the test's own view direct.
    fn config_through(scratch: &Scratch, proxy: &FaultProxy, extra: &str) -> std::path::PathBuf {
        let direct = std::fs::read_to_string(scratch.config_path()).unwrap();
        let proxied = direct.replace(
            &scratch.url,
            &proxy.url_for(&scratch.url, scratch.backend.server_port()),
        );
        let path = scratch.path("proxied.toml");
        std::fs::write(&path, format!("{extra}\n{proxied}")).unwrap();
        path
    }

    /// A consumer whose config points at the proxy, logging to `NAME.log`.
    fn consumer_through(
        scratch: &Scratch,
        config: &std::path::Path,
        name: &str,
        args: &[&str],
    ) -> std::process::Command {
        let mut all = vec!["consume"];
        all.extend_from_slice(args);
        let mut command = scratch.command(&all);
        command
            .env("PIM_JOB_QUEUE_CONFIG", config)
            .stdout(std::fs::File::create(scratch.path(&format!("{name}.log"))).unwrap())
            .stderr(std::process::Stdio::null());
        command
    }

    fn a_short_outage_records_the_result_once(backend: Backend) {
        let scratch = Scratch::new(backend);
        let proxy = FaultProxy::new(backend.server_port());
        let started = scratch.path("started");
        scratch.write_config(&format!(
            "heartbeat_interval = \"200ms\"\nrescue_after = \"9s\"\n[jobs.slow]\ncommand = [\"/bin/sh\", \"-c\", \"touch \\\"$0\\\"; sleep 1.5; echo finished\", \"{}\"]",
            started.display()
        ));
        let config = config_through(&scratch, &proxy, "");
        let id = scratch.push("ui_job", "slow");
        let mut worker = consumer_through(&scratch, &config, "w", &["--limit", "1"])
            .spawn()
            .unwrap();
        wait_until(Duration::from_secs(10), "the job to start", || {
            started.exists()
        });
        proxy.cut();
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(
            scratch.show(id)["status"],
            "running",
            "nothing recorded during the outage"
        );
        proxy.restore();
        assert_eq!(wait_exit(&mut worker, Duration::from_secs(40)), 0);
        let job = scratch.show(id);
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["attempts"], 1);
        assert_eq!(job["output"][0], "finished");
        let log = scratch.log_of("w");
        assert!(log.contains("database unavailable since"), "{log}");
        assert_eq!(log.matches("job started").count(), 1, "{log}");
    }

    fn a_worker_cut_off_stops_its_job_before_anyone_rescues_it(backend: Backend) {
        let scratch = Scratch::new(backend);
        let proxy = FaultProxy::new(backend.server_port());
        let pidfile = scratch.path("job.pid");
        scratch.write_config(&format!(
            "heartbeat_interval = \"200ms\"\nrescue_after = \"3s\"\n[jobs.slow]\ncommand = [\"/bin/sh\", \"-c\", \"echo $$ > \\\"$0\\\"; exec sleep 60\", \"{}\"]",
            pidfile.display()
        ));
        let config = config_through(&scratch, &proxy, "");
        let mut rescuer =
            scratch.spawn_consumer("b", &["--host-id", "host-b", "data_maintenance_job"]);
        let id = scratch.push("ui_job", "slow");
        let mut cut_off = consumer_through(&scratch, &config, "a", &["--host-id", "host-a"])
            .spawn()
            .unwrap();
        wait_until(Duration::from_secs(10), "the job to start", || {
            pidfile.exists()
        });
        let job_pid = pid_in(&pidfile);
        proxy.cut();
        wait_until(Duration::from_secs(20), "the rescue", || {
            scratch.show(id)["status"] != "running"
        });
        assert!(
            process_is_gone(job_pid),
            "the job still ran when it was rescued"
        );
        let job = scratch.show(id);
        assert_eq!(job["status"], "failed");
        assert_eq!(job["reason"], "worker lost");
        proxy.restore();
        wait_until(
            Duration::from_secs(20),
            "the cut-off worker to learn it lost the job",
            || {
                scratch
                    .log_of("a")
                    .contains("no longer held by this worker")
            },
        );
        assert!(
            scratch
                .log_of("a")
                .contains("lost contact with the database")
        );
        assert_eq!(
            scratch.show(id)["status"],
            "failed",
            "the late release changed nothing"
        );
        for child in [&mut cut_off, &mut rescuer] {
            send_signal(child, Signal::SIGTERM);
            assert_eq!(wait_exit(child, Duration::from_secs(10)), 0);
        }
    }

    /// The network black-holes the worker's connections (accepted, never answered, no error:
    /// TCP would retransmit for a quarter of an hour): the fence still ends the job before
    /// anyone may rescue it, the watchdog is pinged all along, the give-up is recorded once
    /// the path is back, and the worker takes the next job.
    fn a_black_holed_connection_never_freezes_the_worker(backend: Backend) {
        const RESCUE_AFTER: Duration = Duration::from_secs(3);
        let scratch = Scratch::new(backend);
        let proxy = FaultProxy::new(backend.server_port());
        let pidfile = scratch.path("job.pid");
        scratch.write_config(&format!(
            "heartbeat_interval = \"200ms\"\nrescue_after = \"3s\"\n[jobs.slow]\ncommand = [\"/bin/sh\", \"-c\", \"echo $$ > \\\"$0\\\"; exec sleep 60\", \"{}\"]\n[jobs.quick]\ncommand = [\"/bin/true\"]",
            pidfile.display()
        ));
        let config = config_through(&scratch, &proxy, "");
        let socket = NotifySocket::new();
        let id = scratch.push("ui_job", "slow");
        let mut worker = consumer_through(&scratch, &config, "a", &[]);
        socket.notify(&mut worker, Some("1000000"));
        let mut worker = worker.spawn().unwrap();
        wait_until(Duration::from_secs(10), "the job to start", || {
            pidfile.exists()
        });
        let job_pid = pid_in(&pidfile);
        let holed = socket.messages().len() - 1;
        let holed_at = Instant::now();
        proxy.black_hole();
        wait_until(RESCUE_AFTER, "the fence to end the job", || {
            process_is_gone(job_pid)
        });
        std::thread::sleep(
            (holed_at + Duration::from_secs(8)).saturating_duration_since(Instant::now()),
        );
        let (pings, longest_gap) = socket.watchdog_pings_since(holed);
        assert!(
            pings >= 12 && longest_gap < Duration::from_millis(900),
            "{pings} pings in the 8 s of the black hole, longest gap {longest_gap:?}:\n{}",
            scratch.log_of("a")
        );
        proxy.restore();
        wait_until(
            Duration::from_secs(20),
            "the give-up to be recorded",
            || scratch.show(id)["status"] != "running",
        );
        let job = scratch.show(id);
        assert_eq!(job["status"], "failed", "{job}");
        assert_eq!(job["reason"], "lost contact with the database", "{job}");
        let next = scratch.push("ui_job", "quick");
        wait_until(Duration::from_secs(20), "the next job to run", || {
            scratch.show(next)["status"] == "succeeded"
        });
        send_signal(&worker, Signal::SIGTERM);
        assert_eq!(wait_exit(&mut worker, Duration::from_secs(10)), 0);
        let log = scratch.log_of("a");
        assert!(log.contains("no answer to"), "{log}");
    }

    /// The pushing host's clock is an hour ahead and the worker's an hour behind (each
    /// under libfaketime): due times are the database's clock, so the job runs at once, and
    /// a delayed one waits its delay, not its delay plus the skew.
    fn hosts_with_skewed_clocks_agree_on_when_a_job_is_due(backend: Backend) {
        let Some(faketime) = libfaketime("hosts_with_skewed_clocks_agree_on_when_a_job_is_due")
        else {
            return;
        };
        let scratch = Scratch::new(backend);
        scratch.write_config("[jobs.quick]\ncommand = [\"/bin/true\"]");
        let skewed = |command: &mut std::process::Command, offset: &str| {
            command
                .env("LD_PRELOAD", &faketime)
                .env("FAKETIME", offset)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        };
        let push = |args: &[&str]| -> i64 {
            let mut all = vec!["push"];
            all.extend_from_slice(args);
            let mut command = scratch.command(&all);
            skewed(&mut command, "+1h");
            let output = command.output().unwrap();
            assert!(output.status.success(), "{output:?}");
            String::from_utf8(output.stdout)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let mut worker = scratch.command(&["consume"]);
        skewed(&mut worker, "-1h");
        let mut worker = worker
            .stdout(std::fs::File::create(scratch.path("w.log")).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let now = push(&["ui_job", "quick"]);
        let delayed = push(&["--delay", "3s", "ui_job", "quick"]);
        let pushed = Instant::now();
        wait_until(Duration::from_secs(10), "the due job to run", || {
            scratch.show(now)["status"] == "succeeded"
        });
        assert_eq!(scratch.show(delayed)["status"], "waiting");
        wait_until(Duration::from_secs(15), "the delayed job to run", || {
            scratch.show(delayed)["status"] == "succeeded"
        });
        assert!(pushed.elapsed() >= Duration::from_secs(3));
        send_signal(&worker, Signal::SIGTERM);
        assert_eq!(wait_exit(&mut worker, Duration::from_secs(10)), 0);
    }

    fn eight_workers_on_two_hosts_run_20000_jobs_exactly_once(backend: Backend) {
        const JOBS: usize = 20_000;
        let scratch = Scratch::new(backend);
        let markers = seed_marker_jobs(&scratch, JOBS);
        let queues = ["ui_job", "import_export_job", "data_maintenance_job"];
        let mut workers: Vec<_> = (0..8)
            .map(|n| {
                let host = if n % 2 == 0 { "host-a" } else { "host-b" };
                scratch.spawn_consumer(&format!("w{n}"), &["--host-id", host])
            })
            .collect();
        wait_until(Duration::from_secs(600), "all jobs to finish", || {
            std::fs::read_dir(&markers).unwrap().count() == JOBS && queues_drained(&scratch)
        });
        scratch.ok(&["stop-workers"]);
        for worker in &mut workers {
            assert_eq!(wait_exit(worker, Duration::from_secs(20)), 75);
        }
        let status = scratch.status_json();
        let total = |field: &str| -> i64 {
            status["queues"]
                .as_array()
                .unwrap()
                .iter()
                .map(|q| q[field].as_i64().unwrap())
                .sum()
        };
        assert_eq!((total("succeeded"), total("failed")), (JOBS as i64, 0));
        let mut finished = 0;
        for n in 0..8 {
            let log = scratch.log_of(&format!("w{n}"));
            let complaint = log.lines().find(|line| {
                (line.contains(" WARN ") || line.contains(" ERROR "))
                    && ["eadlock", "ock wait timeout", "40P01", "40001", "1213"]
                        .iter()
                        .any(|needle| line.contains(needle))
            });
            assert!(complaint.is_none(), "w{n}: {complaint:?}");
            finished += log.matches("job finished").count();
            let order: Vec<usize> = log
                .lines()
                .filter(|line| line.contains("job started"))
                .map(|line| {
                    queues
                        .iter()
                        .position(|q| line.contains(&format!("job_queue={q} ")))
                        .unwrap()
                })
                .collect();
            assert!(
                order.windows(2).all(|w| w[0] <= w[1]),
                "w{n} took a lower queue before a higher one"
            );
        }
        assert_eq!(finished, JOBS);
    }
}

/// A worker whose registration is taken away while it runs a job (what a rescue does when
/// it judged the worker lost) must end that job: it may be someone else's now. The state the
/// "rescuer" left stays, since the worker's late result is guarded.
#[test]
fn a_worker_declared_lost_ends_its_job() {
    let scratch = Scratch::new(Backend::Sqlite);
    let pid_file = scratch.path("job.pid");
    scratch.write_config(&format!(
        "{FAST_FLEET}\n[jobs.long]\ncommand = [\"/bin/sh\", \"-c\", \"echo $$ > {}; exec sleep 60\"]",
        pid_file.display()
    ));
    let id = scratch.push("ui_job", "long");
    let mut worker = scratch.spawn_consumer("a", &["--limit", "1"]);
    wait_until(Duration::from_secs(10), "the job to start", || {
        pid_file.exists() && scratch.show(id)["status"] == "running"
    });
    let job_pid = pid_in(&pid_file);
    let url = scratch.url.clone();
    block_on(async move {
        use sqlx::{Connection, Executor};
        let mut connection = sqlx::SqliteConnection::connect(&url).await.unwrap();
        connection
            .execute(
                "UPDATE pjq_jobs SET status = 'waiting', lease = lease + 1, worker_token = NULL,
                        reason = 'worker lost (requeued)';
                 DELETE FROM pjq_workers;",
            )
            .await
            .unwrap();
    });
    wait_until(
        Duration::from_secs(5),
        "the job's process to be ended",
        || process_is_gone(job_pid),
    );
    assert_eq!(wait_exit(&mut worker, Duration::from_secs(10)), 0);
    let log = scratch.log_of("a");
    assert!(log.contains("was declared lost while it ran job"), "{log}");
    assert_eq!(
        scratch.show(id)["status"],
        "waiting",
        "the rescuer's state stands"
    );
}

/// Pruning a large backlog of old finished jobs must not delay the heartbeat: before, the
/// heartbeat task pruned every batch in a loop, the fence saw no contact and ended this
/// worker's own healthy job (FAST_FLEET: fenced after 1 s).
#[test]
fn a_large_prune_does_not_fence_a_running_job() {
    let scratch = Scratch::new(Backend::Sqlite);
    scratch.write_config(&format!(
        "{FAST_FLEET}\nretention = \"1d\"\n[jobs.work]\ncommand = [\"/bin/sleep\", \"3\"]"
    ));
    scratch.ok(&["migrate"]);
    let url = scratch.url.clone();
    block_on(async move {
        use sqlx::{Connection, Executor};
        let mut connection = sqlx::SqliteConnection::connect(&url).await.unwrap();
        connection
            .execute(
                "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 400000)
                 INSERT INTO pjq_jobs (queue, code, payload, status, created_at, available_at,
                                       finished_at, output)
                 SELECT 'ui_job', 'old', '{}', 'succeeded', 0, 0, 0,
                        '[\"an old line of output that makes the rows wider\"]' FROM n",
            )
            .await
            .unwrap();
    });
    let id = scratch.push("ui_job", "work");
    let output = scratch.run(&["consume", "--limit", "1"]);
    assert_eq!(exit_code(&output), 0, "{}", stderr(&output));
    let job = scratch.show(id);
    assert_eq!(job["status"], "succeeded", "{job}");
}

/// The host's wall clock steps 25 s forward while a job runs (an NTP correction, a resumed
/// VM; on SQLite the database's clock is the host's): every heartbeat now looks 25 s old,
/// yet nobody rescues the running job, and it ends once, succeeded. Both workers run under
/// libfaketime reading one clock file, as processes on one host share its clock; their
/// monotonic clocks are left alone.
#[test]
fn a_clock_step_rescues_nothing() {
    let Some(faketime) = libfaketime("a_clock_step_rescues_nothing") else {
        return;
    };
    let scratch = Scratch::new(Backend::Sqlite);
    let clock = scratch.path("clock.rc");
    std::fs::write(&clock, "+0\n").unwrap();
    let started = scratch.path("started");
    scratch.write_config(&format!(
        "heartbeat_interval = \"200ms\"\nrescue_after = \"3s\"\n[jobs.slow]\ncommand = [\"/bin/sh\", \"-c\", \"touch \\\"$0\\\"; sleep 6; echo finished\", \"{}\"]",
        started.display()
    ));
    let spawn = |name: &str| {
        scratch
            .command(&["consume"])
            .env("LD_PRELOAD", &faketime)
            .env("FAKETIME_TIMESTAMP_FILE", &clock)
            .env("FAKETIME_CACHE_DURATION", "1")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .stdout(std::fs::File::create(scratch.path(&format!("{name}.log"))).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut workers = [spawn("a"), spawn("b")];
    // Both in contact for rescue_after, so both may rescue when the clock steps.
    std::thread::sleep(Duration::from_millis(3500));
    let id = scratch.push("ui_job", "slow");
    wait_until(Duration::from_secs(10), "the job to start", || {
        started.exists()
    });
    std::fs::write(&clock, "+25s\n").unwrap();
    wait_until(Duration::from_secs(20), "the job to end", || {
        scratch.show(id)["status"] != "running"
    });
    let job = scratch.show(id);
    let logs = scratch.log_of("a") + &scratch.log_of("b");
    assert_eq!(job["status"], "succeeded", "{job}\n{logs}");
    assert_eq!(job["attempts"], 1);
    assert_eq!(logs.matches("job started").count(), 1, "{logs}");
    assert!(!logs.contains("rescued job"), "{logs}");
    assert!(logs.contains("clock jumped forward by 2"), "{logs}");
    for worker in &mut workers {
        send_signal(worker, Signal::SIGTERM);
        assert_eq!(wait_exit(worker, Duration::from_secs(10)), 0);
    }
}

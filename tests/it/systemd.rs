//! systemd integration of the real binary: the notify protocol against a fake
//! `$NOTIFY_SOCKET`, stop and reload signals, and journald fields against a fake journald.
//! (The real systemd, as PID 1 in a container, is exercised by scripts/e2e-systemd.sh.)

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::*;

/// Starts a consumer whose notifications go to `socket`.
fn notified_consumer(
    scratch: &Scratch,
    socket: &NotifySocket,
    args: &[&str],
    watchdog_usec: Option<&str>,
) -> Child {
    let mut all = vec!["consume"];
    all.extend_from_slice(args);
    let mut command = scratch.command(&all);
    command
        .stdout(std::fs::File::create(scratch.path("c.log")).unwrap())
        .stderr(Stdio::null());
    socket.notify(&mut command, watchdog_usec);
    command.spawn().unwrap()
}

#[test]
fn ready_status_watchdog_and_stopping_in_order() {
    let scratch = Scratch::new(Backend::Sqlite);
    let envfile = scratch.path("env.txt");
    scratch.write_config(&format!(
        "[jobs.slow]\ncommand = [\"/bin/sh\", \"-c\", \"env > \\\"$0\\\"; sleep 1.5\", \"{}\"]",
        envfile.display()
    ));
    let socket = NotifySocket::new();
    let mut consumer = notified_consumer(&scratch, &socket, &[], Some("1000000"));
    let ready = socket.wait_for("READY=1", Duration::from_secs(10));
    assert_eq!(
        socket.messages()[ready],
        "READY=1\nSTATUS=Idle, waiting for jobs on ui_job, import_export_job, data_maintenance_job\n"
    );
    let id = scratch.push("import_export_job", "slow");
    let running = socket.wait_for(
        &format!("STATUS=Running job {id} slow (import_export_job) for 0s"),
        Duration::from_secs(5),
    );
    let idle_again = socket.wait_for_after("STATUS=Idle", running, Duration::from_secs(10));
    // Pings every ~0.5 s (half of WATCHDOG_USEC) while the 1.5 s job runs, never a gap
    // systemd would kill for.
    let timed = socket.timed();
    let pings: Vec<Instant> = timed[running..idle_again]
        .iter()
        .filter(|(_, m)| m == "WATCHDOG=1\n")
        .map(|(at, _)| *at)
        .collect();
    assert!(
        pings.len() >= 2,
        "{} pings during the job: {:?}",
        pings.len(),
        socket.messages()
    );
    let longest_gap = pings.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(
        longest_gap < Duration::from_millis(1000),
        "pings {longest_gap:?} apart"
    );
    assert!(
        timed[running..idle_again]
            .iter()
            .any(|(_, m)| m.contains("for 1s")),
        "STATUS counts up"
    );
    let env = std::fs::read_to_string(&envfile).unwrap();
    for variable in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
        assert!(
            !env.contains(&format!("{variable}=")),
            "the job inherited {variable}"
        );
    }
    send_signal(&consumer, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut consumer, Duration::from_secs(5)), 0);
    let last = socket
        .messages()
        .into_iter()
        .rfind(|m| m.contains("STOPPING"))
        .unwrap();
    assert_eq!(last, "STOPPING=1\nSTATUS=Stopping\n");
}

#[test]
fn status_explains_a_slow_start_and_ready_waits_for_the_database() {
    let scratch = Scratch::new(Backend::Sqlite);
    let socket = NotifySocket::new();
    let mut command = scratch.command(&["consume"]);
    let mut consumer = command
        .env("NOTIFY_SOCKET", &socket.path)
        .env(
            "PIM_JOB_QUEUE_DATABASE_URL",
            "sqlite:///proc/no-such-dir/jobs.sqlite",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    socket.wait_for(
        "STATUS=Waiting for database (attempt 2, next in 2s)",
        Duration::from_secs(10),
    );
    assert_eq!(
        socket.messages()[0],
        "STATUS=Waiting for database (attempt 1, next in 1s)\n"
    );
    assert!(!socket.messages().iter().any(|m| m.contains("READY=1")));
    send_signal(&consumer, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut consumer, Duration::from_secs(5)), 0);
}

#[test]
fn sigterm_mid_job_drains_with_extend_timeout_and_exits_0() {
    let scratch = Scratch::new(Backend::Sqlite);
    scratch.write_config("[jobs.slow]\ncommand = [\"/bin/sleep\", \"3\"]");
    let socket = NotifySocket::new();
    let mut consumer = notified_consumer(&scratch, &socket, &[], None);
    socket.wait_for("READY=1", Duration::from_secs(10));
    let id = scratch.push("ui_job", "slow");
    let next = scratch.push("ui_job", "slow");
    socket.wait_for(&format!("Running job {id}"), Duration::from_secs(5));
    send_signal(&consumer, Signal::SIGTERM);
    let stopping = socket.wait_for("STOPPING=1", Duration::from_secs(5));
    assert_eq!(
        socket.messages()[stopping],
        format!("STOPPING=1\nSTATUS=Stopping: waiting for job {id}\n")
    );
    socket.wait_for_after("EXTEND_TIMEOUT_USEC=", stopping, Duration::from_secs(5));
    assert_eq!(wait_exit(&mut consumer, Duration::from_secs(10)), 0);
    assert_eq!(scratch.show(id)["status"], "succeeded");
    assert_eq!(scratch.show(next)["status"], "waiting");
}

/// A job that ignores nothing but outlives the stop grace: its group is ended and the job
/// is recorded as interrupted (requeued while attempts remain).
fn stop_grace_ends_the_group(max_attempts: u32) -> (serde_json::Value, i32) {
    let scratch = Scratch::new(Backend::Sqlite);
    let pidfile = scratch.path("grandchild.pid");
    scratch.write_config(&format!(
        "stop_grace = \"1s\"\n[jobs.long]\ncommand = [\"/bin/sh\", \"-c\", \"sleep 300 & echo $! > \\\"$0\\\"; wait\", \"{}\"]\nmax_attempts = {max_attempts}",
        pidfile.display()
    ));
    let id = scratch.push("ui_job", "long");
    let mut consumer = scratch.spawn_consumer("c", &[]);
    wait_until(Duration::from_secs(10), "the job to start", || {
        pidfile.exists()
    });
    let started = Instant::now();
    send_signal(&consumer, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut consumer, Duration::from_secs(10)), 0);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the grace was not waited for"
    );
    let grandchild: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_until(Duration::from_secs(5), "the grandchild to be gone", || {
        process_is_gone(grandchild)
    });
    (scratch.show(id), grandchild)
}

#[test]
fn stop_grace_exceeded_fails_the_job_without_attempts_left() {
    let (job, _) = stop_grace_ends_the_group(1);
    assert_eq!(job["status"], "failed");
    assert_eq!(job["reason"], "the stop grace period ran out");
}

#[test]
fn stop_grace_exceeded_requeues_the_job_with_attempts_left() {
    let (job, _) = stop_grace_ends_the_group(2);
    assert_eq!(job["status"], "waiting");
    assert_eq!(job["reason"], "the stop grace period ran out (requeued)");
}

/// Ending a job that ignores SIGTERM takes `kill_grace`; systemd must keep hearing from the
/// worker meanwhile, or it kills the worker mid-kill (a 3 s grace, a 1 s watchdog).
#[test]
fn the_watchdog_is_pinged_while_a_job_is_being_ended() {
    let scratch = Scratch::new(Backend::Sqlite);
    scratch.write_config(
        "[jobs.stubborn]\ncommand = [\"/bin/sh\", \"-c\", \"trap '' TERM; sleep 30\"]\ntimeout = \"1s\"\nkill_grace = \"3s\"",
    );
    let socket = NotifySocket::new();
    let mut consumer = notified_consumer(&scratch, &socket, &["--limit", "1"], Some("1000000"));
    socket.wait_for("READY=1", Duration::from_secs(10));
    let id = scratch.push("ui_job", "stubborn");
    let running = socket.wait_for(&format!("STATUS=Running job {id}"), Duration::from_secs(5));
    assert_eq!(wait_exit(&mut consumer, Duration::from_secs(20)), 0);
    assert_eq!(scratch.show(id)["reason"], "timeout");
    let (pings, longest_gap) = socket.watchdog_pings_since(running);
    assert!(
        pings >= 4 && longest_gap < Duration::from_millis(1000),
        "{pings} pings over the 4 s of the job, longest gap {longest_gap:?}"
    );
}

/// SIGTERM while the claim is waiting on the database (here: another process holds SQLite's
/// write lock): the claimed job has not started, so it goes back to its queue, its attempt
/// refunded, instead of running while the worker should be stopping.
#[test]
fn a_job_claimed_during_a_stop_is_given_back() {
    let scratch = Scratch::new(Backend::Sqlite);
    let marker = scratch.path("ran");
    scratch.write_config(&format!(
        "[jobs.mark]\ncommand = [\"/usr/bin/touch\", \"{}\"]",
        marker.display()
    ));
    let mut consumer = scratch.spawn_debug_consumer("c", &[]);
    wait_until(Duration::from_secs(10), "the consumer to idle", || {
        scratch.log_of("c").contains("no job due")
    });
    let url = scratch.url.clone();
    let (locked, is_locked) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        block_on(async move {
            use sqlx::{Connection, Executor};
            let mut connection = sqlx::SqliteConnection::connect(&url).await.unwrap();
            // Due in a second: the worker's idle polls (reads, which a writer does not
            // block) see it then, and its claim waits for the write lock taken meanwhile.
            let due = pim_job_queue::store::Timestamp::now().0 + 1_000_000;
            connection
                .execute(
                    format!(
                        "INSERT INTO pjq_jobs (queue, code, payload, status, created_at,
                            available_at)
                         VALUES ('ui_job', 'mark', '{{}}', 'waiting', 0, {due})"
                    )
                    .as_str(),
                )
                .await
                .unwrap();
            connection.execute("BEGIN IMMEDIATE").await.unwrap();
            locked.send(()).unwrap();
            tokio::time::sleep(Duration::from_millis(3500)).await;
            connection.execute("COMMIT").await.unwrap();
        })
    });
    is_locked.recv().unwrap();
    // The worker polls every 50 ms, each poll a read that finds nothing due; once those
    // stop, its claim is the one waiting for the lock.
    let polls = || scratch.log_of("c").matches("no job due").count();
    let mut seen = polls();
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(300));
        let now = polls();
        if now == seen {
            break;
        }
        seen = now;
    }
    send_signal(&consumer, Signal::SIGTERM);
    holder.join().unwrap();
    assert_eq!(wait_exit(&mut consumer, Duration::from_secs(30)), 0);
    let job = scratch.show(1);
    assert!(
        scratch
            .log_of("c")
            .contains("stop requested during the claim"),
        "the claim was under way when the stop came: {}",
        scratch.log_of("c")
    );
    assert!(!marker.exists(), "the job ran during the stop: {job}");
    assert_eq!(job["status"], "waiting", "{job}");
    assert_eq!(job["attempts"], 0, "{job}");
}

#[test]
fn a_second_sigterm_ends_the_job_at_once() {
    let scratch = Scratch::new(Backend::Sqlite);
    scratch.write_config("[jobs.long]\ncommand = [\"/bin/sleep\", \"300\"]");
    let id = scratch.push("ui_job", "long");
    let mut consumer = scratch.spawn_consumer("c", &[]);
    wait_until_started(&scratch, id);
    send_signal(&consumer, Signal::SIGTERM);
    // The second signal only after the first was handled: two pending signals coalesce.
    wait_until(
        Duration::from_secs(10),
        "the first SIGTERM to be handled",
        || {
            scratch
                .log_of("c")
                .contains("stop requested: waiting up to")
        },
    );
    assert!(
        consumer.try_wait().unwrap().is_none(),
        "one SIGTERM must not end the job"
    );
    send_signal(&consumer, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut consumer, Duration::from_secs(10)), 0);
    let job = scratch.show(id);
    assert_eq!(job["status"], "failed");
    assert_eq!(job["reason"], "interrupted by a second stop request");
}

#[test]
fn sighup_changes_the_queues_and_a_broken_conf_keeps_the_old_ones() {
    let scratch = Scratch::new(Backend::Sqlite);
    let conf = scratch.path("1.conf");
    std::fs::write(&conf, "import_export_job\n").unwrap();
    let socket = NotifySocket::new();
    let mut consumer = notified_consumer(&scratch, &socket, &["--instance", "1"], None);
    socket.wait_for("READY=1", Duration::from_secs(10));
    let ui = scratch.push("ui_job", "u");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        scratch.show(ui)["status"],
        "waiting",
        "ui_job is not consumed yet"
    );

    std::fs::write(&conf, "ui_job\n").unwrap();
    send_signal(&consumer, Signal::SIGHUP);
    let reloading = socket.wait_for("RELOADING=1", Duration::from_secs(5));
    let ready = socket.wait_for_after("READY=1", reloading, Duration::from_secs(5));
    assert_eq!(
        socket.messages()[ready],
        "READY=1\nSTATUS=Idle, waiting for jobs on ui_job\n"
    );
    wait_until(Duration::from_secs(5), "the ui job to run", || {
        scratch.show(ui)["status"] == "succeeded"
    });

    std::fs::write(&conf, "ui_job\nnot_a_queue\n").unwrap();
    send_signal(&consumer, Signal::SIGHUP);
    let second = socket.wait_for_after("RELOADING=1", ready, Duration::from_secs(5));
    socket.wait_for_after("READY=1", second, Duration::from_secs(5));
    wait_until(
        Duration::from_secs(5),
        "the reload failure to be logged",
        || {
            scratch
                .log_of("c")
                .contains("reload failed, keeping the previous configuration")
        },
    );
    assert!(
        scratch
            .log_of("c")
            .contains("1.conf:2: unknown queue \"not_a_queue\"")
    );
    let still = scratch.push("ui_job", "u");
    wait_until(Duration::from_secs(5), "the old queues to be kept", || {
        scratch.show(still)["status"] == "succeeded"
    });
    send_signal(&consumer, Signal::SIGTERM);
    assert_eq!(wait_exit(&mut consumer, Duration::from_secs(5)), 0);
}

#[test]
fn sighup_during_a_job_does_not_disturb_it() {
    let scratch = Scratch::new(Backend::Sqlite);
    scratch.write_config("[jobs.slow]\ncommand = [\"/bin/sleep\", \"1.5\"]");
    let socket = NotifySocket::new();
    let mut consumer = notified_consumer(&scratch, &socket, &["--limit", "1"], None);
    socket.wait_for("READY=1", Duration::from_secs(10));
    let id = scratch.push("ui_job", "slow");
    let running = socket.wait_for(&format!("Running job {id}"), Duration::from_secs(5));
    send_signal(&consumer, Signal::SIGHUP);
    let reloading = socket.wait_for_after("RELOADING=1", running, Duration::from_secs(5));
    socket.wait_for_after("READY=1", reloading, Duration::from_secs(5));
    assert_eq!(
        scratch.show(id)["status"],
        "running",
        "reloaded while the job ran"
    );
    assert_eq!(wait_exit(&mut consumer, Duration::from_secs(10)), 0);
    assert_eq!(scratch.show(id)["status"], "succeeded");
}

/// A journald that stops reading (its socket queue full) must not freeze the worker: the
/// thread that would block on the journal is the one that watches jobs, pings the watchdog
/// and applies the fence. Two jobs of 20,000 output lines each run and are recorded while
/// nothing reads the journal; the surplus is dropped, not waited for.
#[test]
fn a_journal_that_stops_reading_never_freezes_the_worker() {
    if !fake_journald_or_loud_skip() {
        return;
    }
    let scratch = Scratch::new(Backend::Sqlite);
    scratch.write_config("[jobs.chatty]\ncommand = [\"/usr/bin/seq\", \"20000\"]");
    let ids = [
        scratch.push("ui_job", "chatty"),
        scratch.push("ui_job", "chatty"),
    ];
    let journald = FakeJournald::new(&scratch);
    let mut worker = fake_journald_command(
        &scratch,
        journald.dir.path(),
        &["consume", "--limit", "2"],
        &journald.stream,
    )
    .stdout(Stdio::null())
    .stderr(journald.stderr)
    .spawn()
    .unwrap();
    let exited = wait_exit_or_kill(&mut worker, Duration::from_secs(30));
    assert_eq!(
        exited,
        Some(0),
        "the worker froze on a journal that stopped reading"
    );
    for id in ids {
        assert_eq!(scratch.show(id)["status"], "succeeded", "job {id}");
    }
}

/// Waits up to `limit` for the child; kills it (and says `None`) if it has not exited.
fn wait_exit_or_kill(child: &mut std::process::Child, limit: Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// One native-protocol datagram: `KEY=value` lines, or `KEY\n` + 64-bit LE length + data.
fn parse_journal_entry(bytes: &[u8]) -> std::collections::HashMap<String, String> {
    let mut fields = std::collections::HashMap::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let line_end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let line = &rest[..line_end];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            let key = String::from_utf8_lossy(&line[..eq]).into_owned();
            fields.insert(key, String::from_utf8_lossy(&line[eq + 1..]).into_owned());
            rest = &rest[(line_end + 1).min(rest.len())..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let after = &rest[line_end + 1..];
            let len = u64::from_le_bytes(after[..8].try_into().unwrap()) as usize;
            let value = &after[8..8 + len];
            fields.insert(key, String::from_utf8_lossy(value).into_owned());
            rest = &after[(8 + len + 1).min(after.len())..];
        }
    }
    fields
}

/// Whether this process may make a private mount namespace (root with CAP_SYS_ADMIN).
fn can_fake_journald() -> bool {
    std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

/// The fake journald: a datagram socket in a directory the worker will see as
/// /run/systemd/journal, and the stderr file whose `dev:ino` systemd would hand the service
/// as `JOURNAL_STREAM`.
struct FakeJournald {
    dir: tempfile::TempDir,
    socket: std::os::unix::net::UnixDatagram,
    stream: String,
    stderr: std::fs::File,
}

impl FakeJournald {
    fn new(scratch: &Scratch) -> FakeJournald {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::Builder::new()
            .prefix("pjqj")
            .tempdir_in("/tmp")
            .unwrap();
        let socket = std::os::unix::net::UnixDatagram::bind(dir.path().join("socket")).unwrap();
        let stderr = std::fs::File::create(scratch.path("stderr")).unwrap();
        let meta = stderr.metadata().unwrap();
        let stream = format!("{}:{}", meta.dev(), meta.ino());
        FakeJournald {
            dir,
            socket,
            stream,
            stderr,
        }
    }
}

/// Whether the journald tests can run here; under CI they must, elsewhere a loud skip.
fn fake_journald_or_loud_skip() -> bool {
    if can_fake_journald() {
        return true;
    }
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "CI must be able to run the journald tests (needs root for unshare --mount)"
    );
    eprintln!("\n!!! SKIPPED journald test: unshare --mount needs root !!!\n");
    false
}

#[test]
fn journald_mode_sends_job_fields_and_priorities() {
    if !fake_journald_or_loud_skip() {
        return;
    }
    let scratch = Scratch::new(Backend::Sqlite);
    scratch.write_config(
        "[jobs.talk]\ncommand = [\"/bin/sh\", \"-c\", \"echo out-line; echo err-line >&2\"]",
    );
    let id = scratch.push("ui_job", "talk");
    let journald = FakeJournald::new(&scratch);
    let journal = &journald.socket;
    journal
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let stdout = std::fs::File::create(scratch.path("stdout")).unwrap();
    let status = run_with_fake_journald(
        &scratch,
        journald.dir.path(),
        &["consume", "--instance", "7", "--limit", "1"],
        &journald.stream,
        stdout,
        journald.stderr,
    );
    assert!(status.success());
    let mut entries = Vec::new();
    let mut buffer = vec![0u8; 1 << 16];
    while let Ok(n) = journal.recv(&mut buffer) {
        if n > 0 {
            entries.push(parse_journal_entry(&buffer[..n]));
        }
    }
    let message = |text: &str| {
        entries
            .iter()
            .find(|e| {
                e.get("MESSAGE")
                    .is_some_and(|m| m == text || m.starts_with(text))
            })
            .unwrap_or_else(|| panic!("no journal entry {text:?} in {entries:#?}"))
    };
    assert!(entries.len() >= 5, "{entries:#?}");
    for entry in &entries {
        assert_eq!(
            entry.get("WORKER_INSTANCE").map(String::as_str),
            Some("7"),
            "{entry:?}"
        );
        assert_eq!(
            entry.get("SYSLOG_IDENTIFIER").map(String::as_str),
            Some("pim-job-queue")
        );
    }
    let id = id.to_string();
    for text in ["job started", "out-line", "err-line", "job finished"] {
        let entry = message(text);
        assert_eq!(entry.get("JOB_ID"), Some(&id), "{text}: {entry:?}");
        assert_eq!(
            entry.get("JOB_QUEUE").map(String::as_str),
            Some("ui_job"),
            "{text}"
        );
        assert_eq!(
            entry.get("JOB_CODE").map(String::as_str),
            Some("talk"),
            "{text}"
        );
    }
    let finished = message("job finished");
    assert_eq!(
        finished["MESSAGE_ID"], "6ac29e07ec8f45c1b58f299e4e118cbd",
        "{finished:?}"
    );
    assert_eq!(finished["JOB_RESULT"], "succeeded", "{finished:?}");
    let usec: u64 = finished["JOB_DURATION_USEC"].parse().expect("a number");
    assert!(usec > 0 && usec < 60_000_000, "{usec}");
    assert_eq!(
        message("job started")["MESSAGE_ID"],
        "c4a51d5e82be4ba9ad5a6e6b8115bd7f"
    );
    assert_eq!(
        message("out-line")["PRIORITY"],
        "6",
        "job stdout is informational"
    );
    assert_eq!(
        message("err-line")["PRIORITY"],
        "4",
        "job stderr is a warning"
    );
    assert!(!message("job store ready").contains_key("JOB_ID"));
    assert_eq!(
        std::fs::read_to_string(scratch.path("stderr")).unwrap(),
        "",
        "never both"
    );
    assert_eq!(
        std::fs::read_to_string(scratch.path("stdout")).unwrap(),
        "",
        "never both"
    );
}

/// Runs the binary with `args` in a private mount namespace where `journal_dir` is mounted
/// at /run/systemd/journal, so the real socket path leads to the fake journald.
fn run_with_fake_journald(
    scratch: &Scratch,
    journal_dir: &std::path::Path,
    args: &[&str],
    journal_stream: &str,
    stdout: std::fs::File,
    stderr: std::fs::File,
) -> std::process::ExitStatus {
    fake_journald_command(scratch, journal_dir, args, journal_stream)
        .stdout(stdout)
        .stderr(stderr)
        .status()
        .unwrap()
}

/// The binary with `args`, its /run/systemd/journal the fake journald's directory.
fn fake_journald_command(
    scratch: &Scratch,
    journal_dir: &std::path::Path,
    args: &[&str],
    journal_stream: &str,
) -> std::process::Command {
    let script = "if [ -d /run/systemd ]; then mount -t tmpfs tmpfs /run/systemd; \
                  else mount -t tmpfs tmpfs /run && mkdir /run/systemd; fi && \
                  mkdir /run/systemd/journal && mount --bind \"$0\" /run/systemd/journal && exec \"$@\"";
    let mut command = std::process::Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .arg(journal_dir)
        .arg(BIN)
        .args(args)
        .env("PIM_JOB_QUEUE_CONFIG", scratch.config_path())
        .env("JOURNAL_STREAM", journal_stream)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("PIM_JOB_QUEUE_LOG")
        .stdin(Stdio::null());
    command
}

//! The daemon, run in-process on a real store with injected faults (`store::faults`): the
//! failures a proxy cannot stage, such as a commit whose reply never comes back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pim_job_queue::config::Config;
use pim_job_queue::consumer::{Consumer, ConsumerOptions, Reloader, StopReason};
use pim_job_queue::exit::Failure;
use pim_job_queue::notify::Notifier;
use pim_job_queue::signals::{Shutdown, Signals};
use pim_job_queue::store::faults::{Fault, Faults};
use pim_job_queue::store::wrap::Wrapped;
use pim_job_queue::store::{self, WorkerIdentity, WorkerStore};

use crate::support::*;

/// Runs a consumer in this process, on the scratch's config, through `faults`, until it
/// has run `limit` jobs (or 30 s pass).
fn consume_through(scratch: &Scratch, faults: Arc<Faults>, limit: u64) -> StopReason {
    let reloader: Reloader = Box::new(|| Err(Failure::config("no reloads in this test")));
    consume_reloadable(scratch, faults, limit, Arc::default(), reloader)
}

/// [`consume_through`], reloading through `reloader` whenever `reload` is notified.
fn consume_reloadable(
    scratch: &Scratch,
    faults: Arc<Faults>,
    limit: u64,
    reload: Arc<tokio::sync::Notify>,
    reloader: Reloader,
) -> StopReason {
    let config = Config::load(Some(&scratch.config_path())).unwrap();
    block_on(async {
        let opened = store::open_configured(
            &config,
            &scratch.url,
            store::CallLimits::for_rescue_after(config.rescue_after),
        )
        .await
        .unwrap();
        let store: Arc<dyn WorkerStore> = Arc::new(Wrapped::new(opened.into_worker(), faults));
        let (_trigger, shutdown) = Shutdown::new();
        let signals = Signals { shutdown, reload };
        let options = ConsumerOptions {
            queues: ["ui_job", "import_export_job", "data_maintenance_job"]
                .map(String::from)
                .to_vec(),
            sleep: None,
            limit: Some(limit),
            time_limit: Some(Duration::from_secs(30)),
            memory_limit: None,
        };
        let worker = WorkerIdentity::for_this_process(None, Some("host-a".into()));
        let notifier = Arc::new(Notifier::disabled());
        let mut consumer =
            Consumer::new(store, config, options, worker, signals, notifier, reloader);
        consumer.run().await
    })
}

/// The claim commits but its reply is lost: the worker never learns it holds the job. Before
/// its next claim it puts back what it claimed unanswered (never started: the attempt
/// refunded), well before a rescuer could (`rescue_after`, which could not refund it); the
/// job is claimed again and run once.
#[test]
fn a_lost_claim_reply_is_taken_back_and_run_once() {
    let scratch = Scratch::new(Backend::Sqlite);
    let runs = scratch.path("runs");
    scratch.write_config(&format!(
        "heartbeat_interval = \"200ms\"\nrescue_after = \"2s\"\n[jobs.mark]\ncommand = [\"/bin/sh\", \"-c\", \"echo run >> {}\"]",
        runs.display()
    ));
    let id = scratch.push("ui_job", "mark");
    let faults = Arc::new(Faults::default());
    faults.arm("claim", Fault::LoseReply, 1);
    let started = Instant::now();
    assert_eq!(consume_through(&scratch, faults, 1), StopReason::JobLimit);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "put back by the worker, not left to the rescue: {:?}",
        started.elapsed()
    );
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n");
    let job = scratch.show(id);
    assert_eq!(
        (job["status"].as_str(), job["attempts"].as_i64()),
        (Some("succeeded"), Some(1)),
        "{job}"
    );
}

/// The result's write commits but its reply is lost: the worker retries, the lease guard
/// refuses the repeat, and the job stays succeeded, recorded once, run once.
#[test]
fn a_lost_reply_to_the_result_changes_nothing() {
    let scratch = Scratch::new(Backend::Sqlite);
    let runs = scratch.path("runs");
    scratch.write_config(&format!(
        "[jobs.mark]\ncommand = [\"/bin/sh\", \"-c\", \"echo run >> {}; echo done\"]",
        runs.display()
    ));
    let id = scratch.push("ui_job", "mark");
    let faults = Arc::new(Faults::default());
    faults.arm("complete", Fault::LoseReply, 1);
    assert_eq!(consume_through(&scratch, faults, 1), StopReason::JobLimit);
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n");
    let job = scratch.show(id);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["output"][0], "done");
}

/// Heartbeats answer late, one after another, each later than the fence (2 s): the running
/// job is stopped by its own worker before anyone may rescue it.
#[test]
fn heartbeats_that_answer_too_late_fence_the_job() {
    let scratch = Scratch::new(Backend::Sqlite);
    scratch.write_config(
        "heartbeat_interval = \"200ms\"\nrescue_after = \"3s\"\n[jobs.long]\ncommand = [\"/bin/sleep\", \"20\"]",
    );
    let id = scratch.push("ui_job", "long");
    let faults = Arc::new(Faults::default());
    faults.arm("heartbeat", Fault::Delay(Duration::from_millis(2500)), 3);
    let started = Instant::now();
    assert_eq!(consume_through(&scratch, faults, 1), StopReason::JobLimit);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let job = scratch.show(id);
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["reason"], "lost contact with the database", "{job}");
}

/// A reload while a job runs, with the database slow to take the new queues (8 s): the loop
/// that watches the job does not wait for that write, so the job's end is seen, and
/// recorded, when it happens. (It used to wait in the reload, blind to the job, the fence
/// and stop requests, for as long as the write took.)
#[test]
fn a_reload_during_a_job_never_waits_on_the_database() {
    let scratch = Scratch::new(Backend::Sqlite);
    let started = scratch.path("started");
    scratch.write_config(&format!(
        "[jobs.short]\ncommand = [\"/bin/sh\", \"-c\", \"touch {}; sleep 1.5\"]",
        started.display()
    ));
    let id = scratch.push("ui_job", "short");
    let faults = Arc::new(Faults::default());
    let reload = Arc::new(tokio::sync::Notify::new());
    let config_path = scratch.config_path();
    let reloader: Reloader = Box::new(move || {
        let config = Config::load(Some(&config_path))?;
        Ok((config, vec!["ui_job".to_string()]))
    });
    let reloading = {
        let (faults, reload) = (faults.clone(), reload.clone());
        std::thread::spawn(move || {
            wait_until(Duration::from_secs(10), "the job to start", || {
                started.exists()
            });
            faults.arm("register", Fault::Delay(Duration::from_secs(8)), 1);
            reload.notify_one();
        })
    };
    let began = Instant::now();
    let reason = consume_reloadable(&scratch, faults, 1, reload, reloader);
    reloading.join().unwrap();
    assert_eq!(reason, StopReason::JobLimit);
    let job = scratch.show(id);
    assert_eq!(job["status"], "succeeded", "{job}");
    let ran_for = job["finished_at"].as_i64().unwrap() - job["started_at"].as_i64().unwrap();
    assert!(
        ran_for < 4_000_000,
        "the end of a 1.5 s job was recorded {ran_for} µs after its start"
    );
    assert!(
        began.elapsed() < Duration::from_secs(8),
        "{:?}",
        began.elapsed()
    );
}

/// A store that refuses this worker for good (a SQLite file it may not write) ends the
/// worker with exit 77, whichever call meets the refusal first: registering used to retry
/// it forever, so whether the worker exited depended on which statement failed first.
#[test]
fn a_store_that_refuses_this_user_ends_the_worker_whichever_call_meets_it() {
    use pim_job_queue::exit::ExitCode;
    use pim_job_queue::store::StoreError;
    for call in ["register", "claim"] {
        let scratch = Scratch::new(Backend::Sqlite);
        scratch.write_config("[jobs.x]\ncommand = [\"/bin/true\"]");
        let id = scratch.push("ui_job", "x");
        let faults = Arc::new(Faults::default());
        let refusal = StoreError::PermissionDenied("not writable by this user".into());
        faults.arm(call, Fault::Fail(refusal), 1);
        let started = Instant::now();
        let reason = consume_through(&scratch, faults, 1);
        assert_eq!(
            reason,
            StopReason::StoreUnusable(ExitCode::NoPerm, "not writable by this user".into()),
            "{call}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{call}: {:?}",
            started.elapsed()
        );
        assert_eq!(scratch.show(id)["status"], "waiting", "{call}");
    }
}

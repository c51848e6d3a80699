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
use pim_job_queue::store::{self, JobStore, WorkerIdentity};

use crate::support::*;

/// Runs a consumer in this process, on the scratch's config, through `faults`, until it
/// has run `limit` jobs (or 30 s pass).
fn consume_through(scratch: &Scratch, faults: Arc<Faults>, limit: u64) -> StopReason {
    let config = Config::load(Some(&scratch.config_path())).unwrap();
    block_on(async {
        let inner = store::open_configured(&config, &scratch.url).await.unwrap();
        let store: Arc<dyn JobStore> = Arc::new(Wrapped::new(inner, faults));
        let (_trigger, shutdown) = Shutdown::new();
        let signals = Signals {
            shutdown,
            reload: Arc::default(),
        };
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
        let reloader: Reloader = Box::new(|| Err(Failure::config("no reloads in this test")));
        let notifier = Arc::new(Notifier::disabled());
        let mut consumer =
            Consumer::new(store, config, options, worker, signals, notifier, reloader);
        consumer.run().await
    })
}

/// The claim commits but its reply is lost: the worker never learns it holds the job, and
/// its heartbeats name none. Once `rescue_after` has passed since the claim, the job is taken
/// back (never started: its attempt refunded), claimed again, and run once.
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
        started.elapsed() >= Duration::from_secs(2),
        "taken back before rescue_after: {:?}",
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

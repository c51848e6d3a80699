//! The daemon loop: claim the next job from the highest-priority non-empty queue, run it,
//! record its result, and look again from the first queue.
//!
//! The loop only talks to the [`JobStore`] trait. It never dies on one bad job (a malformed
//! payload, a missing placeholder field, a command that cannot start all fail that job) nor
//! on a database outage (it backs off and retries, keeping a finished job's result until it
//! can be written). While idle it wakes at once on a same-host push or a database
//! notification, and otherwise polls.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tracing::{Instrument, info, info_span, warn};

use crate::config::Config;
use crate::fleet::{Contact, FleetTimings, Membership};
use crate::runner::{self, Ending, Interruption, JobLaunch, RunReport};
use crate::shutdown::{Shutdown, StopLevel};
use crate::store::{
    ClaimedJob, Completion, JobResult, JobStore, PushListener, Release, StoreError, Timestamp,
    WorkerIdentity,
};
use crate::template::JobFacts;
use crate::units::format_duration;
use crate::wake::{WakeDir, WakeSocket};
use crate::worker::resident_memory_bytes;

/// The first wait after a database error; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the operator asked of this consumer run.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// The queues to consume, highest priority first.
    pub queues: Vec<String>,
    pub poll_interval: Duration,
    /// Exit after this many jobs.
    pub limit: Option<u64>,
    /// Exit, between jobs, once this long has passed.
    pub time_limit: Option<Duration>,
    /// Exit, between jobs, once the worker's own RSS passes this many bytes.
    pub memory_limit: Option<u64>,
}

/// Why the consumer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Signal,
    JobLimit,
    TimeLimit,
    MemoryLimit,
    StopWorkersRequested,
}

impl StopReason {
    pub fn describe(self) -> &'static str {
        match self {
            StopReason::Signal => "stop signal",
            StopReason::JobLimit => "job limit reached",
            StopReason::TimeLimit => "time limit reached",
            StopReason::MemoryLimit => "memory limit reached",
            StopReason::StopWorkersRequested => "stop-workers requested",
        }
    }
}

/// Where wake-ups come from while idle, besides the poll timer.
#[derive(Default)]
struct WakeSources {
    socket: Option<WakeSocket>,
    listener: Option<Box<dyn PushListener>>,
}

pub struct Consumer {
    store: Arc<dyn JobStore>,
    config: Config,
    options: ConsumerOptions,
    worker: WorkerIdentity,
    shutdown: Shutdown,
    timings: FleetTimings,
    started: Instant,
    jobs_done: u64,
    /// The stop-workers generation seen at start; a higher one means "exit".
    stop_generation: Option<i64>,
    backoff: Backoff,
    wake: WakeSources,
}

impl Consumer {
    pub fn new(
        store: Arc<dyn JobStore>,
        config: Config,
        options: ConsumerOptions,
        worker: WorkerIdentity,
        shutdown: Shutdown,
    ) -> Self {
        let timings = FleetTimings {
            heartbeat_interval: config.heartbeat_interval,
            rescue_after: config.rescue_after,
            retention: config.retention,
        };
        Consumer {
            store,
            config,
            options,
            worker,
            shutdown,
            timings,
            started: Instant::now(),
            jobs_done: 0,
            stop_generation: None,
            backoff: Backoff::default(),
            wake: WakeSources::default(),
        }
    }

    /// Runs until a stop condition; returns which.
    pub async fn run(&mut self) -> StopReason {
        let Some(membership) = self.join_fleet().await else {
            return StopReason::Signal;
        };
        self.wake = self.open_wake_sources().await;
        info!(
            worker = %self.worker.describe(),
            "consuming queues {} (highest priority first)",
            self.options.queues.join(", ")
        );
        let contact = membership.contact();
        let reason = loop {
            if let Some(reason) = self.limit_reached() {
                break reason;
            }
            match self.next_step(&contact).await {
                Ok(Some(reason)) => break reason,
                Ok(None) => self.backoff.reset(),
                Err(error) => self.wait_after_error(&error).await,
            }
        };
        membership.leave().await;
        reason
    }

    /// Registers in the fleet, retrying through outages; `None` if stopped meanwhile.
    async fn join_fleet(&mut self) -> Option<Membership> {
        loop {
            let joined = Membership::join(
                self.store.clone(),
                self.worker.clone(),
                self.options.queues.clone(),
                self.timings,
            )
            .await;
            match joined {
                Ok(membership) => return Some(membership),
                Err(error) => self.wait_after_error(&error).await,
            }
            if self.shutdown.is_stopping() {
                return None;
            }
        }
    }

    async fn open_wake_sources(&self) -> WakeSources {
        let dir = WakeDir::for_store(self.config.wake_dir.as_deref(), &self.store.location());
        let name = format!("w-{}-{}", self.worker.pid, &self.worker.token[..8]);
        let socket = dir
            .bind(&name)
            .inspect_err(|error| {
                warn!(
                    "no same-host wake-ups ({}: {error}); polling every {}",
                    dir.path().display(),
                    format_duration(self.options.poll_interval)
                )
            })
            .ok();
        let listener = self
            .store
            .listen()
            .await
            .inspect_err(|error| warn!("no database notifications ({error}); polling"))
            .ok()
            .flatten();
        WakeSources { socket, listener }
    }

    /// One pass: check for a stop request, then claim and run a job or sleep.
    async fn next_step(&mut self, contact: &Contact) -> Result<Option<StopReason>, StoreError> {
        if self.stop_requested_by_operator().await? {
            return Ok(Some(StopReason::StopWorkersRequested));
        }
        // A job claimed now would be fenced at once: wait for the heartbeat to get through.
        if contact.last_ok().elapsed() >= self.timings.fence_after() {
            return Err(StoreError::Unavailable(
                "no heartbeat has reached the database recently; not taking jobs".into(),
            ));
        }
        let claimed = self
            .store
            .claim(&self.options.queues, &self.worker, Timestamp::now())
            .await?;
        match claimed {
            Some(job) => {
                contact.set_current_job(Some(job.id));
                self.process(job, contact).await;
                contact.set_current_job(None);
                self.jobs_done += 1;
            }
            None => self.idle().await,
        }
        Ok(None)
    }

    async fn stop_requested_by_operator(&mut self) -> Result<bool, StoreError> {
        let current = self.store.stop_generation().await?;
        let seen_at_start = *self.stop_generation.get_or_insert(current);
        Ok(current > seen_at_start)
    }

    fn limit_reached(&self) -> Option<StopReason> {
        if self.shutdown.is_stopping() {
            return Some(StopReason::Signal);
        }
        if self
            .options
            .limit
            .is_some_and(|limit| self.jobs_done >= limit)
        {
            return Some(StopReason::JobLimit);
        }
        if self
            .options
            .time_limit
            .is_some_and(|limit| self.started.elapsed() >= limit)
        {
            return Some(StopReason::TimeLimit);
        }
        let over_memory = self
            .options
            .memory_limit
            .zip(resident_memory_bytes())
            .is_some_and(|(limit, rss)| rss > limit);
        over_memory.then_some(StopReason::MemoryLimit)
    }

    /// Sleeps one poll interval, or less when a push, a stop or the time limit comes first.
    async fn idle(&mut self) {
        let mut nap = self.options.poll_interval;
        if let Some(limit) = self.options.time_limit {
            nap = nap.min(limit.saturating_sub(self.started.elapsed()));
        }
        let mut listener_failed = None;
        tokio::select! {
            _ = tokio::time::sleep(nap) => {}
            _ = self.shutdown.reached(StopLevel::Drain) => {}
            _ = woken(self.wake.socket.as_ref()) => {}
            pushed = pushed(self.wake.listener.as_mut()) => listener_failed = pushed.err(),
        }
        if let Some(error) = listener_failed {
            // The listener reconnects on its next use; until then polling carries on.
            warn!("database notifications interrupted: {error}");
            tokio::select! {
                _ = tokio::time::sleep(nap) => {}
                _ = self.shutdown.reached(StopLevel::Drain) => {}
            }
        }
    }

    async fn wait_after_error(&mut self, error: &StoreError) {
        let delay = self.backoff.next_delay();
        warn!(
            attempt = self.backoff.attempts,
            "{error}; retrying in {}",
            format_duration(delay)
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = self.shutdown.reached(StopLevel::Drain) => {}
        }
    }

    /// Runs one claimed job to its recorded end.
    async fn process(&mut self, job: ClaimedJob, contact: &Contact) {
        let span = info_span!("job", job_id = job.id, queue = %job.queue, code = %job.code);
        async {
            let completion = match self.prepare_launch(&job) {
                Ok(launch) => self.execute(&job, &launch, contact).await,
                Err(reason) => {
                    warn!("job failed before it started: {reason}");
                    Outcome::Finished(failure_without_run(reason))
                }
            };
            self.record(&job, &completion).await;
        }
        .instrument(span)
        .await
    }

    /// Works out the argv and environment; an error fails the job, never the worker.
    fn prepare_launch(&self, job: &ClaimedJob) -> Result<JobLaunch, String> {
        let payload = parse_payload(&job.payload)?;
        let spec = self.config.job_spec(&job.code)?;
        let facts = JobFacts {
            id: job.id,
            queue: &job.queue,
            code: &job.code,
            payload: &payload,
        };
        let argv = spec.command.render(&facts)?;
        let mut env: BTreeMap<String, String> = spec.env.clone();
        env.insert("PIM_JOB_ID".into(), job.id.to_string());
        env.insert("PIM_JOB_QUEUE".into(), job.queue.clone());
        env.insert("PIM_JOB_CODE".into(), job.code.clone());
        env.insert("PIM_JOB_PAYLOAD".into(), Value::Object(payload).to_string());
        Ok(JobLaunch {
            argv,
            working_directory: spec.working_directory.clone(),
            env,
            timeout: spec.timeout,
            kill_grace: spec.kill_grace,
        })
    }

    async fn execute(&self, job: &ClaimedJob, launch: &JobLaunch, contact: &Contact) -> Outcome {
        let running = match runner::start(launch) {
            Ok(running) => running,
            Err(error) => {
                let reason = format!("cannot start {}: {error}", launch.argv[0]);
                warn!("job failed: {reason}");
                return Outcome::Finished(failure_without_run(reason));
            }
        };
        info!(
            attempt = job.attempts,
            pid = running.pid().as_raw(),
            "job started"
        );
        match self.store.mark_started(&job.lease, Timestamp::now()).await {
            Ok(true) => {}
            Ok(false) => warn!("job is no longer held by this worker"),
            Err(error) => warn!("could not record the job's start: {error}"),
        }
        let report = running
            .wait(self.interruption(contact, launch.kill_grace))
            .await;
        let outcome = outcome_of(&report);
        log_end(&report, &outcome);
        outcome
    }

    /// Resolves when the running job must be ended early: an abort (second stop signal), or
    /// the fence (no heartbeat for two thirds of `rescue_after`, so others may soon rescue it).
    async fn interruption(&self, contact: &Contact, kill_grace: Duration) -> Interruption {
        tokio::select! {
            _ = self.shutdown.reached(StopLevel::Abort) => Interruption {
                reason: "interrupted by a stop request".into(),
                grace: kill_grace,
            },
            _ = contact.lost_for(self.timings.fence_after()) => Interruption {
                reason: "lost contact with the database".into(),
                grace: self.timings.fence_grace(),
            },
        }
    }

    /// Stores the outcome, retrying through database outages: a finished job's result is
    /// kept in memory until it is written, or until an abort is requested.
    async fn record(&self, job: &ClaimedJob, outcome: &Outcome) {
        let mut backoff = Backoff::default();
        loop {
            let stored = match outcome {
                Outcome::Finished(completion) => self
                    .store
                    .complete(&job.lease, completion)
                    .await
                    .map(|held| held.then_some(Release::Failed)),
                Outcome::GivenUp(reason) => self
                    .store
                    .release(&job.lease, reason, Timestamp::now())
                    .await
                    .map(|release| (release != Release::NotHeld).then_some(release)),
            };
            match stored {
                Ok(Some(Release::Requeued)) => {
                    info!("job put back in its queue (attempts left)");
                    return;
                }
                Ok(Some(_)) => return,
                Ok(None) => {
                    warn!("result not recorded: the job is no longer held by this worker");
                    return;
                }
                Err(error) if error.is_transient() && !self.aborting() => {
                    let delay = backoff.next_delay();
                    warn!(
                        attempt = backoff.attempts,
                        "cannot record the job's result: {error}; retrying in {}",
                        format_duration(delay)
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(error) => {
                    tracing::error!(?outcome, "giving up on recording the job's result: {error}");
                    return;
                }
            }
        }
    }

    fn aborting(&self) -> bool {
        self.shutdown.level() >= StopLevel::Abort
    }
}

/// Resolves on a same-host wake-up; never without a socket.
async fn woken(socket: Option<&WakeSocket>) {
    match socket {
        Some(socket) => socket.woken().await,
        None => std::future::pending().await,
    }
}

/// Resolves on a database notification; never without a listener.
async fn pushed(listener: Option<&mut Box<dyn PushListener>>) -> Result<(), StoreError> {
    match listener {
        Some(listener) => listener.pushed().await,
        None => std::future::pending().await,
    }
}

/// How a claimed job ended, from the worker's side.
#[derive(Debug)]
enum Outcome {
    /// It ran (or could not start); the result is final.
    Finished(Completion),
    /// The worker ended it early; it goes back to its queue if it has attempts left.
    GivenUp(String),
}

/// A job's payload must be a JSON object; anything else (a row inserted by hand) fails it.
fn parse_payload(text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("invalid payload: not a JSON object".into()),
        Err(error) => Err(format!("invalid payload: {error}")),
    }
}

fn failure_without_run(reason: String) -> Completion {
    Completion {
        result: JobResult::Failed {
            exit_code: None,
            signal: None,
            reason,
        },
        output: Vec::new(),
        finished_at: Timestamp::now(),
    }
}

fn outcome_of(report: &RunReport) -> Outcome {
    let signal = report
        .status
        .and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s));
    let exit_code = report.status.and_then(|s| s.code());
    let result = match &report.ending {
        Ending::Exited(0) => JobResult::Succeeded,
        Ending::Exited(code) => JobResult::Failed {
            exit_code: Some(*code),
            signal: None,
            reason: format!("exit code {code}"),
        },
        Ending::Signalled(number) => JobResult::Failed {
            exit_code: None,
            signal: Some(*number),
            reason: format!("killed by signal {}", signal_name(*number)),
        },
        Ending::TimedOut => JobResult::Failed {
            exit_code,
            signal,
            reason: "timeout".into(),
        },
        Ending::Interrupted(reason) => return Outcome::GivenUp(reason.clone()),
    };
    Outcome::Finished(Completion {
        result,
        output: report.output_tail.clone(),
        finished_at: Timestamp::now(),
    })
}

fn signal_name(number: i32) -> String {
    nix::sys::signal::Signal::try_from(number)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| number.to_string())
}

fn log_end(report: &RunReport, outcome: &Outcome) {
    let duration = format_duration(report.duration);
    match outcome {
        Outcome::Finished(Completion {
            result: JobResult::Succeeded,
            ..
        }) => info!(duration = %duration, result = "succeeded", "job finished"),
        Outcome::Finished(Completion {
            result: JobResult::Failed { reason, .. },
            ..
        }) => warn!(duration = %duration, result = "failed", "job finished: {reason}"),
        Outcome::GivenUp(reason) => {
            warn!(duration = %duration, result = "interrupted", "job interrupted: {reason}")
        }
    }
}

/// Capped exponential backoff for database retries.
#[derive(Debug, Default)]
pub struct Backoff {
    pub attempts: u32,
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        self.attempts += 1;
        let factor = 1u32 << (self.attempts - 1).min(5);
        (FIRST_BACKOFF * factor).min(MAX_BACKOFF)
    }

    pub fn reset(&mut self) {
        self.attempts = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let mut backoff = Backoff::default();
        let delays: Vec<u64> = (0..8).map(|_| backoff.next_delay().as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), FIRST_BACKOFF);
    }

    #[test]
    fn payloads_must_be_objects() {
        assert!(parse_payload(r#"{"a":1}"#).is_ok());
        assert!(
            parse_payload("[1]")
                .unwrap_err()
                .contains("not a JSON object")
        );
        assert!(
            parse_payload("{oops")
                .unwrap_err()
                .starts_with("invalid payload")
        );
    }
}

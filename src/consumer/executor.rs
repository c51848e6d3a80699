//! The executor: one claimed job from its launch to its end, watched by a loop that keeps
//! the worker's duties (watchdog, STATUS, reloads, stops with their grace, the timeout, the
//! fence and a lost lease).
//!
//! That loop never awaits the database, so a black-holed connection or a lock wait cannot
//! freeze the fence, the timeout, stop handling or the watchdog while a job runs: the fence
//! and a lost lease reach it as events from the heartbeat task; a store's per-job heartbeat
//! (Akeneo 6's health check) is written by a task of its own ([`JobTouch`]); Akeneo's
//! acknowledgement after the exec is a write the loop waits for *beside* the job; a reload
//! hands new queues to the heartbeat. Before the process exists there is nothing to write
//! (the claim was the job's start record); after it ended come the breaker's launch check
//! and the completer's record.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tracing::{Instrument, error, info, info_span, warn};

use super::{Consumer, FIRST_BACKOFF, STATUS_REFRESH};
use crate::breaker::FailedLaunch;
use crate::config::Transport;
use crate::fleet::Contact;
use crate::outcome::JobOutcome;
use crate::runner::{self, JobLaunch, RunningJob};
use crate::signals::StopLevel;
use crate::store::{ClaimedJob, JobResult, Lease, StoreResult, WorkerStore};
use crate::template::JobFacts;
use crate::units::format_duration;

impl Consumer {
    /// Runs one claimed job to its recorded end.
    pub(super) async fn process(&mut self, job: ClaimedJob, contact: &Contact) {
        let span = info_span!(
            "job",
            job_id = job.id,
            job_queue = %job.queue,
            job_code = %job.code
        );
        async {
            let outcome = match self.prepare_launch(&job) {
                Ok(launch) => self.execute(&job, &launch, contact).await,
                Err(reason) => JobOutcome::Refused { reason },
            };
            outcome.log();
            let failed_launch = self.failed_at_start(&job, &outcome).await;
            self.record(&job, &outcome).await;
            self.account_launch(&job, failed_launch).await;
        }
        .instrument(span)
        .await
    }

    /// Why this launch counts as failed at start, for the breaker: its process never
    /// started, or it failed within the window before the job's system saw it start.
    pub(super) async fn failed_at_start(
        &self,
        job: &ClaimedJob,
        outcome: &JobOutcome,
    ) -> Option<Result<(), String>> {
        if !self.breaker.is_enabled() {
            return None;
        }
        let reason = match outcome {
            JobOutcome::NotStarted { reason } => return Some(Err(reason.clone())),
            JobOutcome::Finished {
                result,
                output,
                ran_for,
                ..
            } => match result {
                JobResult::Succeeded | JobResult::Cancelled { .. } => return Some(Ok(())),
                JobResult::Failed { .. } if !self.breaker.within_window(*ran_for) => {
                    return Some(Ok(()));
                }
                JobResult::Failed { reason, .. } => match output.last() {
                    Some(line) => format!("{reason}: {line}"),
                    None => reason.clone(),
                },
            },
            JobOutcome::Refused { .. } | JobOutcome::Interrupted { .. } => return None,
        };
        match self.db(self.store.launch_took_effect(&job.lease)).await {
            Ok(Some(true)) => Some(Ok(())),
            Ok(Some(false) | None) => Some(Err(reason)),
            Err(error) => {
                warn!("cannot tell whether the job started: {error}");
                None
            }
        }
    }

    /// Feeds the breaker; when launches keep failing at start, claiming stops for a while
    /// (and the environment is checked again before it resumes).
    pub(super) async fn account_launch(
        &mut self,
        job: &ClaimedJob,
        failed: Option<Result<(), String>>,
    ) {
        let reason = match failed {
            None => return,
            Some(Ok(())) => return self.breaker.record_success(),
            Some(Err(reason)) => reason,
        };
        warn!(
            failed_launches = self.breaker.failures_in_a_row() + 1,
            "launch failed at start: {reason}"
        );
        let trip = self.breaker.record_failure(FailedLaunch {
            job: job.id,
            reason,
        });
        match trip {
            Some(trip) => {
                let message = format!(
                    "{}; not taking jobs for {}, then checking the PIM again",
                    trip.describe(),
                    format_duration(trip.closed_for)
                );
                error!("{message}");
                self.notifier.status(&format!("Not taking jobs: {message}"));
            }
            // A launch whose program could not start leaves its job queued: do not hammer it.
            None => self.pause(FIRST_BACKOFF, StopLevel::Drain).await,
        }
    }

    /// Works out the argv and environment; an error fails the job, never the worker.
    pub(super) fn prepare_launch(&self, job: &ClaimedJob) -> Result<JobLaunch, String> {
        let payload = parse_payload(&job.payload)?;
        if let Transport::Akeneo(settings) = &self.config.transport {
            let message = crate::akeneo::JobMessage::from_payload(&payload)?;
            return crate::akeneo::launch(settings, &message, &job.code);
        }
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
        let payload = Value::Object(payload).to_string();
        // The environment of a process holds 128 KiB per variable: a larger payload (a row
        // written by other means) is only on the descriptor, or the job could not start.
        let mut remove_env = Vec::new();
        if payload.len() <= ENV_PAYLOAD_LIMIT {
            env.insert("PIM_JOB_PAYLOAD".into(), payload.clone());
        } else {
            remove_env.push("PIM_JOB_PAYLOAD".into());
        }
        env.insert(
            "PIM_JOB_PAYLOAD_FILE".into(),
            format!("/dev/fd/{}", runner::PAYLOAD_FD),
        );
        Ok(JobLaunch {
            argv,
            working_directory: spec.working_directory.clone(),
            env,
            remove_env,
            timeout: spec.timeout,
            kill_grace: spec.kill_grace,
            signal_leader_first: false,
            payload_on_fd: Some(payload),
        })
    }

    /// Starts and watches the job. Its claim was its start record (see
    /// [`QueueStore::next_job`]); the Akeneo store also acknowledges the PIM's message once
    /// the process exists, a write the watching loop waits for beside the job.
    ///
    /// [`QueueStore::next_job`]: crate::store::QueueStore::next_job
    pub(super) async fn execute(
        &mut self,
        job: &ClaimedJob,
        launch: &JobLaunch,
        contact: &Contact,
    ) -> JobOutcome {
        let running = match runner::start(launch) {
            Ok(running) => running,
            Err(error) => {
                let reason = format!("cannot start {}: {error}", launch.argv[0]);
                return JobOutcome::NotStarted { reason };
            }
        };
        info!(
            message_id = crate::logging::message_id::JOB_STARTED,
            attempt = job.attempts,
            pid = running.pid().as_raw(),
            "job started"
        );
        self.notifier.status(&running_status(job, Duration::ZERO));
        let acknowledges = matches!(self.config.transport, Transport::Akeneo(_));
        let acknowledgement = acknowledges.then(|| {
            let store = self.store.clone();
            let lease = job.lease.clone();
            Box::pin(async move { store.acknowledge_start(&lease).await }) as PendingWrite
        });
        let watched = Watched {
            job,
            kill_grace: launch.kill_grace,
            contact,
            acknowledgement,
        };
        self.watch(running, watched).await
    }

    /// Ends the job's process group now (SIGTERM, SIGKILL after `grace`), pinging the
    /// watchdog meanwhile; the job is reported interrupted for `reason`.
    async fn end_now(
        &mut self,
        mut running: RunningJob,
        reason: &str,
        grace: Duration,
    ) -> JobOutcome {
        warn!("ending the job's process group: {reason}");
        self.notifier.extend_timeout(grace + STATUS_REFRESH);
        self.notifier.while_pinging(running.end_group(grace)).await;
        self.notifier
            .while_pinging(running.interrupted(reason))
            .await
    }

    /// Waits for the job while keeping the worker's duties: watchdog, STATUS, reloads, stop
    /// requests with their grace, the timeout, the fence and a lost lease. Nothing here
    /// awaits the database (see the module doc).
    pub(super) async fn watch(
        &mut self,
        mut running: RunningJob,
        watched: Watched<'_>,
    ) -> JobOutcome {
        let Watched {
            job,
            kill_grace,
            contact,
            mut acknowledgement,
        } = watched;
        let _touch = JobTouch::start(
            self.store.clone(),
            job.lease.clone(),
            self.heartbeat_slice(),
        );
        let mut ticks = tokio::time::interval(self.heartbeat_slice());
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let timeout = running.deadline();
        let mut stop_deadline: Option<tokio::time::Instant> = None;
        let outcome = loop {
            let event = tokio::select! {
                status = running.exited() => JobEvent::Exited(status),
                _ = sleep_until(timeout) => JobEvent::TimedOut,
                _ = ticks.tick() => JobEvent::Tick,
                _ = self.signals.reload.notified() => JobEvent::Reload,
                _ = self.signals.shutdown.reached(StopLevel::Drain), if stop_deadline.is_none() => {
                    JobEvent::StopRequested
                }
                _ = sleep_until(stop_deadline) => {
                    JobEvent::Interrupt("the stop grace period ran out", kill_grace)
                }
                _ = self.signals.shutdown.reached(StopLevel::Abort) => {
                    JobEvent::Interrupt("interrupted by a second stop request", kill_grace)
                }
                _ = contact.lost_for(self.timings.fence_after()) => {
                    JobEvent::Interrupt("lost contact with the database", self.timings.fence_grace())
                }
                reason = contact.cancel_requested(job.id) => JobEvent::Cancel(reason),
                _ = contact.lease_lost(job.id) => {
                    JobEvent::Interrupt("this worker was declared lost: the job is someone else's", self.timings.fence_grace())
                }
                held = settle(&mut acknowledgement), if acknowledgement.is_some() => {
                    acknowledgement = None;
                    match acknowledged(held) {
                        Some(reason) => JobEvent::Interrupt(reason, self.timings.fence_grace()),
                        None => continue,
                    }
                }
            };
            match event {
                JobEvent::Exited(status) => {
                    break self
                        .notifier
                        .while_pinging(running.exited_with(status))
                        .await;
                }
                JobEvent::TimedOut => {
                    warn!("job timed out: ending its process group");
                    let status = self
                        .notifier
                        .while_pinging(running.end_group(kill_grace))
                        .await;
                    break self.notifier.while_pinging(running.timed_out(status)).await;
                }
                JobEvent::Interrupt(reason, grace) => {
                    break self.end_now(running, reason, grace).await;
                }
                JobEvent::Cancel(reason) => {
                    warn!("ending the job's process group: {reason}");
                    self.notifier.extend_timeout(kill_grace + STATUS_REFRESH);
                    self.notifier
                        .while_pinging(running.end_group(kill_grace))
                        .await;
                    break self.notifier.while_pinging(running.cancelled(reason)).await;
                }
                JobEvent::Tick => self.keep_alive_while_running(job, &running, stop_deadline),
                JobEvent::Reload => self.reload(contact),
                JobEvent::StopRequested => {
                    let grace = self.config.stop_grace;
                    stop_deadline = Some(tokio::time::Instant::now() + grace);
                    info!(
                        "stop requested: waiting up to {} for job {} to finish",
                        format_duration(grace),
                        job.id
                    );
                    self.notifier
                        .stopping(&format!("Stopping: waiting for job {}", job.id));
                    self.keep_alive_while_running(job, &running, stop_deadline);
                }
            }
        };
        // A job that ended before its acknowledgement answered: the answer is still needed
        // (the result is only recorded for a message this worker holds), within the deadline.
        if let Some(pending) = acknowledgement {
            acknowledged(self.db(pending).await);
        }
        outcome
    }

    /// Watchdog ping and STATUS while a job runs; during a stop, also asks systemd for more
    /// time, as long as the stop grace lasts.
    pub(super) fn keep_alive_while_running(
        &mut self,
        job: &ClaimedJob,
        running: &RunningJob,
        stop_deadline: Option<tokio::time::Instant>,
    ) {
        self.ping_watchdog_if_due();
        match stop_deadline {
            None => self
                .notifier
                .status(&running_status(job, running.elapsed())),
            Some(deadline) => {
                self.notifier.status(&format!(
                    "Stopping: waiting for job {} ({} running)",
                    job.id,
                    format_duration(Duration::from_secs(running.elapsed().as_secs()))
                ));
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                self.notifier
                    .extend_timeout(left.min(STATUS_REFRESH * 3) + STATUS_REFRESH);
            }
        }
    }
}

/// One job as the watching loop sees it.
pub(super) struct Watched<'a> {
    pub job: &'a ClaimedJob,
    pub kill_grace: Duration,
    pub contact: &'a Contact,
    /// Akeneo's acknowledgement of the job's message, still on its way.
    pub acknowledgement: Option<PendingWrite>,
}

/// A store write the watching loop waits for beside the job, never instead of it.
pub(super) type PendingWrite = Pin<Box<dyn Future<Output = StoreResult<bool>> + Send>>;

/// Resolves with the pending write's answer; never when there is none.
async fn settle(pending: &mut Option<PendingWrite>) -> StoreResult<bool> {
    match pending {
        Some(write) => write.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Why the job must end, from its acknowledgement's answer: taken over by another consumer
/// (it redelivered the message), the job is theirs to run, so this copy ends at once.
fn acknowledged(held: StoreResult<bool>) -> Option<&'static str> {
    match held {
        Ok(true) => None,
        Ok(false) => {
            error!("the job was taken over before its start was recorded");
            Some("the job is no longer held by this worker")
        }
        Err(error) => {
            warn!("could not record the job's start: {error}");
            None
        }
    }
}

/// A store's per-job heartbeat (Akeneo 6's `health_check_time`), written on a task of its
/// own for as long as this value lives: a slow write delays nothing but the next one.
struct JobTouch(tokio::task::JoinHandle<()>);

impl JobTouch {
    fn start(store: Arc<dyn WorkerStore>, lease: Lease, every: Duration) -> JobTouch {
        let touching = async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                if let Err(error) = store.touch(&lease).await {
                    warn!("could not refresh the job's heartbeat: {error}");
                }
            }
        };
        JobTouch(tokio::spawn(touching.in_current_span()))
    }
}

impl Drop for JobTouch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What woke the job-watching loop.
pub(super) enum JobEvent {
    Exited(Option<std::process::ExitStatus>),
    TimedOut,
    Tick,
    Reload,
    StopRequested,
    /// End the job now: why, and how long SIGTERM gets before SIGKILL.
    Interrupt(&'static str, Duration),
    /// An operator cancelled the job: end it, and it ends `cancelled` for this reason.
    Cancel(String),
}

pub(super) fn running_status(job: &ClaimedJob, elapsed: Duration) -> String {
    format!(
        "Running job {} {} ({}) for {}",
        job.id,
        job.code,
        job.queue,
        format_duration(Duration::from_secs(elapsed.as_secs()))
    )
}

pub(super) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// A job's payload must be a JSON object; anything else (a row inserted by hand) fails it.
pub(super) fn parse_payload(text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("invalid payload: not a JSON object".into()),
        Err(error) => Err(format!("invalid payload: {error}")),
    }
}

/// Payloads up to this size are also in `PIM_JOB_PAYLOAD`; all are on `PIM_JOB_PAYLOAD_FILE`.
pub(super) const ENV_PAYLOAD_LIMIT: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

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

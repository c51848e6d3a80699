//! The completer: a job's result (or its give-back) written to the store, retried through
//! outages, guarded by the lease so a late or repeated write changes nothing.
//!
//! A final result is not written on its own: it waits, in memory, for the worker's next turn
//! ([`QueueStore::next_job`]), which records it in the same transaction as the next claim, so a
//! busy worker pays one durable commit per job. Whenever the worker is not about to take its
//! next turn (it stops, or it must wait), the result is written by itself first
//! ([`Consumer::write_finished`]).
//!
//! [`QueueStore::next_job`]: crate::store::QueueStore::next_job

use tracing::{error, info, warn};

use super::{Backoff, Consumer};
use crate::outcome::{JobOutcome, Record, refusal};
use crate::signals::StopLevel;
use std::time::Duration;

use crate::store::{ClaimedJob, Completion, JobResult, Release, StoreError, Timestamp};
use crate::units::format_duration;

/// Says in a retried failure's reason that it was the last attempt.
fn exhausted(completion: &mut Completion, attempts: i64) {
    if let JobResult::Failed { reason, .. } = &mut completion.result {
        reason.push_str(&format!(" (attempts exhausted: {attempts})"));
    }
}

/// A number in [-1, 1] that differs from one worker and moment to the next: where in the
/// jitter band a retry lands. No cryptography needed, only spread.
fn spread() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mixed =
        (u64::from(nanos) ^ u64::from(std::process::id())).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (mixed >> 11) as f64 / (1_u64 << 53) as f64 * 2.0 - 1.0
}

/// One attempt of a retried job, as a JSON line for its history.
fn attempt_entry(job: &ClaimedJob, completion: &Completion, ran_for: Option<Duration>) -> String {
    let (exit_code, signal, reason) = match &completion.result {
        JobResult::Failed {
            exit_code,
            signal,
            reason,
        } => (*exit_code, *signal, reason.as_str()),
        _ => (None, None, ""),
    };
    let finished_at = completion.finished_at;
    let started_at = Timestamp(finished_at.0 - ran_for.map_or(0, |d| d.as_micros() as i64));
    let line = serde_json::json!({
        "attempt": job.attempts,
        "started_at": started_at.to_string(),
        "finished_at": finished_at.to_string(),
        "exit_code": exit_code,
        "signal": signal,
        "reason": reason,
    });
    format!("{line}\n")
}

/// The most job ids kept as "held, result not recorded" (see [`Consumer::unrecorded`]).
const MOST_UNRECORDED: usize = 64;

/// A finished job and its result, waiting for the next turn.
pub(super) struct Finished {
    pub job: ClaimedJob,
    pub completion: Completion,
}

impl Consumer {
    /// Records the outcome: a final result waits for the next turn (see the module doc);
    /// a give-back or put-back is written now, retried through outages.
    pub(super) async fn record(&mut self, job: &ClaimedJob, outcome: &JobOutcome) {
        match outcome.record() {
            Record::Complete(mut completion) => {
                if let Some(delay) = self.retry_delay(job, &completion) {
                    let entry = attempt_entry(job, &completion, outcome.ran_for());
                    let retry = Record::Retry {
                        completion: &completion,
                        delay,
                        entry: &entry,
                    };
                    match self.write(job, retry).await {
                        Some(Release::Requeued) => {
                            info!(
                                job_id = job.id,
                                "job failed, retrying in {} (attempt {} failed)",
                                format_duration(delay),
                                job.attempts
                            );
                            return;
                        }
                        Some(_) => exhausted(&mut completion, job.attempts),
                        None => return,
                    }
                }
                self.finished = Some(Finished {
                    job: job.clone(),
                    completion,
                });
            }
            record => {
                self.write(job, record).await;
            }
        }
    }

    /// How long until a failed job runs again, when its code's retry policy retries this
    /// failure (whether attempts are left, the store decides).
    fn retry_delay(&self, job: &ClaimedJob, completion: &Completion) -> Option<Duration> {
        let JobResult::Failed { exit_code, .. } = &completion.result else {
            return None;
        };
        let policy = self.config.job_spec(&job.code).ok()?.retry.as_ref()?;
        policy
            .retries(*exit_code)
            .then(|| policy.delay(job.attempts, spread()))
    }

    /// Writes the result waiting for the next turn by itself, when there is one.
    pub(super) async fn write_finished(&mut self) {
        if let Some(Finished { job, completion }) = self.finished.take() {
            self.write(&job, Record::Complete(completion)).await;
        }
    }

    /// Writes one record, retrying through database outages: the result is kept in memory
    /// until it is written, or until an abort is requested. Returns what became of the job
    /// (for a retry, `Failed`: no attempts left), `None` when it was not recorded.
    async fn write(&mut self, job: &ClaimedJob, record: Record<'_>) -> Option<Release> {
        let mut backoff = Backoff::default();
        loop {
            let stored = match &record {
                Record::PutBack(reason) => self.put_back_unstarted(job, reason).await,
                Record::GiveBack(reason) => self
                    .db(self.store.release(&job.lease, reason, Timestamp::now()))
                    .await
                    .map(|release| (release != Release::NotHeld).then_some(release)),
                Record::Complete(completion) => self
                    .db(self.store.complete(&job.lease, completion))
                    .await
                    .map(|held| held.then_some(Release::Failed)),
                Record::Retry {
                    completion,
                    delay,
                    entry,
                } => self
                    .db(self
                        .store
                        .retry_later(&job.lease, completion, *delay, entry))
                    .await
                    .map(|retried| {
                        retried.map(|again| {
                            if again {
                                Release::Requeued
                            } else {
                                Release::Failed
                            }
                        })
                    }),
            };
            match stored {
                Ok(Some(Release::Requeued)) => {
                    if matches!(record, Record::GiveBack(_) | Record::PutBack(_)) {
                        info!(job_id = job.id, "job put back in its queue (attempts left)");
                    }
                    return Some(Release::Requeued);
                }
                Ok(Some(release)) => return Some(release),
                Ok(None) => {
                    warn!(
                        job_id = job.id,
                        "result not recorded: the job is no longer held by this worker"
                    );
                    return None;
                }
                Err(error) if error.is_transient() && !self.aborting() => {
                    let delay = backoff.next_delay();
                    warn!(
                        job_id = job.id,
                        attempt = backoff.attempts,
                        "cannot record the job's result: {error}; retrying in {}",
                        format_duration(delay)
                    );
                    self.notifier.status(&format!(
                        "Database unavailable, holding the result of job {}",
                        job.id
                    ));
                    self.pause(delay, StopLevel::Abort).await;
                }
                Err(error) => {
                    error!(
                        job_id = job.id,
                        ?record,
                        "giving up on recording the job's result: {error}"
                    );
                    self.note_unrecorded(job);
                    return None;
                }
            }
        }
    }

    /// A job left running under this worker's token because its result could not be
    /// written: it ran, so no put-back of unanswered claims may take it (only a rescue).
    fn note_unrecorded(&mut self, job: &ClaimedJob) {
        if self.unrecorded.len() == MOST_UNRECORDED {
            self.unrecorded.remove(0);
        }
        self.unrecorded.push(job.lease.job_id);
    }

    /// A stop request arrived while the claim was on its way: the job has not started, so it
    /// goes back to its queue (its attempt refunded) instead of holding up the stop.
    pub(super) async fn give_back_claim(&self, job: &ClaimedJob) {
        const REASON: &str = "claimed while the worker was stopping";
        match self.db(self.store.put_back_unrun(&job.lease, REASON)).await {
            Ok(held) => info!(
                job_id = job.id,
                "stop requested during the claim: job {} given back{}",
                job.id,
                if held { "" } else { " (already taken back)" }
            ),
            Err(error) => warn!(
                job_id = job.id,
                "stop requested during the claim; job {} could not be given back, it will be \
                 rescued: {error}",
                job.id
            ),
        }
    }

    /// A job whose process never started goes back where the store allows it (the Akeneo
    /// message becomes visible again at once); elsewhere it fails with the reason.
    pub(super) async fn put_back_unstarted(
        &self,
        job: &ClaimedJob,
        reason: &str,
    ) -> Result<Option<Release>, StoreError> {
        if self
            .db(self.store.release_unstarted(&job.lease, reason))
            .await?
        {
            info!("job put back in its queue: its process never started");
            return Ok(Some(Release::Requeued));
        }
        let completion = refusal(reason);
        let held = self
            .db(self.store.complete(&job.lease, &completion))
            .await?;
        Ok(held.then_some(Release::Failed))
    }
}

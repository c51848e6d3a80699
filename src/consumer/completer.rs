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
use crate::store::{ClaimedJob, Completion, Release, StoreError, Timestamp};
use crate::units::format_duration;

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
            Record::Complete(completion) => {
                self.finished = Some(Finished {
                    job: job.clone(),
                    completion,
                });
            }
            record => self.write(job, record).await,
        }
    }

    /// Writes the result waiting for the next turn by itself, when there is one.
    pub(super) async fn write_finished(&mut self) {
        if let Some(Finished { job, completion }) = self.finished.take() {
            self.write(&job, Record::Complete(completion)).await;
        }
    }

    /// Writes one record, retrying through database outages: the result is kept in memory
    /// until it is written, or until an abort is requested.
    async fn write(&mut self, job: &ClaimedJob, record: Record<'_>) {
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
            };
            match stored {
                Ok(Some(Release::Requeued)) => {
                    info!(job_id = job.id, "job put back in its queue (attempts left)");
                    return;
                }
                Ok(Some(_)) => return,
                Ok(None) => {
                    warn!(
                        job_id = job.id,
                        "result not recorded: the job is no longer held by this worker"
                    );
                    return;
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
                    return;
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

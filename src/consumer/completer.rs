//! The completer: a job's result (or its give-back) written to the store, retried through
//! outages, guarded by the lease so a late or repeated write changes nothing.

use tracing::{error, info, warn};

use super::{Backoff, Consumer};
use crate::outcome::{JobOutcome, Record, refusal};
use crate::signals::StopLevel;
use crate::store::{ClaimedJob, Release, StoreError, Timestamp};
use crate::units::format_duration;

impl Consumer {
    /// Stores the outcome, retrying through database outages: a finished job's result is
    /// kept in memory until it is written, or until an abort is requested.
    pub(super) async fn record(&mut self, job: &ClaimedJob, outcome: &JobOutcome) {
        let mut backoff = Backoff::default();
        loop {
            let stored = match outcome.record() {
                Record::PutBack(reason) => self.put_back_unstarted(job, reason).await,
                Record::GiveBack(reason) => self
                    .db(self.store.release(&job.lease, reason, Timestamp::now()))
                    .await
                    .map(|release| (release != Release::NotHeld).then_some(release)),
                Record::Complete(completion) => self
                    .db(self.store.complete(&job.lease, &completion))
                    .await
                    .map(|held| held.then_some(Release::Failed)),
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
                    self.notifier.status(&format!(
                        "Database unavailable, holding the result of job {}",
                        job.id
                    ));
                    self.pause(delay, StopLevel::Abort).await;
                }
                Err(error) => {
                    error!(?outcome, "giving up on recording the job's result: {error}");
                    return;
                }
            }
        }
    }

    /// Records a native job's start before its process exists; `Some` (give the job back,
    /// do not start it) when that record is not certain. The store's call deadline, well
    /// inside the fence, bounds the wait.
    pub(super) async fn record_start_before_spawn(&self, job: &ClaimedJob) -> Option<JobOutcome> {
        let start = self.store.mark_started(&job.lease, Timestamp::now());
        let why = match self.db(start).await {
            Ok(true) => return None,
            Ok(false) => "the job is no longer held by this worker".to_string(),
            Err(error) => format!("its start could not be recorded ({error})"),
        };
        Some(JobOutcome::Interrupted {
            reason: format!("not started: {why}"),
            output: Vec::new(),
            ran_for: std::time::Duration::ZERO,
        })
    }

    /// A stop request arrived while the claim was on its way: the job has not started, so it
    /// goes back to its queue (its attempt refunded) instead of holding up the stop.
    pub(super) async fn give_back_claim(&self, job: &ClaimedJob) {
        const REASON: &str = "claimed while the worker was stopping";
        let released = match self
            .db(self.store.release_unstarted(&job.lease, REASON))
            .await
        {
            Ok(true) => Ok(Release::Requeued),
            Ok(false) => {
                self.db(self.store.release(&job.lease, REASON, Timestamp::now()))
                    .await
            }
            Err(error) => Err(error),
        };
        match released {
            Ok(release) => info!(
                job_id = job.id,
                "stop requested during the claim: job {} given back ({release:?})", job.id
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

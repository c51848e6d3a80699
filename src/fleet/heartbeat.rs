//! The heartbeat: alone on its task and timer, so nothing else the worker does (a rescue, a
//! prune, a job, a reload) can delay it, and with it the fence. It also records the queues
//! a reload chose, finds out when this worker was declared lost, and reads an operator's
//! request to cancel the running job.

use std::sync::Arc;

use tokio::time::Instant;
use tracing::{error, info, warn};

use super::contact::Contact;
use super::{FleetTimings, clock};
use crate::store::{FleetStore, JobId, StoreResult, WorkerIdentity};

pub(super) struct Heartbeat {
    pub(super) store: Arc<dyn FleetStore>,
    pub(super) worker: WorkerIdentity,
    pub(super) queues: Vec<String>,
    pub(super) timings: FleetTimings,
    pub(super) contact: Arc<Contact>,
}

impl Heartbeat {
    pub(super) async fn run(mut self) {
        let mut ticks = tokio::time::interval(self.timings.heartbeat_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0u32;
        loop {
            ticks.tick().await;
            let sent = Instant::now();
            match self.beat().await {
                Ok(()) => {
                    if let Some(since) = self.contact.record_ok(sent) {
                        info!(
                            "database reachable again (unavailable since {})",
                            clock(since)
                        );
                    }
                    failures = 0;
                }
                Err(error) => {
                    failures += 1;
                    let since = self.contact.record_failure();
                    warn!(
                        attempt = failures,
                        "database unavailable since {}, retrying (attempt {failures}): {error}",
                        clock(since)
                    );
                }
            }
        }
    }

    async fn beat(&mut self) -> StoreResult<()> {
        self.record_new_queues().await?;
        let current = self.contact.current_job();
        if !self.store.heartbeat(&self.worker, current).await? {
            match current {
                Some(job) => {
                    error!(
                        job_id = job,
                        "this worker was declared lost while it ran job {job}: the job may \
                         have been rescued and be someone else's now, so it is being ended"
                    );
                    self.contact.lose_job(job);
                }
                None => warn!("this worker's registration was gone (declared lost?)"),
            }
            info!("registering this worker again");
            self.store
                .register_worker(&self.worker, &self.queues)
                .await?;
            return Ok(());
        }
        if let Some(job) = current {
            self.read_cancel_request(job).await?;
        }
        Ok(())
    }

    /// Tells the consumer when an operator asked to cancel the running `job`.
    async fn read_cancel_request(&self, job: JobId) -> StoreResult<()> {
        if let Some(reason) = self.store.cancel_request(job, &self.worker).await?
            && self.contact.request_cancel(job, reason.clone())
        {
            info!(job_id = job, "job {job}: {reason}: ending it");
        }
        Ok(())
    }

    /// Records the queues a reload chose; kept for the next beat if the write fails.
    async fn record_new_queues(&mut self) -> StoreResult<()> {
        let Some(queues) = self.contact.take_new_queues() else {
            return Ok(());
        };
        match self.store.register_worker(&self.worker, &queues).await {
            Ok(()) => {
                self.queues = queues;
                Ok(())
            }
            Err(error) => {
                self.contact.keep_new_queues(queues);
                Err(error)
            }
        }
    }
}

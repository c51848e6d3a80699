//! The rescuer: takes back, exactly once, the running jobs of workers that stopped
//! heartbeating (or that never learnt of their claim), on a task of its own so that a slow
//! rescue delays neither the heartbeat nor pruning.
//!
//! It only judges others after this worker has itself been in contact for `rescue_after`,
//! and never within `rescue_after` of a forward step of the database's clock.

use std::sync::Arc;
use std::time::Instant;

use tracing::warn;

use super::FleetTimings;
use super::clock::{ClockReading, ClockWatch, format_micros};
use super::contact::Contact;
use crate::store::{FleetStore, OrphanedJob, Timestamp};

pub(super) struct Rescuer {
    pub(super) store: Arc<dyn FleetStore>,
    pub(super) timings: FleetTimings,
    pub(super) contact: Arc<Contact>,
    pub(super) clock: ClockWatch,
}

impl Rescuer {
    pub(super) async fn run(mut self) {
        let mut ticks = tokio::time::interval(self.timings.heartbeat_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_forget: Option<Instant> = None;
        loop {
            ticks.tick().await;
            // Scanned every round, so that a clock step is seen even before this worker
            // may rescue; the clock comes with the orphans, one statement a round.
            let Some(orphans) = self.scan().await else {
                continue;
            };
            if !self.contact.may_rescue(&self.timings) {
                continue;
            }
            self.take_back(orphans).await;
            // Lost workers' rows only need to go eventually: once per `rescue_after`.
            if last_forget.is_none_or(|at| at.elapsed() >= self.timings.rescue_after) {
                match self
                    .store
                    .forget_lost_workers(self.timings.rescue_after)
                    .await
                {
                    Ok(()) => last_forget = Some(Instant::now()),
                    Err(error) => warn!("could not forget lost workers: {error}"),
                }
            }
        }
    }

    /// Reads the database's clock and the orphaned jobs; `None` when the clock stepped
    /// forward within the last `rescue_after`, or the scan failed.
    async fn scan(&mut self) -> Option<Vec<OrphanedJob>> {
        let sent = Instant::now();
        let scan = match self.store.rescue_scan(self.timings.rescue_after).await {
            Ok(scan) => scan,
            Err(error) => {
                warn!("could not look for orphaned jobs: {error}");
                return None;
            }
        };
        self.contact.record_paused(scan.paused);
        let reading = ClockReading {
            sent,
            received: Instant::now(),
            database: scan.now,
        };
        match self.clock.record(reading, self.timings.rescue_after) {
            Some(step) if step > 0 => warn!(
                "the database's clock jumped forward by {}: no rescue for {}, until every live \
                 worker has heartbeated on the new clock",
                format_micros(step),
                humantime::format_duration(self.timings.rescue_after)
            ),
            Some(step) => warn!(
                "the database's clock jumped back by {}: jobs of lost workers are rescued up to \
                 that much later",
                format_micros(step)
            ),
            None => {}
        }
        self.clock
            .allows_rescue(Instant::now())
            .then_some(scan.orphans)
    }

    /// Takes back, exactly once, each orphan still orphaned at the lease seen.
    async fn take_back(&self, orphans: Vec<OrphanedJob>) {
        let taken = self
            .store
            .take_back_orphans(orphans, self.timings.rescue_after, Timestamp::now())
            .await;
        let rescued = match taken {
            Ok(rescued) => rescued,
            Err(error) => return warn!("could not take back orphaned jobs: {error}"),
        };
        for job in rescued {
            let what = if job.requeued {
                "requeued"
            } else {
                "marked failed (worker lost)"
            };
            warn!(
                message_id = crate::logging::message_id::JOB_RESCUED,
                rescued_job = job.id,
                "rescued job {} from lost worker {}: {what}",
                job.id,
                job.lost_worker
            );
        }
    }
}

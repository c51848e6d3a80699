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
use crate::store::{JobStore, Timestamp};

pub(super) struct Rescuer {
    pub(super) store: Arc<dyn JobStore>,
    pub(super) timings: FleetTimings,
    pub(super) contact: Arc<Contact>,
    pub(super) clock: ClockWatch,
}

impl Rescuer {
    pub(super) async fn run(mut self) {
        let mut ticks = tokio::time::interval(self.timings.heartbeat_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            // Read every round, so that a step is seen even before this worker may rescue.
            let steady = self.clock_is_steady().await;
            if steady && self.contact.may_rescue(&self.timings) {
                self.rescue().await;
            }
        }
    }

    /// Reads the database's clock; false when it stepped forward within the last
    /// `rescue_after`, or cannot be read.
    async fn clock_is_steady(&mut self) -> bool {
        let sent = Instant::now();
        let database = match self.store.database_time().await {
            Ok(time) => time,
            Err(error) => {
                warn!("cannot read the database's clock, not rescuing this round: {error}");
                return false;
            }
        };
        let reading = ClockReading {
            sent,
            received: Instant::now(),
            database,
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
        self.clock.allows_rescue(Instant::now())
    }

    async fn rescue(&self) {
        match self
            .store
            .rescue_orphans(self.timings.rescue_after, Timestamp::now())
            .await
        {
            Ok(rescued) => {
                for job in rescued {
                    let what = if job.requeued {
                        "requeued"
                    } else {
                        "marked failed (worker lost)"
                    };
                    warn!(
                        rescued_job = job.id,
                        "rescued job {} from lost worker {}: {what}", job.id, job.lost_worker
                    );
                }
            }
            Err(error) => warn!("could not look for orphaned jobs: {error}"),
        }
    }
}

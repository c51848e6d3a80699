//! The scheduler: queues the recurring jobs of `[schedule.*]`. Every worker runs one; for
//! each slot, the store's slot table lets exactly one of them (on any host) queue the job,
//! so a slot runs once however many workers are up, and as long as any is.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::config::Schedule;
use crate::store::{FleetStore, NewJob, Timestamp};

/// How often the schedules are looked at: slots are minutes, so a run starts within a
/// second or so of its minute.
const TICK: Duration = Duration::from_secs(1);

/// A schedule with the attempts its job code gets.
#[derive(Debug, Clone)]
pub struct ScheduledJob {
    pub schedule: Schedule,
    pub max_attempts: u32,
}

pub(super) struct Scheduler {
    pub(super) store: Arc<dyn FleetStore>,
    pub(super) jobs: Vec<ScheduledJob>,
}

impl Scheduler {
    pub(super) async fn run(self) {
        // The last slot of each schedule this worker saw queued (by itself or another).
        let mut settled: HashMap<String, jiff::Timestamp> = HashMap::new();
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let now = jiff::Timestamp::now();
            for job in &self.jobs {
                let Some(slot) = job.schedule.due_slot(now) else {
                    continue;
                };
                if settled.get(&job.schedule.name) == Some(&slot) {
                    continue;
                }
                if self.queue(job, slot).await {
                    settled.insert(job.schedule.name.clone(), slot);
                }
            }
        }
    }

    /// Queues `slot`'s run of `job`'s schedule unless another worker did; false when the
    /// store could not be reached (the next tick tries again).
    async fn queue(&self, job: &ScheduledJob, slot: jiff::Timestamp) -> bool {
        let schedule = &job.schedule;
        let new_job = NewJob {
            queue: schedule.queue.clone(),
            code: schedule.code.clone(),
            payload: schedule.payload.clone(),
            delay: Duration::ZERO,
            max_attempts: job.max_attempts,
            unique_key: Some(schedule.unique_key(slot)),
        };
        let at = Timestamp(slot.as_microsecond());
        match self.store.enqueue_slot(&schedule.name, at, &new_job).await {
            Ok(Some(id)) => {
                info!(
                    job_id = id,
                    schedule = schedule.name,
                    "queued the {slot} run of schedule {} as job {id}",
                    schedule.name
                );
                true
            }
            Ok(None) => {
                debug!(
                    schedule = schedule.name,
                    "the {slot} run was queued by another worker"
                );
                true
            }
            Err(error) => {
                warn!(
                    schedule = schedule.name,
                    "could not queue the {slot} run of schedule {}: {error}", schedule.name
                );
                false
            }
        }
    }
}

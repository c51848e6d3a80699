//! Fleet membership: this worker's row in the database, its heartbeat, the rescue of other
//! workers' orphaned jobs, the pruning of old finished jobs, and the fence.
//!
//! The rescue protocol, in one place:
//! * every worker refreshes its heartbeat every `heartbeat_interval`, by the database's clock;
//! * a running job whose worker's heartbeat is older than `rescue_after` is taken back by
//!   whichever live worker notices first, in one guarded statement (so exactly once);
//! * each heartbeat names the job the worker runs: a job whose live worker has not named it
//!   for `rescue_after` since its claim (the claim's reply was lost on the way) is taken
//!   back the same way;
//! * a worker only rescues after it has itself been in contact with the database for
//!   `rescue_after`, so that after an outage every live worker has had time to refresh its
//!   heartbeat before anyone judges it lost;
//! * a worker that has not reached the database for two thirds of `rescue_after` stops its
//!   running job itself (the fence), so a rescued job is never still running somewhere.
//! * heartbeat ages are differences of the database's clock, so a step of that clock (an
//!   NTP correction, a resumed VM, `date -s`; on SQLite, this host's clock) would make every
//!   live worker look lost: each rescuer round reads the clock against the monotonic
//!   one, and after a forward step nobody is rescued for `rescue_after`, by when every live
//!   worker has heartbeated on the new clock.
//!
//! One role a file and a task: the [`heartbeat`] alone on its timer (so nothing else can
//! delay it, and with it the fence), the [`rescuer`], the [`pruner`]; they share what they
//! know through the [`Contact`], which the consumer reads (the fence, a lost lease) and
//! writes (the job it runs, the queues a reload chose). [`clock`] watches the database's
//! clock for steps.

mod clock;
mod contact;
mod heartbeat;
mod pruner;
mod rescuer;
mod scheduler;

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::warn;

pub use clock::clock;
pub use contact::Contact;
pub use scheduler::ScheduledJob;

use crate::store::{FleetStore, StoreResult, WorkerIdentity};

#[derive(Debug, Clone, Copy)]
pub struct FleetTimings {
    pub heartbeat_interval: Duration,
    pub rescue_after: Duration,
    pub retention: Option<Duration>,
    /// How long failed jobs are kept (`None`: until someone deletes or retries them).
    pub failed_retention: Option<Duration>,
}

impl FleetTimings {
    /// The timings `config` sets.
    pub fn of(config: &crate::config::Config) -> FleetTimings {
        FleetTimings {
            heartbeat_interval: config.heartbeat_interval,
            rescue_after: config.rescue_after,
            retention: config.retention,
            failed_retention: config.failed_retention,
        }
    }

    /// How long without contact before this worker stops its own running job.
    pub fn fence_after(&self) -> Duration {
        self.rescue_after * 2 / 3
    }

    /// How long the fenced job's process group gets between SIGTERM and SIGKILL: half the
    /// time left before others may rescue it.
    pub fn fence_grace(&self) -> Duration {
        (self.rescue_after - self.fence_after()) / 2
    }
}

/// This worker's membership in the fleet; the heartbeat task runs until [`Membership::leave`].
pub struct Membership {
    store: Arc<dyn FleetStore>,
    worker: WorkerIdentity,
    contact: Arc<Contact>,
    /// The heartbeat, rescuer and pruner tasks.
    tasks: Vec<JoinHandle<()>>,
}

impl Membership {
    /// Registers the worker and starts its heartbeat, rescuer and pruner.
    pub async fn join(
        store: Arc<dyn FleetStore>,
        worker: WorkerIdentity,
        queues: Vec<String>,
        timings: FleetTimings,
    ) -> StoreResult<Membership> {
        store.register_worker(&worker, &queues).await?;
        let contact = Arc::new(Contact::new());
        let heartbeat = heartbeat::Heartbeat {
            store: store.clone(),
            worker: worker.clone(),
            queues,
            timings,
            contact: contact.clone(),
        };
        let rescuer = rescuer::Rescuer {
            store: store.clone(),
            timings,
            contact: contact.clone(),
            clock: clock::ClockWatch::default(),
        };
        let pruner = pruner::Pruner {
            store: store.clone(),
            timings,
        };
        Ok(Membership {
            store,
            worker,
            contact,
            tasks: vec![
                tokio::spawn(heartbeat.run()),
                tokio::spawn(rescuer.run()),
                tokio::spawn(pruner.run()),
            ],
        })
    }

    /// Starts queueing the recurring jobs of `jobs`, if any.
    pub fn schedule(&mut self, jobs: Vec<ScheduledJob>) {
        if jobs.is_empty() {
            return;
        }
        let scheduler = scheduler::Scheduler {
            store: self.store.clone(),
            jobs,
        };
        self.tasks.push(tokio::spawn(scheduler.run()));
    }

    pub fn contact(&self) -> Arc<Contact> {
        self.contact.clone()
    }

    /// Stops the fleet tasks and removes the worker's row (best effort: a row left behind is
    /// cleaned up by the next rescue).
    pub async fn leave(self) {
        for task in &self.tasks {
            task.abort();
        }
        if let Err(error) = self.store.unregister_worker(&self.worker).await {
            warn!("could not remove this worker's registration: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fence_comes_well_before_the_rescue() {
        let timings = FleetTimings {
            heartbeat_interval: Duration::from_secs(5),
            rescue_after: Duration::from_secs(30),
            retention: None,
            failed_retention: None,
        };
        assert_eq!(timings.fence_after(), Duration::from_secs(20));
        assert_eq!(timings.fence_grace(), Duration::from_secs(5));
        assert!(timings.fence_after() + timings.fence_grace() < timings.rescue_after);
    }
}

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
//!   live worker look lost: each housekeeping round reads the clock against the monotonic
//!   one, and after a forward step nobody is rescued for `rescue_after`, by when every live
//!   worker has heartbeated on the new clock.
//!
//! The heartbeat is alone on its task and timer: rescuing and pruning run on another task
//! (housekeeping), so a slow rescue or a large prune never delays the heartbeat, and with it
//! the fence. Pruning deletes one batch a round, and rounds follow each other only while
//! there is a backlog.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::store::{JobId, JobStore, StoreResult, Timestamp, WorkerIdentity, saturating_micros};

/// How often old finished jobs are pruned, when there is no backlog.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Finished jobs deleted per pruning round: one short statement, never a long loop.
const PRUNE_BATCH: i64 = 5000;

#[derive(Debug, Clone, Copy)]
pub struct FleetTimings {
    pub heartbeat_interval: Duration,
    pub rescue_after: Duration,
    pub retention: Option<Duration>,
}

impl FleetTimings {
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

/// What the heartbeat task knows about the database, shared with the consumer.
#[derive(Debug)]
pub struct Contact {
    state: Mutex<ContactState>,
    /// Woken when the heartbeat learns that this worker was declared lost while it ran a
    /// job: the job is someone else's now.
    lease_lost: tokio::sync::Notify,
}

#[derive(Debug)]
struct ContactState {
    /// When the last successful heartbeat was *sent* (so never later than the database's
    /// own record of it).
    last_ok: Instant,
    /// Since when heartbeats have been failing, if they are.
    outage_since: Option<SystemTime>,
    /// Since when heartbeats have been getting through without a break.
    connected_since: Instant,
    current_job: Option<JobId>,
    /// A job this worker was found to have lost (its registration taken away while it ran).
    lost_job: Option<JobId>,
    /// Queues a reload chose, for the heartbeat to record with its next beat.
    new_queues: Option<Vec<String>>,
}

impl Contact {
    fn new() -> Contact {
        Contact {
            state: Mutex::new(ContactState {
                last_ok: Instant::now(),
                outage_since: None,
                connected_since: Instant::now(),
                current_job: None,
                lost_job: None,
                new_queues: None,
            }),
            lease_lost: tokio::sync::Notify::new(),
        }
    }

    /// Resolves when this worker learns it lost `job` (its registration was taken away
    /// while it ran the job, as a rescue does). Remembered, so a loop that was busy when
    /// the heartbeat found out still hears it; never about another job.
    pub async fn lease_lost(&self, job: JobId) {
        loop {
            let notified = self.lease_lost.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().lost_job == Some(job) {
                return;
            }
            notified.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ContactState> {
        self.state.lock().expect("contact lock")
    }

    pub fn last_ok(&self) -> Instant {
        self.lock().last_ok
    }

    pub fn outage_since(&self) -> Option<SystemTime> {
        self.lock().outage_since
    }

    pub fn set_current_job(&self, job: Option<JobId>) {
        self.lock().current_job = job;
    }

    fn current_job(&self) -> Option<JobId> {
        self.lock().current_job
    }

    /// Hands the queues a reload chose to the heartbeat, which records them with its next
    /// beat: the consumer never waits on the database for a reload, even while a job runs.
    pub fn record_queues(&self, queues: Vec<String>) {
        self.lock().new_queues = Some(queues);
    }

    fn take_new_queues(&self) -> Option<Vec<String>> {
        self.lock().new_queues.take()
    }

    /// Puts back queues the heartbeat could not record, unless a newer reload replaced them.
    fn keep_new_queues(&self, queues: Vec<String>) {
        self.lock().new_queues.get_or_insert(queues);
    }

    /// Records a successful heartbeat; returns since when the outage it ends had lasted.
    fn record_ok(&self, sent: Instant) -> Option<SystemTime> {
        let mut state = self.lock();
        state.last_ok = sent;
        let ended = state.outage_since.take();
        if ended.is_some() {
            state.connected_since = sent;
        }
        ended
    }

    /// Whether this worker may judge others lost: it has itself been in contact without a
    /// break for `rescue_after`, and is in contact now.
    fn may_rescue(&self, timings: &FleetTimings) -> bool {
        let state = self.lock();
        state.outage_since.is_none()
            && state.connected_since.elapsed() >= timings.rescue_after
            && state.last_ok.elapsed() < timings.fence_after()
    }

    /// Records a failed heartbeat; returns since when the database has been unavailable.
    fn record_failure(&self) -> SystemTime {
        *self.lock().outage_since.get_or_insert_with(SystemTime::now)
    }

    /// Resolves once no heartbeat has succeeded for `limit`.
    pub async fn lost_for(&self, limit: Duration) {
        loop {
            let last = self.last_ok();
            tokio::time::sleep_until((last + limit).into()).await;
            if self.last_ok() == last {
                return;
            }
        }
    }
}

/// This worker's membership in the fleet; the heartbeat task runs until [`Membership::leave`].
pub struct Membership {
    store: Arc<dyn JobStore>,
    worker: WorkerIdentity,
    contact: Arc<Contact>,
    heartbeat: JoinHandle<()>,
    housekeeping: JoinHandle<()>,
}

impl Membership {
    /// Registers the worker and starts its heartbeat.
    pub async fn join(
        store: Arc<dyn JobStore>,
        worker: WorkerIdentity,
        queues: Vec<String>,
        timings: FleetTimings,
    ) -> StoreResult<Membership> {
        store.register_worker(&worker, &queues).await?;
        let contact = Arc::new(Contact::new());
        let heartbeat = Heartbeat {
            store: store.clone(),
            worker: worker.clone(),
            queues,
            timings,
            contact: contact.clone(),
        };
        let housekeeping = Housekeeping {
            store: store.clone(),
            timings,
            contact: contact.clone(),
            clock: ClockWatch::default(),
        };
        Ok(Membership {
            store,
            worker,
            contact,
            heartbeat: tokio::spawn(heartbeat.run()),
            housekeeping: tokio::spawn(housekeeping.run()),
        })
    }

    pub fn contact(&self) -> Arc<Contact> {
        self.contact.clone()
    }

    /// Stops the heartbeat and removes the worker's row (best effort: a row left behind is
    /// cleaned up by the next rescue).
    pub async fn leave(self) {
        self.heartbeat.abort();
        self.housekeeping.abort();
        if let Err(error) = self.store.unregister_worker(&self.worker).await {
            warn!("could not remove this worker's registration: {error}");
        }
    }
}

struct Heartbeat {
    store: Arc<dyn JobStore>,
    worker: WorkerIdentity,
    queues: Vec<String>,
    timings: FleetTimings,
    contact: Arc<Contact>,
}

impl Heartbeat {
    async fn run(mut self) {
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
                    self.contact.lock().lost_job = Some(job);
                    self.contact.lease_lost.notify_waiters();
                }
                None => warn!("this worker's registration was gone (declared lost?)"),
            }
            info!("registering this worker again");
            self.store
                .register_worker(&self.worker, &self.queues)
                .await?;
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

/// Rescue and pruning, on their own task so that neither can delay the heartbeat.
struct Housekeeping {
    store: Arc<dyn JobStore>,
    timings: FleetTimings,
    contact: Arc<Contact>,
    clock: ClockWatch,
}

impl Housekeeping {
    async fn run(mut self) {
        let mut ticks = tokio::time::interval(self.timings.heartbeat_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_prune = Instant::now();
        loop {
            ticks.tick().await;
            // Read every round, so that a step is seen even before this worker may rescue.
            let steady = self.clock_is_steady().await;
            if steady && self.contact.may_rescue(&self.timings) {
                self.rescue().await;
            }
            if Instant::now() >= next_prune {
                let backlog = self.prune_round().await;
                next_prune = Instant::now() + if backlog { Duration::ZERO } else { PRUNE_EVERY };
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

    /// Deletes one batch of finished jobs older than the retention; true when a full batch
    /// went (more may be waiting: the next round comes at the next tick).
    async fn prune_round(&self) -> bool {
        let Some(retention) = self.timings.retention else {
            return false;
        };
        let before = Timestamp::now().minus(retention);
        match self.store.prune_batch(before, PRUNE_BATCH).await {
            Ok(0) => false,
            Ok(pruned) => {
                info!("pruned {pruned} finished job(s) older than the retention");
                pruned >= PRUNE_BATCH as u64
            }
            Err(error) => {
                warn!("could not prune finished jobs: {error}");
                false
            }
        }
    }
}

/// How far the database's clock and the monotonic clock may drift apart between two
/// readings without it being a step: NTP slews by at most 0.5 ms a second.
const CLOCK_TOLERANCE: Duration = Duration::from_millis(250);

/// The database's clock as seen against this host's monotonic clock.
#[derive(Debug, Default)]
struct ClockWatch {
    last: Option<ClockReading>,
    /// No rescue before this: the clock stepped forward.
    frozen_until: Option<Instant>,
}

/// One reading of the database's clock, and when (monotonic) it was asked and answered.
#[derive(Debug, Clone, Copy)]
struct ClockReading {
    sent: Instant,
    received: Instant,
    database: Timestamp,
}

impl ClockWatch {
    /// Takes a reading; returns the step in microseconds (positive: forward) when the
    /// database's clock moved unlike the monotonic one by more than the two round trips and
    /// [`CLOCK_TOLERANCE`] allow. A forward step freezes rescue for `rescue_after`.
    fn record(&mut self, reading: ClockReading, rescue_after: Duration) -> Option<i64> {
        let previous = self.last.replace(reading)?;
        let moved = reading.database.0 - previous.database.0;
        let shortest = saturating_micros(reading.sent.saturating_duration_since(previous.received));
        let longest = saturating_micros(reading.received.duration_since(previous.sent));
        let tolerance = saturating_micros(CLOCK_TOLERANCE);
        if (shortest - tolerance..=longest + tolerance).contains(&moved) {
            return None;
        }
        let step = moved - (shortest + longest) / 2;
        if step > 0 {
            self.frozen_until = Some(reading.received + rescue_after);
        }
        Some(step)
    }

    fn allows_rescue(&self, now: Instant) -> bool {
        self.frozen_until.is_none_or(|until| now >= until)
    }
}

fn format_micros(step: i64) -> humantime::FormattedDuration {
    // Whole milliseconds: the round trips make anything finer noise.
    humantime::format_duration(Duration::from_millis(step.unsigned_abs() / 1000))
}

/// A wall-clock time as `HH:MM:SS` UTC, for "unavailable since" messages.
pub fn clock(time: SystemTime) -> String {
    let text = humantime::format_rfc3339_seconds(time).to_string();
    text.get(11..19).unwrap_or(&text).to_string()
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
        };
        assert_eq!(timings.fence_after(), Duration::from_secs(20));
        assert_eq!(timings.fence_grace(), Duration::from_secs(5));
        assert!(timings.fence_after() + timings.fence_grace() < timings.rescue_after);
    }

    fn reading(at: Instant, database_secs: f64) -> ClockReading {
        ClockReading {
            sent: at,
            received: at + Duration::from_millis(2),
            database: Timestamp((database_secs * 1e6) as i64),
        }
    }

    #[test]
    fn a_clock_that_runs_with_the_monotonic_one_is_steady() {
        let start = Instant::now();
        let rescue_after = Duration::from_secs(30);
        let mut watch = ClockWatch::default();
        for n in 0..10 {
            let at = start + Duration::from_secs(5 * n);
            // A little drift and jitter, as NTP slewing and scheduling give.
            let database = 1_000.0 + 5.0 * n as f64 * 1.0005 + 0.01 * (n % 3) as f64;
            assert_eq!(watch.record(reading(at, database), rescue_after), None);
        }
        assert!(watch.allows_rescue(start + Duration::from_secs(50)));
    }

    #[test]
    fn a_forward_step_freezes_rescue_for_rescue_after() {
        let start = Instant::now();
        let rescue_after = Duration::from_secs(30);
        let mut watch = ClockWatch::default();
        assert_eq!(watch.record(reading(start, 1_000.0), rescue_after), None);
        let after_step = start + Duration::from_secs(5);
        let step = watch
            .record(reading(after_step, 1_030.0), rescue_after)
            .unwrap();
        assert!((24_990_000..=25_010_000).contains(&step), "{step}");
        assert!(!watch.allows_rescue(after_step));
        assert!(!watch.allows_rescue(after_step + Duration::from_secs(29)));
        assert!(watch.allows_rescue(after_step + Duration::from_secs(31)));
        let later = after_step + Duration::from_secs(5);
        assert_eq!(watch.record(reading(later, 1_035.0), rescue_after), None);
    }

    #[test]
    fn a_backward_step_is_seen_but_does_not_freeze() {
        let start = Instant::now();
        let rescue_after = Duration::from_secs(30);
        let mut watch = ClockWatch::default();
        watch.record(reading(start, 1_000.0), rescue_after);
        let at = start + Duration::from_secs(5);
        let step = watch.record(reading(at, 995.0), rescue_after).unwrap();
        assert!(step < -9_000_000, "{step}");
        assert!(watch.allows_rescue(at));
    }

    #[test]
    fn a_slow_answer_is_not_a_step() {
        let start = Instant::now();
        let mut watch = ClockWatch::default();
        watch.record(reading(start, 1_000.0), Duration::from_secs(30));
        // The query took 3 s to answer (a lock wait): the database read its clock somewhere
        // in that window.
        let slow = ClockReading {
            sent: start + Duration::from_secs(5),
            received: start + Duration::from_secs(8),
            database: Timestamp(1_007_500_000),
        };
        assert_eq!(watch.record(slow, Duration::from_secs(30)), None);
    }

    #[test]
    fn clock_shows_hours_minutes_seconds() {
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(3600 + 62);
        assert_eq!(clock(time), "01:01:02");
    }
}

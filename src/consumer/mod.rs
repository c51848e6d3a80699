//! The daemon loop: claim the next job from the highest-priority non-empty queue, run it,
//! record its result, and look again from the first queue.
//!
//! The loop only talks to the [`WorkerStore`] roles. It never dies on one bad job (a malformed
//! payload, a missing placeholder field, a command that cannot start all fail that job) nor
//! on a database outage (it backs off and retries, keeping a finished job's result until it
//! can be written). It stays responsive while a job runs: the same loop that watches the
//! child sends the watchdog pings and STATUS updates, applies reloads and handles stops, so a
//! hung loop stops the pings and systemd restarts the worker.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{debug, error, info, warn};

use crate::akeneo::restart_signal::RestartSignal;
use crate::breaker::LaunchBreaker;
use crate::config::{Config, Transport};
use crate::exit::{ExitCode, Failure};
use crate::fleet::{Contact, FleetTimings, Membership, ScheduledJob, clock};
use crate::notify::Notifier;
use crate::signals::{Signals, StopLevel};
use crate::store::{JobId, Poll, StoreError, Turn, WorkerIdentity, WorkerStore};
use crate::units::format_duration;
use crate::worker::resident_memory_bytes;

mod completer;
mod executor;
mod idle;

use idle::WakeSources;

/// The first wait after a database error; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often STATUS is refreshed (and a store's per-job heartbeat written) while a job runs;
/// more often when the watchdog needs it. Under 5 s: Akeneo expects a job heartbeat at
/// least every 5 s.
const STATUS_REFRESH: Duration = Duration::from_secs(4);
/// How many turns in a row may find a due job another worker is taking before the worker
/// sleeps a poll interval (their waits, 0 to 16 ms, add up to about 100 ms).
const MOST_CONTENDED_TURNS: u32 = 12;

/// What the operator asked of this consumer run.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// The queues to consume, highest priority first.
    pub queues: Vec<String>,
    /// `--sleep`, which outlives reloads; otherwise the config's `poll_interval` applies.
    pub sleep: Option<Duration>,
    /// Exit after this many jobs.
    pub limit: Option<u64>,
    /// Exit, between jobs, once this long has passed.
    pub time_limit: Option<Duration>,
    /// Exit, between jobs, once the worker's own RSS passes this many bytes.
    pub memory_limit: Option<u64>,
}

/// Re-reads the configuration and the queue selection, for SIGHUP.
pub type Reloader = Box<dyn Fn() -> Result<(Config, Vec<String>), Failure>>;

/// Why the consumer stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    Signal,
    JobLimit,
    TimeLimit,
    MemoryLimit,
    /// `pim-job-queue stop-workers`, or Symfony's `messenger:stop-workers` in Akeneo mode:
    /// a graceful restart under systemd and supervisor.
    StopWorkersRequested,
    /// The environment cannot run jobs (the Akeneo preflight failed after a reload or after
    /// launches kept failing): a configuration problem for a person to fix.
    CannotLaunch(String),
    /// The job store refuses this worker in a way waiting cannot fix (a SQLite file this
    /// user may not write): exit with the store's code (77) instead of retrying forever.
    StoreUnusable(ExitCode, String),
}

impl StopReason {
    pub fn describe(&self) -> String {
        match self {
            StopReason::Signal => "stop signal".into(),
            StopReason::JobLimit => "job limit reached".into(),
            StopReason::TimeLimit => "time limit reached".into(),
            StopReason::MemoryLimit => "memory limit reached".into(),
            StopReason::StopWorkersRequested => "stop-workers requested".into(),
            StopReason::CannotLaunch(reason) => format!("jobs cannot be launched: {reason}"),
            StopReason::StoreUnusable(_, reason) => format!("the job store is unusable: {reason}"),
        }
    }
}

pub struct Consumer {
    store: Arc<dyn WorkerStore>,
    config: Config,
    options: ConsumerOptions,
    worker: WorkerIdentity,
    signals: Signals,
    notifier: Arc<Notifier>,
    reloader: Reloader,
    timings: FleetTimings,
    started: Instant,
    jobs_done: u64,
    /// The stop-workers generation seen at start; a higher one means "exit".
    stop_generation: Option<i64>,
    backoff: Backoff,
    wake: WakeSources,
    /// Symfony's `messenger:stop-workers` signal, in Akeneo mode.
    restart_signal: Option<RestartSignal>,
    /// When this worker started, in seconds since the epoch, to compare with that signal.
    started_at_unix: f64,
    breaker: LaunchBreaker,
    /// The Akeneo preflight must run again before the next claim (after a reload).
    preflight_due: bool,
    /// The last job's result, recorded with the next claim (see `completer`).
    finished: Option<completer::Finished>,
    /// A claim's answer never arrived: before the next one, jobs claimed under this
    /// worker's token that it never learnt of are put back.
    claim_unanswered: bool,
    /// Jobs this worker ran whose result it could not record; never put back as unanswered.
    unrecorded: Vec<JobId>,
    /// Turns in a row that found a due job another worker was taking.
    contended: u32,
    /// The fleet-wide pauses as STATUS last said them.
    paused: String,
}

impl Consumer {
    pub fn new(
        store: Arc<dyn WorkerStore>,
        config: Config,
        options: ConsumerOptions,
        worker: WorkerIdentity,
        signals: Signals,
        notifier: Arc<Notifier>,
        reloader: Reloader,
    ) -> Self {
        let timings = FleetTimings::of(&config);
        Consumer {
            store,
            options,
            worker,
            signals,
            notifier,
            reloader,
            timings,
            started: Instant::now(),
            jobs_done: 0,
            stop_generation: None,
            backoff: Backoff::default(),
            wake: WakeSources::default(),
            restart_signal: match &config.transport {
                Transport::Akeneo(settings) => Some(RestartSignal::new(&settings.cache_dir())),
                Transport::Native => None,
            },
            started_at_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
            breaker: match &config.transport {
                Transport::Akeneo(settings) => {
                    LaunchBreaker::new(settings.max_failed_launches, settings.failed_launch_window)
                }
                Transport::Native => LaunchBreaker::disabled(),
            },
            preflight_due: false,
            finished: None,
            claim_unanswered: false,
            unrecorded: Vec::new(),
            contended: 0,
            paused: String::new(),
            config,
        }
    }

    /// Runs until a stop condition; returns which.
    pub async fn run(&mut self) -> StopReason {
        let membership = match self.join_fleet().await {
            Ok(membership) => membership,
            Err(reason) => {
                self.notifier.stopping("Stopping");
                return reason;
            }
        };
        self.wake = self.open_wake_sources().await;
        info!(
            worker = %self.worker.describe(),
            "consuming queues {} (highest priority first)",
            self.options.queues.join(", ")
        );
        self.notifier.ready(&self.idle_status());
        let contact = membership.contact();
        let reason = loop {
            self.ping_watchdog_if_due();
            if let Some(reason) = self.limit_reached() {
                break reason;
            }
            match self.next_step(&contact).await {
                Ok(Some(reason)) => break reason,
                Ok(None) => self.backoff.reset(),
                Err(error) => match unusable(&error) {
                    Some(reason) => break reason,
                    None => self.wait_after_error(&error, &contact).await,
                },
            }
        };
        self.write_finished().await;
        self.notifier.stopping("Stopping");
        self.db(membership.leave()).await;
        reason
    }

    fn shutdown(&self) -> &crate::signals::Shutdown {
        &self.signals.shutdown
    }

    /// The recurring jobs this worker helps queue, with their codes' attempts.
    fn scheduled_jobs(&self) -> Vec<ScheduledJob> {
        self.config
            .schedules
            .iter()
            .map(|schedule| ScheduledJob {
                schedule: schedule.clone(),
                max_attempts: self.config.max_attempts(&schedule.code),
            })
            .collect()
    }

    /// Registers in the fleet, retrying through outages; why not when stopped meanwhile or
    /// refused for good.
    async fn join_fleet(&mut self) -> Result<Membership, StopReason> {
        loop {
            let joined = self
                .db(Membership::join(
                    self.store.clone(),
                    self.worker.clone(),
                    self.options.queues.clone(),
                    self.timings,
                ))
                .await;
            match joined {
                Ok(mut membership) => {
                    membership.schedule(self.scheduled_jobs());
                    return Ok(membership);
                }
                Err(error) => {
                    if let Some(reason) = unusable(&error) {
                        return Err(reason);
                    }
                    let delay = self.backoff.next_delay();
                    self.notifier.status(&format!(
                        "Waiting for database (attempt {}, next in {})",
                        self.backoff.attempts,
                        format_duration(delay)
                    ));
                    warn!("cannot register this worker: {error}");
                    self.pause(delay, StopLevel::Drain).await;
                }
            }
            if self.shutdown().is_stopping() {
                return Err(StopReason::Signal);
            }
        }
    }

    fn poll_interval(&self) -> Duration {
        self.options.sleep.unwrap_or(self.config.poll_interval)
    }

    fn idle_status(&self) -> String {
        let queues = self.options.queues.join(", ");
        if self.paused.is_empty() {
            format!("Idle, waiting for jobs on {queues}")
        } else {
            format!(
                "Idle, waiting for jobs on {queues}; paused: {}",
                self.paused
            )
        }
    }

    /// Says a change of the fleet-wide pauses in STATUS, as the rescuer's round read them.
    fn note_pauses(&mut self, contact: &Contact) {
        if let Some(paused) = contact.paused_unless(&self.paused) {
            self.paused = paused;
            self.notifier.status(&self.idle_status());
        }
    }

    /// One pass: a turn (the last job's result, a claim, the stop-workers generation, in
    /// one transaction), then run the job or sleep.
    async fn next_step(&mut self, contact: &Contact) -> Result<Option<StopReason>, StoreError> {
        if self.symfony_stop_requested() {
            return Ok(Some(StopReason::StopWorkersRequested));
        }
        self.note_pauses(contact);
        if self.breaker.blocked_for().is_some() || self.preflight_due {
            self.write_finished().await;
        }
        if let Some(reason) = self.launching_blocked().await {
            return Ok(reason);
        }
        // A job claimed now would be fenced at once: wait for the heartbeat to get through.
        if contact.last_ok().elapsed() >= self.timings.fence_after() {
            self.write_finished().await;
            return Err(StoreError::Unavailable(
                "no heartbeat has reached the database recently; not taking jobs".into(),
            ));
        }
        self.put_back_unanswered_claims().await?;
        let poll = self.take_turn().await?;
        if self.stop_requested_by_operator(poll.stop_generation) {
            if let Some(job) = &poll.job {
                self.give_back_claim(job).await;
            }
            return Ok(Some(StopReason::StopWorkersRequested));
        }
        self.wake
            .note_claim(poll.job.is_some(), self.poll_interval());
        self.contended = if poll.contended {
            self.contended + 1
        } else {
            0
        };
        match poll.job {
            Some(job) if self.shutdown().is_stopping() => self.give_back_claim(&job).await,
            Some(job) => {
                contact.set_current_job(Some(job.id));
                self.process(job, contact).await;
                contact.set_current_job(None);
                self.jobs_done += 1;
                self.notifier.status(&self.idle_status());
            }
            None if poll.contended && self.contended <= MOST_CONTENDED_TURNS => {
                // Another worker is taking the due job this turn saw; the next may be free
                // at once. Not a poll interval's sleep: that is the stall of a busy queue.
                let step = u64::from(self.contended - 1).min(4);
                self.pause(Duration::from_millis(step * step), StopLevel::Drain)
                    .await;
            }
            None => {
                debug!("no job due");
                self.notifier.status(&self.idle_status());
                self.idle(contact).await;
            }
        }
        Ok(None)
    }

    /// The store's turn, carrying the last job's result. On an error the result is kept
    /// for the next turn (or written by itself when waiting cannot help), and the claim may
    /// have gone through unanswered.
    async fn take_turn(&mut self) -> Result<Poll, StoreError> {
        let finished = self.finished.take();
        let turn = Turn {
            queues: &self.options.queues,
            worker: &self.worker,
            finished: finished
                .as_ref()
                .map(|finished| (&finished.job.lease, &finished.completion)),
            pass_over: self.pass_over(),
            caps: &self.config.caps,
        };
        let answer = self.db(self.store.next_job(&turn)).await;
        match answer {
            Ok(poll) => {
                if let (Some(finished), Some(false)) = (&finished, poll.recorded) {
                    warn!(
                        job_id = finished.job.id,
                        "result not recorded: the job is no longer held by this worker (taken \
                         back, or recorded by an earlier attempt whose answer was lost)"
                    );
                }
                Ok(poll)
            }
            Err(error) => {
                self.claim_unanswered = true;
                self.finished = finished;
                if !error.is_transient() {
                    self.write_finished().await;
                }
                Err(error)
            }
        }
    }

    /// After turns that lost the race for a head: 1 to 3 of the next jobs may be taken
    /// instead, varied by worker and by turn so that racing workers spread out.
    fn pass_over(&self) -> u32 {
        match self.contended {
            0 => 0,
            turns => (self.worker.pid + turns) % 3 + 1,
        }
    }

    /// After a claim whose answer never arrived: any job still claimed under this worker's
    /// token, other than the one whose result it holds and those it ran but could not
    /// record, was never seen by this worker, so never started: back to its queue,
    /// refunded, before the next claim.
    async fn put_back_unanswered_claims(&mut self) -> Result<(), StoreError> {
        if !self.claim_unanswered {
            return Ok(());
        }
        let mut keep = self.unrecorded.clone();
        keep.extend(
            self.finished
                .as_ref()
                .map(|finished| finished.job.lease.job_id),
        );
        let put_back = self
            .db(self.store.put_back_unanswered_claims(&self.worker, &keep))
            .await?;
        self.claim_unanswered = false;
        if put_back > 0 {
            info!("{put_back} job(s) claimed by an unanswered claim put back in their queue");
        }
        Ok(())
    }

    /// `messenger:stop-workers` run in the PIM since this worker started.
    fn symfony_stop_requested(&mut self) -> bool {
        let started = self.started_at_unix;
        let Some(signal) = self.restart_signal.as_mut() else {
            return false;
        };
        match signal.requested_at() {
            Some(requested) if requested > started => {
                info!("messenger:stop-workers was run in the PIM: exiting to be restarted");
                true
            }
            _ => false,
        }
    }

    /// Keeps the worker from claiming while its launches cannot work. `Some(None)`: this
    /// pass is spent waiting; `Some(Some(reason))`: stop; `None`: claim.
    async fn launching_blocked(&mut self) -> Option<Option<StopReason>> {
        if let Some(left) = self.breaker.blocked_for() {
            if !left.is_zero() {
                self.pause(left.min(self.heartbeat_slice()), StopLevel::Drain)
                    .await;
                return Some(None);
            }
            self.preflight_due = true;
        }
        if !self.preflight_due {
            return None;
        }
        self.preflight_due = false;
        match self.run_preflight().await {
            Ok(()) => {
                self.breaker.allow_probe();
                self.notifier.status(&self.idle_status());
                None
            }
            Err(reason) => Some(Some(StopReason::CannotLaunch(reason))),
        }
    }

    /// The Akeneo preflight, with watchdog pings while PHP boots.
    async fn run_preflight(&mut self) -> Result<(), String> {
        let Transport::Akeneo(settings) = self.config.transport.clone() else {
            return Ok(());
        };
        self.notifier.status("Checking that the PIM can run jobs");
        self.notifier
            .while_pinging(crate::akeneo::preflight::check(&settings))
            .await
            .map(drop)
    }

    /// Whether `pim-job-queue stop-workers` ran since this worker's first turn.
    fn stop_requested_by_operator(&mut self, current: i64) -> bool {
        let seen_at_start = *self.stop_generation.get_or_insert(current);
        current > seen_at_start
    }

    fn limit_reached(&self) -> Option<StopReason> {
        if self.shutdown().is_stopping() {
            return Some(StopReason::Signal);
        }
        if self
            .options
            .limit
            .is_some_and(|limit| self.jobs_done >= limit)
        {
            return Some(StopReason::JobLimit);
        }
        if self
            .options
            .time_limit
            .is_some_and(|limit| self.started.elapsed() >= limit)
        {
            return Some(StopReason::TimeLimit);
        }
        let over_memory = self
            .options
            .memory_limit
            .zip(resident_memory_bytes())
            .is_some_and(|(limit, rss)| rss > limit);
        over_memory.then_some(StopReason::MemoryLimit)
    }

    /// The longest this loop may go without looking up: the watchdog's half-period.
    fn heartbeat_slice(&self) -> Duration {
        self.notifier
            .watchdog_interval()
            .unwrap_or(Duration::MAX)
            .min(STATUS_REFRESH)
    }

    /// A store call, with the watchdog pinged while it waits: every call ends within the
    /// store's deadline, which may be longer than a ping interval.
    async fn db<T>(&self, call: impl std::future::Future<Output = T>) -> T {
        self.notifier.while_pinging(call).await
    }

    fn ping_watchdog_if_due(&self) {
        self.notifier.watchdog_if_due();
    }

    /// Re-reads the config and the queue selection. An invalid new configuration is logged
    /// and the old one kept; a running job is never disturbed. No database call: the
    /// heartbeat records new queues with its next beat, so a reload during a job never
    /// holds up the loop that watches it.
    fn reload(&mut self, contact: &Contact) {
        self.notifier.reloading();
        match (self.reloader)() {
            Ok((mut config, queues)) => {
                self.warn_about_restart_only_changes(&config);
                if !same_transport(&config.transport, &self.config.transport) {
                    warn!(
                        "transport and [akeneo] changes take effect at the next restart; \
                         keeping the running ones"
                    );
                }
                config.transport = self.config.transport.clone();
                self.preflight_due = matches!(config.transport, Transport::Akeneo(_));
                if queues != self.options.queues {
                    info!(
                        "reloaded: now consuming {} (was {})",
                        queues.join(", "),
                        self.options.queues.join(", ")
                    );
                    contact.record_queues(queues.clone());
                } else {
                    info!("reloaded: queues unchanged ({})", queues.join(", "));
                }
                self.config = config;
                self.options.queues = queues;
            }
            Err(failure) => error!(
                "reload failed, keeping the previous configuration: {}",
                failure.message
            ),
        }
        self.notifier.ready(&self.idle_status());
    }

    fn warn_about_restart_only_changes(&self, new: &Config) {
        let old = &self.config;
        if new.database_url != old.database_url
            || new.wake_dir != old.wake_dir
            || new.heartbeat_interval != old.heartbeat_interval
            || new.rescue_after != old.rescue_after
            || new.retention != old.retention
        {
            warn!(
                "database_url, wake_dir, heartbeat_interval, rescue_after and retention \
                 changes take effect at the next restart"
            );
        }
    }

    fn aborting(&self) -> bool {
        self.shutdown().level() >= StopLevel::Abort
    }
}

/// Whether two transports are the same as configured (the detected launcher aside).
fn same_transport(a: &Transport, b: &Transport) -> bool {
    match (a, b) {
        (Transport::Akeneo(a), Transport::Akeneo(b)) => a.as_configured() == b.as_configured(),
        (a, b) => a == b,
    }
}

/// Why the worker must stop, for a store error that no retry can fix: whichever call meets
/// it first (opening, registering, claiming), the worker ends the same way.
/// The exit code and message are the ones every command gives for that error.
fn unusable(error: &StoreError) -> Option<StopReason> {
    if !matches!(error, StoreError::PermissionDenied(_)) {
        return None;
    }
    let failure = Failure::from(error.clone());
    Some(StopReason::StoreUnusable(failure.exit, failure.message))
}

fn unavailable_status(contact: &Contact) -> String {
    match contact.outage_since() {
        Some(since) => format!("Database unavailable since {}, retrying", clock(since)),
        None => "Database unavailable, retrying".into(),
    }
}

/// Capped exponential backoff for database retries.
#[derive(Debug, Default)]
pub struct Backoff {
    pub attempts: u32,
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        self.attempts += 1;
        let factor = 1u32 << (self.attempts - 1).min(5);
        (FIRST_BACKOFF * factor).min(MAX_BACKOFF)
    }

    pub fn reset(&mut self) {
        self.attempts = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let mut backoff = Backoff::default();
        let delays: Vec<u64> = (0..8).map(|_| backoff.next_delay().as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), FIRST_BACKOFF);
    }
}

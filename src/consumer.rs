//! The daemon loop: claim the next job from the highest-priority non-empty queue, run it,
//! record its result, and look again from the first queue.
//!
//! The loop only talks to the [`JobStore`] trait. It never dies on one bad job (a malformed
//! payload, a missing placeholder field, a command that cannot start all fail that job) nor
//! on a database outage (it backs off and retries, keeping a finished job's result until it
//! can be written). It stays responsive while a job runs: the same loop that watches the
//! child sends the watchdog pings and STATUS updates, applies reloads and handles stops, so a
//! hung loop stops the pings and systemd restarts the worker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::akeneo::restart_signal::RestartSignal;
use crate::breaker::{FailedLaunch, LaunchBreaker};
use crate::config::{Config, Transport};
use crate::exit::Failure;
use crate::fleet::{Contact, FleetTimings, Membership, clock};
use crate::notify::Notifier;
use crate::runner::{self, Ending, JobLaunch, RunReport, RunningJob};
use crate::signals::{Signals, StopLevel};
use crate::store::{
    ClaimedJob, Completion, JobResult, JobStore, PushListener, Release, StoreError, Timestamp,
    WorkerIdentity,
};
use crate::template::JobFacts;
use crate::units::format_duration;
use crate::wake::{WakeDir, WakeSocket};
use crate::worker::resident_memory_bytes;

/// The first wait after a database error; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often STATUS is refreshed (and a store's per-job heartbeat written) while a job runs;
/// more often when the watchdog needs it. Under 5 s: Akeneo expects a job heartbeat at
/// least every 5 s.
const STATUS_REFRESH: Duration = Duration::from_secs(4);

/// Payloads up to this size are also in `PIM_JOB_PAYLOAD`; all are on `PIM_JOB_PAYLOAD_FILE`.
const ENV_PAYLOAD_LIMIT: usize = 64 * 1024;

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
        }
    }
}

/// Where wake-ups come from while idle, besides the poll timer.
#[derive(Default)]
struct WakeSources {
    socket: Option<WakeSocket>,
    listener: Option<Box<dyn PushListener>>,
    /// The last idle ended on a same-host datagram, not yet followed by a claim.
    woken_by_socket: bool,
    /// Until then the socket is not listened to: a datagram that found nothing to claim
    /// costs at most one claim attempt per poll interval (any local user can send them).
    socket_muted_until: Option<Instant>,
}

impl WakeSources {
    /// After a claim: a wake-up that found nothing mutes the socket for `poll_interval`.
    fn note_claim(&mut self, found_a_job: bool, poll_interval: Duration) {
        if std::mem::take(&mut self.woken_by_socket) && !found_a_job {
            self.socket_muted_until = Some(Instant::now() + poll_interval);
        }
    }

    fn socket_muted(&self) -> bool {
        self.socket_muted_until
            .is_some_and(|until| Instant::now() < until)
    }
}

/// What woke the job-watching loop.
enum JobEvent {
    Exited(Option<std::process::ExitStatus>),
    TimedOut,
    Tick,
    Reload,
    StopRequested,
    /// End the job now: why, and how long SIGTERM gets before SIGKILL.
    Interrupt(&'static str, Duration),
}

pub struct Consumer {
    store: Arc<dyn JobStore>,
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
}

impl Consumer {
    pub fn new(
        store: Arc<dyn JobStore>,
        config: Config,
        options: ConsumerOptions,
        worker: WorkerIdentity,
        signals: Signals,
        notifier: Arc<Notifier>,
        reloader: Reloader,
    ) -> Self {
        let timings = FleetTimings {
            heartbeat_interval: config.heartbeat_interval,
            rescue_after: config.rescue_after,
            retention: config.retention,
        };
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
            config,
        }
    }

    /// Runs until a stop condition; returns which.
    pub async fn run(&mut self) -> StopReason {
        let Some(membership) = self.join_fleet().await else {
            self.notifier.stopping("Stopping");
            return StopReason::Signal;
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
                Err(error) => self.wait_after_error(&error, &contact).await,
            }
        };
        self.notifier.stopping("Stopping");
        self.db(membership.leave()).await;
        reason
    }

    fn shutdown(&self) -> &crate::signals::Shutdown {
        &self.signals.shutdown
    }

    /// Registers in the fleet, retrying through outages; `None` if stopped meanwhile.
    async fn join_fleet(&mut self) -> Option<Membership> {
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
                Ok(membership) => return Some(membership),
                Err(error) => {
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
                return None;
            }
        }
    }

    async fn open_wake_sources(&self) -> WakeSources {
        let dir = WakeDir::for_store(self.config.wake_dir.as_deref(), &self.store.location());
        let name = format!("w-{}-{}", self.worker.pid, &self.worker.token[..8]);
        let socket = dir
            .bind(&name)
            .inspect_err(|error| {
                warn!(
                    "no same-host wake-ups ({}: {error}); polling every {}",
                    dir.path().display(),
                    format_duration(self.poll_interval())
                )
            })
            .ok();
        let listener = self
            .db(self.store.listen())
            .await
            .inspect_err(|error| warn!("no database notifications ({error}); polling"))
            .ok()
            .flatten();
        WakeSources {
            socket,
            listener,
            ..WakeSources::default()
        }
    }

    fn poll_interval(&self) -> Duration {
        self.options.sleep.unwrap_or(self.config.poll_interval)
    }

    fn idle_status(&self) -> String {
        format!(
            "Idle, waiting for jobs on {}",
            self.options.queues.join(", ")
        )
    }

    /// One pass: check for a stop request, then claim and run a job or sleep.
    async fn next_step(&mut self, contact: &Contact) -> Result<Option<StopReason>, StoreError> {
        if self.stop_requested_by_operator().await? || self.symfony_stop_requested() {
            return Ok(Some(StopReason::StopWorkersRequested));
        }
        if let Some(reason) = self.launching_blocked().await {
            return Ok(reason);
        }
        // A job claimed now would be fenced at once: wait for the heartbeat to get through.
        if contact.last_ok().elapsed() >= self.timings.fence_after() {
            return Err(StoreError::Unavailable(
                "no heartbeat has reached the database recently; not taking jobs".into(),
            ));
        }
        let claimed = self
            .db(self
                .store
                .claim(&self.options.queues, &self.worker, Timestamp::now()))
            .await?;
        self.wake
            .note_claim(claimed.is_some(), self.poll_interval());
        match claimed {
            Some(job) if self.shutdown().is_stopping() => self.give_back_claim(&job).await,
            Some(job) => {
                contact.set_current_job(Some(job.id));
                self.process(job, contact).await;
                contact.set_current_job(None);
                self.jobs_done += 1;
                self.notifier.status(&self.idle_status());
            }
            None => {
                debug!("no job due");
                self.notifier.status(&self.idle_status());
                self.idle().await;
            }
        }
        Ok(None)
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

    async fn stop_requested_by_operator(&mut self) -> Result<bool, StoreError> {
        let current = self.db(self.store.stop_generation()).await?;
        let seen_at_start = *self.stop_generation.get_or_insert(current);
        Ok(current > seen_at_start)
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

    /// Sleeps one poll interval, or less when a push, a stop, a reload, the time limit or
    /// the watchdog comes first.
    async fn idle(&mut self) {
        let mut nap = self.poll_interval().min(self.heartbeat_slice());
        if let Some(limit) = self.options.time_limit {
            nap = nap.min(limit.saturating_sub(self.started.elapsed()));
        }
        let mut listener_failed = None;
        let mut reload = false;
        let socket = self
            .wake
            .socket
            .as_ref()
            .filter(|_| !self.wake.socket_muted());
        let mut woken_by_socket = false;
        tokio::select! {
            _ = tokio::time::sleep(nap) => {}
            _ = self.signals.shutdown.reached(StopLevel::Drain) => {}
            _ = self.signals.reload.notified() => reload = true,
            _ = woken(socket) => woken_by_socket = true,
            pushed = pushed(self.wake.listener.as_mut()) => listener_failed = pushed.err(),
        }
        self.wake.woken_by_socket = woken_by_socket;
        if reload {
            self.reload().await;
        }
        if let Some(error) = listener_failed {
            // The listener reconnects on its next use; until then polling carries on.
            warn!("database notifications interrupted: {error}");
            self.pause(nap, StopLevel::Drain).await;
        }
    }

    /// Sleeps `duration` in watchdog-sized slices, pinging between them; returns early once
    /// the stop level reaches `until`.
    async fn pause(&mut self, duration: Duration, until: StopLevel) {
        let deadline = Instant::now() + duration;
        loop {
            self.ping_watchdog_if_due();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.shutdown().level() >= until {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(left.min(self.heartbeat_slice())) => {}
                _ = self.signals.shutdown.reached(until) => return,
            }
        }
    }

    async fn wait_after_error(&mut self, error: &StoreError, contact: &Contact) {
        if let StoreError::SchemaMissing(_) = error
            && self.config.auto_migrate
        {
            warn!("{error}: creating them again");
            match self.db(self.store.migrate()).await {
                Ok(_) => return,
                Err(error) => warn!("could not create the job store's tables: {error}"),
            }
        }
        let delay = self.backoff.next_delay();
        warn!(
            attempt = self.backoff.attempts,
            "{error}; retrying in {}",
            format_duration(delay)
        );
        self.notifier.status(&unavailable_status(contact));
        self.pause(delay, StopLevel::Drain).await;
    }

    /// Re-reads the config and the queue selection. An invalid new configuration is logged
    /// and the old one kept; a running job is never disturbed.
    async fn reload(&mut self) {
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
                    if let Err(error) = self
                        .db(self.store.register_worker(&self.worker, &queues))
                        .await
                    {
                        warn!("could not record the new queues: {error}");
                    }
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

    /// Runs one claimed job to its recorded end.
    async fn process(&mut self, job: ClaimedJob, contact: &Contact) {
        let span = info_span!(
            "job",
            job_id = job.id,
            job_queue = %job.queue,
            job_code = %job.code
        );
        async {
            let (outcome, ran_for) = match self.prepare_launch(&job) {
                Ok(launch) => self.execute(&job, &launch, contact).await,
                Err(reason) => {
                    warn!("job failed before it started: {reason}");
                    (Outcome::Finished(failure_without_run(reason)), None)
                }
            };
            let failed_launch = self.failed_at_start(&job, &outcome, ran_for).await;
            self.record(&job, &outcome).await;
            self.account_launch(&job, failed_launch).await;
        }
        .instrument(span)
        .await
    }

    /// Why this launch counts as failed at start, for the breaker: its process never
    /// started, or it failed within the window before the job's system saw it start.
    async fn failed_at_start(
        &self,
        job: &ClaimedJob,
        outcome: &Outcome,
        ran_for: Option<Duration>,
    ) -> Option<Result<(), String>> {
        if !self.breaker.is_enabled() {
            return None;
        }
        let reason = match (outcome, ran_for) {
            (Outcome::NotStarted(reason), _) => return Some(Err(reason.clone())),
            (Outcome::Finished(completion), Some(ran_for)) => match &completion.result {
                JobResult::Succeeded => return Some(Ok(())),
                JobResult::Failed { .. } if !self.breaker.within_window(ran_for) => {
                    return Some(Ok(()));
                }
                JobResult::Failed { reason, .. } => match completion.output.last() {
                    Some(line) => format!("{reason}: {line}"),
                    None => reason.clone(),
                },
            },
            _ => return None,
        };
        match self.db(self.store.launch_took_effect(&job.lease)).await {
            Ok(Some(true)) => Some(Ok(())),
            Ok(Some(false) | None) => Some(Err(reason)),
            Err(error) => {
                warn!("cannot tell whether the job started: {error}");
                None
            }
        }
    }

    /// Feeds the breaker; when launches keep failing at start, claiming stops for a while
    /// (and the environment is checked again before it resumes).
    async fn account_launch(&mut self, job: &ClaimedJob, failed: Option<Result<(), String>>) {
        let reason = match failed {
            None => return,
            Some(Ok(())) => return self.breaker.record_success(),
            Some(Err(reason)) => reason,
        };
        warn!(
            failed_launches = self.breaker.failures_in_a_row() + 1,
            "launch failed at start: {reason}"
        );
        let trip = self.breaker.record_failure(FailedLaunch {
            job: job.id,
            reason,
        });
        match trip {
            Some(trip) => {
                let message = format!(
                    "{}; not taking jobs for {}, then checking the PIM again",
                    trip.describe(),
                    format_duration(trip.closed_for)
                );
                error!("{message}");
                self.notifier.status(&format!("Not taking jobs: {message}"));
            }
            // A launch whose program could not start leaves its job queued: do not hammer it.
            None => self.pause(FIRST_BACKOFF, StopLevel::Drain).await,
        }
    }

    /// Works out the argv and environment; an error fails the job, never the worker.
    fn prepare_launch(&self, job: &ClaimedJob) -> Result<JobLaunch, String> {
        let payload = parse_payload(&job.payload)?;
        if let Transport::Akeneo(settings) = &self.config.transport {
            let message = crate::akeneo::JobMessage::from_payload(&payload)?;
            return crate::akeneo::launch(settings, &message, &job.code);
        }
        let spec = self.config.job_spec(&job.code)?;
        let facts = JobFacts {
            id: job.id,
            queue: &job.queue,
            code: &job.code,
            payload: &payload,
        };
        let argv = spec.command.render(&facts)?;
        let mut env: BTreeMap<String, String> = spec.env.clone();
        env.insert("PIM_JOB_ID".into(), job.id.to_string());
        env.insert("PIM_JOB_QUEUE".into(), job.queue.clone());
        env.insert("PIM_JOB_CODE".into(), job.code.clone());
        let payload = Value::Object(payload).to_string();
        // The environment of a process holds 128 KiB per variable: a larger payload (a row
        // written by other means) is only on the descriptor, or the job could not start.
        let mut remove_env = Vec::new();
        if payload.len() <= ENV_PAYLOAD_LIMIT {
            env.insert("PIM_JOB_PAYLOAD".into(), payload.clone());
        } else {
            remove_env.push("PIM_JOB_PAYLOAD".into());
        }
        env.insert(
            "PIM_JOB_PAYLOAD_FILE".into(),
            format!("/dev/fd/{}", runner::PAYLOAD_FD),
        );
        Ok(JobLaunch {
            argv,
            working_directory: spec.working_directory.clone(),
            env,
            remove_env,
            timeout: spec.timeout,
            kill_grace: spec.kill_grace,
            signal_leader_first: false,
            payload_on_fd: Some(payload),
        })
    }

    /// Starts and watches the job; also returns how long its process ran.
    ///
    /// A native job's start is recorded *before* its process is spawned: a job whose start
    /// is not recorded has certainly not run, which is what lets a rescue (or a give-back)
    /// run it again with its attempt refunded. If the record cannot be written, the job is
    /// not started but given back. (The Akeneo store records the start after the exec: its
    /// start acknowledges the PIM's message, which must wait for a process that runs.)
    async fn execute(
        &mut self,
        job: &ClaimedJob,
        launch: &JobLaunch,
        contact: &Contact,
    ) -> (Outcome, Option<Duration>) {
        let start_recorded_first = matches!(self.config.transport, Transport::Native);
        if start_recorded_first && let Some(not_started) = self.record_start_before_spawn(job).await
        {
            return (not_started, None);
        }
        let running = match runner::start(launch) {
            Ok(running) => running,
            Err(error) => {
                let reason = format!("cannot start {}: {error}", launch.argv[0]);
                warn!("job did not start: {reason}");
                return (Outcome::NotStarted(reason), None);
            }
        };
        info!(
            attempt = job.attempts,
            pid = running.pid().as_raw(),
            "job started"
        );
        self.notifier.status(&running_status(job, Duration::ZERO));
        if !start_recorded_first {
            match self
                .db(self.store.mark_started(&job.lease, Timestamp::now()))
                .await
            {
                Ok(true) => {}
                Ok(false) => warn!("job is no longer held by this worker"),
                Err(error) => warn!("could not record the job's start: {error}"),
            }
        }
        let report = self.watch(running, job, launch.kill_grace, contact).await;
        let outcome = outcome_of(&report);
        log_end(&report, &outcome);
        (outcome, Some(report.duration))
    }

    /// Waits for the job while keeping the worker's duties: watchdog, STATUS, reloads, stop
    /// requests with their grace, the timeout and the fence.
    async fn watch(
        &mut self,
        mut running: RunningJob,
        job: &ClaimedJob,
        kill_grace: Duration,
        contact: &Contact,
    ) -> RunReport {
        let mut ticks = tokio::time::interval(self.heartbeat_slice());
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let timeout = running.deadline();
        let mut stop_deadline: Option<tokio::time::Instant> = None;
        loop {
            let event = tokio::select! {
                status = running.exited() => JobEvent::Exited(status),
                _ = sleep_until(timeout) => JobEvent::TimedOut,
                _ = ticks.tick() => JobEvent::Tick,
                _ = self.signals.reload.notified() => JobEvent::Reload,
                _ = self.signals.shutdown.reached(StopLevel::Drain), if stop_deadline.is_none() => {
                    JobEvent::StopRequested
                }
                _ = sleep_until(stop_deadline) => {
                    JobEvent::Interrupt("the stop grace period ran out", kill_grace)
                }
                _ = self.signals.shutdown.reached(StopLevel::Abort) => {
                    JobEvent::Interrupt("interrupted by a second stop request", kill_grace)
                }
                _ = contact.lost_for(self.timings.fence_after()) => {
                    JobEvent::Interrupt("lost contact with the database", self.timings.fence_grace())
                }
                _ = contact.lease_lost(job.id) => {
                    JobEvent::Interrupt("this worker was declared lost: the job is someone else's", self.timings.fence_grace())
                }
            };
            match event {
                JobEvent::Exited(status) => {
                    let ending = RunningJob::ending_of(status);
                    return self
                        .notifier
                        .while_pinging(running.finish(ending, status))
                        .await;
                }
                JobEvent::TimedOut => {
                    warn!("job timed out: ending its process group");
                    let status = self
                        .notifier
                        .while_pinging(running.end_group(kill_grace))
                        .await;
                    return self
                        .notifier
                        .while_pinging(running.finish(Ending::TimedOut, status))
                        .await;
                }
                JobEvent::Interrupt(reason, grace) => {
                    warn!("ending the job's process group: {reason}");
                    self.notifier.extend_timeout(grace + STATUS_REFRESH);
                    let status = self.notifier.while_pinging(running.end_group(grace)).await;
                    let ending = Ending::Interrupted(reason.into());
                    return self
                        .notifier
                        .while_pinging(running.finish(ending, status))
                        .await;
                }
                JobEvent::Tick => {
                    self.keep_alive_while_running(job, &running, stop_deadline);
                    // Bounded: a black-holed connection must not hold up the fence, the
                    // timeout, stop handling and the watchdog, which this loop also serves.
                    let touch =
                        tokio::time::timeout(self.heartbeat_slice(), self.store.touch(&job.lease));
                    match touch.await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => warn!("could not refresh the job's heartbeat: {error}"),
                        Err(_) => warn!("refreshing the job's heartbeat did not answer in time"),
                    }
                }
                JobEvent::Reload => self.reload().await,
                JobEvent::StopRequested => {
                    let grace = self.config.stop_grace;
                    stop_deadline = Some(tokio::time::Instant::now() + grace);
                    info!(
                        "stop requested: waiting up to {} for job {} to finish",
                        format_duration(grace),
                        job.id
                    );
                    self.notifier
                        .stopping(&format!("Stopping: waiting for job {}", job.id));
                    self.keep_alive_while_running(job, &running, stop_deadline);
                }
            }
        }
    }

    /// Watchdog ping and STATUS while a job runs; during a stop, also asks systemd for more
    /// time, as long as the stop grace lasts.
    fn keep_alive_while_running(
        &mut self,
        job: &ClaimedJob,
        running: &RunningJob,
        stop_deadline: Option<tokio::time::Instant>,
    ) {
        self.ping_watchdog_if_due();
        match stop_deadline {
            None => self
                .notifier
                .status(&running_status(job, running.elapsed())),
            Some(deadline) => {
                self.notifier.status(&format!(
                    "Stopping: waiting for job {} ({} running)",
                    job.id,
                    format_duration(Duration::from_secs(running.elapsed().as_secs()))
                ));
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                self.notifier
                    .extend_timeout(left.min(STATUS_REFRESH * 3) + STATUS_REFRESH);
            }
        }
    }

    /// Stores the outcome, retrying through database outages: a finished job's result is
    /// kept in memory until it is written, or until an abort is requested.
    async fn record(&mut self, job: &ClaimedJob, outcome: &Outcome) {
        let mut backoff = Backoff::default();
        loop {
            let stored = match outcome {
                Outcome::Finished(completion) => self
                    .db(self.store.complete(&job.lease, completion))
                    .await
                    .map(|held| held.then_some(Release::Failed)),
                Outcome::GivenUp(reason) => self
                    .db(self.store.release(&job.lease, reason, Timestamp::now()))
                    .await
                    .map(|release| (release != Release::NotHeld).then_some(release)),
                Outcome::NotStarted(reason) => self.put_back_unstarted(job, reason).await,
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
    /// do not start it) when that record is not certain.
    async fn record_start_before_spawn(&self, job: &ClaimedJob) -> Option<Outcome> {
        let bounded = tokio::time::timeout(
            self.timings.fence_after(),
            self.store.mark_started(&job.lease, Timestamp::now()),
        );
        let why = match self.db(bounded).await {
            Ok(Ok(true)) => return None,
            Ok(Ok(false)) => "the job is no longer held by this worker".to_string(),
            Ok(Err(error)) => format!("its start could not be recorded ({error})"),
            Err(_) => "recording its start did not answer in time".to_string(),
        };
        warn!("job not started: {why}");
        Some(Outcome::GivenUp(format!("not started: {why}")))
    }

    /// A stop request arrived while the claim was on its way: the job has not started, so it
    /// goes back to its queue (its attempt refunded) instead of holding up the stop.
    async fn give_back_claim(&self, job: &ClaimedJob) {
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
    async fn put_back_unstarted(
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
        let held = self
            .db(self
                .store
                .complete(&job.lease, &failure_without_run(reason.to_string())))
            .await?;
        Ok(held.then_some(Release::Failed))
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

fn running_status(job: &ClaimedJob, elapsed: Duration) -> String {
    format!(
        "Running job {} {} ({}) for {}",
        job.id,
        job.code,
        job.queue,
        format_duration(Duration::from_secs(elapsed.as_secs()))
    )
}

fn unavailable_status(contact: &Contact) -> String {
    match contact.outage_since() {
        Some(since) => format!("Database unavailable since {}, retrying", clock(since)),
        None => "Database unavailable, retrying".into(),
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Resolves on a same-host wake-up; never without a socket.
async fn woken(socket: Option<&WakeSocket>) {
    match socket {
        Some(socket) => socket.woken().await,
        None => std::future::pending().await,
    }
}

/// Resolves on a database notification; never without a listener.
async fn pushed(listener: Option<&mut Box<dyn PushListener>>) -> Result<(), StoreError> {
    match listener {
        Some(listener) => listener.pushed().await,
        None => std::future::pending().await,
    }
}

/// How a claimed job ended, from the worker's side.
#[derive(Debug)]
enum Outcome {
    /// It ran (or could not start); the result is final.
    Finished(Completion),
    /// The worker ended it early; it goes back to its queue if it has attempts left.
    GivenUp(String),
    /// Its process could not be started at all.
    NotStarted(String),
}

/// A job's payload must be a JSON object; anything else (a row inserted by hand) fails it.
fn parse_payload(text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("invalid payload: not a JSON object".into()),
        Err(error) => Err(format!("invalid payload: {error}")),
    }
}

fn failure_without_run(reason: String) -> Completion {
    Completion {
        result: JobResult::Failed {
            exit_code: None,
            signal: None,
            reason,
        },
        output: Vec::new(),
        finished_at: Timestamp::now(),
    }
}

fn outcome_of(report: &RunReport) -> Outcome {
    let signal = report
        .status
        .and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s));
    let exit_code = report.status.and_then(|s| s.code());
    let result = match &report.ending {
        Ending::Exited(0) => JobResult::Succeeded,
        Ending::Exited(code) => JobResult::Failed {
            exit_code: Some(*code),
            signal: None,
            reason: format!("exit code {code}"),
        },
        Ending::Signalled(number) => JobResult::Failed {
            exit_code: None,
            signal: Some(*number),
            reason: format!("killed by signal {}", signal_name(*number)),
        },
        Ending::TimedOut => JobResult::Failed {
            exit_code,
            signal,
            reason: "timeout".into(),
        },
        Ending::Interrupted(reason) => return Outcome::GivenUp(reason.clone()),
    };
    Outcome::Finished(Completion {
        result,
        output: report.output_tail.clone(),
        finished_at: Timestamp::now(),
    })
}

fn signal_name(number: i32) -> String {
    nix::sys::signal::Signal::try_from(number)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| number.to_string())
}

fn log_end(report: &RunReport, outcome: &Outcome) {
    let duration = format_duration(report.duration);
    match outcome {
        Outcome::Finished(Completion {
            result: JobResult::Succeeded,
            ..
        }) => info!(duration = %duration, result = "succeeded", "job finished"),
        Outcome::Finished(Completion {
            result: JobResult::Failed { reason, .. },
            ..
        }) => warn!(duration = %duration, result = "failed", "job finished: {reason}"),
        Outcome::GivenUp(reason) => {
            warn!(duration = %duration, result = "interrupted", "job interrupted: {reason}")
        }
        Outcome::NotStarted(reason) => warn!(result = "not started", "job not started: {reason}"),
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

    #[test]
    fn payloads_must_be_objects() {
        assert!(parse_payload(r#"{"a":1}"#).is_ok());
        assert!(
            parse_payload("[1]")
                .unwrap_err()
                .contains("not a JSON object")
        );
        assert!(
            parse_payload("{oops")
                .unwrap_err()
                .starts_with("invalid payload")
        );
    }
}

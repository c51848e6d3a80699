//! The job store: one trait per role ([`roles`]), one backend module per database.
//!
//! The consumer, the runner and the commands only see the role traits, so a backend can be
//! added without touching them. All SQL lives in this module: the statements the native
//! backends share are written once in [`statements`] and run by [`native`], each backend
//! module keeps only what its database does differently. Every change out of `running` is
//! guarded by the claiming worker's token and the lease counter set at claim time, so a late
//! or repeated completion (after a rescue, say) changes nothing.

pub mod akeneo;
pub mod faults;
pub mod mysql;
mod native;
pub mod postgres;
pub mod roles;
mod rows;
pub mod sqlite;
mod statements;
pub mod wrap;

pub use roles::{
    AdminStore, ConsumedStore, FleetStore, ForeignJobs, JobStore, QueueStore, SchemaStore,
    WorkerStore,
};

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Serialize;

use crate::exit::{ExitCode, Failure};

pub type JobId = i64;

/// A point in time in microseconds since the Unix epoch, UTC. Stored as a plain integer in
/// every backend so no database session time zone can shift it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Timestamp {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(since_epoch.as_micros() as i64)
    }

    pub fn minus(self, duration: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(saturating_micros(duration)))
    }

    pub fn plus(self, duration: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(saturating_micros(duration)))
    }

    /// How long after `earlier` this is; zero if it is not later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0).max(0) as u64)
    }
}

/// A duration in microseconds, saturating instead of wrapping around (a wrapped delay would
/// run a job at once).
pub fn saturating_micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // RFC 3339 stops at year 9999; a row written by other means may lie beyond.
        const LAST_RFC3339_MICROS: i64 = 253_402_300_799_000_000;
        if self.0 > LAST_RFC3339_MICROS {
            return f.write_str("after 9999-12-31T23:59:59Z");
        }
        let time = UNIX_EPOCH + Duration::from_micros(self.0.max(0) as u64);
        write!(f, "{}", humantime::format_rfc3339_seconds(time))
    }
}

/// The largest payload `push` accepts: a job's payload names its work, it does not carry
/// bulk data (MySQL's default `max_allowed_packet` is 16 MiB, the environment of a process
/// about 2 MiB in all and 128 KiB per variable).
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;

/// Where a job is in its life. Only `waiting` jobs are claimed; only `running` jobs complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Waiting,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Waiting,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Waiting => "waiting",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<JobStatus> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job to store. The payload is JSON text, already checked to be an object.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub queue: String,
    pub code: String,
    pub payload: String,
    /// How long after the database stores it the job becomes due: created and due times
    /// are the database's clock, so hosts with skewed clocks agree on them.
    pub delay: Duration,
    /// How many claims the job may have; a rescue or an interrupted stop requeues it while
    /// it has attempts left. Fixed at push time from the pusher's config.
    pub max_attempts: u32,
    /// At most one waiting or running job has this key (a unique index, not a check).
    pub unique_key: Option<String>,
}

/// The longest unique key: what MariaDB indexes in full.
pub const MAX_UNIQUE_KEY_CHARS: usize = 255;

/// A schedule's latest queued slot, for `status` and `metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScheduleRun {
    pub name: String,
    pub slot_at: Timestamp,
    pub enqueued_at: Timestamp,
    pub job_id: Option<JobId>,
}

/// What a push with a unique key did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Created(JobId),
    /// A job with the key was waiting or running already: this one.
    Existing(JobId),
}

/// Whether `error` is the database refusing a second waiting or running job with the same
/// unique key (PostgreSQL 23505, MariaDB 1062, SQLite 2067).
pub fn is_unique_violation(error: &StoreError) -> bool {
    matches!(error.driver_error(), Some(sqlx::Error::Database(db))
        if db.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

/// Who claims and runs jobs: written into every job a worker claims.
#[derive(Debug, Clone)]
pub struct WorkerIdentity {
    /// Unique per worker process and start, so a restarted worker with a reused pid is
    /// not mistaken for its predecessor.
    pub token: String,
    pub host: String,
    pub instance: Option<String>,
    pub pid: u32,
}

/// The right to change a running job: the claiming worker's token and the lease counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job_id: JobId,
    pub token: String,
    pub lease: i64,
}

/// A job just claimed by this worker.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub id: JobId,
    pub queue: String,
    pub code: String,
    /// As stored; it may be malformed if someone inserted the row by hand.
    pub payload: String,
    pub attempts: i64,
    pub lease: Lease,
}

/// What a worker asks of the store between two jobs (see [`QueueStore::next_job`]).
#[derive(Debug, Clone, Copy)]
pub struct Turn<'a> {
    /// The queues to claim from, highest priority first.
    pub queues: &'a [String],
    pub worker: &'a WorkerIdentity,
    /// The job this worker just ran and its result, recorded in the same transaction as the
    /// claim (one durable commit per job).
    pub finished: Option<(&'a Lease, &'a Completion)>,
    /// After a turn that lost the race for a queue's head to another worker: how many of
    /// the next due jobs of that queue this one may take instead (see `contended`). Stores
    /// whose claims skip rows others hold (`SKIP LOCKED`), or that serialize writers, ignore
    /// it.
    pub pass_over: u32,
    /// The fleet-wide limits on running jobs per code or group: a head whose limit is
    /// reached is passed over for the next eligible job.
    pub caps: &'a ConcurrencyCaps,
}

impl Turn<'_> {
    /// The job this turn finishes (0 for none): it no longer counts against its cap.
    fn finishing_id(&self) -> JobId {
        self.finished.map_or(0, |(lease, _)| lease.job_id)
    }
}

/// `max_running` of `[jobs.CODE]` or of the `[groups.NAME]` a code joins: at most `limit`
/// jobs of the codes sharing `key` run at once, across every worker of the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cap {
    pub code: String,
    /// `code:NAME` or `group:NAME`, stored on the running jobs it counts.
    pub key: String,
    pub limit: u32,
}

/// The caps a worker's claims respect. They come from its configuration, not from the
/// jobs, so a reload changes them at once and rows inserted by SQL are capped too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConcurrencyCaps {
    caps: Vec<Cap>,
    /// The caps as every turn binds them, written once (see [`ConcurrencyCaps::as_json`]).
    json: String,
}

impl ConcurrencyCaps {
    pub fn new(mut caps: Vec<Cap>) -> ConcurrencyCaps {
        caps.sort_by(|a, b| a.code.cmp(&b.code));
        let json = Self::render(&caps, &[]);
        ConcurrencyCaps { caps, json }
    }

    /// No caps: the claim statements without their cap checks.
    pub fn none() -> &'static ConcurrencyCaps {
        static NONE: ConcurrencyCaps = ConcurrencyCaps {
            caps: Vec::new(),
            json: String::new(),
        };
        &NONE
    }

    pub fn is_empty(&self) -> bool {
        self.caps.is_empty()
    }

    pub fn of(&self, code: &str) -> Option<&Cap> {
        self.caps.iter().find(|cap| cap.code == code)
    }

    /// The codes sharing `key`, in code order.
    pub fn codes_of(&self, key: &str) -> Vec<String> {
        self.caps
            .iter()
            .filter(|cap| cap.key == key)
            .map(|cap| cap.code.clone())
            .collect()
    }

    /// Each key once with its limit, in key order.
    pub fn limits(&self) -> Vec<(&str, u32)> {
        let mut limits: Vec<(&str, u32)> = self
            .caps
            .iter()
            .map(|cap| (cap.key.as_str(), cap.limit))
            .collect();
        limits.sort();
        limits.dedup();
        limits
    }

    /// The caps as the claim statements read them: a JSON array of `{code, key, limit}`,
    /// the keys in `full` (found full under their lock this turn) with limit 0.
    fn as_json(&self, full: &[String]) -> std::borrow::Cow<'_, str> {
        if full.is_empty() {
            std::borrow::Cow::Borrowed(&self.json)
        } else {
            std::borrow::Cow::Owned(Self::render(&self.caps, full))
        }
    }

    fn render(caps: &[Cap], full: &[String]) -> String {
        let rows: Vec<serde_json::Value> = caps
            .iter()
            .map(|cap| {
                let limit = if full.contains(&cap.key) {
                    0
                } else {
                    cap.limit
                };
                serde_json::json!({"code": cap.code, "key": cap.key, "limit": limit})
            })
            .collect();
        serde_json::Value::Array(rows).to_string()
    }
}

/// What one turn found.
#[derive(Debug, Clone, Default)]
pub struct Poll {
    /// The stop-workers generation, read in the same statement as the claim.
    pub stop_generation: i64,
    /// The job claimed for this worker, already marked started.
    pub job: Option<ClaimedJob>,
    /// Whether the finished job's result was recorded: false when the lease was no longer
    /// held (the job was rescued, or this is a repeat); `None` when there was none.
    pub recorded: Option<bool>,
    /// No job was claimed although a due one exists: another worker was taking it at that
    /// moment. Not "empty": ask again at once instead of sleeping a poll interval.
    pub contended: bool,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobResult {
    Succeeded,
    /// Ended by its worker at an operator's request (`cancel` of a running job).
    Cancelled {
        reason: String,
    },
    Failed {
        exit_code: Option<i32>,
        signal: Option<i32>,
        reason: String,
    },
}

/// A job's result with the last lines of its output.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub result: JobResult,
    pub output: Vec<String>,
    pub finished_at: Timestamp,
    pub usage: ResourceUsage,
}

/// What the kernel measured of a job's main process and the descendants it waited for
/// (`wait4`'s rusage): unknown when no process ran or it could not be reaped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ResourceUsage {
    /// The largest resident set size, bytes.
    pub peak_rss_bytes: Option<i64>,
    /// User plus system CPU time, microseconds.
    pub cpu_usec: Option<i64>,
}

/// Everything stored about a job, for `show`, `jobs` and `status`.
#[derive(Debug, Clone, Serialize)]
pub struct JobRecord {
    pub id: JobId,
    pub queue: String,
    pub code: String,
    pub payload: String,
    pub status: JobStatus,
    pub attempts: i64,
    pub max_attempts: i64,
    pub created_at: Timestamp,
    pub available_at: Timestamp,
    pub claimed_at: Option<Timestamp>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub worker_host: Option<String>,
    pub worker_instance: Option<String>,
    pub worker_pid: Option<i64>,
    pub exit_code: Option<i64>,
    pub exit_signal: Option<i64>,
    pub reason: Option<String>,
    pub output: Vec<String>,
    /// An operator's request to end this running job, until its worker honours it.
    pub cancel_requested: Option<String>,
    /// The last run's peak memory and CPU time.
    pub usage: ResourceUsage,
    /// The earlier attempts of a job retried after a failure (`retry_on_exit_codes`),
    /// oldest first.
    pub earlier_attempts: Vec<serde_json::Value>,
}

/// How many jobs a queue has in each state.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct QueueCounts {
    pub queue: String,
    /// Waiting and due now.
    pub waiting: i64,
    /// Waiting for their `--delay` to pass.
    pub delayed: i64,
    pub running: i64,
    /// Messages the Akeneo transport cannot run, left in the PIM's table for a person.
    pub set_aside: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub cancelled: i64,
    /// How long the queue's oldest due job has waited, in seconds (0 when none is due);
    /// filled in by `status` from [`FleetStore::queue_latencies`].
    pub latency_seconds: f64,
}

/// Which jobs `jobs` lists, newest first.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub queue: Option<String>,
    pub status: Option<JobStatus>,
    pub code: Option<String>,
    /// Only jobs created within this long, by the database's clock.
    pub since: Option<Duration>,
    pub limit: u32,
}

/// How many of the jobs a filter selects share a code and a reason (`jobs --stats`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct JobStats {
    pub code: String,
    pub reason: Option<String>,
    pub count: i64,
    /// When the latest of them finished, if any did.
    pub last_finished_at: Option<Timestamp>,
}

/// What an operator's state change (`retry`, `cancel`) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOutcome {
    Changed,
    /// The job is running: its worker was asked to end it (a cancel).
    Requested,
    NotFound,
    /// The job exists but is in a state the change does not apply to.
    WrongState(JobStatus),
}

/// A registered worker, for `status`.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerRecord {
    pub host: String,
    pub instance: Option<String>,
    pub pid: i64,
    pub queues: String,
    pub started_at: Timestamp,
    /// When its last heartbeat reached the database, by the database's clock.
    pub heartbeat_at: Timestamp,
    /// How long ago, by the database's clock, its last heartbeat was.
    pub heartbeat_age_seconds: f64,
    pub current_job: Option<JobId>,
}

/// A running job taken back from a worker whose heartbeat stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RescuedJob {
    pub id: JobId,
    /// True when it went back to its queue, false when it was marked failed (no attempts left).
    pub requeued: bool,
    /// `host/instance/pid` of the lost worker.
    pub lost_worker: String,
}

/// A running job whose worker looks lost, as seen by a rescuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrphanedJob {
    pub id: JobId,
    /// The lease at the time it was seen; the take-back only applies if it is unchanged.
    pub lease: i64,
    /// `host/instance/pid` of the lost worker.
    pub lost_worker: String,
}

/// What a rescuer's round read, in one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RescueScan {
    /// The database's clock when it was read.
    pub now: Timestamp,
    pub orphans: Vec<OrphanedJob>,
    /// The queues paused fleet-wide, described for people (`queue (reason), …`; empty when
    /// none): it rides along so each worker's STATUS can say so.
    pub paused: String,
}

/// How long a queue's oldest due job has waited.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QueueLatency {
    pub queue: String,
    /// When its oldest due job became due.
    pub oldest_due_at: Timestamp,
    /// How long ago that was, by the database's clock.
    pub seconds: f64,
}

/// The upper bounds of the job duration and wait histograms: a tenth of a second (a
/// `ui_job` that feels instant) to six hours (a full catalog export).
pub const HISTOGRAM_BOUNDS: [Duration; 13] = [
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(30),
    Duration::from_secs(60),
    Duration::from_secs(300),
    Duration::from_secs(600),
    Duration::from_secs(1800),
    Duration::from_secs(3600),
    Duration::from_secs(7200),
    Duration::from_secs(21600),
];

/// Finished jobs (or rescues) of one queue, event and pair of histogram buckets, counted
/// since the store was created: the rows still in the table plus those a prune, delete or
/// retry folded into the tallies before removing them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    pub queue: String,
    /// `succeeded`, `failed`, `cancelled`, `lost`, `interrupted`, or `rescued`.
    pub event: String,
    /// Index into [`HISTOGRAM_BOUNDS`] of the duration's bucket (its length past the last
    /// bound), -1 for a job that never started and for rescues.
    pub duration_bucket: i64,
    /// The same for the wait from due to start.
    pub wait_bucket: i64,
    pub jobs: i64,
    /// Summed durations, microseconds.
    pub duration_sum: i64,
    /// Summed waits, microseconds.
    pub wait_sum: i64,
}

/// A queue an operator paused fleet-wide: claims pass it over until it is resumed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PausedQueue {
    pub queue: String,
    pub reason: String,
    pub paused_at: Timestamp,
    /// Who paused it (`$SUDO_USER`, else the user running the command).
    pub paused_by: String,
}

/// Which finished jobs a prune deletes, each kind after its own retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// Succeeded and cancelled jobs (`retention`).
    Done,
    /// Failed jobs (`failed_retention`): kept longer, until someone has looked at them.
    Failed,
}

impl Finished {
    /// How this kind is said to people.
    pub fn describe(self) -> &'static str {
        match self {
            Finished::Done => "succeeded or cancelled",
            Finished::Failed => "failed",
        }
    }

    /// The statuses of this kind, as SQL string literals.
    pub fn statuses(self) -> &'static str {
        match self {
            Finished::Done => "'succeeded', 'cancelled'",
            Finished::Failed => "'failed'",
        }
    }
}

/// What became of a job this worker gave up (interrupted by a stop, or fenced off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    Requeued,
    Failed,
    /// The lease was no longer held: someone else already took the job back.
    NotHeld,
}

/// The reason recorded on a job whose worker stopped heartbeating.
pub const WORKER_LOST: &str = "worker lost";

/// The schema version found in the database and the one this binary brings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaVersion {
    pub found: i64,
    pub latest: i64,
}

/// What a store error says, free of secrets, and the driver's error behind it when there is
/// one: callers sort errors by their variant, and code that needs the database's own error
/// (its number, its SQLSTATE) reads it from [`Detail::driver_error`] or the error's
/// `source()`, never from the text.
#[derive(Debug, Clone)]
pub struct Detail {
    text: String,
    cause: Option<Arc<sqlx::Error>>,
}

impl Detail {
    /// The driver's `error`, said after `context` (the store's location, never with a
    /// password).
    pub fn of(context: &str, error: sqlx::Error) -> Detail {
        Detail {
            text: format!("{context}: {error}"),
            cause: Some(Arc::new(error)),
        }
    }

    /// The same cause, said as `text`.
    pub fn worded(self, text: String) -> Detail {
        Detail { text, ..self }
    }

    pub fn driver_error(&self) -> Option<&sqlx::Error> {
        self.cause.as_deref()
    }
}

impl fmt::Display for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The source is the driver's error, whose own text (never shown by `Display`, which says
/// the scrubbed text) may quote what it parsed from the database URL.
impl std::error::Error for Detail {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|error| error as &(dyn std::error::Error + 'static))
    }
}

impl From<String> for Detail {
    fn from(text: String) -> Detail {
        Detail { text, cause: None }
    }
}

impl From<&str> for Detail {
    fn from(text: &str) -> Detail {
        Detail::from(text.to_string())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached now; trying again later may work.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] Detail),
    #[error(
        "the database schema is at version {found}, newer than this binary knows ({latest}): upgrade pim-job-queue"
    )]
    SchemaTooNew { found: i64, latest: i64 },
    #[error(
        "the database schema is at version {found}, this binary needs {latest}: run `pim-job-queue migrate` (auto_migrate is off)"
    )]
    SchemaOutdated { found: i64, latest: i64 },
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
    /// A table of this project's schema is gone (a PIM reinstall or a staging refresh drops
    /// tables it does not know); running the migrations again brings it back.
    #[error("the job store's tables are missing: {0}")]
    SchemaMissing(#[source] Detail),
    /// The operation does not exist for this store (for example `push` on the Akeneo
    /// transport, whose jobs the PIM queues).
    #[error("{0}")]
    Unsupported(String),
    #[error("database error: {0}")]
    Database(#[source] Detail),
    /// This user may not write the store (a SQLite file created by root for a worker that
    /// runs as the service user): waiting does not help, an operator must fix the owner.
    #[error("{0}")]
    PermissionDenied(#[source] Detail),
}

impl StoreError {
    /// The error with the secrets of `url` removed from its text: a driver's message may
    /// quote what it parsed out of the URL (MySQL's "Unknown database '...'").
    pub fn without_secrets_of(self, url: &str) -> StoreError {
        let scrub = |text: String| crate::secrets::scrub_url_secrets(&text, url);
        let reword = |detail: Detail| {
            let text = scrub(detail.text.clone());
            detail.worded(text)
        };
        match self {
            StoreError::Unavailable(detail) => StoreError::Unavailable(reword(detail)),
            StoreError::InvalidUrl(text) => StoreError::InvalidUrl(scrub(text)),
            StoreError::SchemaMissing(detail) => StoreError::SchemaMissing(reword(detail)),
            StoreError::Unsupported(text) => StoreError::Unsupported(scrub(text)),
            StoreError::Database(detail) => StoreError::Database(reword(detail)),
            StoreError::PermissionDenied(detail) => StoreError::PermissionDenied(reword(detail)),
            other => other,
        }
    }

    /// The database driver's error behind this one, when there is one.
    pub fn driver_error(&self) -> Option<&sqlx::Error> {
        match self {
            StoreError::Unavailable(detail)
            | StoreError::SchemaMissing(detail)
            | StoreError::Database(detail)
            | StoreError::PermissionDenied(detail) => detail.driver_error(),
            _ => None,
        }
    }

    /// Whether waiting and trying again can help (a server restart, a lock held too long).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_) | StoreError::SchemaMissing(_)
        )
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Failure {
        let exit = match &error {
            StoreError::Unavailable(_) | StoreError::SchemaMissing(_) => ExitCode::Unavailable,
            StoreError::SchemaTooNew { .. }
            | StoreError::SchemaOutdated { .. }
            | StoreError::InvalidUrl(_) => ExitCode::Config,
            StoreError::Database(_) => ExitCode::Software,
            StoreError::Unsupported(_) => ExitCode::Usage,
            StoreError::PermissionDenied(_) => ExitCode::NoPerm,
        };
        Failure::new(exit, error.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Database-side push notifications.
#[async_trait]
pub trait PushListener: Send {
    /// Resolves when a job may have been pushed.
    async fn pushed(&mut self) -> StoreResult<()>;
}

/// Adds one `GROUP BY queue, status` row to per-queue counts (rows arrive ordered by queue).
fn add_count(counts: &mut Vec<QueueCounts>, queue: String, status: &str, n: i64, later: i64) {
    if counts.last().is_none_or(|c| c.queue != queue) {
        counts.push(QueueCounts {
            queue,
            ..QueueCounts::default()
        });
    }
    let entry = counts.last_mut().expect("pushed above");
    match JobStatus::parse(status) {
        Some(JobStatus::Waiting) => {
            entry.waiting += n - later;
            entry.delayed += later;
        }
        Some(JobStatus::Running) => entry.running += n,
        Some(JobStatus::Succeeded) => entry.succeeded += n,
        Some(JobStatus::Failed) => entry.failed += n,
        Some(JobStatus::Cancelled) => entry.cancelled += n,
        None => {}
    }
}

/// What a guarded take-back did: `Some(true)` requeued, `Some(false)` failed, `None` nothing.
fn release_of(outcome: Option<bool>) -> Release {
    match outcome {
        Some(true) => Release::Requeued,
        Some(false) => Release::Failed,
        None => Release::NotHeld,
    }
}

/// The status and result columns a completion writes.
pub(super) fn completion_columns(
    result: &JobResult,
) -> (JobStatus, Option<i64>, Option<i64>, Option<&str>) {
    match result {
        JobResult::Succeeded => (JobStatus::Succeeded, Some(0), None, None),
        JobResult::Cancelled { reason } => {
            (JobStatus::Cancelled, None, None, Some(reason.as_str()))
        }
        JobResult::Failed {
            exit_code,
            signal,
            reason,
        } => (
            JobStatus::Failed,
            exit_code.map(i64::from),
            signal.map(i64::from),
            Some(reason.as_str()),
        ),
    }
}

/// sqlx errors that mean "the connection is gone or cannot be made", whatever the database.
fn is_connection_error(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_)
    )
}

/// How long a store call may take, on the client and on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallLimits {
    /// The client's deadline on every call (see [`wrap::Deadline`]).
    pub deadline: Duration,
}

impl CallLimits {
    /// The longest deadline: a call that has not answered in 10 s is not coming back soon.
    const MOST: Duration = Duration::from_secs(10);

    /// Limits for a fleet that rescues after `rescue_after`: half the time before the fence
    /// (two thirds of it), so a worker learns of a dead connection with time left to act.
    pub fn for_rescue_after(rescue_after: Duration) -> CallLimits {
        CallLimits {
            deadline: (rescue_after / 3).min(Self::MOST),
        }
    }

    /// Limits for a command an operator or a script runs (push, status, pause, ...): no
    /// fence bounds it, so it waits out a busy writer (workers starting up on a loaded SQLite
    /// file) as long as any call may, instead of failing with "database is locked".
    pub fn for_command() -> CallLimits {
        CallLimits {
            deadline: Self::MOST,
        }
    }

    /// What the server is told to give up after (a lock wait, SQLite's busy wait, a
    /// statement): before the client's deadline, so a slow call ends with an error the
    /// server chose and the connection stays usable.
    pub fn server_side(&self) -> Duration {
        self.deadline * 3 / 4
    }
}

impl Default for CallLimits {
    fn default() -> CallLimits {
        CallLimits::for_rescue_after(crate::config::DEFAULT_RESCUE_AFTER)
    }
}

/// Opens the store a database URL names, without touching the schema, with the default call
/// limits. Errors never carry the URL's secrets.
pub async fn open(url: &str) -> StoreResult<Box<dyn JobStore>> {
    open_with(url, CallLimits::default()).await
}

/// Opens the store a database URL names with these call limits.
pub async fn open_with(url: &str, limits: CallLimits) -> StoreResult<Box<dyn JobStore>> {
    let store = open_backend(url, limits)
        .await
        .map_err(|error| error.without_secrets_of(url))?;
    Ok(Box::new(wrap::Deadlined::with_deadline(
        store,
        limits.deadline,
    )))
}

async fn open_backend(url: &str, limits: CallLimits) -> StoreResult<Box<dyn JobStore>> {
    let scheme = url.split(':').next().unwrap_or("");
    let store: Box<dyn JobStore> = match scheme {
        "sqlite" => {
            let opening = sqlite::SqliteStore::open(url, limits);
            Box::new(bounded_open(url, limits, opening).await?)
        }
        "postgres" | "postgresql" => {
            let opening = postgres::PostgresStore::open(url, limits);
            Box::new(bounded_open(url, limits, opening).await?)
        }
        "mysql" | "mariadb" => {
            let opening = mysql::MysqlStore::open(url, limits);
            Box::new(bounded_open(url, limits, opening).await?)
        }
        _ => {
            return Err(StoreError::InvalidUrl(format!(
                "`{}` must start with sqlite:, postgres://, postgresql://, mysql:// or mariadb://",
                redact_url(url)
            )));
        }
    };
    Ok(store)
}

/// Opening a connection is a call too: a server that accepts and never answers must not
/// hold up the start.
async fn bounded_open<T>(
    url: &str,
    limits: CallLimits,
    opening: impl std::future::Future<Output = StoreResult<T>>,
) -> StoreResult<T> {
    // Connecting may take a TCP handshake, TLS and authentication: a few calls' worth.
    let limit = limits.deadline * 3;
    tokio::time::timeout(limit, opening)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable(Detail::from(format!(
                "{}: no answer within {}",
                redact_url(url),
                humantime::format_duration(limit)
            ))))
        })
}

/// A store as opened for a command, by the roles it plays.
pub enum Opened {
    /// The native job store: every role.
    Native(Box<dyn JobStore>),
    /// A store whose jobs another system queues and tracks (the PIM's Messenger table):
    /// what a worker needs, and that system's stop; no job management by id.
    Consumed(Box<dyn ConsumedStore>),
}

impl Opened {
    /// The store as a worker sees it.
    pub fn worker(&self) -> &dyn WorkerStore {
        match self {
            Opened::Native(store) => store.as_ref(),
            Opened::Consumed(store) => store.as_ref(),
        }
    }

    pub fn into_worker(self) -> Box<dyn WorkerStore> {
        match self {
            Opened::Native(store) => store,
            Opened::Consumed(store) => store,
        }
    }

    /// The store with job management by id, for `what` (a command's name): an
    /// [`StoreError::Unsupported`] error naming the transport when it has none.
    pub fn jobs(&self, what: &str) -> StoreResult<&dyn JobStore> {
        match self {
            Opened::Native(store) => Ok(store.as_ref()),
            Opened::Consumed(_) => Err(StoreError::Unsupported(format!(
                "{what} is not available with transport = \"akeneo\": jobs are queued and \
                 tracked by the PIM (its process tracker shows them)"
            ))),
        }
    }
}

/// Opens the store the configuration selects: the native job store at `url`, or the PIM's
/// Messenger table when `transport = "akeneo"`, each call bounded by `limits` (a worker's
/// fit its fleet timings, a command's [`CallLimits::for_command`]).
pub async fn open_configured(
    config: &crate::config::Config,
    url: &str,
    limits: CallLimits,
) -> StoreResult<Opened> {
    match &config.transport {
        crate::config::Transport::Native => Ok(Opened::Native(open_with(url, limits).await?)),
        crate::config::Transport::Akeneo(settings) => {
            let scheme = url.split(':').next().unwrap_or("");
            if !matches!(scheme, "mysql" | "mariadb") {
                return Err(StoreError::InvalidUrl(format!(
                    "transport = \"akeneo\" needs the PIM's MySQL/MariaDB database, not `{}`",
                    redact_url(url)
                )));
            }
            let opening = akeneo::AkeneoStore::open(url, settings.clone(), limits);
            let store = bounded_open(url, limits, opening)
                .await
                .map_err(|error| error.without_secrets_of(url))?;
            let store: Box<dyn ConsumedStore> = Box::new(store);
            Ok(Opened::Consumed(Box::new(wrap::Deadlined::with_deadline(
                store,
                limits.deadline,
            ))))
        }
    }
}

/// Brings the schema to the version this binary needs, or checks it when `auto_migrate` is off.
pub async fn prepare_schema(store: &dyn SchemaStore, auto_migrate: bool) -> StoreResult<()> {
    if auto_migrate {
        store.migrate().await.map(drop)
    } else {
        let version = store.schema_version().await?;
        match version.found.cmp(&version.latest) {
            std::cmp::Ordering::Equal => Ok(()),
            std::cmp::Ordering::Greater => Err(StoreError::SchemaTooNew {
                found: version.found,
                latest: version.latest,
            }),
            std::cmp::Ordering::Less => Err(StoreError::SchemaOutdated {
                found: version.found,
                latest: version.latest,
            }),
        }
    }
}

/// The SQLite file used when nothing is configured: the systemd state directory, the
/// system state directory as root, or the user's data directory.
pub fn default_database_path() -> PathBuf {
    const FILE: &str = "jobs.sqlite";
    if let Some(state) = std::env::var_os("STATE_DIRECTORY") {
        let first = state
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        if !first.is_empty() {
            return PathBuf::from(first).join(FILE);
        }
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/pim_job_queue").join(FILE);
    }
    let data_home = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    data_home.join("pim_job_queue").join(FILE)
}

pub fn default_database_url() -> String {
    format!("sqlite://{}", default_database_path().display())
}

pub use crate::secrets::redact_url;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every wait a call can make ends before the fence: the server's limits (SQLite's busy
    /// wait, lock waits, statements) before the client's deadline, and that well before the
    /// fence (two thirds of `rescue_after`), so a heartbeat that cannot get through fails
    /// and tries again instead of outlasting it.
    #[test]
    fn call_limits_end_before_the_fence() {
        for seconds in [3, 9, 30, 60, 600] {
            let rescue_after = Duration::from_secs(seconds);
            let limits = CallLimits::for_rescue_after(rescue_after);
            let fence = rescue_after * 2 / 3;
            assert!(limits.server_side() < limits.deadline, "{seconds}");
            assert!(limits.deadline * 2 <= fence, "{seconds}");
            assert!(limits.deadline <= Duration::from_secs(10), "{seconds}");
        }
    }

    #[test]
    fn timestamps_print_in_utc() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(
            Timestamp(5_000_000).since(Timestamp(2_000_000)),
            Duration::from_secs(3)
        );
        assert_eq!(Timestamp(1).since(Timestamp(2)), Duration::ZERO);
    }
}

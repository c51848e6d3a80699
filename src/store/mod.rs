//! The job store: one trait, [`JobStore`], and one backend module per database.
//!
//! The consumer, the runner and the commands only see the trait, so a backend can be added
//! without touching them. All SQL lives in the backend modules. Every change out of `running`
//! is guarded by the claiming worker's token and the lease counter set at claim time, so a
//! late or repeated completion (after a rescue, say) changes nothing.

pub mod sqlite;

use std::fmt;
use std::path::PathBuf;
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

    pub fn plus(self, duration: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(duration.as_micros() as i64))
    }

    /// How long after `earlier` this is; zero if it is not later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0).max(0) as u64)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let time = UNIX_EPOCH + Duration::from_micros(self.0.max(0) as u64);
        write!(f, "{}", humantime::format_rfc3339_seconds(time))
    }
}

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
    pub created_at: Timestamp,
    pub available_at: Timestamp,
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

/// How a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobResult {
    Succeeded,
    Failed {
        exit_code: Option<i32>,
        signal: Option<i32>,
        reason: String,
    },
}

/// A job's result with the last lines of its output.
#[derive(Debug, Clone)]
pub struct Completion {
    pub result: JobResult,
    pub output: Vec<String>,
    pub finished_at: Timestamp,
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
    pub succeeded: i64,
    pub failed: i64,
    pub cancelled: i64,
}

/// Which jobs `jobs` lists, newest first.
#[derive(Debug, Clone)]
pub struct JobFilter {
    pub queue: Option<String>,
    pub status: Option<JobStatus>,
    pub limit: u32,
}

/// What an operator's state change (`retry`, `cancel`) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOutcome {
    Changed,
    NotFound,
    /// The job exists but is in a state the change does not apply to.
    WrongState(JobStatus),
}

/// The schema version found in the database and the one this binary brings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaVersion {
    pub found: i64,
    pub latest: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached now; trying again later may work.
    #[error("database unavailable: {0}")]
    Unavailable(String),
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
    #[error("database error: {0}")]
    Database(String),
}

impl StoreError {
    /// Whether waiting and trying again can help (a server restart, a lock held too long).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Failure {
        let exit = match &error {
            StoreError::Unavailable(_) => ExitCode::Unavailable,
            StoreError::SchemaTooNew { .. }
            | StoreError::SchemaOutdated { .. }
            | StoreError::InvalidUrl(_) => ExitCode::Config,
            StoreError::Database(_) => ExitCode::Software,
        };
        Failure::new(exit, error.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The operations the worker and the commands need from a database.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Where the jobs are, for people (no password).
    fn location(&self) -> String;

    /// Creates or upgrades the schema; safe when several processes do it at once. Returns how
    /// many migrations were applied.
    async fn migrate(&self) -> StoreResult<u32>;

    async fn schema_version(&self) -> StoreResult<SchemaVersion>;

    async fn push(&self, job: &NewJob) -> StoreResult<JobId>;

    /// Claims the oldest due job of the first non-empty queue in `queues`, or nothing.
    async fn claim(
        &self,
        queues: &[String],
        worker: &WorkerIdentity,
        now: Timestamp,
    ) -> StoreResult<Option<ClaimedJob>>;

    /// Records that the job's process started. False if the lease is no longer held.
    async fn mark_started(&self, lease: &Lease, now: Timestamp) -> StoreResult<bool>;

    /// Records a running job's result. False (and nothing changed) if the lease is no longer
    /// held: the job was rescued, or this completion is a repeat.
    async fn complete(&self, lease: &Lease, completion: &Completion) -> StoreResult<bool>;

    /// The current stop-workers generation; workers exit when it moves past the one they saw
    /// at start.
    async fn stop_generation(&self) -> StoreResult<i64>;

    /// Asks every worker sharing this database to stop; returns the new generation.
    async fn request_stop(&self) -> StoreResult<i64>;

    /// Counts per queue, for the queues that have any jobs.
    async fn queue_counts(&self, now: Timestamp) -> StoreResult<Vec<QueueCounts>>;

    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<JobRecord>>;

    async fn get_job(&self, id: JobId) -> StoreResult<Option<JobRecord>>;

    /// Puts a failed or cancelled job back to waiting, with its attempts reset.
    async fn retry(&self, id: JobId, now: Timestamp) -> StoreResult<ChangeOutcome>;

    /// Cancels a waiting job.
    async fn cancel(&self, id: JobId, now: Timestamp) -> StoreResult<ChangeOutcome>;
}

/// Opens the store a database URL names, without touching the schema.
pub async fn open(url: &str) -> StoreResult<Box<dyn JobStore>> {
    let scheme = url.split(':').next().unwrap_or("");
    match scheme {
        "sqlite" => Ok(Box::new(sqlite::SqliteStore::open(url).await?)),
        "postgres" | "postgresql" | "mysql" | "mariadb" => Err(StoreError::InvalidUrl(format!(
            "{scheme} URLs are not supported by this build yet; use an sqlite: URL"
        ))),
        _ => Err(StoreError::InvalidUrl(format!(
            "`{}` does not start with sqlite:",
            redact_url(url)
        ))),
    }
}

/// Brings the schema to the version this binary needs, or checks it when `auto_migrate` is off.
pub async fn prepare_schema(store: &dyn JobStore, auto_migrate: bool) -> StoreResult<()> {
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

/// A URL with its password replaced, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact_url("mysql://akeneo:s3cret@db:3306/pim"),
            "mysql://akeneo:***@db:3306/pim"
        );
        assert_eq!(
            redact_url("sqlite:///var/x.sqlite"),
            "sqlite:///var/x.sqlite"
        );
        assert_eq!(redact_url("postgres://db/pim"), "postgres://db/pim");
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

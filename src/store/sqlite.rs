//! The SQLite backend: the zero-configuration default, one file shared by the workers of one
//! host.
//!
//! WAL mode lets readers (`status`) run beside the writers; the busy timeout makes workers
//! queue for the write lock instead of failing. A claim is a single `UPDATE … RETURNING`
//! statement, and SQLite takes the write lock before that statement reads anything, so two
//! processes can never claim the same row.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Row, Sqlite, Transaction};

use super::{
    ChangeOutcome, ClaimedJob, Completion, JobFilter, JobId, JobRecord, JobResult, JobStatus,
    JobStore, Lease, NewJob, QueueCounts, SchemaVersion, StoreError, StoreResult, Timestamp,
    WorkerIdentity,
};

/// How long a statement waits for another process's write lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Schema migrations, applied in order, each a list of statements; a released version is
/// never edited.
const MIGRATIONS: &[(i64, &[&str])] = &[(
    1,
    &[
        "CREATE TABLE pjq_jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            queue TEXT NOT NULL,
            code TEXT NOT NULL,
            payload TEXT NOT NULL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            lease INTEGER NOT NULL DEFAULT 0,
            created_at INTEGER NOT NULL,
            available_at INTEGER NOT NULL,
            claimed_at INTEGER,
            started_at INTEGER,
            finished_at INTEGER,
            worker_token TEXT,
            worker_host TEXT,
            worker_instance TEXT,
            worker_pid INTEGER,
            exit_code INTEGER,
            exit_signal INTEGER,
            reason TEXT,
            output TEXT
        )",
        "CREATE INDEX pjq_jobs_claim ON pjq_jobs (queue, available_at, id)
            WHERE status = 'waiting'",
        "CREATE INDEX pjq_jobs_status ON pjq_jobs (status, queue)",
        "CREATE TABLE pjq_control (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT INTO pjq_control (name, value) VALUES ('stop_generation', 0)",
    ],
)];

const LATEST_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

const RECORD_COLUMNS: &str = "id, queue, code, payload, status, attempts, created_at, \
    available_at, claimed_at, started_at, finished_at, worker_host, worker_instance, \
    worker_pid, exit_code, exit_signal, reason, output";

pub struct SqliteStore {
    pool: SqlitePool,
    path: String,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file an `sqlite:` URL names.
    pub async fn open(url: &str) -> StoreResult<SqliteStore> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|error| StoreError::InvalidUrl(format!("{url}: {error}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            .disable_statement_logging();
        let path = options.get_filename().display().to_string();
        create_parent_dir(options.get_filename())?;
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .map_err(|error| classify(error, &path))?;
        Ok(SqliteStore { pool, path })
    }

    fn error(&self, error: sqlx::Error) -> StoreError {
        classify(error, &self.path)
    }

    async fn found_version(&self, tx: &mut Transaction<'_, Sqlite>) -> StoreResult<i64> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS pjq_schema_migrations (
                version INTEGER PRIMARY KEY,
                applied_at INTEGER NOT NULL
            )",
        )
        .execute(&mut **tx)
        .await
        .map_err(|e| self.error(e))?;
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM pjq_schema_migrations")
            .fetch_one(&mut **tx)
            .await
            .map_err(|e| self.error(e))
    }

    async fn claim_from(
        &self,
        queue: &str,
        worker: &WorkerIdentity,
        now: Timestamp,
    ) -> StoreResult<Option<ClaimedJob>> {
        let row = sqlx::query(
            "UPDATE pjq_jobs SET status = 'running', lease = lease + 1, attempts = attempts + 1,
                claimed_at = ?1, started_at = NULL, finished_at = NULL,
                worker_token = ?2, worker_host = ?3, worker_instance = ?4, worker_pid = ?5,
                exit_code = NULL, exit_signal = NULL, reason = NULL, output = NULL
             WHERE id = (SELECT id FROM pjq_jobs
                         WHERE queue = ?6 AND status = 'waiting' AND available_at <= ?1
                         ORDER BY available_at, id LIMIT 1)
             RETURNING id, queue, code, payload, attempts, lease",
        )
        .bind(now.0)
        .bind(&worker.token)
        .bind(&worker.host)
        .bind(&worker.instance)
        .bind(worker.pid as i64)
        .bind(queue)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        row.map(|row| claimed_from_row(&row, &worker.token))
            .transpose()
            .map_err(|e| self.error(e))
    }

    async fn status_of(&self, id: JobId) -> StoreResult<Option<JobStatus>> {
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM pjq_jobs WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        Ok(status.and_then(|s| JobStatus::parse(&s)))
    }

    /// Turns "no row changed" into the reason, for operator commands.
    async fn change_outcome(&self, id: JobId, rows: u64) -> StoreResult<ChangeOutcome> {
        if rows > 0 {
            return Ok(ChangeOutcome::Changed);
        }
        Ok(match self.status_of(id).await? {
            Some(status) => ChangeOutcome::WrongState(status),
            None => ChangeOutcome::NotFound,
        })
    }
}

#[async_trait]
impl JobStore for SqliteStore {
    fn location(&self) -> String {
        format!("sqlite://{}", self.path)
    }

    async fn migrate(&self) -> StoreResult<u32> {
        // IMMEDIATE takes the write lock first, so concurrent starters apply each step once.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.error(e))?;
        let found = self.found_version(&mut tx).await?;
        if found > LATEST_VERSION {
            return Err(StoreError::SchemaTooNew {
                found,
                latest: LATEST_VERSION,
            });
        }
        let mut applied = 0;
        for &(version, statements) in MIGRATIONS {
            if version <= found {
                continue;
            }
            for statement in statements {
                sqlx::query(statement)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.error(e))?;
            }
            sqlx::query("INSERT INTO pjq_schema_migrations (version, applied_at) VALUES (?, ?)")
                .bind(version)
                .bind(Timestamp::now().0)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.error(e))?;
            applied += 1;
        }
        tx.commit().await.map_err(|e| self.error(e))?;
        Ok(applied)
    }

    async fn schema_version(&self) -> StoreResult<SchemaVersion> {
        let has_table: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'pjq_schema_migrations')",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        let found = if has_table {
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM pjq_schema_migrations")
                .fetch_one(&self.pool)
                .await
                .map_err(|e| self.error(e))?
        } else {
            0
        };
        Ok(SchemaVersion {
            found,
            latest: LATEST_VERSION,
        })
    }

    async fn push(&self, job: &NewJob) -> StoreResult<JobId> {
        sqlx::query_scalar(
            "INSERT INTO pjq_jobs (queue, code, payload, status, created_at, available_at)
             VALUES (?, ?, ?, 'waiting', ?, ?) RETURNING id",
        )
        .bind(&job.queue)
        .bind(&job.code)
        .bind(&job.payload)
        .bind(job.created_at.0)
        .bind(job.available_at.0)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.error(e))
    }

    async fn claim(
        &self,
        queues: &[String],
        worker: &WorkerIdentity,
        now: Timestamp,
    ) -> StoreResult<Option<ClaimedJob>> {
        for queue in queues {
            if let Some(job) = self.claim_from(queue, worker, now).await? {
                return Ok(Some(job));
            }
        }
        Ok(None)
    }

    async fn mark_started(&self, lease: &Lease, now: Timestamp) -> StoreResult<bool> {
        let result = sqlx::query(
            "UPDATE pjq_jobs SET started_at = ?
             WHERE id = ? AND worker_token = ? AND lease = ? AND status = 'running'",
        )
        .bind(now.0)
        .bind(lease.job_id)
        .bind(&lease.token)
        .bind(lease.lease)
        .execute(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(result.rows_affected() == 1)
    }

    async fn complete(&self, lease: &Lease, completion: &Completion) -> StoreResult<bool> {
        let (status, exit_code, signal, reason) = match &completion.result {
            JobResult::Succeeded => (JobStatus::Succeeded, Some(0), None, None),
            JobResult::Failed {
                exit_code,
                signal,
                reason,
            } => (
                JobStatus::Failed,
                *exit_code,
                *signal,
                Some(reason.as_str()),
            ),
        };
        let result = sqlx::query(
            "UPDATE pjq_jobs SET status = ?, finished_at = ?, exit_code = ?, exit_signal = ?,
                reason = ?, output = ?
             WHERE id = ? AND worker_token = ? AND lease = ? AND status = 'running'",
        )
        .bind(status.as_str())
        .bind(completion.finished_at.0)
        .bind(exit_code)
        .bind(signal)
        .bind(reason)
        .bind(completion.output.join("\n"))
        .bind(lease.job_id)
        .bind(&lease.token)
        .bind(lease.lease)
        .execute(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(result.rows_affected() == 1)
    }

    async fn stop_generation(&self) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT value FROM pjq_control WHERE name = 'stop_generation'")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.error(e))
    }

    async fn request_stop(&self) -> StoreResult<i64> {
        sqlx::query_scalar(
            "UPDATE pjq_control SET value = value + 1 WHERE name = 'stop_generation'
             RETURNING value",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.error(e))
    }

    async fn queue_counts(&self, now: Timestamp) -> StoreResult<Vec<QueueCounts>> {
        let rows = sqlx::query(
            "SELECT queue, status, COUNT(*) AS n,
                    SUM(CASE WHEN available_at > ? THEN 1 ELSE 0 END) AS later
             FROM pjq_jobs GROUP BY queue, status ORDER BY queue",
        )
        .bind(now.0)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        let mut counts: Vec<QueueCounts> = Vec::new();
        for row in rows {
            let queue: String = row.get("queue");
            let status: String = row.get("status");
            let n: i64 = row.get("n");
            let later: i64 = row.get("later");
            if counts.last().is_none_or(|c| c.queue != queue) {
                counts.push(QueueCounts {
                    queue,
                    ..QueueCounts::default()
                });
            }
            let entry = counts.last_mut().expect("pushed above");
            match JobStatus::parse(&status) {
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
        Ok(counts)
    }

    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<JobRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {RECORD_COLUMNS} FROM pjq_jobs
             WHERE (?1 IS NULL OR queue = ?1) AND (?2 IS NULL OR status = ?2)
             ORDER BY id DESC LIMIT ?3"
        ))
        .bind(&filter.queue)
        .bind(filter.status.map(JobStatus::as_str))
        .bind(filter.limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        rows.iter()
            .map(record_from_row)
            .collect::<Result<_, _>>()
            .map_err(|e| self.error(e))
    }

    async fn get_job(&self, id: JobId) -> StoreResult<Option<JobRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {RECORD_COLUMNS} FROM pjq_jobs WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        row.as_ref()
            .map(record_from_row)
            .transpose()
            .map_err(|e| self.error(e))
    }

    async fn retry(&self, id: JobId, now: Timestamp) -> StoreResult<ChangeOutcome> {
        let result = sqlx::query(
            "UPDATE pjq_jobs SET status = 'waiting', attempts = 0, available_at = ?,
                finished_at = NULL
             WHERE id = ? AND status IN ('failed', 'cancelled')",
        )
        .bind(now.0)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        self.change_outcome(id, result.rows_affected()).await
    }

    async fn cancel(&self, id: JobId, now: Timestamp) -> StoreResult<ChangeOutcome> {
        let result = sqlx::query(
            "UPDATE pjq_jobs SET status = 'cancelled', finished_at = ?,
                reason = 'cancelled by operator'
             WHERE id = ? AND status = 'waiting'",
        )
        .bind(now.0)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        self.change_outcome(id, result.rows_affected()).await
    }
}

fn create_parent_dir(file: &Path) -> StoreResult<()> {
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.exists() => std::fs::create_dir_all(dir)
            .map_err(|error| {
                StoreError::Unavailable(format!("cannot create {}: {error}", dir.display()))
            }),
        _ => Ok(()),
    }
}

/// Sorts SQLite failures into "try again later" and "something is wrong".
fn classify(error: sqlx::Error, path: &str) -> StoreError {
    const SQLITE_BUSY: &str = "5";
    const SQLITE_LOCKED: &str = "6";
    const SQLITE_IOERR: &str = "10";
    const SQLITE_FULL: &str = "13";
    const SQLITE_CANTOPEN: &str = "14";
    const SQLITE_READONLY: &str = "8";
    let transient = match &error {
        sqlx::Error::Database(db) => {
            let primary = db.code().map(|c| {
                let code: i64 = c.parse().unwrap_or(-1);
                (code & 0xff).to_string()
            });
            matches!(
                primary.as_deref(),
                Some(
                    SQLITE_BUSY
                        | SQLITE_LOCKED
                        | SQLITE_IOERR
                        | SQLITE_FULL
                        | SQLITE_CANTOPEN
                        | SQLITE_READONLY
                )
            )
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    };
    if transient {
        StoreError::Unavailable(format!("{path}: {error}"))
    } else {
        StoreError::Database(format!("{path}: {error}"))
    }
}

fn claimed_from_row(row: &SqliteRow, token: &str) -> Result<ClaimedJob, sqlx::Error> {
    let id: JobId = row.try_get("id")?;
    Ok(ClaimedJob {
        id,
        queue: row.try_get("queue")?,
        code: row.try_get("code")?,
        payload: row.try_get("payload")?,
        attempts: row.try_get("attempts")?,
        lease: Lease {
            job_id: id,
            token: token.to_string(),
            lease: row.try_get("lease")?,
        },
    })
}

fn record_from_row(row: &SqliteRow) -> Result<JobRecord, sqlx::Error> {
    let status: String = row.try_get("status")?;
    let output: Option<String> = row.try_get("output")?;
    let timestamp = |name: &str| -> Result<Option<Timestamp>, sqlx::Error> {
        Ok(row.try_get::<Option<i64>, _>(name)?.map(Timestamp))
    };
    Ok(JobRecord {
        id: row.try_get("id")?,
        queue: row.try_get("queue")?,
        code: row.try_get("code")?,
        payload: row.try_get("payload")?,
        status: JobStatus::parse(&status)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown job status {status:?}").into()))?,
        attempts: row.try_get("attempts")?,
        created_at: Timestamp(row.try_get("created_at")?),
        available_at: Timestamp(row.try_get("available_at")?),
        claimed_at: timestamp("claimed_at")?,
        started_at: timestamp("started_at")?,
        finished_at: timestamp("finished_at")?,
        worker_host: row.try_get("worker_host")?,
        worker_instance: row.try_get("worker_instance")?,
        worker_pid: row.try_get("worker_pid")?,
        exit_code: row.try_get("exit_code")?,
        exit_signal: row.try_get("exit_signal")?,
        reason: row.try_get("reason")?,
        output: output
            .filter(|text| !text.is_empty())
            .map(|text| text.lines().map(str::to_owned).collect())
            .unwrap_or_default(),
    })
}

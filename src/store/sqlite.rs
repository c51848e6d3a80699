//! The SQLite backend: the zero-configuration default, one file shared by the workers of one
//! host.
//!
//! WAL mode lets readers (`status`) run beside the writers; the busy timeout makes workers
//! queue for the write lock instead of failing. A claim is a single `UPDATE … RETURNING`
//! statement, and SQLite takes the write lock before that statement reads anything, so two
//! processes can never claim the same row.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Row};

use super::rows::{self, Dialect, JOB_RECORD_COLUMNS, RUNS_AGAIN, STOP_GENERATION};
use super::{
    CallLimits, ChangeOutcome, ClaimedJob, Completion, Detail, JobFilter, JobId, JobRecord,
    JobStatus, JobStore, Lease, NewJob, OrphanedJob, Poll, QueueCounts, Release, RescueScan,
    SchemaVersion, StoreError, StoreResult, Timestamp, Turn, WORKER_LOST, WorkerIdentity,
    WorkerRecord,
};

/// The database's clock in microseconds since the epoch (for SQLite: this host's clock).
const DB_NOW: &str = "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)";
const DIALECT: Dialect = Dialect {
    db_now: DB_NOW,
    placeholder: numbered,
};

fn numbered(n: usize) -> String {
    format!("?{n}")
}

fn insert_job() -> String {
    rows::insert_job(DB_NOW, ["?"; 5])
}

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
            max_attempts INTEGER NOT NULL DEFAULT 1,
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
        "CREATE INDEX pjq_jobs_finished ON pjq_jobs (finished_at)
            WHERE finished_at IS NOT NULL",
        "CREATE TABLE pjq_control (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT INTO pjq_control (name, value) VALUES ('stop_generation', 0)",
        "CREATE TABLE pjq_workers (
            token TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            instance TEXT,
            pid INTEGER NOT NULL,
            queues TEXT NOT NULL,
            started_at INTEGER NOT NULL,
            heartbeat_at INTEGER NOT NULL,
            current_job INTEGER
        )",
    ],
)];

const LATEST_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

pub struct SqliteStore {
    pool: SqlitePool,
    path: String,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file an `sqlite:` URL names.
    ///
    /// A statement waits for another process's write lock for the server-side part of
    /// `limits`: well inside the fence, so write contention on the file makes a heartbeat
    /// fail and try again, never outlast the fence of every job on the host.
    pub async fn open(url: &str, limits: CallLimits) -> StoreResult<SqliteStore> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|error| StoreError::InvalidUrl(format!("{url}: {error}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(limits.server_side())
            .disable_statement_logging();
        let path = options.get_filename().display().to_string();
        create_store_file(options.get_filename())?;
        let pool = SqlitePoolOptions::new()
            // No ping before each use: it doubled every call's round trips, and a
            // connection that died meanwhile fails its statement, which is retried like
            // any other transient error.
            .test_before_acquire(false)
            .max_connections(2)
            .connect_with(options)
            .await
            .map_err(|error| classify(error, &path))?;
        Ok(SqliteStore { pool, path })
    }

    fn error(&self, error: sqlx::Error) -> StoreError {
        classify(error, &self.path)
    }

    /// Claims the next job inside `tx`: the head of the first queue with a due job, in one
    /// statement that also reads the stop-workers generation. Writers are serialized on
    /// SQLite, so the head found is the head taken.
    async fn claim_in(
        &self,
        tx: &mut sqlx::SqliteConnection,
        turn: &Turn<'_>,
    ) -> Result<(Option<ClaimedJob>, i64), sqlx::Error> {
        let statement = format!(
            "UPDATE pjq_jobs SET {}
             WHERE id = {}
             RETURNING id, queue, code, payload, attempts, lease, {STOP_GENERATION} AS generation",
            DIALECT.claim_assignments(1),
            DIALECT.next_due_id(turn.queues.len(), 5, false)
        );
        let mut query = rows::bind_worker(sqlx::query(&statement), turn.worker);
        for queue in turn.queues {
            query = query.bind(queue.as_str());
        }
        if let Some(row) = query.fetch_optional(&mut *tx).await? {
            let job = rows::claimed_job(&row, &turn.worker.token)?;
            return Ok((Some(job), row.try_get("generation")?));
        }
        let generation = sqlx::query_scalar(&format!("SELECT {STOP_GENERATION}"))
            .fetch_one(&mut *tx)
            .await?;
        Ok((None, generation))
    }

    /// The idle poll, one read: the stop-workers generation and whether any of `queues` has
    /// a due job.
    async fn probe(&self, queues: &[String]) -> Result<(i64, bool), sqlx::Error> {
        let statement = format!(
            "SELECT {STOP_GENERATION} AS generation, {} IS NOT NULL AS due",
            DIALECT.next_due_id(queues.len(), 1, false)
        );
        let mut query = sqlx::query(&statement);
        for queue in queues {
            query = query.bind(queue.as_str());
        }
        let row = query.fetch_one(&self.pool).await?;
        Ok((row.try_get("generation")?, row.try_get("due")?))
    }

    async fn turn(&self, turn: &Turn<'_>) -> Result<Poll, sqlx::Error> {
        if turn.finished.is_none() {
            let (stop_generation, due) = self.probe(turn.queues).await?;
            if !due {
                return Ok(Poll {
                    stop_generation,
                    ..Poll::default()
                });
            }
        }
        // IMMEDIATE: the write lock first, so the claim never has to upgrade a read lock.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let recorded = match turn.finished {
            Some((lease, completion)) => {
                let complete = DIALECT.complete_job(1);
                let result = rows::bind_completion(sqlx::query(&complete), lease, completion)
                    .execute(&mut *tx)
                    .await?;
                Some(result.rows_affected() == 1)
            }
            None => None,
        };
        let (job, stop_generation) = self.claim_in(&mut tx, turn).await?;
        tx.commit().await?;
        Ok(Poll {
            stop_generation,
            job,
            recorded,
            contended: false,
        })
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

    /// Requeues (attempts left) or fails a running job whose lease is still `lease` and
    /// whose holder is as `holder` says; returns which, or `None` when the guard did not hold.
    async fn take_back(
        &self,
        id: JobId,
        lease: i64,
        holder: Holder<'_>,
        reason: &str,
        now: Timestamp,
    ) -> StoreResult<Option<bool>> {
        let (holder_check, token) = match holder {
            Holder::Token(token) => ("worker_token = ?5".to_string(), Some(token)),
            Holder::Lost { rescue_after } => (rows::orphaned(DB_NOW, rescue_after), None),
        };
        let statement = format!(
            "UPDATE pjq_jobs SET
                status = CASE WHEN {RUNS_AGAIN} THEN 'waiting' ELSE 'failed' END,
                available_at = CASE WHEN {RUNS_AGAIN} THEN {DB_NOW} ELSE available_at END,
                finished_at = CASE WHEN {RUNS_AGAIN} THEN NULL ELSE ?1 END,
                reason = CASE WHEN {RUNS_AGAIN} THEN ?2 || ' (requeued)' ELSE ?2 END,
                attempts = CASE WHEN started_at IS NULL THEN attempts - 1 ELSE attempts END,
                lease = lease + 1, worker_token = NULL
             WHERE id = ?3 AND lease = ?4 AND status = 'running' AND {holder_check}
             RETURNING status"
        );
        let mut query = sqlx::query_scalar::<_, String>(&statement)
            .bind(now.0)
            .bind(reason)
            .bind(id)
            .bind(lease);
        if let Some(token) = token {
            query = query.bind(token);
        }
        let status = query
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        Ok(status.map(|s| s == "waiting"))
    }
}

rows::guarded_writes!(SqliteStore);

/// Who must hold a job for a take-back to apply.
#[derive(Clone, Copy)]
enum Holder<'a> {
    /// This worker, giving the job up.
    Token(&'a str),
    /// Nobody alive: the holder's heartbeat is older than this, or its row is gone.
    Lost { rescue_after: Duration },
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
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS pjq_schema_migrations (
                version INTEGER PRIMARY KEY,
                applied_at INTEGER NOT NULL
            )",
        )
        .execute(&mut *tx)
        .await
        .map_err(|e| self.error(e))?;
        let found: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM pjq_schema_migrations")
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| self.error(e))?;
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
        sqlx::query_scalar(&format!("{} RETURNING id", insert_job()))
            .bind(&job.queue)
            .bind(&job.code)
            .bind(&job.payload)
            .bind(rows::delay_micros(job.delay))
            .bind(job.max_attempts as i64)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.error(e))
    }

    async fn push_batch(&self, jobs: &[NewJob]) -> StoreResult<u64> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.error(e))?;
        let insert = insert_job();
        for job in jobs {
            rows::bind_new_job(sqlx::query(&insert), job)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.error(e))?;
        }
        tx.commit().await.map_err(|e| self.error(e))?;
        Ok(jobs.len() as u64)
    }

    async fn next_job(&self, turn: &Turn<'_>) -> StoreResult<Poll> {
        self.turn(turn).await.map_err(|e| self.error(e))
    }

    async fn put_back_unrun(&self, lease: &Lease, reason: &str) -> StoreResult<bool> {
        self.guarded_put_back(lease, reason).await
    }

    async fn put_back_unanswered_claims(
        &self,
        worker: &WorkerIdentity,
        keep: &[JobId],
    ) -> StoreResult<u64> {
        self.guarded_put_back_unanswered(worker, keep).await
    }

    async fn complete(&self, lease: &Lease, completion: &Completion) -> StoreResult<bool> {
        self.guarded_complete(lease, completion).await
    }

    async fn database_time(&self) -> StoreResult<Timestamp> {
        let now = rows::database_time(&self.pool, DB_NOW).await;
        now.map_err(|e| self.error(e))
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

    async fn queue_counts(&self) -> StoreResult<Vec<QueueCounts>> {
        let rows = sqlx::query(&format!(
            "SELECT queue, status, COUNT(*) AS n,
                    SUM(CASE WHEN available_at > {DB_NOW} THEN 1 ELSE 0 END) AS later
             FROM pjq_jobs GROUP BY queue, status ORDER BY queue"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        let mut counts = Vec::new();
        for row in rows {
            super::add_count(
                &mut counts,
                row.get("queue"),
                row.get::<String, _>("status").as_str(),
                row.get("n"),
                row.get("later"),
            );
        }
        Ok(counts)
    }

    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<JobRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_RECORD_COLUMNS} FROM pjq_jobs
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
            .map(rows::job_record)
            .collect::<Result<_, _>>()
            .map_err(|e| self.error(e))
    }

    async fn get_job(&self, id: JobId) -> StoreResult<Option<JobRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {JOB_RECORD_COLUMNS} FROM pjq_jobs WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        row.as_ref()
            .map(rows::job_record)
            .transpose()
            .map_err(|e| self.error(e))
    }

    async fn retry(&self, id: JobId) -> StoreResult<ChangeOutcome> {
        let result = sqlx::query(&format!(
            "UPDATE pjq_jobs SET status = 'waiting', attempts = 0, available_at = {DB_NOW},
                finished_at = NULL
             WHERE id = ? AND status IN ('failed', 'cancelled')"
        ))
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

    async fn release(&self, lease: &Lease, reason: &str, now: Timestamp) -> StoreResult<Release> {
        let outcome = self
            .take_back(
                lease.job_id,
                lease.lease,
                Holder::Token(&lease.token),
                reason,
                now,
            )
            .await?;
        Ok(super::release_of(outcome))
    }

    async fn register_worker(&self, worker: &WorkerIdentity, queues: &[String]) -> StoreResult<()> {
        sqlx::query(&format!(
            "INSERT INTO pjq_workers
                (token, host, instance, pid, queues, started_at, heartbeat_at, current_job)
             VALUES (?, ?, ?, ?, ?, ?, {DB_NOW}, NULL)
             ON CONFLICT (token) DO UPDATE SET heartbeat_at = excluded.heartbeat_at,
                queues = excluded.queues"
        ))
        .bind(&worker.token)
        .bind(&worker.host)
        .bind(&worker.instance)
        .bind(worker.pid as i64)
        .bind(queues.join(","))
        .bind(Timestamp::now().0)
        .execute(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(())
    }

    async fn heartbeat(
        &self,
        worker: &WorkerIdentity,
        current_job: Option<JobId>,
    ) -> StoreResult<bool> {
        let result = sqlx::query(&format!(
            "UPDATE pjq_workers SET heartbeat_at = {DB_NOW}, current_job = ? WHERE token = ?"
        ))
        .bind(current_job)
        .bind(&worker.token)
        .execute(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(result.rows_affected() == 1)
    }

    async fn unregister_worker(&self, worker: &WorkerIdentity) -> StoreResult<()> {
        sqlx::query("DELETE FROM pjq_workers WHERE token = ?")
            .bind(&worker.token)
            .execute(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    async fn list_workers(&self) -> StoreResult<Vec<WorkerRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT host, instance, pid, queues, started_at, current_job,
                    {DB_NOW} - heartbeat_at AS age
             FROM pjq_workers ORDER BY host, instance, pid"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        rows.iter()
            .map(rows::worker_record)
            .collect::<Result<_, _>>()
            .map_err(|e| self.error(e))
    }

    async fn rescue_scan(&self, rescue_after: Duration) -> StoreResult<RescueScan> {
        self.scan_for_orphans(rescue_after).await
    }

    async fn take_back_orphan(
        &self,
        job: &OrphanedJob,
        rescue_after: Duration,
        now: Timestamp,
    ) -> StoreResult<Option<bool>> {
        let lost = Holder::Lost { rescue_after };
        self.take_back(job.id, job.lease, lost, WORKER_LOST, now)
            .await
    }

    async fn forget_lost_workers(&self, rescue_after: Duration) -> StoreResult<()> {
        let limit = rescue_after.as_micros() as i64;
        sqlx::query(&format!(
            "DELETE FROM pjq_workers WHERE heartbeat_at <= {DB_NOW} - {limit}
               AND NOT EXISTS (SELECT 1 FROM pjq_jobs j
                               WHERE j.status = 'running' AND j.worker_token = pjq_workers.token)"
        ))
        .execute(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(())
    }

    async fn prune_batch(&self, before: Timestamp, limit: i64) -> StoreResult<u64> {
        let result = sqlx::query(
            "DELETE FROM pjq_jobs WHERE id IN (
                    SELECT id FROM pjq_jobs
                    WHERE finished_at < ? AND status IN ('succeeded', 'failed', 'cancelled')
                    LIMIT ?)",
        )
        .bind(before.0)
        .bind(limit)
        .execute(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        Ok(result.rows_affected())
    }
}

/// Creates a missing store file before SQLite opens it, so that it gets the right owner and
/// mode: readable by its owner only (0600, in new directories of 0700), and, when root
/// creates it in a directory that belongs to another user (the service's state directory),
/// owned by that user, whose workers must write it. SQLite itself gives its `-wal`/`-shm`
/// files the owner of the database when it runs as root.
fn create_store_file(file: &Path) -> StoreResult<()> {
    if file.as_os_str().is_empty() || file == Path::new(":memory:") || file.exists() {
        return Ok(());
    }
    let cannot = |what: &Path, error: std::io::Error| {
        let message = format!("cannot create {}: {error}", what.display());
        if error.kind() == std::io::ErrorKind::PermissionDenied {
            StoreError::PermissionDenied(message.into())
        } else {
            StoreError::Unavailable(message.into())
        }
    };
    let dir = file.parent().filter(|dir| !dir.as_os_str().is_empty());
    if let Some(dir) = dir
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|error| cannot(dir, error))?;
    }
    let created = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
    {
        Ok(created) => created,
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(error) => return Err(cannot(file, error)),
    };
    if nix::unistd::geteuid().is_root()
        && let Some(owner) = dir.and_then(|dir| std::fs::metadata(dir).ok())
        && owner.uid() != 0
    {
        std::os::unix::fs::fchown(&created, Some(owner.uid()), Some(owner.gid()))
            .map_err(|error| cannot(file, error))?;
    }
    Ok(())
}

/// Why SQLite cannot write `path`, when it is a matter of permissions: the file, or the
/// directory its journal files go in, is not writable by this user.
fn permission_problem(path: &str) -> Option<String> {
    let file = Path::new(path);
    let dir = file
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let me = nix::unistd::geteuid();
    for target in [file, dir] {
        if target.exists() && nix::unistd::access(target, nix::unistd::AccessFlags::W_OK).is_err() {
            let owner = std::fs::metadata(target).map(|m| m.uid()).unwrap_or(0);
            return Some(format!(
                "{} is not writable by this user (uid {me}; it belongs to uid {owner}): \
                 a worker cannot use this job store until its owner is fixed, e.g. \
                 `chown -R <service user> {}`",
                target.display(),
                dir.display()
            ));
        }
    }
    None
}

/// Sorts a SQLite error by its primary result code: the one place that decides what waiting
/// can fix.
pub fn classify(error: sqlx::Error, path: &str) -> StoreError {
    // Primary result codes: BUSY, LOCKED, READONLY, IOERR, FULL, CANTOPEN.
    const TRANSIENT: [i64; 6] = [5, 6, 8, 10, 13, 14];
    let primary = match &error {
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|code| code.parse::<i64>().ok())
            .map(|code| code & 0xff),
        _ => None,
    };
    // Any database error is lasting when this user cannot write the file or its directory:
    // READONLY and CANTOPEN as a rule, but under load a read-only WAL connection can also
    // report BUSY or an I/O error first, and retrying those would loop forever.
    if primary.is_some()
        && let Some(problem) = permission_problem(path)
    {
        let text = format!("{problem} ({error})");
        return StoreError::PermissionDenied(Detail::of(path, error).worded(text));
    }
    let transient = match primary {
        Some(code) => TRANSIENT.contains(&code),
        None => super::is_connection_error(&error),
    };
    if transient {
        StoreError::Unavailable(Detail::of(path, error))
    } else {
        StoreError::Database(Detail::of(path, error))
    }
}

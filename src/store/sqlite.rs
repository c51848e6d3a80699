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

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Row};

use super::statements::{self, Dialect, STOP_GENERATION, Upsert};
use super::{
    CallLimits, ClaimedJob, Detail, JobId, NewJob, Poll, SchemaStore, SchemaVersion, StoreError,
    StoreResult, Timestamp, Turn, native, rows,
};

/// The database's clock in microseconds since the epoch (for SQLite: this host's clock).
const DB_NOW: &str = "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)";
pub(super) const DIALECT: Dialect = Dialect {
    db_now: DB_NOW,
    placeholder: numbered,
    integer: "BIGINT",
    upsert: Upsert::OnConflict,
    concat: statements::pipes,
    joined,
    returning: true,
    lock_rows: "",
    caps_rows,
};

/// The caps bound at `param` as rows (see [`Dialect::caps_rows`]).
fn caps_rows(param: &str) -> String {
    format!(
        "(SELECT json_extract(value, '$.code') AS code, json_extract(value, '$.key') AS cap_key,
                 json_extract(value, '$.limit') AS cap_limit
          FROM json_each({param}))"
    )
}

/// The pause descriptions joined, for [`Dialect::rescue_scan`].
fn joined(expression: &str) -> String {
    format!("group_concat({expression}, ', ')")
}

fn numbered(n: usize) -> String {
    format!("?{n}")
}

/// Schema migrations, applied in order, each a list of statements; a released version is
/// never edited.
const MIGRATIONS: &[(i64, &[&str])] = &[
    (
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
    ),
    (
        2,
        &["CREATE TABLE pjq_pauses (
            queue TEXT PRIMARY KEY,
            reason TEXT NOT NULL,
            paused_at INTEGER NOT NULL,
            paused_by TEXT NOT NULL
        )"],
    ),
    (
        3,
        // What finished jobs counted as before a prune, delete or retry removed them (see
        // `Dialect::fold_tallies`), and rescues: the counters `metrics` reports.
        &[
            "CREATE TABLE pjq_tallies (
            queue TEXT NOT NULL,
            event TEXT NOT NULL,
            duration_bucket INTEGER NOT NULL,
            wait_bucket INTEGER NOT NULL,
            jobs INTEGER NOT NULL,
            duration_sum INTEGER NOT NULL,
            wait_sum INTEGER NOT NULL,
            PRIMARY KEY (queue, event, duration_bucket, wait_bucket)
        )",
            // A running job's cancel request, for its worker's heartbeat to find.
            "ALTER TABLE pjq_jobs ADD COLUMN cancel_requested TEXT",
            // The last run's peak memory and CPU time (`wait4`'s rusage).
            "ALTER TABLE pjq_jobs ADD COLUMN peak_rss_bytes INTEGER",
            "ALTER TABLE pjq_jobs ADD COLUMN cpu_usec INTEGER",
            // At most one waiting or running job per unique key (`push --unique-key`).
            "ALTER TABLE pjq_jobs ADD COLUMN unique_key TEXT",
            "CREATE UNIQUE INDEX pjq_jobs_unique_active ON pjq_jobs (unique_key)
             WHERE status IN ('waiting', 'running')",
            // Earlier attempts of a retried job, one JSON line each.
            "ALTER TABLE pjq_jobs ADD COLUMN history TEXT",
            // One row per schedule and slot: its primary key lets one worker queue it.
            "CREATE TABLE pjq_schedule_slots (
                name TEXT NOT NULL,
                slot_at INTEGER NOT NULL,
                enqueued_at INTEGER NOT NULL,
                job_id INTEGER,
                PRIMARY KEY (name, slot_at)
            )",
        ],
    ),
    (
        4,
        // Concurrency caps: the key a running job counts under, and one row per key whose
        // lock the other backends' claims take (kept alike here).
        &[
            "ALTER TABLE pjq_jobs ADD COLUMN concurrency_key TEXT",
            "CREATE INDEX pjq_jobs_capped ON pjq_jobs (concurrency_key) WHERE status = 'running'",
            "CREATE TABLE pjq_concurrency (cap_key TEXT PRIMARY KEY)",
        ],
    ),
];

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
        let deadline = tokio::time::Instant::now() + limits.server_side();
        loop {
            let connecting = SqlitePoolOptions::new()
                // No ping before each use: it doubled every call's round trips, and a
                // connection that died meanwhile fails its statement, which is retried like
                // any other transient error.
                .test_before_acquire(false)
                .max_connections(2)
                .connect_with(options.clone())
                .await;
            match connecting {
                Ok(pool) => return Ok(SqliteStore { pool, path }),
                // A file another process is creating: switching it to WAL takes an
                // exclusive lock, and SQLite answers BUSY at once rather than call the busy
                // handler where waiting could deadlock. It is over in milliseconds.
                Err(error) if is_busy(&error) && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(error) => return Err(classify(error, &path)),
            }
        }
    }

    fn error(&self, error: sqlx::Error) -> StoreError {
        classify(error, &self.path)
    }

    /// The claim: the head of the first of `queues` queues with a due job (bound after the
    /// worker), updated and returned with the stop-workers generation. Writers are
    /// serialized on SQLite, so the head found is the head taken, and the running jobs a
    /// cap check counts are all there are: with `capped`, the caps are bound after the
    /// worker (for the claimed job's concurrency key) and with each queue's lookup.
    fn claim_statement(queues: usize, capped: bool) -> String {
        let (cap_key, first) = if capped {
            (DIALECT.cap_key_of_code("?5"), 6)
        } else {
            ("NULL".to_string(), 5)
        };
        format!(
            "UPDATE pjq_jobs SET {}
             WHERE id = {}
             RETURNING id, queue, code, payload, attempts, lease, {STOP_GENERATION} AS generation",
            DIALECT.claim_assignments(1, &cap_key),
            DIALECT.next_due_id(queues, first, false, capped)
        )
    }

    /// Claims the next job inside `tx` (see [`SqliteStore::claim_statement`]).
    async fn claim_in(
        &self,
        tx: &mut sqlx::SqliteConnection,
        turn: &Turn<'_>,
    ) -> Result<(Option<ClaimedJob>, i64), sqlx::Error> {
        let caps = rows::CapsBinding::of(turn, &[]);
        let statement = Self::claim_statement(turn.queues.len(), caps.is_some());
        let mut query = rows::bind_worker(sqlx::query(&statement), turn.worker);
        if let Some(caps) = &caps {
            query = query.bind(caps.json.as_ref());
        }
        let query = rows::bind_heads(query, turn.queues, caps.as_ref());
        if let Some(row) = query.fetch_optional(&mut *tx).await? {
            let job = rows::claimed_job(&row, &turn.worker.token)?;
            return Ok((Some(job), row.try_get("generation")?));
        }
        let generation = sqlx::query_scalar(&DIALECT.stop_generation())
            .fetch_one(&mut *tx)
            .await?;
        Ok((None, generation))
    }

    /// The idle poll, one read: the stop-workers generation and whether any of `queues` has
    /// a due job.
    async fn probe(&self, turn: &Turn<'_>) -> Result<(i64, bool), sqlx::Error> {
        let caps = rows::CapsBinding::of(turn, &[]);
        let statement = DIALECT.probe(turn.queues.len(), caps.is_some());
        let query = rows::bind_heads(sqlx::query(&statement), turn.queues, caps.as_ref());
        let row = query.fetch_one(&self.pool).await?;
        Ok((row.try_get("generation")?, row.try_get("due")?))
    }

    async fn turn(&self, turn: &Turn<'_>) -> Result<Poll, sqlx::Error> {
        if turn.finished.is_none() {
            let (stop_generation, due) = self.probe(turn).await?;
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
}

#[async_trait]
impl SchemaStore for SqliteStore {
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

    async fn check_statements(&self) -> StoreResult<usize> {
        self.prepare_every_statement().await
    }
}

/// The database `native_roles!` names in its types.
type Db = sqlx::Sqlite;

// What this backend does differently, for `native_roles!`.
impl SqliteStore {
    /// Stores a job inside `conn`'s transaction; returns its id.
    async fn insert_in(
        conn: &mut <Db as sqlx::Database>::Connection,
        job: &NewJob,
    ) -> Result<JobId, sqlx::Error> {
        let insert = format!("{} RETURNING id", DIALECT.insert_job());
        let row = rows::bind_new_job(sqlx::query(&insert), job)
            .fetch_one(&mut *conn)
            .await?;
        row.try_get("id")
    }

    /// A transaction that reads rows, then changes them: on SQLite it takes the write lock
    /// first, so its reads never need an upgrade another writer could refuse.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Db>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    async fn run_turn(&self, turn: &Turn<'_>) -> StoreResult<Poll> {
        self.turn(turn).await.map_err(|e| self.error(e))
    }

    async fn insert_one(&self, job: &NewJob) -> StoreResult<JobId> {
        let mut conn = self.pool.acquire().await.map_err(|e| self.error(e))?;
        Self::insert_in(&mut conn, job)
            .await
            .map_err(|e| self.error(e))
    }

    async fn insert_many(&self, jobs: &[NewJob]) -> StoreResult<u64> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.error(e))?;
        let insert = DIALECT.insert_job();
        for job in jobs {
            rows::bind_new_job(sqlx::query(&insert), job)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.error(e))?;
        }
        tx.commit().await.map_err(|e| self.error(e))?;
        Ok(jobs.len() as u64)
    }

    async fn open_listener(&self) -> StoreResult<Option<Box<dyn super::PushListener>>> {
        Ok(None)
    }

    /// Nothing to announce: idle workers see a resumed queue at their next poll.
    async fn announce_resume(&self) -> StoreResult<()> {
        Ok(())
    }

    /// The statements only this backend has, for [`SchemaStore::check_statements`].
    fn own_statements() -> Vec<(&'static str, String)> {
        vec![
            ("claim, returning", Self::claim_statement(3, false)),
            ("claim, capped, returning", Self::claim_statement(3, true)),
        ]
    }
}

native::native_roles!(SqliteStore);

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
/// SQLite's primary result code of a database error (its extended code's low byte).
fn primary_code(error: &sqlx::Error) -> Option<i64> {
    match error {
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|code| code.parse::<i64>().ok())
            .map(|code| code & 0xff),
        _ => None,
    }
}

/// SQLITE_BUSY, with any extended code.
fn is_busy(error: &sqlx::Error) -> bool {
    primary_code(error) == Some(5)
}

pub fn classify(error: sqlx::Error, path: &str) -> StoreError {
    // Primary result codes: BUSY, LOCKED, READONLY, IOERR, FULL, CANTOPEN.
    const TRANSIENT: [i64; 6] = [5, 6, 8, 10, 13, 14];
    let primary = primary_code(&error);
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

//! The MariaDB (10.6+) / MySQL (8.0+) backend, for installations that keep jobs in the PIM's
//! own database server, shared by many hosts.
//!
//! An idle poll is one consistent read that takes no lock: the stop-workers generation and
//! the head of the first queue with a due job. A claim is a short transaction, with the
//! previous job's result when there is one (one durable commit per job): the same read with
//! `FOR UPDATE SKIP LOCKED` in each queue's lookup (so concurrent workers pass over each
//! other's rows instead of waiting on them, and never deadlock), then the update of the row
//! it locked. Sessions run at READ COMMITTED (no gap locks), and the rare lock-wait timeout
//! is retried here instead of surfacing. MySQL has no `UPDATE … RETURNING`: the claimed row
//! is the row read, with the lease and attempt the update added.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, Row};

use super::statements::{self, Dialect, Upsert};
use super::{
    CallLimits, Cap, ClaimedJob, Completion, Detail, JobId, Lease, NewJob, Poll, SchemaStore,
    SchemaVersion, StoreError, StoreResult, Timestamp, Turn, WorkerIdentity, native, redact_url,
    rows,
};

/// The database's clock in microseconds since the epoch; sessions run at time zone +00:00,
/// so `NOW(6)` is UTC and the conversion is exact.
const DB_NOW: &str = "CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED)";
pub(super) const DIALECT: Dialect = Dialect {
    db_now: DB_NOW,
    placeholder: positional,
    integer: "SIGNED",
    upsert: Upsert::OnDuplicateKey,
    concat: statements::concat_fn,
    joined,
    returning: false,
    lock_rows: " FOR UPDATE",
    caps_rows,
};

/// The caps bound at `param` as rows (see [`Dialect::caps_rows`]), in the tables' collation
/// (a JSON table's text is in the connection's, which `=` would refuse to mix).
fn caps_rows(param: &str) -> String {
    const TEXT: &str = "VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci";
    format!(
        "(SELECT code, cap_key, cap_limit FROM JSON_TABLE({param}, '$[*]' COLUMNS (
            code {TEXT} PATH '$.code', cap_key {TEXT} PATH '$.key',
            cap_limit BIGINT PATH '$.limit')) AS x)"
    )
}

/// The pause descriptions joined, for [`Dialect::rescue_scan`].
fn joined(expression: &str) -> String {
    format!("GROUP_CONCAT({expression} ORDER BY queue SEPARATOR ', ')")
}

fn positional(_: usize) -> String {
    "?".to_string()
}

/// The head of a queue as a probe read it, before any claim.
struct Head(ClaimedJob);

impl Head {
    /// The job as the claim that matched it left it: one more attempt, the next lease.
    fn claimed_by(self, worker: &WorkerIdentity) -> ClaimedJob {
        let Head(job) = self;
        ClaimedJob {
            attempts: job.attempts + 1,
            lease: Lease {
                job_id: job.id,
                token: worker.token.clone(),
                lease: job.lease.lease + 1,
            },
            ..job
        }
    }
}

const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a claim is retried after a deadlock or lock-wait timeout before giving up.
const LOCK_RETRIES: u32 = 10;
/// Deadlock found; lock wait timeout exceeded.
const LOCK_CONFLICT_ERRORS: [u16; 2] = [1213, 1205];
/// Server error numbers after which trying again later can work: too many connections
/// (1040), server shutdown (1053), aborted connection (1152, 1184), network read/write
/// errors (1158-1161), lock wait timeout (1205), deadlock (1213), query interrupted (1317),
/// read-only server during a failover (1290, 1792, 1836), MariaDB's connection killed
/// (1927), MySQL 8's idle disconnect (4031).
const TRANSIENT_ERRORS: [u16; 16] = [
    1040, 1053, 1152, 1158, 1159, 1160, 1161, 1184, 1205, 1213, 1290, 1317, 1792, 1836, 1927, 4031,
];
/// ER_NO_SUCH_TABLE.
const NO_SUCH_TABLE: u16 = 1146;

const MIGRATIONS: &[(i64, &[&str])] = &[
    (
        1,
        &[
            "CREATE TABLE IF NOT EXISTS pjq_jobs (
            id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
            queue VARCHAR(64) NOT NULL,
            code VARCHAR(255) NOT NULL,
            payload LONGTEXT NOT NULL,
            status VARCHAR(16) NOT NULL,
            attempts BIGINT NOT NULL DEFAULT 0,
            max_attempts BIGINT NOT NULL DEFAULT 1,
            lease BIGINT NOT NULL DEFAULT 0,
            created_at BIGINT NOT NULL,
            available_at BIGINT NOT NULL,
            claimed_at BIGINT NULL,
            started_at BIGINT NULL,
            finished_at BIGINT NULL,
            worker_token VARCHAR(64) NULL,
            worker_host VARCHAR(255) NULL,
            worker_instance VARCHAR(64) NULL,
            worker_pid BIGINT NULL,
            exit_code BIGINT NULL,
            exit_signal BIGINT NULL,
            reason TEXT NULL,
            output MEDIUMTEXT NULL,
            KEY pjq_jobs_claim (queue, status, available_at, id),
            KEY pjq_jobs_status (status, queue),
            KEY pjq_jobs_finished (finished_at)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci",
            "CREATE TABLE IF NOT EXISTS pjq_control (
            name VARCHAR(64) NOT NULL PRIMARY KEY,
            value BIGINT NOT NULL
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci",
            "INSERT IGNORE INTO pjq_control (name, value) VALUES ('stop_generation', 0)",
            "CREATE TABLE IF NOT EXISTS pjq_workers (
            token VARCHAR(64) NOT NULL PRIMARY KEY,
            host VARCHAR(255) NOT NULL,
            instance VARCHAR(64) NULL,
            pid BIGINT NOT NULL,
            queues TEXT NOT NULL,
            started_at BIGINT NOT NULL,
            heartbeat_at BIGINT NOT NULL,
            current_job BIGINT NULL
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci",
        ],
    ),
    (
        2,
        &["CREATE TABLE IF NOT EXISTS pjq_pauses (
            queue VARCHAR(64) NOT NULL PRIMARY KEY,
            reason TEXT NOT NULL,
            paused_at BIGINT NOT NULL,
            paused_by VARCHAR(255) NOT NULL
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci"],
    ),
    (
        3,
        // What finished jobs counted as before a prune, delete or retry removed them (see
        // `Dialect::fold_tallies`), and rescues: the counters `metrics` reports.
        &[
            "CREATE TABLE IF NOT EXISTS pjq_tallies (
            queue VARCHAR(64) NOT NULL,
            event VARCHAR(16) NOT NULL,
            duration_bucket INT NOT NULL,
            wait_bucket INT NOT NULL,
            jobs BIGINT NOT NULL,
            duration_sum BIGINT NOT NULL,
            wait_sum BIGINT NOT NULL,
            PRIMARY KEY (queue, event, duration_bucket, wait_bucket)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci",
            // A running job's cancel request, for its worker's heartbeat to find.
            "ALTER TABLE pjq_jobs ADD COLUMN IF NOT EXISTS cancel_requested TEXT NULL",
            // The last run's peak memory and CPU time (`wait4`'s rusage).
            "ALTER TABLE pjq_jobs ADD COLUMN IF NOT EXISTS peak_rss_bytes BIGINT NULL",
            "ALTER TABLE pjq_jobs ADD COLUMN IF NOT EXISTS cpu_usec BIGINT NULL",
            // At most one waiting or running job per unique key (`push --unique-key`):
            // MariaDB has no partial index, so a generated column holds the key only while
            // the job is waiting or running, and a unique index (which allows many NULLs)
            // covers it.
            "ALTER TABLE pjq_jobs ADD COLUMN IF NOT EXISTS unique_key VARCHAR(255) NULL",
            "ALTER TABLE pjq_jobs ADD COLUMN IF NOT EXISTS active_unique_key VARCHAR(255)
             AS (CASE WHEN status IN ('waiting', 'running') THEN unique_key END) PERSISTENT",
            "CREATE UNIQUE INDEX IF NOT EXISTS pjq_jobs_unique_active
             ON pjq_jobs (active_unique_key)",
            // Earlier attempts of a retried job, one JSON line each.
            "ALTER TABLE pjq_jobs ADD COLUMN IF NOT EXISTS history LONGTEXT NULL",
            // One row per schedule and slot: its primary key lets one worker queue it.
            "CREATE TABLE IF NOT EXISTS pjq_schedule_slots (
                name VARCHAR(191) NOT NULL,
                slot_at BIGINT NOT NULL,
                enqueued_at BIGINT NOT NULL,
                job_id BIGINT NULL,
                PRIMARY KEY (name, slot_at)
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci",
        ],
    ),
    (
        4,
        // Concurrency caps: the key a running job counts under, and one row per key that
        // claims of its capped codes lock (see `Dialect::lock_cap`).
        &[
            "ALTER TABLE pjq_jobs ADD COLUMN IF NOT EXISTS concurrency_key VARCHAR(255) NULL",
            "CREATE INDEX IF NOT EXISTS pjq_jobs_capped ON pjq_jobs (concurrency_key, status)",
            "CREATE TABLE IF NOT EXISTS pjq_concurrency (
                cap_key VARCHAR(255) NOT NULL PRIMARY KEY
            ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci",
        ],
    ),
];

const LATEST_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

pub struct MysqlStore {
    pool: MySqlPool,
    location: String,
}

impl MysqlStore {
    /// Opens a `mysql://` or `mariadb://` URL (the latter as users write it for MariaDB).
    ///
    /// Each session waits for row and metadata locks no longer than the server-side part of
    /// `limits` (whole seconds, at least one): InnoDB's default of 50 s and the metadata
    /// lock's year would outlast the fence; the server's "lock wait timeout" is transient.
    pub async fn open(url: &str, limits: CallLimits) -> StoreResult<MysqlStore> {
        let location = redact_url(url);
        let normalized = match url.strip_prefix("mariadb:") {
            Some(rest) => format!("mysql:{rest}"),
            None => url.to_string(),
        };
        let options = MySqlConnectOptions::from_str(&normalized)
            .map_err(|error| StoreError::InvalidUrl(format!("{location}: {error}")))?
            .timezone(Some("+00:00".to_string()))
            .charset("utf8mb4")
            .disable_statement_logging();
        let isolation = session_isolation(&options, &location).await?;
        let wait = limits.server_side().as_secs().max(1);
        let lock_waits =
            format!("SET SESSION innodb_lock_wait_timeout = {wait}, lock_wait_timeout = {wait}");
        let pool = MySqlPoolOptions::new()
            // No ping before each use: it doubled every call's round trips, and a
            // connection that died meanwhile fails its statement, which is retried like
            // any other transient error.
            .test_before_acquire(false)
            .max_connections(3)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(move |connection, _| {
                let lock_waits = lock_waits.clone();
                Box::pin(async move {
                    connection.execute(isolation).await?;
                    connection.execute(lock_waits.as_str()).await.map(drop)
                })
            })
            .connect_with(options)
            .await
            .map_err(|error| classify(error, &location))?;
        Ok(MysqlStore { pool, location })
    }

    fn error(&self, error: sqlx::Error) -> StoreError {
        classify(error, &self.location)
    }

    /// The connection pool, shared with the Akeneo transport that lives in the same database.
    pub(super) fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Reads the stop-workers generation and the next job of the first of `queues` queues
    /// (bound in order) that has one. Plain, it is the idle poll: one consistent read that
    /// takes no lock. With `skip_locked`, inside the claim's transaction, the job is locked,
    /// passing over jobs other workers hold.
    fn head_statement(queues: usize, skip_locked: bool, capped: bool) -> String {
        format!(
            "SELECT g.generation, j.id, j.queue, j.code, j.payload, j.attempts, j.lease
             FROM (SELECT value AS generation, {} AS next_id
                   FROM pjq_control WHERE name = 'stop_generation') AS g
             LEFT JOIN pjq_jobs j ON j.id = g.next_id",
            DIALECT.next_due_id(queues, 1, skip_locked, capped)
        )
    }

    async fn next_head<'c, E>(
        executor: E,
        queues: &[String],
        skip_locked: bool,
        caps: Option<&rows::CapsBinding<'_>>,
    ) -> Result<(i64, Option<Head>), sqlx::Error>
    where
        E: sqlx::Executor<'c, Database = sqlx::MySql>,
    {
        let statement = Self::head_statement(queues.len(), skip_locked, caps.is_some());
        let query = rows::bind_heads(sqlx::query(&statement), queues, caps);
        let row = query.fetch_one(executor).await?;
        let id: Option<JobId> = row.try_get("id")?;
        let head = match id {
            Some(_) => Some(Head(rows::claimed_job(&row, "")?)),
            None => None,
        };
        Ok((row.try_get("generation")?, head))
    }

    /// The claim of a head this transaction has locked: worker, its concurrency key, then
    /// id and lease.
    fn claim_statement() -> String {
        format!(
            "UPDATE pjq_jobs SET {} WHERE id = ? AND lease = ? AND status = 'waiting'",
            DIALECT.claim_assignments(1, "?")
        )
    }

    /// The finished job's result and the next job's claim in one statement, so a busy
    /// turn is four statements (BEGIN, the locking read, this, COMMIT). Each assignment
    /// tells the two rows apart by their status, the finished one `running`, the head
    /// `waiting`; `status` is assigned last, since MySQL evaluates assignments left to
    /// right. Binds finished_at, exit_code, exit_signal, reason, output, peak RSS, CPU
    /// time, the worker's token, host, instance and pid, the head's concurrency key, the
    /// result's status, then the finished job's id, token and lease, and the head's id and
    /// lease.
    fn complete_and_claim_statement() -> String {
        let now = DB_NOW;
        let either = |column: &str, done: &str, claimed: &str| {
            format!("{column} = CASE WHEN status = 'running' THEN {done} ELSE {claimed} END")
        };
        let assignments = [
            either("finished_at", "?", "NULL"),
            either("exit_code", "?", "NULL"),
            either("exit_signal", "?", "NULL"),
            either("reason", "?", "NULL"),
            either("output", "?", "NULL"),
            either("peak_rss_bytes", "?", "NULL"),
            either("cpu_usec", "?", "NULL"),
            either("lease", "lease", "lease + 1"),
            either("attempts", "attempts", "attempts + 1"),
            either("claimed_at", "claimed_at", now),
            either("started_at", "started_at", now),
            either("worker_token", "worker_token", "?"),
            either("worker_host", "worker_host", "?"),
            either("worker_instance", "worker_instance", "?"),
            either("worker_pid", "worker_pid", "?"),
            either("concurrency_key", "concurrency_key", "?"),
            either("status", "?", "'running'"),
        ];
        format!(
            "UPDATE pjq_jobs SET {}
             WHERE (id = ? AND worker_token = ? AND lease = ? AND status = 'running')
                OR (id = ? AND lease = ? AND status = 'waiting')",
            assignments.join(",\n                 ")
        )
    }

    /// Runs [`MysqlStore::complete_and_claim_statement`]; returns whether the result was
    /// recorded (the head, locked by this transaction, is always claimed).
    async fn complete_and_claim(
        tx: &mut sqlx::MySqlConnection,
        finished: (&Lease, &Completion),
        head: &Head,
        cap_key: Option<&str>,
        worker: &WorkerIdentity,
    ) -> Result<bool, sqlx::Error> {
        let (lease, completion) = finished;
        let (status, exit_code, signal, reason) = super::completion_columns(&completion.result);
        let statement = Self::complete_and_claim_statement();
        let changed = sqlx::query(&statement)
            .bind(completion.finished_at.0)
            .bind(exit_code)
            .bind(signal)
            .bind(reason)
            .bind(completion.output.join("\n"))
            .bind(completion.usage.peak_rss_bytes)
            .bind(completion.usage.cpu_usec)
            .bind(worker.token.as_str())
            .bind(worker.host.as_str())
            .bind(worker.instance.as_deref())
            .bind(worker.pid as i64)
            .bind(cap_key)
            .bind(status.as_str())
            .bind(lease.job_id)
            .bind(lease.token.as_str())
            .bind(lease.lease)
            .bind(head.0.id)
            .bind(head.0.lease.lease)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        Ok(changed == 2)
    }

    /// An idle worker's turn reads first (one statement, no lock, nothing written), and
    /// opens a transaction only when a job is due; a busy worker's turn records its last
    /// result and claims in one transaction of four statements: BEGIN, the locking read,
    /// one update of both rows, COMMIT (no `UPDATE … RETURNING` here): one durable commit.
    ///
    /// Caps cost nothing while the head is not capped: the reads check caps only after
    /// meeting a capped head (MariaDB optimizes each cap check anew in every lookup, 0.4 ms
    /// a read). A capped head takes two more statements, its cap's lock and the count of
    /// its running jobs; a full one sends the turn back to read again passing it over.
    async fn turn(&self, turn: &Turn<'_>) -> Result<Poll, sqlx::Error> {
        if turn.finished.is_none()
            && let Some(stop_generation) = self.nothing_to_claim(turn).await?
        {
            return Ok(Poll {
                stop_generation,
                ..Poll::default()
            });
        }
        // Keys found full under their lock this turn; `None` until a cap is met.
        let mut full: Option<Vec<String>> = None;
        loop {
            let mut tx = self.pool.begin().await?;
            let caps = full
                .as_deref()
                .and_then(|full| rows::CapsBinding::of(turn, full));
            let (stop_generation, head) =
                Self::next_head(&mut *tx, turn.queues, true, caps.as_ref()).await?;
            let cap = head.as_ref().and_then(|head| turn.caps.of(&head.0.code));
            if let Some(cap) = cap
                && !Self::below_cap(&mut tx, cap, turn).await?
            {
                // Its cap is full: without this transaction's locks (one cap lock at a
                // time, so two turns never wait on each other's), look again passing that
                // cap, and any other the read finds full, over.
                tx.rollback().await?;
                full.get_or_insert_with(Vec::new).push(cap.key.clone());
                continue;
            }
            let cap_key = cap.map(|cap| cap.key.as_str());
            let recorded = Self::record_and_claim(&mut tx, turn, head.as_ref(), cap_key).await?;
            tx.commit().await?;
            return Ok(Poll {
                stop_generation,
                // An idle turn saw a due job that other workers' claims had locked.
                contended: head.is_none() && turn.finished.is_none(),
                job: head.map(|head| head.claimed_by(turn.worker)),
                recorded,
            });
        }
    }

    /// The idle poll, without a lock: the stop-workers generation when no job can be
    /// claimed (none due, or only jobs whose caps are full), `None` when one can.
    async fn nothing_to_claim(&self, turn: &Turn<'_>) -> Result<Option<i64>, sqlx::Error> {
        let (stop_generation, head) = Self::next_head(&self.pool, turn.queues, false, None).await?;
        let capped = match &head {
            None => return Ok(Some(stop_generation)),
            Some(head) => turn.caps.of(&head.0.code).is_some(),
        };
        if !capped {
            return Ok(None);
        }
        let caps = rows::CapsBinding::of(turn, &[]);
        let (stop_generation, head) =
            Self::next_head(&self.pool, turn.queues, false, caps.as_ref()).await?;
        Ok(head.is_none().then_some(stop_generation))
    }

    /// Whether `cap` has room, read under its lock (taken here, held to the commit) in a
    /// statement of its own: at READ COMMITTED it sees every claim of the cap that
    /// committed before the lock was granted, and later ones wait for this transaction.
    async fn below_cap(
        tx: &mut sqlx::MySqlConnection,
        cap: &Cap,
        turn: &Turn<'_>,
    ) -> Result<bool, sqlx::Error> {
        sqlx::query(&DIALECT.lock_cap())
            .bind(&cap.key)
            .execute(&mut *tx)
            .await?;
        let running: i64 = sqlx::query_scalar(&DIALECT.running_under_cap())
            .bind(&cap.key)
            .bind(turn.finishing_id())
            .fetch_one(&mut *tx)
            .await?;
        Ok(running < i64::from(cap.limit))
    }

    /// The last result and the claim of the locked head, whichever there are; returns
    /// whether the result was recorded.
    async fn record_and_claim(
        tx: &mut sqlx::MySqlConnection,
        turn: &Turn<'_>,
        head: Option<&Head>,
        cap_key: Option<&str>,
    ) -> Result<Option<bool>, sqlx::Error> {
        Ok(match (turn.finished, head) {
            (Some(finished), Some(head)) => Some(
                Self::complete_and_claim(&mut *tx, finished, head, cap_key, turn.worker).await?,
            ),
            (Some((lease, completion)), None) => {
                let complete = DIALECT.complete_job(1);
                let done = rows::bind_completion(sqlx::query(&complete), lease, completion)
                    .execute(&mut *tx)
                    .await?;
                Some(done.rows_affected() == 1)
            }
            (None, Some(head)) => {
                rows::bind_worker(sqlx::query(&Self::claim_statement()), turn.worker)
                    .bind(cap_key)
                    .bind(head.0.id)
                    .bind(head.0.lease.lease)
                    .execute(&mut *tx)
                    .await?;
                None
            }
            (None, None) => None,
        })
    }
}

#[async_trait]
impl SchemaStore for MysqlStore {
    fn location(&self) -> String {
        self.location.clone()
    }

    async fn migrate(&self) -> StoreResult<u32> {
        // DDL commits implicitly in MySQL, so a named lock on one connection serializes
        // concurrent starters instead of a transaction; every statement is idempotent in
        // case a run was cut off half way.
        let mut conn = self.pool.acquire().await.map_err(|e| self.error(e))?;
        let locked: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK('pjq_migrate', 60)")
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| self.error(e))?;
        if locked != Some(1) {
            return Err(StoreError::Unavailable(Detail::from(format!(
                "{}: another process holds the migration lock",
                self.location
            ))));
        }
        let outcome = async {
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS pjq_schema_migrations (
                    version BIGINT NOT NULL PRIMARY KEY,
                    applied_at BIGINT NOT NULL
                ) ENGINE=InnoDB",
            )
            .execute(&mut *conn)
            .await?;
            let found: i64 = sqlx::query_scalar(
                "SELECT CAST(COALESCE(MAX(version), 0) AS SIGNED) FROM pjq_schema_migrations",
            )
            .fetch_one(&mut *conn)
            .await?;
            if found > LATEST_VERSION {
                return Ok(Err(found));
            }
            let mut applied = 0;
            for &(version, statements) in MIGRATIONS {
                if version <= found {
                    continue;
                }
                for statement in statements {
                    sqlx::query(statement).execute(&mut *conn).await?;
                }
                sqlx::query(
                    "INSERT INTO pjq_schema_migrations (version, applied_at) VALUES (?, ?)",
                )
                .bind(version)
                .bind(Timestamp::now().0)
                .execute(&mut *conn)
                .await?;
                applied += 1;
            }
            Ok::<_, sqlx::Error>(Ok(applied))
        }
        .await;
        let _ = sqlx::query("SELECT RELEASE_LOCK('pjq_migrate')")
            .execute(&mut *conn)
            .await;
        match outcome.map_err(|e| self.error(e))? {
            Ok(applied) => Ok(applied),
            Err(found) => Err(StoreError::SchemaTooNew {
                found,
                latest: LATEST_VERSION,
            }),
        }
    }

    async fn schema_version(&self) -> StoreResult<SchemaVersion> {
        let tables: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.tables
             WHERE table_schema = DATABASE() AND table_name = 'pjq_schema_migrations'",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.error(e))?;
        let found = if tables > 0 {
            sqlx::query_scalar(
                "SELECT CAST(COALESCE(MAX(version), 0) AS SIGNED) FROM pjq_schema_migrations",
            )
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
type Db = sqlx::MySql;

// What this backend does differently, for `native_roles!`.
impl MysqlStore {
    /// Stores a job inside `conn`'s transaction; returns its id.
    async fn insert_in(
        conn: &mut <Db as sqlx::Database>::Connection,
        job: &NewJob,
    ) -> Result<JobId, sqlx::Error> {
        let insert = DIALECT.insert_job();
        let result = rows::bind_new_job(sqlx::query(&insert), job)
            .execute(&mut *conn)
            .await?;
        Ok(result.last_insert_id() as JobId)
    }

    /// A transaction that reads rows (locking them), then changes them, at READ COMMITTED:
    /// its locking reads lock the rows they return and no gaps, so a prune scanning the
    /// finished jobs never holds a range a worker's turn must insert an index entry into
    /// (at REPEATABLE READ the two deadlocked under eight busy workers).
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Db>, sqlx::Error> {
        self.pool
            .begin_with("SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION")
            .await
    }

    async fn run_turn(&self, turn: &Turn<'_>) -> StoreResult<Poll> {
        let mut attempt = 0;
        loop {
            match self.turn(turn).await {
                Err(error) if is_lock_conflict(&error) && attempt < LOCK_RETRIES => {
                    attempt += 1;
                    tracing::debug!(attempt, "claim hit a lock conflict, retrying: {error}");
                    tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt))).await;
                }
                other => return other.map_err(|e| self.error(e)),
            }
        }
    }

    async fn insert_one(&self, job: &NewJob) -> StoreResult<JobId> {
        let mut conn = self.pool.acquire().await.map_err(|e| self.error(e))?;
        Self::insert_in(&mut conn, job)
            .await
            .map_err(|e| self.error(e))
    }

    async fn insert_many(&self, jobs: &[NewJob]) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await.map_err(|e| self.error(e))?;
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
            ("idle read", Self::head_statement(3, false, false)),
            ("locking read", Self::head_statement(3, true, false)),
            ("idle read, capped", Self::head_statement(3, false, true)),
            ("locking read, capped", Self::head_statement(3, true, true)),
            ("claim a locked head", Self::claim_statement()),
            ("complete and claim", Self::complete_and_claim_statement()),
        ]
    }
}

native::native_roles!(MysqlStore);

/// READ COMMITTED, so a claim locks only the row it takes (no gap locks), except where the
/// server's binary log is statement-based: InnoDB then rejects every write at READ
/// COMMITTED (error 1665), and REPEATABLE READ with SKIP LOCKED still claims correctly.
async fn session_isolation(
    options: &MySqlConnectOptions,
    location: &str,
) -> StoreResult<&'static str> {
    let mut probe = options
        .connect()
        .await
        .map_err(|error| classify(error, location))?;
    let (log_bin, format): (i64, String) =
        sqlx::query_as("SELECT CAST(@@log_bin AS SIGNED), CAST(@@binlog_format AS CHAR)")
            .fetch_one(&mut probe)
            .await
            .map_err(|error| classify(error, location))?;
    let _ = probe.close().await;
    if log_bin == 1 && format.eq_ignore_ascii_case("STATEMENT") {
        tracing::warn!(
            "{location}: binlog_format=STATEMENT rejects writes at READ COMMITTED; \
             using REPEATABLE READ (claims stay correct with SKIP LOCKED; ROW or MIXED is better)"
        );
        Ok("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    } else {
        Ok("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    }
}

/// The server's error number (sqlx's `code()` is the SQLSTATE on MySQL, not the number).
fn error_number(error: &sqlx::Error) -> Option<u16> {
    match error {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .map(|mysql| mysql.number()),
        _ => None,
    }
}

pub(super) fn is_lock_conflict(error: &sqlx::Error) -> bool {
    error_number(error).is_some_and(|number| LOCK_CONFLICT_ERRORS.contains(&number))
}

/// Sorts MySQL failures into "try again later", "our tables are gone" and "something is
/// wrong", by the server's error number. The one place MySQL errors are sorted (public so
/// that tests can feed it errors provoked from a real server).
pub fn classify(error: sqlx::Error, location: &str) -> StoreError {
    let kind = match error_number(&error) {
        Some(number) if TRANSIENT_ERRORS.contains(&number) => ErrorKind::Transient,
        Some(NO_SUCH_TABLE) if error.to_string().contains(".pjq_") => ErrorKind::SchemaMissing,
        Some(_) => ErrorKind::Permanent,
        None if super::is_connection_error(&error) => ErrorKind::Transient,
        None => ErrorKind::Permanent,
    };
    let detail = Detail::of(location, error);
    match kind {
        ErrorKind::Transient => StoreError::Unavailable(detail),
        ErrorKind::SchemaMissing => StoreError::SchemaMissing(detail),
        ErrorKind::Permanent => StoreError::Database(detail),
    }
}

enum ErrorKind {
    Transient,
    SchemaMissing,
    Permanent,
}

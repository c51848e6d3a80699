//! The PostgreSQL backend (15+), for a fleet of workers on many hosts sharing one database.
//!
//! A claim is one statement: the oldest due row of a queue is locked with `FOR UPDATE SKIP
//! LOCKED`, so concurrent workers never wait on each other's rows and never deadlock, and is
//! updated in the same statement. `push` sends a `NOTIFY` that idle workers `LISTEN` for.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Row};

use super::statements::{self, Dialect, STOP_GENERATION, Upsert};
use super::{
    CallLimits, Cap, ClaimedJob, Detail, JobId, NewJob, Poll, PushListener, SchemaStore,
    SchemaVersion, StoreError, StoreResult, Timestamp, Turn, native, redact_url, rows,
};

/// The channel `push` notifies and idle workers listen on.
const CHANNEL: &str = "pjq_jobs";
/// Serializes concurrent `migrate` runs (an arbitrary constant, "pjq" in ASCII).
const MIGRATION_LOCK: i64 = 0x706a71;
/// The database's clock in microseconds since the epoch, independent of the session time zone.
const DB_NOW: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::bigint";
pub(super) const DIALECT: Dialect = Dialect {
    db_now: DB_NOW,
    placeholder: dollar,
    integer: "BIGINT",
    upsert: Upsert::OnConflict,
    concat: statements::pipes,
    joined,
    returning: true,
    lock_rows: " FOR UPDATE",
    caps_rows,
};

/// The caps bound at `param` as rows (see [`Dialect::caps_rows`]).
fn caps_rows(param: &str) -> String {
    format!(
        "(SELECT code, key AS cap_key, \"limit\" AS cap_limit
          FROM jsonb_to_recordset(CAST({param} AS jsonb)) AS x(code text, key text, \"limit\" bigint))"
    )
}

/// The pause descriptions joined, for [`Dialect::rescue_scan`].
fn joined(expression: &str) -> String {
    format!("string_agg({expression}, ', ' ORDER BY queue)")
}

fn dollar(n: usize) -> String {
    format!("${n}")
}

/// How long to wait for a connection before reporting the database unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

const MIGRATIONS: &[(i64, &[&str])] = &[
    (
        1,
        &[
            "CREATE TABLE pjq_jobs (
            id BIGSERIAL PRIMARY KEY,
            queue TEXT NOT NULL,
            code TEXT NOT NULL,
            payload TEXT NOT NULL,
            status TEXT NOT NULL,
            attempts BIGINT NOT NULL DEFAULT 0,
            max_attempts BIGINT NOT NULL DEFAULT 1,
            lease BIGINT NOT NULL DEFAULT 0,
            created_at BIGINT NOT NULL,
            available_at BIGINT NOT NULL,
            claimed_at BIGINT,
            started_at BIGINT,
            finished_at BIGINT,
            worker_token TEXT,
            worker_host TEXT,
            worker_instance TEXT,
            worker_pid BIGINT,
            exit_code BIGINT,
            exit_signal BIGINT,
            reason TEXT,
            output TEXT
        )",
            "CREATE INDEX pjq_jobs_claim ON pjq_jobs (queue, available_at, id)
            WHERE status = 'waiting'",
            "CREATE INDEX pjq_jobs_status ON pjq_jobs (status, queue)",
            "CREATE INDEX pjq_jobs_finished ON pjq_jobs (finished_at)
            WHERE finished_at IS NOT NULL",
            "CREATE TABLE pjq_control (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
            "INSERT INTO pjq_control (name, value) VALUES ('stop_generation', 0)",
            "CREATE TABLE pjq_workers (
            token TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            instance TEXT,
            pid BIGINT NOT NULL,
            queues TEXT NOT NULL,
            started_at BIGINT NOT NULL,
            heartbeat_at BIGINT NOT NULL,
            current_job BIGINT
        )",
        ],
    ),
    (
        2,
        // With statistics stale after a bulk load, the planner took the status index and sorted
        // every waiting job (71 ms a claim at 100,000 queued): only the partial claim index
        // serves waiting jobs now, and running ones have a partial index of their own (rescue,
        // the worker registry, the put-back of unanswered claims).
        &[
            "DROP INDEX IF EXISTS pjq_jobs_status",
            "CREATE INDEX pjq_jobs_running ON pjq_jobs (worker_token) WHERE status = 'running'",
        ],
    ),
    (
        3,
        // Queues an operator paused, fleet-wide: claims pass over them.
        &["CREATE TABLE pjq_pauses (
            queue TEXT PRIMARY KEY,
            reason TEXT NOT NULL,
            paused_at BIGINT NOT NULL,
            paused_by TEXT NOT NULL
        )"],
    ),
    (
        4,
        // What finished jobs counted as before a prune, delete or retry removed them (see
        // `Dialect::fold_tallies`), and rescues: the counters `metrics` reports.
        &[
            "CREATE TABLE pjq_tallies (
            queue TEXT NOT NULL,
            event TEXT NOT NULL,
            duration_bucket INTEGER NOT NULL,
            wait_bucket INTEGER NOT NULL,
            jobs BIGINT NOT NULL,
            duration_sum BIGINT NOT NULL,
            wait_sum BIGINT NOT NULL,
            PRIMARY KEY (queue, event, duration_bucket, wait_bucket)
        )",
            // A running job's cancel request, for its worker's heartbeat to find.
            "ALTER TABLE pjq_jobs ADD COLUMN cancel_requested TEXT",
            // The last run's peak memory and CPU time (`wait4`'s rusage).
            "ALTER TABLE pjq_jobs ADD COLUMN peak_rss_bytes BIGINT",
            "ALTER TABLE pjq_jobs ADD COLUMN cpu_usec BIGINT",
            // At most one waiting or running job per unique key (`push --unique-key`).
            "ALTER TABLE pjq_jobs ADD COLUMN unique_key TEXT",
            "CREATE UNIQUE INDEX pjq_jobs_unique_active ON pjq_jobs (unique_key)
             WHERE status IN ('waiting', 'running')",
            // Earlier attempts of a retried job, one JSON line each.
            "ALTER TABLE pjq_jobs ADD COLUMN history TEXT",
            // One row per schedule and slot: its primary key lets one worker queue it.
            "CREATE TABLE pjq_schedule_slots (
                name TEXT NOT NULL,
                slot_at BIGINT NOT NULL,
                enqueued_at BIGINT NOT NULL,
                job_id BIGINT,
                PRIMARY KEY (name, slot_at)
            )",
        ],
    ),
    (
        5,
        // Concurrency caps: the key a running job counts under, and one row per key that
        // claims of its capped codes lock (see `Dialect::lock_cap`).
        &[
            "ALTER TABLE pjq_jobs ADD COLUMN concurrency_key TEXT",
            "CREATE INDEX pjq_jobs_capped ON pjq_jobs (concurrency_key) WHERE status = 'running'",
            "CREATE TABLE pjq_concurrency (cap_key TEXT PRIMARY KEY)",
        ],
    ),
];

const LATEST_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

pub struct PostgresStore {
    pool: PgPool,
    location: String,
}

impl PostgresStore {
    /// Statements and lock waits end on the server after the server-side part of `limits`,
    /// with an error classified as transient, before the client's deadline cuts the call.
    pub async fn open(url: &str, limits: CallLimits) -> StoreResult<PostgresStore> {
        let location = redact_url(url);
        let server_limit = format!("{}ms", limits.server_side().as_millis().max(1));
        let options = PgConnectOptions::from_str(url)
            .map_err(|error| StoreError::InvalidUrl(format!("{location}: {error}")))?
            .application_name("pim-job-queue")
            .options([
                ("statement_timeout", server_limit.as_str()),
                ("lock_timeout", server_limit.as_str()),
            ])
            .disable_statement_logging();
        let pool = PgPoolOptions::new()
            // No ping before each use: it doubled every call's round trips, and a
            // connection that died meanwhile fails its statement, which is retried like
            // any other transient error.
            .test_before_acquire(false)
            .max_connections(3)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|error| classify(error, &location))?;
        Ok(PostgresStore { pool, location })
    }

    fn error(&self, error: sqlx::Error) -> StoreError {
        classify(error, &self.location)
    }

    /// One turn in one statement: the finished job's result (when there is one), the claim
    /// of the head of the first queue with a due job that no other worker is taking (`SKIP
    /// LOCKED`, queues tried in order and no further once one yields a row), the stop-workers
    /// generation, and whether a due job was left because another worker held it.
    /// The worker's token, host, instance and pid are bound first ($1–$4), the queues
    /// ($5), with `capped` the caps ($6), then the result when there is one.
    ///
    /// With caps, a head whose cap the statement's snapshot finds reached is passed over;
    /// a head with a cap not reached is not claimed here but returned as `capped_id`: a
    /// snapshot taken before this statement waited on nothing may miss another worker's
    /// claim of the same cap, so [`PostgresStore::claim_capped`] claims it under the cap's
    /// lock. The job being finished no longer counts as running.
    fn turn_statement(finished: bool, capped: bool) -> String {
        let result_at = if capped { 7 } else { 6 };
        let done = if finished {
            format!(
                "done AS ({} RETURNING id),",
                DIALECT.complete_job(result_at)
            )
        } else {
            "done AS (SELECT NULL::bigint AS id WHERE false),".to_string()
        };
        // The caps and the full ones as CTEs, each computed once: written inline where they
        // are used, the statement took PostgreSQL 1.5 ms more to plan than to run, and the
        // planner kept re-planning it for each call (custom plans).
        let (ctes, filter, uncapped, capped_id) = if capped {
            (
                format!(
                    "caps AS MATERIALIZED {},
                     full_codes AS MATERIALIZED ({}),",
                    caps_rows("$6"),
                    DIALECT.full_codes("caps", "(SELECT COALESCE(max(id), 0) FROM done)")
                ),
                " AND code NOT IN (SELECT code FROM full_codes)",
                " AND next.code NOT IN (SELECT code FROM caps)",
                "(SELECT n.id FROM next n WHERE n.code IN (SELECT code FROM caps))",
            )
        } else {
            (String::new(), "", "", "NULL::bigint")
        };
        let queues = "$5::text[]";
        format!(
            "WITH {done} {ctes}
             next AS (
                SELECT h.id, h.code FROM unnest({queues}) WITH ORDINALITY AS q(name, pos)
                CROSS JOIN LATERAL (
                    SELECT id, code FROM pjq_jobs
                    WHERE queue = q.name AND status = 'waiting' AND available_at <= {DB_NOW}
                      AND NOT EXISTS (SELECT 1 FROM pjq_pauses p WHERE p.queue = q.name){filter}
                    ORDER BY available_at, id LIMIT 1
                    FOR UPDATE SKIP LOCKED) h
                LIMIT 1),
             claimed AS (
                UPDATE pjq_jobs j SET {} FROM next WHERE j.id = next.id{uncapped}
                RETURNING j.id, j.queue, j.code, j.payload, j.attempts, j.lease)
             SELECT {STOP_GENERATION} AS generation,
                (SELECT count(*) FROM done) AS recorded,
                c.id, c.queue, c.code, c.payload, c.attempts, c.lease,
                {capped_id} AS capped_id,
                (SELECT n.code FROM next n) AS head_code,
                CASE WHEN c.id IS NULL THEN EXISTS (
                    SELECT 1 FROM pjq_jobs WHERE queue = ANY({queues})
                    AND status = 'waiting' AND available_at <= {DB_NOW}
                    AND queue NOT IN (SELECT queue FROM pjq_pauses){filter})
                ELSE false END AS contended
             FROM (SELECT 1) AS one LEFT JOIN claimed c ON true",
            DIALECT.claim_assignments(1, "NULL")
        )
    }

    /// The claim of a capped head by id, after the turn passed it on: under its cap's lock,
    /// in a statement whose snapshot is taken after the lock, so every claim of the cap
    /// that committed before is counted and every later one waits for this one. Binds the
    /// worker ($1–$4), the cap's key ($5), the job's id ($6) and the cap's limit ($7).
    fn capped_claim_statement() -> String {
        format!(
            "UPDATE pjq_jobs SET {}
             WHERE id = $6 AND status = 'waiting' AND available_at <= {DB_NOW}
               AND NOT EXISTS (SELECT 1 FROM pjq_pauses p WHERE p.queue = pjq_jobs.queue)
               AND {} < $7
             RETURNING id, queue, code, payload, attempts, lease",
            DIALECT.claim_assignments(1, "$5"),
            DIALECT.running_under("$5", "0")
        )
    }

    /// Claims job `id` if its cap still has room (see
    /// [`PostgresStore::capped_claim_statement`]); `None` when it is full or the job was
    /// taken meanwhile.
    async fn claim_capped(
        &self,
        turn: &Turn<'_>,
        id: JobId,
        cap: &Cap,
    ) -> Result<Option<ClaimedJob>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(&DIALECT.lock_cap())
            .bind(&cap.key)
            .execute(&mut *tx)
            .await?;
        let statement = Self::capped_claim_statement();
        let row = rows::bind_worker(sqlx::query(&statement), turn.worker)
            .bind(&cap.key)
            .bind(id)
            .bind(i64::from(cap.limit))
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        row.map(|row| rows::claimed_job(&row, &turn.worker.token))
            .transpose()
    }

    /// A turn: the one statement, then, for a capped head it passed on, the claim under the
    /// cap's lock. A cap found full there (or whose head was taken meanwhile) is passed over
    /// by another statement (without the result, recorded already); each such statement
    /// passes over one more cap, so there are at most as many as caps.
    async fn turn(&self, turn: &Turn<'_>) -> Result<Poll, sqlx::Error> {
        let mut poll = self.one_statement(turn, &[]).await?;
        let mut full: Vec<String> = Vec::new();
        while let Some((id, code)) = poll.capped_head.take() {
            let Some(cap) = turn.caps.of(&code) else {
                break;
            };
            if let Some(job) = self.claim_capped(turn, id, cap).await? {
                poll.poll.job = Some(job);
                break;
            }
            full.push(cap.key.clone());
            let recorded = poll.poll.recorded;
            poll = self
                .one_statement(
                    &Turn {
                        finished: None,
                        ..*turn
                    },
                    &full,
                )
                .await?;
            poll.poll.recorded = recorded;
        }
        Ok(poll.poll)
    }

    /// [`PostgresStore::turn_statement`], with the keys in `full` as if their caps were
    /// reached.
    async fn one_statement(&self, turn: &Turn<'_>, full: &[String]) -> Result<Answer, sqlx::Error> {
        let caps = rows::CapsBinding::of(turn, full);
        let statement = Self::turn_statement(turn.finished.is_some(), caps.is_some());
        let mut query = rows::bind_worker(sqlx::query(&statement), turn.worker).bind(turn.queues);
        if let Some(caps) = &caps {
            query = query.bind(caps.json.as_ref());
        }
        if let Some((lease, completion)) = turn.finished {
            query = rows::bind_completion(query, lease, completion);
        }
        let row = query.fetch_one(&self.pool).await?;
        let id: Option<JobId> = row.try_get("id")?;
        let job = match id {
            Some(_) => Some(rows::claimed_job(&row, &turn.worker.token)?),
            None => None,
        };
        let recorded: i64 = row.try_get("recorded")?;
        let capped_id: Option<JobId> = row.try_get("capped_id")?;
        let head_code: Option<String> = row.try_get("head_code")?;
        Ok(Answer {
            poll: Poll {
                stop_generation: row.try_get("generation")?,
                job,
                recorded: turn.finished.map(|_| recorded == 1),
                contended: row.try_get("contended")?,
            },
            capped_head: capped_id.zip(head_code),
        })
    }
}

/// What the turn's statement found: the poll, and a capped head it left to claim.
struct Answer {
    poll: Poll,
    capped_head: Option<(JobId, String)>,
}

#[async_trait]
impl SchemaStore for PostgresStore {
    fn location(&self) -> String {
        self.location.clone()
    }

    async fn migrate(&self) -> StoreResult<u32> {
        let mut tx = self.pool.begin().await.map_err(|e| self.error(e))?;
        // Migrations may wait for each other and rewrite tables: not bound by the limits of
        // ordinary calls.
        for limit in ["statement_timeout", "lock_timeout"] {
            sqlx::query(&format!("SET LOCAL {limit} = '300s'"))
                .execute(&mut *tx)
                .await
                .map_err(|e| self.error(e))?;
        }
        // Concurrent starters queue here; each step is applied once, atomically with its
        // version row (PostgreSQL DDL is transactional).
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.error(e))?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS pjq_schema_migrations (
                version BIGINT PRIMARY KEY,
                applied_at BIGINT NOT NULL
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
            sqlx::query("INSERT INTO pjq_schema_migrations (version, applied_at) VALUES ($1, $2)")
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
        let has_table: bool =
            sqlx::query_scalar("SELECT to_regclass('pjq_schema_migrations') IS NOT NULL")
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
type Db = sqlx::Postgres;

// What this backend does differently, for `native_roles!`.
impl PostgresStore {
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

    /// A transaction that reads rows (locking them), then changes them.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Db>, sqlx::Error> {
        self.pool.begin().await
    }

    async fn run_turn(&self, turn: &Turn<'_>) -> StoreResult<Poll> {
        self.turn(turn).await.map_err(|e| self.error(e))
    }

    async fn insert_one(&self, job: &NewJob) -> StoreResult<JobId> {
        // The notification is delivered when the insert commits, never before.
        sqlx::query_scalar(&format!(
            "WITH inserted AS ({} RETURNING id)
             SELECT inserted.id FROM inserted, (SELECT pg_notify($7, $1)) AS notified",
            DIALECT.insert_job()
        ))
        .bind(&job.queue)
        .bind(&job.code)
        .bind(&job.payload)
        .bind(rows::delay_micros(job.delay))
        .bind(job.max_attempts as i64)
        .bind(job.unique_key.as_deref())
        .bind(CHANNEL)
        .fetch_one(&self.pool)
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
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(CHANNEL)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.error(e))?;
        tx.commit().await.map_err(|e| self.error(e))?;
        Ok(jobs.len() as u64)
    }

    async fn open_listener(&self) -> StoreResult<Option<Box<dyn PushListener>>> {
        let mut listener = PgListener::connect_with(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        listener.listen(CHANNEL).await.map_err(|e| self.error(e))?;
        Ok(Some(Box::new(PgPushListener {
            listener,
            location: self.location.clone(),
        })))
    }

    /// Wakes idle workers when a paused queue is resumed, as a push does.
    async fn announce_resume(&self) -> StoreResult<()> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(CHANNEL)
            .execute(&self.pool)
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// The statements only this backend has, for [`SchemaStore::check_statements`].
    fn own_statements() -> Vec<(&'static str, String)> {
        vec![
            ("turn", Self::turn_statement(false, false)),
            ("turn with a result", Self::turn_statement(true, false)),
            ("turn, capped", Self::turn_statement(false, true)),
            (
                "turn with a result, capped",
                Self::turn_statement(true, true),
            ),
            ("capped claim", Self::capped_claim_statement()),
        ]
    }
}

native::native_roles!(PostgresStore);

struct PgPushListener {
    listener: PgListener,
    location: String,
}

#[async_trait]
impl PushListener for PgPushListener {
    async fn pushed(&mut self) -> StoreResult<()> {
        // `recv` reconnects and re-listens by itself after a lost connection; pushes made
        // while it was gone are found by polling.
        self.listener
            .recv()
            .await
            .map(drop)
            .map_err(|e| classify(e, &self.location))
    }
}

/// Sorts a PostgreSQL error by its SQLSTATE: the one place that decides what waiting can fix.
pub fn classify(error: sqlx::Error, location: &str) -> StoreError {
    let transient = match &error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // Connection exceptions, shutdowns, too many connections, serialization
            // failures, deadlocks, lock_timeout (55P03) and statement_timeout or a cancel
            // (57014): all pass with time.
            code.starts_with("08")
                || code.starts_with("57P")
                || matches!(
                    code.as_ref(),
                    "53300" | "40001" | "40P01" | "55P03" | "57014"
                )
        }),
        other => super::is_connection_error(other),
    };
    if transient {
        StoreError::Unavailable(Detail::of(location, error))
    } else {
        StoreError::Database(Detail::of(location, error))
    }
}

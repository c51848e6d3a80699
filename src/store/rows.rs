//! Row decoding shared by every backend: the column names are the same everywhere, only the
//! SQL that produces them differs.

use std::time::Duration;

use sqlx::{ColumnIndex, Decode, Row, Type};

use super::{ClaimedJob, JobRecord, JobStatus, Lease, Timestamp, WorkerRecord};

/// The database's clock, read with the dialect's `db_now` expression.
pub async fn database_time<'c, E>(executor: E, db_now: &str) -> Result<Timestamp, sqlx::Error>
where
    E: sqlx::Executor<'c>,
    for<'q> <E::Database as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, E::Database>,
    (i64,): for<'r> sqlx::FromRow<'r, <E::Database as sqlx::Database>::Row>,
{
    let sql = format!("SELECT {db_now}");
    let now: i64 = sqlx::query_scalar(&sql).fetch_one(executor).await?;
    Ok(Timestamp(now))
}

/// The columns [`job_record`] reads, in the order backends select them.
pub const JOB_RECORD_COLUMNS: &str = "id, queue, code, payload, status, attempts, \
    max_attempts, created_at, available_at, claimed_at, started_at, finished_at, worker_host, \
    worker_instance, worker_pid, exit_code, exit_signal, reason, output";

pub fn job_record<'r, R>(row: &'r R) -> Result<JobRecord, sqlx::Error>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    let status: String = row.try_get("status")?;
    let output: Option<String> = row.try_get("output")?;
    let timestamp = |name: &'r str| -> Result<Option<Timestamp>, sqlx::Error> {
        Ok(row.try_get::<Option<i64>, _>(name)?.map(Timestamp))
    };
    Ok(JobRecord {
        id: row.try_get("id")?,
        queue: row.try_get("queue")?,
        code: row.try_get("code")?,
        payload: row.try_get("payload")?,
        status: parse_status(&status)?,
        attempts: row.try_get("attempts")?,
        max_attempts: row.try_get("max_attempts")?,
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

/// Reads `id, queue, code, payload, attempts, lease` of a job just claimed by `token`.
pub fn claimed_job<'r, R>(row: &'r R, token: &str) -> Result<ClaimedJob, sqlx::Error>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    let id: i64 = row.try_get("id")?;
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

/// The columns [`worker_record`] reads; `age` is the heartbeat's age in microseconds.
pub fn worker_record<'r, R>(row: &'r R) -> Result<WorkerRecord, sqlx::Error>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    let age: i64 = row.try_get("age")?;
    Ok(WorkerRecord {
        host: row.try_get("host")?,
        instance: row.try_get("instance")?,
        pid: row.try_get("pid")?,
        queues: row.try_get("queues")?,
        started_at: Timestamp(row.try_get("started_at")?),
        heartbeat_age_seconds: age.max(0) as f64 / 1e6,
        current_job: row.try_get("current_job")?,
    })
}

fn parse_status(text: &str) -> Result<JobStatus, sqlx::Error> {
    JobStatus::parse(text)
        .ok_or_else(|| sqlx::Error::Decode(format!("unknown job status {text:?}").into()))
}

/// `host/instance/pid` from the columns of a job row.
pub fn worker_of_job<'r, R>(row: &'r R) -> Result<String, sqlx::Error>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    let host: Option<String> = row.try_get("worker_host")?;
    let instance: Option<String> = row.try_get("worker_instance")?;
    let pid: Option<i64> = row.try_get("worker_pid")?;
    Ok(format!(
        "{}/{}/{}",
        host.as_deref().unwrap_or("?"),
        instance.as_deref().unwrap_or("-"),
        pid.map_or("?".into(), |p| p.to_string())
    ))
}

/// When a taken-back job runs again (SQL shared by the backends): while it has attempts left,
/// and always when it never started. Claims write `started_at` themselves (the claim is the
/// start record), so "never started" is a row claimed by a worker older than that, whose
/// start was a separate write: its claim is refunded, as that worker's rescue promised.
pub(super) const RUNS_AGAIN: &str = "(attempts < max_attempts OR started_at IS NULL)";

/// SQL that is true for a `pjq_jobs` row whose worker is lost or has disowned it; `db_now` is
/// the dialect's expression for the database's clock in microseconds.
///
/// Lost: no worker row with this token has a heartbeat younger than `rescue_after`.
/// Disowned: the worker is alive, but its heartbeats, for `rescue_after` since the claim,
/// report another job or none. That is a claim whose reply never reached the worker (the
/// commit went through, the connection died), or a result the worker gave up writing: left
/// alone, such a job would stay `running` under a live, idle worker forever. The wait covers
/// a heartbeat sent just before the claim's reply arrived, which cannot name the job yet
/// (every call ends within a third of `rescue_after`). `claimed_at` and `heartbeat_at` are
/// both written by the database's clock.
pub fn orphaned(db_now: &str, rescue_after: Duration) -> String {
    let limit = rescue_after.as_micros() as i64;
    format!(
        "NOT EXISTS (SELECT 1 FROM pjq_workers w WHERE w.token = pjq_jobs.worker_token
                     AND w.heartbeat_at > {db_now} - {limit}
                     AND (w.current_job = pjq_jobs.id
                          OR w.heartbeat_at <= pjq_jobs.claimed_at + {limit}))"
    )
}

/// The rescuer's round in one statement: the database's clock (always one row) and the
/// running jobs whose worker is lost or has disowned them (see [`orphaned`]).
pub fn rescue_scan(db_now: &str, rescue_after: Duration) -> String {
    format!(
        "SELECT n.now, o.id, o.lease, o.worker_host, o.worker_instance, o.worker_pid
         FROM (SELECT {db_now} AS now) n
         LEFT JOIN (SELECT id, lease, worker_host, worker_instance, worker_pid FROM pjq_jobs
                    WHERE status = 'running' AND {}) o ON 1 = 1",
        orphaned(db_now, rescue_after)
    )
}

/// Reads [`rescue_scan`]'s rows.
pub fn rescue_scan_rows<R>(rows: &[R]) -> Result<super::RescueScan, sqlx::Error>
where
    R: Row,
    for<'r> &'r str: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
{
    let now = match rows.first() {
        Some(row) => Timestamp(row.try_get("now")?),
        None => return Err(sqlx::Error::RowNotFound),
    };
    let mut orphans = Vec::new();
    for row in rows {
        if let Some(id) = row.try_get::<Option<i64>, _>("id")? {
            orphans.push(super::OrphanedJob {
                id,
                lease: row.try_get("lease")?,
                lost_worker: worker_of_job(row)?,
            });
        }
    }
    Ok(super::RescueScan { now, orphans })
}

/// The statement that stores a new job: created now and due its delay later, both by the
/// database's clock (`db_now`), so hosts with skewed clocks agree on when it is due.
/// `params` are the dialect's placeholders for queue, code, payload, delay (microseconds,
/// see [`delay_micros`]) and max_attempts.
pub fn insert_job(db_now: &str, params: [&str; 5]) -> String {
    let [queue, code, payload, delay, max_attempts] = params;
    format!(
        "INSERT INTO pjq_jobs (queue, code, payload, status, created_at, available_at,
            max_attempts)
         SELECT {queue}, {code}, {payload}, 'waiting', n.at, n.at + {delay}, {max_attempts}
         FROM (SELECT {db_now} AS at) AS n"
    )
}

/// Binds a new job to [`insert_job`]'s placeholders, in their order.
pub fn bind_new_job<'q, DB>(
    query: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    job: &'q super::NewJob,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    String: sqlx::Encode<'q, DB> + Type<DB>,
    i64: sqlx::Encode<'q, DB> + Type<DB>,
{
    query
        .bind(&job.queue)
        .bind(&job.code)
        .bind(&job.payload)
        .bind(delay_micros(job.delay))
        .bind(job.max_attempts as i64)
}

/// A job's delay in microseconds, at most a thousand years: far enough to mean "not before
/// an operator says so", near enough that adding the clock cannot overflow.
pub fn delay_micros(delay: Duration) -> i64 {
    const MOST: i64 = 1000 * 366 * 86_400 * 1_000_000;
    super::saturating_micros(delay).min(MOST)
}

/// What differs between the native backends' SQL for the statements written once below:
/// the clock expression and the placeholders. Every statement uses each of its parameters
/// once, in bind order, so MySQL's positional `?` binds them like the numbered ones.
#[derive(Clone, Copy)]
pub(super) struct Dialect {
    /// The database's clock in microseconds since the epoch.
    pub db_now: &'static str,
    /// The placeholder of the `n`-th bound value, counting from 1.
    pub placeholder: fn(usize) -> String,
}

impl Dialect {
    fn p(&self, n: usize) -> String {
        (self.placeholder)(n)
    }

    /// The assignments of a claim, with the worker's token, host, instance and pid bound at
    /// `first` and after. The claim is the job's start record (`started_at` too): it commits
    /// before the job's process is spawned, so a job whose claim is not recorded never ran.
    pub fn claim_assignments(&self, first: usize) -> String {
        let now = self.db_now;
        format!(
            "status = 'running', lease = lease + 1, attempts = attempts + 1,
             claimed_at = {now}, started_at = {now}, finished_at = NULL,
             worker_token = {}, worker_host = {}, worker_instance = {}, worker_pid = {},
             exit_code = NULL, exit_signal = NULL, reason = NULL, output = NULL",
            self.p(first),
            self.p(first + 1),
            self.p(first + 2),
            self.p(first + 3)
        )
    }

    /// Records a result, guarded by the lease, with status, finished_at, exit_code,
    /// exit_signal, reason, output, then id, token, lease bound from `first` (see
    /// [`bind_completion`]).
    pub fn complete_job(&self, first: usize) -> String {
        let p = |n: usize| self.p(first - 1 + n);
        format!(
            "UPDATE pjq_jobs SET status = {}, finished_at = {}, exit_code = {},
                exit_signal = {}, reason = {}, output = {}
             WHERE id = {} AND worker_token = {} AND lease = {} AND status = 'running'",
            p(1),
            p(2),
            p(3),
            p(4),
            p(5),
            p(6),
            p(7),
            p(8),
            p(9)
        )
    }

    /// Puts a claimed job that never started back to waiting, its attempt refunded:
    /// reason, then id, token, lease.
    pub fn put_back_unrun(&self) -> String {
        format!(
            "UPDATE pjq_jobs SET status = 'waiting', attempts = attempts - 1, lease = lease + 1,
                claimed_at = NULL, started_at = NULL, worker_token = NULL, reason = {}
             WHERE id = {} AND worker_token = {} AND lease = {} AND status = 'running'",
            self.p(1),
            self.p(2),
            self.p(3),
            self.p(4)
        )
    }

    /// Puts back, refunded, the jobs running under a token (bound first) except `keep`
    /// ids (bound after it).
    pub fn put_back_unanswered(&self, keep: usize) -> String {
        let kept = if keep == 0 {
            String::new()
        } else {
            let ids: Vec<String> = (2..2 + keep).map(|n| self.p(n)).collect();
            format!(" AND id NOT IN ({})", ids.join(", "))
        };
        format!(
            "UPDATE pjq_jobs SET status = 'waiting', attempts = attempts - 1, lease = lease + 1,
                claimed_at = NULL, started_at = NULL, worker_token = NULL,
                reason = 'claimed, never started (the claim''s answer was lost)'
             WHERE worker_token = {} AND status = 'running'{kept}",
            self.p(1)
        )
    }

    /// The id of the next job to claim, or NULL: the oldest due job of the first of
    /// `queues` queues (bound from `first`, in priority order) that has one. `COALESCE`
    /// stops at its first non-null argument, so a queue is looked at only while those
    /// before it are empty, each with one index seek: no sort of the waiting jobs, no
    /// temporary table, however many wait.
    ///
    /// With `skip_locked`, inside a transaction, the job found is locked, and jobs other
    /// workers hold are passed over (the next one of the same queue is taken): claims never
    /// wait on each other, never take a lower queue's job while a higher one has a free one.
    pub fn next_due_id(&self, queues: usize, first: usize, skip_locked: bool) -> String {
        let now = self.db_now;
        let lock = if skip_locked {
            " FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        let heads: Vec<String> = (0..queues)
            .map(|i| {
                format!(
                    "(SELECT id FROM pjq_jobs
                      WHERE queue = {} AND status = 'waiting' AND available_at <= {now}
                      ORDER BY available_at, id LIMIT 1{lock})",
                    self.p(first + i)
                )
            })
            .collect();
        format!("COALESCE({}, NULL)", heads.join(", "))
    }
}

/// The stop-workers generation, as a scalar subquery.
pub(super) const STOP_GENERATION: &str =
    "(SELECT value FROM pjq_control WHERE name = 'stop_generation')";

/// Binds [`Dialect::complete_job`]'s parameters.
pub(super) fn bind_completion<'q, DB>(
    query: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    lease: &'q Lease,
    completion: &'q super::Completion,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    String: sqlx::Encode<'q, DB> + Type<DB>,
    &'q str: sqlx::Encode<'q, DB> + Type<DB>,
    i64: sqlx::Encode<'q, DB> + Type<DB>,
    Option<i64>: sqlx::Encode<'q, DB> + Type<DB>,
    Option<&'q str>: sqlx::Encode<'q, DB> + Type<DB>,
{
    let (status, exit_code, signal, reason) = super::completion_columns(&completion.result);
    query
        .bind(status.as_str())
        .bind(completion.finished_at.0)
        .bind(exit_code)
        .bind(signal)
        .bind(reason)
        .bind(completion.output.join("\n"))
        .bind(lease.job_id)
        .bind(lease.token.as_str())
        .bind(lease.lease)
}

/// Binds a worker's token, host, instance and pid, in [`Dialect::claim_assignments`]' order.
pub(super) fn bind_worker<'q, DB>(
    query: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    worker: &'q super::WorkerIdentity,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    &'q str: sqlx::Encode<'q, DB> + Type<DB>,
    Option<&'q str>: sqlx::Encode<'q, DB> + Type<DB>,
    i64: sqlx::Encode<'q, DB> + Type<DB>,
{
    query
        .bind(worker.token.as_str())
        .bind(worker.host.as_str())
        .bind(worker.instance.as_deref())
        .bind(worker.pid as i64)
}

/// The worker's guarded writes, the same statements and binds on every native backend: an
/// inherent `impl` of `$store`, which has a `pool`, an `error` method and a `DIALECT` in
/// scope. (A macro because sqlx's result types share no `rows_affected` trait.)
macro_rules! guarded_writes {
    ($store:ty) => {
        impl $store {
            /// [`super::JobStore::put_back_unrun`].
            async fn guarded_put_back(&self, lease: &Lease, reason: &str) -> StoreResult<bool> {
                let result = sqlx::query(&DIALECT.put_back_unrun())
                    .bind(reason)
                    .bind(lease.job_id)
                    .bind(&lease.token)
                    .bind(lease.lease)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                Ok(result.rows_affected() == 1)
            }

            /// [`super::JobStore::put_back_unanswered_claims`].
            async fn guarded_put_back_unanswered(
                &self,
                worker: &WorkerIdentity,
                keep: &[JobId],
            ) -> StoreResult<u64> {
                let statement = DIALECT.put_back_unanswered(keep.len());
                let mut query = sqlx::query(&statement).bind(&worker.token);
                for id in keep {
                    query = query.bind(id);
                }
                let result = query.execute(&self.pool).await.map_err(|e| self.error(e))?;
                Ok(result.rows_affected())
            }

            /// [`super::JobStore::rescue_scan`].
            async fn scan_for_orphans(
                &self,
                rescue_after: std::time::Duration,
            ) -> StoreResult<super::RescueScan> {
                let found = sqlx::query(&rows::rescue_scan(DB_NOW, rescue_after))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                rows::rescue_scan_rows(&found).map_err(|e| self.error(e))
            }

            /// [`super::JobStore::complete`].
            async fn guarded_complete(
                &self,
                lease: &Lease,
                completion: &Completion,
            ) -> StoreResult<bool> {
                let complete = DIALECT.complete_job(1);
                let result = rows::bind_completion(sqlx::query(&complete), lease, completion)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| self.error(e))?;
                Ok(result.rows_affected() == 1)
            }
        }
    };
}
pub(super) use guarded_writes;

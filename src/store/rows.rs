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
/// and always when it never started (its claim is refunded: it did not run, so a single
/// attempt must not end as `worker lost`).
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

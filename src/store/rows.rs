//! Row decoding shared by every backend: the column names are the same everywhere, only the
//! SQL that produces them differs.

use std::time::Duration;

use sqlx::{ColumnIndex, Decode, Row, Type};

use super::{ClaimedJob, JobRecord, JobStatus, Lease, Timestamp, WorkerRecord};

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
        cancel_requested: row.try_get("cancel_requested")?,
        earlier_attempts: row
            .try_get::<Option<String>, _>("history")?
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect(),
        usage: super::ResourceUsage {
            peak_rss_bytes: row.try_get("peak_rss_bytes")?,
            cpu_usec: row.try_get("cpu_usec")?,
        },
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
        heartbeat_at: Timestamp(row.try_get("heartbeat_at")?),
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

/// Reads [`super::statements::Dialect::rescue_scan`]'s rows.
pub fn rescue_scan_rows<R>(rows: &[R]) -> Result<super::RescueScan, sqlx::Error>
where
    R: Row,
    for<'r> &'r str: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
{
    let (now, paused) = match rows.first() {
        Some(row) => (
            Timestamp(row.try_get("now")?),
            row.try_get::<Option<String>, _>("paused")?
                .unwrap_or_default(),
        ),
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
    Ok(super::RescueScan {
        now,
        orphans,
        paused,
    })
}

/// Binds a new job to [`super::statements::Dialect::insert_job`]'s placeholders, in their order.
pub fn bind_new_job<'q, DB>(
    query: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    job: &'q super::NewJob,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    String: sqlx::Encode<'q, DB> + Type<DB>,
    i64: sqlx::Encode<'q, DB> + Type<DB>,
    Option<&'q str>: sqlx::Encode<'q, DB> + Type<DB>,
{
    query
        .bind(&job.queue)
        .bind(&job.code)
        .bind(&job.payload)
        .bind(delay_micros(job.delay))
        .bind(job.max_attempts as i64)
        .bind(job.unique_key.as_deref())
}

/// A job's delay in microseconds, at most a thousand years: far enough to mean "not before
/// an operator says so", near enough that adding the clock cannot overflow.
pub fn delay_micros(delay: Duration) -> i64 {
    const MOST: i64 = 1000 * 366 * 86_400 * 1_000_000;
    super::saturating_micros(delay).min(MOST)
}

/// Binds [`super::statements::Dialect::complete_job`]'s parameters.
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
        .bind(completion.usage.peak_rss_bytes)
        .bind(completion.usage.cpu_usec)
        .bind(lease.job_id)
        .bind(lease.token.as_str())
        .bind(lease.lease)
}

/// Binds a worker's token, host, instance and pid, in [`super::statements::Dialect::claim_assignments`]' order.
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

/// What the cap checks of a turn's lookups bind: the caps (limit 0 for keys found full
/// this turn) and the id of the job the turn finishes, which no longer counts as running.
pub(super) struct CapsBinding<'a> {
    pub json: std::borrow::Cow<'a, str>,
    pub finishing: super::JobId,
}

impl<'a> CapsBinding<'a> {
    /// `None` when the worker has no caps: the statements without cap checks.
    pub fn of(turn: &super::Turn<'a>, full: &[String]) -> Option<CapsBinding<'a>> {
        (!turn.caps.is_empty()).then(|| CapsBinding {
            json: turn.caps.as_json(full),
            finishing: turn.finishing_id(),
        })
    }
}

/// Binds the queues of [`super::statements::Dialect::next_due_id`]: each twice, for its
/// lookup and for its pause check, in priority order, each followed by the caps when the
/// lookups check them.
pub(super) fn bind_heads<'q, DB>(
    mut query: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    queues: &'q [String],
    caps: Option<&'q CapsBinding<'_>>,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    &'q str: sqlx::Encode<'q, DB> + Type<DB>,
    i64: sqlx::Encode<'q, DB> + Type<DB>,
{
    for queue in queues {
        query = query.bind(queue.as_str()).bind(queue.as_str());
        if let Some(caps) = caps {
            query = query.bind(caps.json.as_ref()).bind(caps.finishing);
        }
    }
    query
}

/// Reads `queue, reason, paused_at, paused_by` of a pause.
pub fn paused_queue<'r, R>(row: &'r R) -> Result<super::PausedQueue, sqlx::Error>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(super::PausedQueue {
        queue: row.try_get("queue")?,
        reason: row.try_get("reason")?,
        paused_at: Timestamp(row.try_get("paused_at")?),
        paused_by: row.try_get("paused_by")?,
    })
}

/// Reads `oldest` and `now` (microseconds) and the queue from column `queue_column`.
pub fn queue_latency<'r, R>(
    row: &'r R,
    queue_column: &'r str,
) -> Result<super::QueueLatency, sqlx::Error>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    let oldest: i64 = row.try_get("oldest")?;
    let now: i64 = row.try_get("now")?;
    Ok(super::QueueLatency {
        queue: row.try_get(queue_column)?,
        oldest_due_at: Timestamp(oldest),
        seconds: now.saturating_sub(oldest).max(0) as f64 / 1e6,
    })
}

/// Reads `code, reason, n, last` of [`super::statements::Dialect::job_stats`].
pub fn job_stats<'r, R>(row: &'r R) -> Result<super::JobStats, sqlx::Error>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(super::JobStats {
        code: row.try_get("code")?,
        reason: row.try_get("reason")?,
        count: row.try_get("n")?,
        last_finished_at: row.try_get::<Option<i64>, _>("last")?.map(Timestamp),
    })
}

/// Reads a row of [`super::statements::Dialect::schedule_runs`].
pub fn schedule_run<'r, R>(row: &'r R) -> Result<super::ScheduleRun, sqlx::Error>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(super::ScheduleRun {
        name: row.try_get("name")?,
        slot_at: Timestamp(row.try_get("slot_at")?),
        enqueued_at: Timestamp(row.try_get("enqueued_at")?),
        job_id: row.try_get("job_id")?,
    })
}

/// Reads a row of [`super::statements::Dialect::finished_tallies`].
pub fn tally<'r, R>(row: &'r R) -> Result<super::Tally, sqlx::Error>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(super::Tally {
        queue: row.try_get("queue")?,
        event: row.try_get("event")?,
        duration_bucket: row.try_get("duration_bucket")?,
        wait_bucket: row.try_get("wait_bucket")?,
        jobs: row.try_get("jobs")?,
        duration_sum: row.try_get("duration_sum")?,
        wait_sum: row.try_get("wait_sum")?,
    })
}

/// Binds the parameters of [`super::statements::Dialect::job_filter`], in its order.
pub(super) fn bind_job_filter<'q, DB>(
    query: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    filter: &'q super::JobFilter,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    Option<&'q str>: sqlx::Encode<'q, DB> + Type<DB>,
    i64: sqlx::Encode<'q, DB> + Type<DB>,
{
    // "Any age": further back than any clock reading, without overflowing.
    let since = filter.since.map_or(1_i64 << 62, super::saturating_micros);
    query
        .bind(filter.queue.as_deref())
        .bind(filter.status.map(super::JobStatus::as_str))
        .bind(filter.code.as_deref())
        .bind(since)
}

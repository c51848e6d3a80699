//! The Akeneo drop-in transport: consumes the PIM's own Symfony Messenger table,
//! `messenger_messages`, in the PIM's MySQL/MariaDB database, beside (or instead of) PHP
//! `messenger:consume` processes.
//!
//! A poll is one consistent read that takes no lock: the stop-workers generation and the
//! message Symfony's `get()` would pick (queue by queue in priority order; `delivered_at` null
//! or older than the redeliver timeout; `available_at` due; oldest first). The claim marks
//! that row delivered, as `get()` does, with an update by primary key guarded by the same
//! condition, so no other consumer, PHP or ours, takes it twice; one that lost the race
//! reads again at once. It locks one row, so it never deadlocks with PHP's `SELECT … FOR
//! UPDATE`, and it works on servers without `SKIP LOCKED`. The row is deleted (acknowledged) only once the job's process has really
//! started; a launch that fails before that puts it back at once, as Symfony's reject-to-retry
//! would, so a broken PHP setup cannot eat the queue. Rows that cannot be run are never
//! deleted: they are set aside (`delivered_at` far in the future, which PHP consumers skip
//! too), logged once and counted in `status`. Rows PHP consumers soft-deleted (`delivered_at`
//! in year 9999) are never claimed and are purged, as Symfony does. All datetimes are UTC
//! strings with second precision passed as parameters; the server's `NOW()` and session time
//! zone are never used. Fleet features (worker registry, stop-workers) use this project's own
//! `pjq_` tables in the same database.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use sqlx::mysql::MySqlPool;
use sqlx::{MySqlConnection, Row};

use super::mysql::{MysqlStore, classify, is_lock_conflict};
use super::{
    ChangeOutcome, ClaimedJob, Completion, Finished, FleetStore, ForeignJobs, JobId, JobResult,
    JobStatus, Lease, OrphanedJob, PausedQueue, Poll, QueueCounts, QueueLatency, QueueStore,
    Release, RescueScan, SchemaStore, SchemaVersion, StoreError, StoreResult, Timestamp, Turn,
    WorkerIdentity, WorkerRecord,
};
use crate::akeneo::{AkeneoSettings, JobMessage, Launcher, Target};

/// How often soft-deleted rows are purged (Symfony does it on every poll).
const PURGE_EVERY: Duration = Duration::from_secs(10);
/// Both sentinels Symfony 5.4 writes on MySQL: '9999-12-31' (5.4.7 to 5.4.11) and
/// '9999-12-31 23:59:59' (5.4.12 and later).
const SOFT_DELETED_FROM: &str = "9999-12-31 00:00:00";
/// `delivered_at` of a row set aside: never due again (Symfony redelivers only rows
/// delivered before now minus the redeliver timeout) and not a soft-delete sentinel, so
/// neither consumer kind takes or purges it. `UPDATE ... SET delivered_at = NULL` releases it.
const SET_ASIDE: &str = "9000-01-01 00:00:00";
/// Akeneo's BatchStatus values the worker reads or writes.
const COMPLETED: i64 = 1;
const STARTING: i64 = 2;
const STARTED: i64 = 3;
const STOPPING: i64 = 4;
const FAILED: i64 = 6;

/// What one claim transaction did with the row it locked.
enum Taken {
    /// Marked delivered by this worker at `delivered_at`; not acknowledged yet.
    Job {
        id: i64,
        message: JobMessage,
        /// The job instance code: looked up for an execution, given for a scheduled job.
        code: String,
        delivered_at: String,
    },
    /// Cannot be run: left in the table, out of every consumer's way (its execution, when
    /// it names one still waiting to start, failed with the reason).
    SetAside {
        id: i64,
        execution: Option<i64>,
        reason: String,
    },
}

/// The oldest due message of a queue, as a probe read it (a message's row never changes
/// but for `delivered_at`).
struct Head {
    id: i64,
    queue: String,
    headers: String,
    body: String,
    /// The execution its body names, read in the same statement: its id, job instance
    /// code and status, when it exists.
    execution: Option<(i64, String, i64)>,
}

/// A message this worker claimed and has not finished with.
#[derive(Debug, Clone)]
struct Claim {
    execution: Option<i64>,
    /// The `delivered_at` this worker wrote, which guards the acknowledgement and the release.
    delivered_at: String,
    /// Whether the message was deleted because its job started.
    acknowledged: bool,
}

pub struct AkeneoStore {
    fleet: MysqlStore,
    settings: AkeneoSettings,
    last_purge: Mutex<Option<Instant>>,
    /// Messages claimed by this process and not finished, by message id.
    claims: Mutex<HashMap<JobId, Claim>>,
}

impl AkeneoStore {
    pub async fn open(
        url: &str,
        settings: AkeneoSettings,
        limits: super::CallLimits,
    ) -> StoreResult<AkeneoStore> {
        let fleet = MysqlStore::open(url, limits).await?;
        Ok(AkeneoStore {
            fleet,
            settings,
            last_purge: Mutex::new(None),
            claims: Mutex::default(),
        })
    }

    fn pool(&self) -> &MySqlPool {
        self.fleet.pool()
    }

    fn error(&self, error: sqlx::Error) -> StoreError {
        classify(error, &self.fleet.location())
    }

    /// Deletes rows PHP consumers acknowledged by soft delete, at most every few seconds.
    async fn purge_soft_deleted(&self) {
        {
            let mut last = self.last_purge.lock().expect("purge lock");
            if last.is_some_and(|at| at.elapsed() < PURGE_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let purged = sqlx::query("DELETE FROM messenger_messages WHERE delivered_at >= ?")
            .bind(SOFT_DELETED_FROM)
            .execute(self.pool())
            .await;
        match purged {
            Ok(result) if result.rows_affected() > 0 => {
                tracing::debug!("purged {} soft-deleted message(s)", result.rows_affected())
            }
            Ok(_) => {}
            // A deadlock with a PHP consumer's own purge is harmless: the next one catches up.
            Err(error) => tracing::debug!("purging soft-deleted messages: {error}"),
        }
    }

    /// The idle poll, one consistent read that takes no lock: the stop-workers generation
    /// and the oldest due message of the first of `queues` that has one, as Symfony's
    /// `get()` picks it (not delivered, or delivered before the redeliver timeout; due).
    async fn probe(
        &self,
        queues: &[String],
        now: SystemTime,
        pass_over: u32,
    ) -> Result<(i64, Option<Head>), sqlx::Error> {
        let redeliver_before = utc_seconds(now - self.settings.redeliver_timeout);
        // As the native stores' `next_due_id`: a queue is looked at only while those before
        // it are empty; after a lost race, among its first few messages. Symfony's table
        // has single-column indexes only, and MariaDB takes `available_at`'s for the ordered
        // lookup, which for a queue with nothing to take reads every row of the table (2 ms
        // at 1,300 rows, once per empty higher queue per poll): `queue_name`'s index answers
        // "nothing here" first.
        let heads: Vec<String> = (0..queues.len())
            .map(|i| {
                let any = "EXISTS (SELECT 1 FROM messenger_messages
                     WHERE queue_name = ? AND (delivered_at IS NULL OR delivered_at < ?))";
                let due = "SELECT id FROM messenger_messages
                     WHERE queue_name = ? AND (delivered_at IS NULL OR delivered_at < ?)
                       AND available_at <= ?
                     ORDER BY available_at ASC, id ASC";
                let head = match pass_over {
                    0 => format!("({due} LIMIT 1)"),
                    n => format!("(SELECT MAX(id) FROM ({due} LIMIT {}) AS q{i})", n + 1),
                };
                // Paused by an operator (`pim-job-queue pause`): passed over like an
                // empty queue.
                let running = "NOT EXISTS (SELECT 1 FROM pjq_pauses WHERE queue = ?)";
                format!("CASE WHEN {any} AND {running} THEN {head} END")
            })
            .collect();
        // The execution lookup rides along (Akeneo's bodies are JSON with an integer
        // `job_execution_id`); the message is still decoded, and checked, in Rust.
        let statement = format!(
            "SELECT g.generation, m.id, m.queue_name, m.headers, m.body,
                e.id AS execution_id, i.code AS execution_code,
                CAST(e.status AS SIGNED) AS execution_status
             FROM (SELECT value AS generation, COALESCE({}, NULL) AS next_id
                   FROM pjq_control WHERE name = 'stop_generation') AS g
             LEFT JOIN messenger_messages m ON m.id = g.next_id
             LEFT JOIN akeneo_batch_job_execution e ON e.id = CASE WHEN JSON_VALID(m.body)
                THEN CAST(JSON_VALUE(m.body, '$.job_execution_id') AS UNSIGNED) END
             LEFT JOIN akeneo_batch_job_instance i ON i.id = e.job_instance_id",
            heads.join(", ")
        );
        let mut query = sqlx::query(&statement);
        for queue in queues {
            query = query
                .bind(queue.as_str())
                .bind(redeliver_before.as_str())
                .bind(queue.as_str())
                .bind(queue.as_str())
                .bind(redeliver_before.as_str())
                .bind(utc_seconds(now));
        }
        let row = query.fetch_one(self.pool()).await?;
        let id: Option<i64> = row.try_get("id")?;
        let head = match id {
            Some(id) => Some(Head {
                id,
                queue: row.try_get("queue_name")?,
                headers: row.try_get("headers")?,
                body: row.try_get("body")?,
                execution: match row.try_get::<Option<i64>, _>("execution_id")? {
                    Some(execution) => Some((
                        execution,
                        row.try_get::<Option<String>, _>("execution_code")?
                            .unwrap_or_default(),
                        row.try_get("execution_status")?,
                    )),
                    None => None,
                },
            }),
            None => None,
        };
        Ok((row.try_get("generation")?, head))
    }

    /// Takes the message a probe found, if no consumer (PHP or ours) took it since: decode
    /// it, look up its execution, then mark it delivered (a job) or set it aside (anything
    /// that cannot run) with an update guarded as Symfony's redelivery is. `None`: another
    /// consumer was first.
    async fn take(&self, head: Head, now: SystemTime) -> Result<Option<Taken>, sqlx::Error> {
        let Head {
            id,
            headers,
            body,
            execution,
            ..
        } = head;
        let taken = match JobMessage::decode(&headers, &body) {
            Ok(message) => self.examine(id, message, execution, now).await?,
            Err(undecodable) => Taken::SetAside {
                id,
                execution: undecodable.execution,
                reason: undecodable.reason,
            },
        };
        let redelivered_before = utc_seconds(now - self.settings.redeliver_timeout);
        let mark = |delivered_at: &str| {
            sqlx::query(
                "UPDATE messenger_messages SET delivered_at = ?
                 WHERE id = ? AND (delivered_at IS NULL OR delivered_at < ?)",
            )
            .bind(delivered_at.to_string())
            .bind(id)
            .bind(redelivered_before.clone())
        };
        let set_aside_execution = match &taken {
            Taken::Job { delivered_at, .. } => {
                let marked = mark(delivered_at).execute(self.pool()).await?;
                return Ok((marked.rows_affected() == 1).then_some(taken));
            }
            Taken::SetAside {
                execution: None, ..
            } => {
                let marked = mark(SET_ASIDE).execute(self.pool()).await?;
                return Ok((marked.rows_affected() == 1).then_some(taken));
            }
            Taken::SetAside {
                execution: Some(execution),
                reason,
                ..
            } => (
                *execution,
                format!("pim-job-queue set aside message {id}: {reason}"),
            ),
        };
        // Set aside with its execution failed, both or neither.
        let mut tx = self.pool().begin().await?;
        let marked = mark(SET_ASIDE).execute(&mut *tx).await?;
        if marked.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(None);
        }
        let (execution, reason) = set_aside_execution;
        fail_waiting_execution(&mut tx, execution, &reason).await?;
        tx.commit().await?;
        Ok(Some(taken))
    }

    /// Probes and takes until a job is claimed, nothing is due, or another consumer wins
    /// the race for the head (said as `contended`, so the worker looks again at once).
    async fn claim_next(&self, turn: &Turn<'_>) -> StoreResult<(i64, Option<ClaimedJob>, bool)> {
        loop {
            let now = SystemTime::now();
            let (generation, head) = self
                .probe(turn.queues, now, turn.pass_over)
                .await
                .map_err(|e| self.error(e))?;
            let Some(head) = head else {
                return Ok((generation, None, false));
            };
            let queue = head.queue.clone();
            let taken = match self.take(head, now).await {
                // A deadlock with a PHP consumer's purge: the worker looks again at once.
                Err(error) if is_lock_conflict(&error) => None,
                other => other.map_err(|e| self.error(e))?,
            };
            match taken {
                None => return Ok((generation, None, true)),
                Some(Taken::SetAside { id, reason, .. }) => tracing::error!(
                    message_id = id,
                    "set aside message {id} of {queue}, which cannot be run: {reason} \
                     (it stays in messenger_messages; `status` counts it)"
                ),
                Some(Taken::Job {
                    id,
                    message,
                    code,
                    delivered_at,
                }) => {
                    let job = self.claimed(id, queue, message, code, delivered_at, turn.worker);
                    return Ok((generation, Some(job), false));
                }
            }
        }
    }

    /// Remembers a message this worker took, and says it as a job.
    fn claimed(
        &self,
        message_id: i64,
        queue: String,
        message: JobMessage,
        code: String,
        delivered_at: String,
        worker: &WorkerIdentity,
    ) -> ClaimedJob {
        let (id, execution) = match message.target {
            Target::Execution(execution) => (execution, Some(execution)),
            Target::Scheduled(_) => (message_id, None),
        };
        self.claims.lock().expect("claims lock").insert(
            message_id,
            Claim {
                execution,
                delivered_at,
                acknowledged: false,
            },
        );
        ClaimedJob {
            id,
            queue,
            code,
            payload: message.to_payload().to_string(),
            attempts: 1,
            lease: Lease {
                job_id: message_id,
                token: worker.token.clone(),
                lease: 0,
            },
        }
    }

    /// Looks up what a decoded message names; a message of a class this worker does not
    /// know is run only when its execution is still waiting to start.
    async fn examine(
        &self,
        id: i64,
        message: JobMessage,
        looked_up: Option<(i64, String, i64)>,
        now: SystemTime,
    ) -> Result<Taken, sqlx::Error> {
        let code = match &message.target {
            Target::Execution(execution) => {
                let found = match looked_up {
                    Some((seen, code, status)) if seen == *execution => Some((code, status)),
                    // The SQL read of the body disagreed with the decoder: ask again.
                    _ => {
                        let mut conn = self.pool().acquire().await?;
                        execution_state(&mut conn, *execution).await?
                    }
                };
                let waiting = found
                    .as_ref()
                    .is_some_and(|(_, status)| *status == STARTING);
                if !message.known_class && !waiting {
                    return Ok(Taken::SetAside {
                        id,
                        execution: None,
                        reason: format!(
                            "unknown message class {} names job execution {execution}, which is not waiting to start",
                            message.class
                        ),
                    });
                }
                found.map(|(code, _)| code).unwrap_or_default()
            }
            Target::Scheduled(code) => code.clone(),
        };
        Ok(Taken::Job {
            id,
            message,
            code,
            delivered_at: utc_seconds(now),
        })
    }

    fn claim_of(&self, lease: &Lease) -> Option<Claim> {
        self.claims
            .lock()
            .expect("claims lock")
            .get(&lease.job_id)
            .cloned()
    }

    fn forget(&self, lease: &Lease) -> Option<Claim> {
        self.claims
            .lock()
            .expect("claims lock")
            .remove(&lease.job_id)
    }

    /// The execution behind a lease, when this worker must heartbeat it itself (Akeneo 6
    /// has no watchdog).
    fn heartbeat_execution(&self, lease: &Lease) -> Option<i64> {
        if self.settings.resolved_launcher() != Some(Launcher::Direct) {
            return None;
        }
        self.claim_of(lease)?.execution
    }

    /// What Akeneo's watchdog does every 5 s: the PIM shows a job whose heartbeat is older
    /// than 10 s as failed, and refuses a second run of a unique job only while it is fresh.
    async fn write_health_check(&self, execution: i64) -> StoreResult<()> {
        let now = utc_seconds(SystemTime::now());
        sqlx::query(
            "UPDATE akeneo_batch_job_execution SET health_check_time = ?, updated_time = ?
             WHERE id = ?",
        )
        .bind(&now)
        .bind(&now)
        .bind(execution)
        .execute(self.pool())
        .await
        .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// What Akeneo's watchdog does when the job process ends: an execution still marked
    /// running was never finished by the job, so it is failed (status 6, exit code FAILED),
    /// with the worker's reason in the exit description. Paused executions are left alone.
    async fn fail_if_unfinished(&self, execution: i64, reason: &str) -> StoreResult<()> {
        let result = sqlx::query(
            "UPDATE akeneo_batch_job_execution
             SET status = ?, exit_code = 'FAILED', updated_time = ?,
                 exit_description = CONCAT_WS('\n', NULLIF(exit_description, ''), ?)
             WHERE id = ? AND exit_code IN ('EXECUTING', 'UNKNOWN') AND status NOT IN (9, 10)",
        )
        .bind(FAILED)
        .bind(utc_seconds(SystemTime::now()))
        .bind(format!("pim-job-queue: {reason}"))
        .bind(execution)
        .execute(self.pool())
        .await
        .map_err(|e| self.error(e))?;
        if result.rows_affected() > 0 {
            tracing::warn!(
                job_execution_id = execution,
                "job execution {execution} was left unfinished ({reason}): marked failed"
            );
        }
        Ok(())
    }

    /// Ends this worker's claim: the PIM is told the truth about an execution the job left
    /// unfinished, and a message whose job never started (its launch could not even be
    /// prepared) is set aside rather than left to come back after the redeliver timeout.
    async fn finish(&self, lease: &Lease, reason: &str) -> StoreResult<()> {
        let Some(claim) = self.claim_of(lease) else {
            return Ok(());
        };
        if !claim.acknowledged {
            self.set_aside_claimed(lease.job_id, &claim, reason).await?;
        } else if let Some(execution) = claim.execution {
            self.fail_if_unfinished(execution, reason).await?;
        }
        self.forget(lease);
        Ok(())
    }

    async fn set_aside_claimed(&self, id: i64, claim: &Claim, reason: &str) -> StoreResult<()> {
        let mut tx = self.pool().begin().await.map_err(|e| self.error(e))?;
        let result = async {
            sqlx::query(
                "UPDATE messenger_messages SET delivered_at = ? WHERE id = ? AND delivered_at = ?",
            )
            .bind(SET_ASIDE)
            .bind(id)
            .bind(&claim.delivered_at)
            .execute(&mut *tx)
            .await?;
            if let Some(execution) = claim.execution {
                let reason = format!("pim-job-queue set aside message {id}: {reason}");
                fail_waiting_execution(&mut tx, execution, &reason).await?;
            }
            tx.commit().await
        }
        .await;
        result.map_err(|e| self.error(e))?;
        tracing::error!(
            message_id = id,
            "set aside message {id}, which cannot be run: {reason} (it stays in messenger_messages)"
        );
        Ok(())
    }
}

/// The job instance code and status of an execution, if it exists.
async fn execution_state(
    tx: &mut MySqlConnection,
    execution: i64,
) -> Result<Option<(String, i64)>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT job_instance.code, CAST(job_execution.status AS SIGNED) AS status
         FROM akeneo_batch_job_execution job_execution
         INNER JOIN akeneo_batch_job_instance job_instance
            ON job_instance.id = job_execution.job_instance_id
         WHERE job_execution.id = ?",
    )
    .bind(execution)
    .fetch_optional(&mut *tx)
    .await?;
    row.map(|row| Ok((row.try_get("code")?, row.try_get("status")?)))
        .transpose()
}

/// Fails an execution whose message cannot be run, if it is still waiting to start, so the
/// PIM does not show it as starting forever.
async fn fail_waiting_execution(
    tx: &mut MySqlConnection,
    execution: i64,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE akeneo_batch_job_execution
         SET status = ?, exit_code = 'FAILED', updated_time = ?, exit_description = ?
         WHERE id = ? AND status = ?",
    )
    .bind(FAILED)
    .bind(utc_seconds(SystemTime::now()))
    .bind(reason)
    .bind(execution)
    .bind(STARTING)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[async_trait]
impl SchemaStore for AkeneoStore {
    fn location(&self) -> String {
        format!("messenger_messages at {}", self.fleet.location())
    }

    async fn migrate(&self) -> StoreResult<u32> {
        let tables: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.tables
             WHERE table_schema = DATABASE() AND table_name = 'messenger_messages'",
        )
        .fetch_one(self.pool())
        .await
        .map_err(|e| self.error(e))?;
        if tables == 0 {
            return Err(StoreError::InvalidUrl(format!(
                "{} has no messenger_messages table: is it the PIM's database?",
                self.fleet.location()
            )));
        }
        self.fleet.migrate().await
    }

    async fn schema_version(&self) -> StoreResult<SchemaVersion> {
        self.fleet.schema_version().await
    }

    async fn check_statements(&self) -> StoreResult<usize> {
        self.fleet.check_statements().await
    }
}

#[async_trait]
impl QueueStore for AkeneoStore {
    /// The previous job's end (Akeneo's record is its execution row, written by the job:
    /// only an execution it left unfinished is failed), then the next message.
    async fn next_job(&self, turn: &Turn<'_>) -> StoreResult<Poll> {
        let recorded = match turn.finished {
            Some((lease, completion)) => Some(self.complete(lease, completion).await?),
            None => None,
        };
        self.purge_soft_deleted().await;
        let (stop_generation, job, contended) = self.claim_next(turn).await?;
        Ok(Poll {
            stop_generation,
            job,
            recorded,
            contended,
        })
    }

    /// The acknowledgement, once the job's process exists: from now on the message is gone,
    /// as with Akeneo's ack-on-receipt, and the execution row is the job's record.
    async fn acknowledge_start(&self, lease: &Lease) -> StoreResult<bool> {
        let Some(claim) = self.claim_of(lease) else {
            return Ok(false);
        };
        let acknowledged =
            sqlx::query("DELETE FROM messenger_messages WHERE id = ? AND delivered_at = ?")
                .bind(lease.job_id)
                .bind(&claim.delivered_at)
                .execute(self.pool())
                .await
                .map_err(|e| self.error(e))?;
        if acknowledged.rows_affected() != 1 {
            // Another consumer redelivered the message (its redeliver timeout passed) or
            // already finished with it: the message and its execution are theirs now, so
            // this worker's ending of its copy must change neither.
            self.forget(lease);
            return Ok(false);
        }
        if let Some(claim) = self
            .claims
            .lock()
            .expect("claims lock")
            .get_mut(&lease.job_id)
        {
            claim.acknowledged = true;
        }
        self.touch(lease).await?;
        Ok(true)
    }

    async fn put_back_unrun(&self, lease: &Lease, reason: &str) -> StoreResult<bool> {
        self.release_unstarted(lease, reason).await
    }

    /// A message whose claim's answer was lost stays delivered, and comes back after the
    /// redeliver timeout as with PHP consumers: this worker cannot tell it from a message
    /// another consumer is running (its `delivered_at` names no consumer).
    async fn put_back_unanswered_claims(
        &self,
        _worker: &WorkerIdentity,
        _keep: &[JobId],
    ) -> StoreResult<u64> {
        Ok(0)
    }

    async fn touch(&self, lease: &Lease) -> StoreResult<()> {
        match self.heartbeat_execution(lease) {
            Some(execution) => self.write_health_check(execution).await,
            None => Ok(()),
        }
    }

    /// A launch that never started gives its message back at once, untouched.
    async fn release_unstarted(&self, lease: &Lease, _reason: &str) -> StoreResult<bool> {
        let Some(claim) = self.forget(lease) else {
            return Ok(true);
        };
        sqlx::query(
            "UPDATE messenger_messages SET delivered_at = NULL WHERE id = ? AND delivered_at = ?",
        )
        .bind(lease.job_id)
        .bind(&claim.delivered_at)
        .execute(self.pool())
        .await
        .map_err(|e| self.error(e))?;
        Ok(true)
    }

    /// Whether Akeneo saw the job start: an execution still STARTING after its process ended
    /// was never picked up by `akeneo:batch:job` (PHP could not boot, the command is missing).
    async fn launch_took_effect(&self, lease: &Lease) -> StoreResult<Option<bool>> {
        let Some(execution) = self.claim_of(lease).and_then(|claim| claim.execution) else {
            return Ok(None);
        };
        let mut conn = self.pool().acquire().await.map_err(|e| self.error(e))?;
        let state = execution_state(&mut conn, execution)
            .await
            .map_err(|e| self.error(e))?;
        Ok(state.map(|(_, status)| status != STARTING))
    }

    async fn complete(&self, lease: &Lease, completion: &Completion) -> StoreResult<bool> {
        let reason = match &completion.result {
            JobResult::Succeeded => "the job exited without finishing its execution".to_string(),
            JobResult::Failed { reason, .. } => format!("the job ended: {reason}"),
            JobResult::Cancelled { reason } => format!("the job was ended: {reason}"),
        };
        self.finish(lease, &reason).await?;
        Ok(true)
    }

    async fn release(&self, lease: &Lease, reason: &str, _now: Timestamp) -> StoreResult<Release> {
        // The message was acknowledged when the job started: like Akeneo, never run twice.
        self.finish(lease, &format!("the worker ended the job: {reason}"))
            .await?;
        Ok(Release::Failed)
    }
}

/// `cancel EXECUTION_ID`: what the PIM's "stop job" does (`JobTrackerController::stopJobAction`
/// through `SqlUpdateJobExecutionStatus`): status and exit code STOPPING, for a running
/// execution. The job's steps check it between items and stop themselves (status STOPPED);
/// a job the PIM does not declare stoppable runs on, as it would after the PIM's own stop.
#[async_trait]
impl ForeignJobs for AkeneoStore {
    async fn stop_job(&self, id: JobId) -> StoreResult<ChangeOutcome> {
        let stopped = sqlx::query(
            "UPDATE akeneo_batch_job_execution SET status = ?, exit_code = 'STOPPING'
             WHERE id = ? AND status IN (?, ?)",
        )
        .bind(STOPPING)
        .bind(id)
        .bind(STARTING)
        .bind(STARTED)
        .execute(self.pool())
        .await
        .map_err(|e| self.error(e))?;
        if stopped.rows_affected() > 0 {
            return Ok(ChangeOutcome::Requested);
        }
        let status: Option<i64> =
            sqlx::query_scalar("SELECT status FROM akeneo_batch_job_execution WHERE id = ?")
                .bind(id)
                .fetch_optional(self.pool())
                .await
                .map_err(|e| self.error(e))?;
        Ok(match status {
            None => ChangeOutcome::NotFound,
            Some(STOPPING) => ChangeOutcome::Requested,
            Some(COMPLETED) => ChangeOutcome::WrongState(JobStatus::Succeeded),
            Some(FAILED) => ChangeOutcome::WrongState(JobStatus::Failed),
            // STOPPED, ABANDONED, UNKNOWN, PAUSED...: over, one way or another.
            Some(_) => ChangeOutcome::WrongState(JobStatus::Cancelled),
        })
    }
}

#[async_trait]
impl FleetStore for AkeneoStore {
    async fn database_time(&self) -> StoreResult<Timestamp> {
        self.fleet.database_time().await
    }

    async fn stop_generation(&self) -> StoreResult<i64> {
        self.fleet.stop_generation().await
    }

    async fn request_stop(&self) -> StoreResult<i64> {
        self.fleet.request_stop().await
    }

    async fn queue_counts(&self) -> StoreResult<Vec<QueueCounts>> {
        let now = SystemTime::now();
        let rows = sqlx::query(
            "SELECT queue_name,
                CAST(SUM(delivered_at IS NULL AND available_at <= ?) AS SIGNED) AS due,
                CAST(SUM(delivered_at IS NULL AND available_at > ?) AS SIGNED) AS later,
                CAST(SUM(delivered_at IS NOT NULL AND delivered_at >= ? AND delivered_at < ?)
                     AS SIGNED) AS taken,
                CAST(SUM(delivered_at = ?) AS SIGNED) AS set_aside
             FROM messenger_messages GROUP BY queue_name ORDER BY queue_name",
        )
        .bind(utc_seconds(now))
        .bind(utc_seconds(now))
        .bind(utc_seconds(now - self.settings.redeliver_timeout))
        .bind(SET_ASIDE)
        .bind(SET_ASIDE)
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.error(e))?;
        Ok(rows
            .iter()
            .map(|row| QueueCounts {
                queue: row.get("queue_name"),
                waiting: row.get::<Option<i64>, _>("due").unwrap_or(0),
                delayed: row.get::<Option<i64>, _>("later").unwrap_or(0),
                running: row.get::<Option<i64>, _>("taken").unwrap_or(0),
                set_aside: row.get::<Option<i64>, _>("set_aside").unwrap_or(0),
                ..QueueCounts::default()
            })
            .collect())
    }

    async fn register_worker(&self, worker: &WorkerIdentity, queues: &[String]) -> StoreResult<()> {
        self.fleet.register_worker(worker, queues).await
    }

    async fn heartbeat(
        &self,
        worker: &WorkerIdentity,
        current_job: Option<JobId>,
    ) -> StoreResult<bool> {
        self.fleet.heartbeat(worker, current_job).await
    }

    async fn unregister_worker(&self, worker: &WorkerIdentity) -> StoreResult<()> {
        self.fleet.unregister_worker(worker).await
    }

    async fn list_workers(&self) -> StoreResult<Vec<WorkerRecord>> {
        self.fleet.list_workers().await
    }

    // Messages are acknowledged on receipt, so the Messenger side has nothing to take back
    // (Akeneo's own heartbeat shows a dead job as failed); these clear stale worker rows.
    async fn rescue_scan(&self, rescue_after: Duration) -> StoreResult<RescueScan> {
        self.fleet.rescue_scan(rescue_after).await
    }

    async fn take_back_orphan(
        &self,
        job: &OrphanedJob,
        rescue_after: Duration,
        now: Timestamp,
    ) -> StoreResult<Option<bool>> {
        self.fleet.take_back_orphan(job, rescue_after, now).await
    }

    async fn forget_lost_workers(&self, rescue_after: Duration) -> StoreResult<()> {
        self.fleet.forget_lost_workers(rescue_after).await
    }

    async fn pause(&self, queues: &[String], reason: &str, by: &str) -> StoreResult<()> {
        self.fleet.pause(queues, reason, by).await
    }

    async fn resume(&self, queues: &[String]) -> StoreResult<u64> {
        self.fleet.resume(queues).await
    }

    async fn paused_queues(&self) -> StoreResult<Vec<PausedQueue>> {
        self.fleet.paused_queues().await
    }

    /// The PIM's messages waiting to be delivered, by `queue_name`.
    async fn queue_latencies(&self) -> StoreResult<Vec<QueueLatency>> {
        let found = sqlx::query(
            "SELECT queue_name,
                CAST(UNIX_TIMESTAMP(MIN(available_at)) * 1000000 AS SIGNED) AS oldest,
                CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED) AS now
             FROM messenger_messages
             WHERE delivered_at IS NULL AND available_at <= UTC_TIMESTAMP()
             GROUP BY queue_name ORDER BY queue_name",
        )
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.error(e))?;
        found
            .iter()
            .map(|row| super::rows::queue_latency(row, "queue_name"))
            .collect::<Result<_, _>>()
            .map_err(|e| self.error(e))
    }

    /// The configuration refuses `[schedule.*]` with this transport: the PIM schedules its
    /// own jobs.
    async fn enqueue_slot(
        &self,
        _schedule: &str,
        _slot: Timestamp,
        _job: &super::NewJob,
    ) -> StoreResult<Option<JobId>> {
        Err(StoreError::Unsupported(
            "schedules need the native job store".to_string(),
        ))
    }

    async fn schedule_runs(&self) -> StoreResult<Vec<super::ScheduleRun>> {
        Ok(Vec::new())
    }

    /// Caps need the native store (the config refuses them here).
    async fn running_per_cap(&self) -> StoreResult<Vec<(String, i64)>> {
        Ok(Vec::new())
    }

    /// The PIM stops its jobs itself (status STOPPING, read by the running job).
    async fn cancel_request(
        &self,
        _job: super::JobId,
        _worker: &super::WorkerIdentity,
    ) -> StoreResult<Option<String>> {
        Ok(None)
    }

    /// The PIM tracks its jobs in its own tables (`akeneo_batch_job_execution`): no tallies
    /// of ours.
    async fn finished_tallies(&self) -> StoreResult<Option<Vec<super::Tally>>> {
        Ok(None)
    }

    /// Akeneo's record of a failure is its job execution (status FAILED).
    async fn failed_since(&self, window: Duration) -> StoreResult<u64> {
        let since = utc_seconds(SystemTime::now() - window);
        let failed: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM akeneo_batch_job_execution
             WHERE status = ? AND COALESCE(end_time, updated_time) >= ?",
        )
        .bind(FAILED)
        .bind(since)
        .fetch_one(self.pool())
        .await
        .map_err(|e| self.error(e))?;
        Ok(failed.max(0) as u64)
    }

    async fn prune_batch(&self, kind: Finished, before: Timestamp, limit: i64) -> StoreResult<u64> {
        self.fleet.prune_batch(kind, before, limit).await
    }
}

/// A UTC time as MySQL DATETIME text with second precision, as Akeneo's UTCDateTimeType
/// writes it.
pub fn utc_seconds(time: SystemTime) -> String {
    let text = humantime::format_rfc3339_seconds(time).to_string();
    text.trim_end_matches('Z').replacen('T', " ", 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetimes_are_utc_seconds() {
        let time = SystemTime::UNIX_EPOCH + Duration::from_millis(1_712_588_400_999);
        assert_eq!(utc_seconds(time), "2024-04-08 15:00:00");
    }
}

//! The native backends' SQL, written once. A [`Dialect`] holds what differs between SQLite,
//! PostgreSQL and MariaDB/MySQL (the clock expression, placeholders, integer casts, the
//! upsert clause, `RETURNING`, how a read locks its rows); every statement is built
//! from it here, and [`Dialect::every_statement`] lists them all, so a test can check that
//! each dialect has each statement and that its server accepts it.
//!
//! Every statement uses each of its parameters once, in bind order, so MySQL's positional
//! `?` binds them like the numbered placeholders of the others. The statements only a
//! backend has (PostgreSQL's one-statement turn, MariaDB's claim transaction, the
//! migrations) stay in that backend's module.

use std::time::Duration;

/// What differs between the native backends' SQL.
#[derive(Clone, Copy)]
pub(super) struct Dialect {
    /// The database's clock in microseconds since the epoch.
    pub db_now: &'static str,
    /// The placeholder of the `n`-th bound value, counting from 1.
    pub placeholder: fn(usize) -> String,
    /// The type a 64-bit integer cast names (`BIGINT`, or MySQL's `SIGNED`).
    pub integer: &'static str,
    /// How an insert refreshes the row it collides with.
    pub upsert: Upsert,
    /// Text expressions joined into one, in order (`||` is OR on MySQL).
    pub concat: fn(&[&str]) -> String,
    /// An aggregate joining a text expression over rows with `", "`.
    pub joined: fn(&str) -> String,
    /// Whether `UPDATE … RETURNING` exists (not on MariaDB 10.11 or MySQL).
    pub returning: bool,
    /// What makes a `SELECT` lock the rows it reads until the transaction ends
    /// (`FOR UPDATE`; nothing on SQLite, whose write transactions hold the whole file).
    pub lock_rows: &'static str,
    /// The rows `code, cap_key, cap_limit` of a JSON array of caps (see
    /// [`super::ConcurrencyCaps`]) bound at the given placeholder, as a table expression.
    pub caps_rows: fn(&str) -> String,
}

/// How an insert refreshes the row whose key it collides with.
#[derive(Clone, Copy)]
pub(super) enum Upsert {
    /// `ON CONFLICT (key) DO UPDATE SET c = excluded.c` (SQLite, PostgreSQL).
    OnConflict,
    /// `ON DUPLICATE KEY UPDATE c = VALUES(c)` (MariaDB, MySQL).
    OnDuplicateKey,
}

/// What a job picked for a prune, delete or retry must still be when its row is locked
/// (see [`Dialect::locked_ids`]): it was picked by a read that locked nothing, or named by
/// an operator, and may have changed since (a retry, a claim).
#[derive(Clone, Copy)]
pub(super) enum Still {
    /// Finished, of this kind.
    Finished(super::Finished),
    /// Not running (any other state may be deleted).
    NotRunning,
    /// In this state (`delete --status`).
    In(super::JobStatus),
    /// Failed or cancelled.
    Retryable,
}

impl Still {
    fn condition(self) -> String {
        match self {
            Still::Finished(kind) => format!("status IN ({})", kind.statuses()),
            Still::NotRunning => "status <> 'running'".to_string(),
            Still::In(status) => format!("status = '{}' AND status <> 'running'", status.as_str()),
            Still::Retryable => "status IN ('failed', 'cancelled')".to_string(),
        }
    }
}

/// When a taken-back job runs again: while it has attempts left, and always when it never
/// started. Claims write `started_at` themselves (the claim is the start record), so "never
/// started" is a row claimed by a worker older than that, whose start was a separate write:
/// its claim is refunded, as that worker's rescue promised.
pub(super) const RUNS_AGAIN: &str = "(attempts < max_attempts OR started_at IS NULL)";

/// The stop-workers generation, as a scalar subquery.
pub(super) const STOP_GENERATION: &str =
    "(SELECT value FROM pjq_control WHERE name = 'stop_generation')";

/// The columns [`super::rows::job_record`] reads, in the order backends select them.
pub(super) const JOB_RECORD_COLUMNS: &str = "id, queue, code, payload, status, attempts, \
    max_attempts, created_at, available_at, claimed_at, started_at, finished_at, worker_host, \
    worker_instance, worker_pid, exit_code, exit_signal, reason, output, cancel_requested, \
    peak_rss_bytes, cpu_usec, history";

/// Who must hold a job for a take-back ([`Dialect::take_back`]) to apply.
#[derive(Clone, Copy)]
pub(super) enum Holder<'a> {
    /// This worker, giving the job up: its token is bound last.
    Token(&'a str),
    /// Nobody alive: the holder's heartbeat is older than this, or its row is gone.
    Lost { rescue_after: Duration },
}

impl Dialect {
    fn p(&self, n: usize) -> String {
        (self.placeholder)(n)
    }

    /// `expression` as a 64-bit integer (MySQL's `SUM` is a decimal).
    fn integer(&self, expression: &str) -> String {
        format!("CAST({expression} AS {})", self.integer)
    }

    /// The tail of an insert keyed by `key` that updates `columns` of the row it collides
    /// with to the values it brought.
    fn upsert(&self, table: &str, key: &str, columns: &[&str]) -> String {
        self.on_collision(table, key, columns, |_, brought| brought.to_string())
    }

    /// The tail of an insert into `table` keyed by `key` that sets each of `columns` of the
    /// row it collides with to `combine(stored, brought)`: the column as stored and the
    /// value the insert brought, each as this database spells them.
    fn on_collision(
        &self,
        table: &str,
        key: &str,
        columns: &[&str],
        combine: impl Fn(&str, &str) -> String,
    ) -> String {
        let set: Vec<String> = columns
            .iter()
            .map(|c| {
                let (stored, brought) = match self.upsert {
                    Upsert::OnConflict => (format!("{table}.{c}"), format!("excluded.{c}")),
                    Upsert::OnDuplicateKey => (c.to_string(), format!("VALUES({c})")),
                };
                format!("{c} = {}", combine(&stored, &brought))
            })
            .collect();
        let head = match self.upsert {
            Upsert::OnConflict => format!("ON CONFLICT ({key}) DO UPDATE SET"),
            Upsert::OnDuplicateKey => "ON DUPLICATE KEY UPDATE".to_string(),
        };
        format!("{head} {}", set.join(", "))
    }

    /// The database's clock.
    pub fn database_time(&self) -> String {
        format!("SELECT {}", self.db_now)
    }

    /// Stores a new job: created now and due its delay later, both by the database's clock,
    /// so hosts with skewed clocks agree on when it is due. Binds queue, code, payload,
    /// delay (microseconds) and max_attempts (see [`super::rows::bind_new_job`]).
    pub fn insert_job(&self) -> String {
        format!(
            "INSERT INTO pjq_jobs (queue, code, payload, status, created_at, available_at,
                max_attempts, unique_key)
             SELECT {}, {}, {}, 'waiting', n.at, n.at + {}, {}, {}
             FROM (SELECT {} AS at) AS n",
            self.p(1),
            self.p(2),
            self.p(3),
            self.p(4),
            self.p(5),
            self.p(6),
            self.db_now
        )
    }

    /// Records a schedule's slot (name, slot_at) unless a worker did already: the primary
    /// key lets exactly one of them (one row changed: this one).
    pub fn claim_slot(&self) -> String {
        let row = format!(
            "INTO pjq_schedule_slots (name, slot_at, enqueued_at) VALUES ({}, {}, {})",
            self.p(1),
            self.p(2),
            self.db_now
        );
        match self.upsert {
            Upsert::OnConflict => format!("INSERT {row} ON CONFLICT (name, slot_at) DO NOTHING"),
            Upsert::OnDuplicateKey => format!("INSERT IGNORE {row}"),
        }
    }

    /// The job a slot queued: job id, then name and slot_at.
    pub fn set_slot_job(&self) -> String {
        format!(
            "UPDATE pjq_schedule_slots SET job_id = {} WHERE name = {} AND slot_at = {}",
            self.p(1),
            self.p(2),
            self.p(3)
        )
    }

    /// Each schedule's latest queued slot.
    pub fn schedule_runs(&self) -> String {
        "SELECT s.name, s.slot_at, s.enqueued_at, s.job_id FROM pjq_schedule_slots s
         WHERE s.slot_at = (SELECT MAX(m.slot_at) FROM pjq_schedule_slots m WHERE m.name = s.name)
         ORDER BY s.name"
            .to_string()
    }

    /// The waiting or running job with a unique key (bound).
    pub fn active_with_key(&self) -> String {
        format!(
            "SELECT id FROM pjq_jobs WHERE unique_key = {} AND status IN ('waiting', 'running')",
            self.p(1)
        )
    }

    /// The assignments of a claim, with the worker's token, host, instance and pid bound at
    /// `first` and after. The claim is the job's start record (`started_at` too): it commits
    /// before the job's process is spawned, so a job whose claim is not recorded never ran.
    /// `cap_key` is the SQL of the concurrency key the running job counts under (`NULL`
    /// when its code has no cap).
    pub fn claim_assignments(&self, first: usize, cap_key: &str) -> String {
        let now = self.db_now;
        format!(
            "status = 'running', lease = lease + 1, attempts = attempts + 1,
             claimed_at = {now}, started_at = {now}, finished_at = NULL,
             worker_token = {}, worker_host = {}, worker_instance = {}, worker_pid = {},
             exit_code = NULL, exit_signal = NULL, reason = NULL, output = NULL,
             concurrency_key = {cap_key}",
            self.p(first),
            self.p(first + 1),
            self.p(first + 2),
            self.p(first + 3)
        )
    }

    /// The concurrency key of the row being updated's code, from the caps bound at `caps`.
    pub fn cap_key_of_code(&self, caps: &str) -> String {
        format!(
            "(SELECT c.cap_key FROM {} c WHERE c.code = pjq_jobs.code)",
            (self.caps_rows)(caps)
        )
    }

    /// The condition that passes over jobs whose cap is reached: their code's key counts
    /// as many running jobs as its limit. `caps` is where the caps are bound; `finishing`
    /// the id of a job this same turn is finishing (0 for none), which no longer counts.
    /// The count reads the statement's snapshot: exact where writers are serialized
    /// (SQLite); elsewhere a claim of a capped job checks again under the cap's lock
    /// ([`Dialect::lock_cap`]).
    pub fn cap_filter(&self, caps: &str, finishing: &str) -> String {
        format!(
            " AND code NOT IN ({})",
            self.full_codes(&(self.caps_rows)(caps), finishing)
        )
    }

    /// The codes of `caps` (a table expression of `code, cap_key, cap_limit`) whose key
    /// counts as many running jobs as its limit, job `finishing` not counted.
    pub fn full_codes(&self, caps: &str, finishing: &str) -> String {
        format!(
            "SELECT c.code FROM {caps} c WHERE {} >= c.cap_limit",
            self.running_under("c.cap_key", finishing)
        )
    }

    /// How many jobs run under the concurrency key `key` (SQL), job `except` (SQL) not
    /// counted: the one count every cap check makes.
    pub fn running_under(&self, key: &str, except: &str) -> String {
        format!(
            "(SELECT count(*) FROM pjq_jobs r
              WHERE r.status = 'running' AND r.concurrency_key = {key} AND r.id <> {except})"
        )
    }

    /// Locks a cap's row (key bound), creating it the first time: claims of the cap's
    /// codes queue here, so the count of its running jobs each reads after the lock is
    /// still true when it commits.
    pub fn lock_cap(&self) -> String {
        format!(
            "INSERT INTO pjq_concurrency (cap_key) VALUES ({}) {}",
            self.p(1),
            self.upsert("pjq_concurrency", "cap_key", &["cap_key"])
        )
    }

    /// How many jobs run under a cap's key (bound first), not counting one id (bound
    /// second) that this turn is finishing.
    pub fn running_under_cap(&self) -> String {
        format!("SELECT {}", self.running_under(&self.p(1), &self.p(2)))
    }

    /// How many jobs run under each concurrency key, for `status`.
    pub fn running_per_cap(&self) -> String {
        "SELECT concurrency_key, count(*) AS running FROM pjq_jobs
         WHERE status = 'running' AND concurrency_key IS NOT NULL
         GROUP BY concurrency_key ORDER BY concurrency_key"
            .to_string()
    }

    /// Records a result, guarded by the lease, with status, finished_at, exit_code,
    /// exit_signal, reason, output, then id, token, lease bound from `first` (see
    /// [`super::rows::bind_completion`]).
    pub fn complete_job(&self, first: usize) -> String {
        let columns = [
            "status",
            "finished_at",
            "exit_code",
            "exit_signal",
            "reason",
            "output",
            "peak_rss_bytes",
            "cpu_usec",
        ];
        let set: Vec<String> = (first..)
            .zip(columns)
            .map(|(n, column)| format!("{column} = {}", self.p(n)))
            .collect();
        format!(
            "UPDATE pjq_jobs SET {} WHERE {}",
            set.join(", "),
            self.held_at(first + columns.len())
        )
    }

    /// The guard of every change a worker makes to the job it runs: the job (id bound at
    /// `first`) is still running under its claim's token and lease (bound after it).
    fn held_at(&self, first: usize) -> String {
        format!(
            "id = {} AND worker_token = {} AND lease = {} AND status = 'running'",
            self.p(first),
            self.p(first + 1),
            self.p(first + 2)
        )
    }

    /// Puts a failed running job back to waiting, due some microseconds (bound first) from
    /// now, with an attempt's line (second) added to its history and its exit code, signal,
    /// reason and output; then id, token, lease. Only while it has attempts left.
    pub fn retry_later(&self) -> String {
        let history = (self.concat)(&["COALESCE(history, '')", &self.p(2)]);
        format!(
            "UPDATE pjq_jobs SET status = 'waiting', available_at = {} + {}, history = {history},
                exit_code = {}, exit_signal = {}, reason = {}, output = {},
                lease = lease + 1, worker_token = NULL
             WHERE {} AND attempts < max_attempts",
            self.db_now,
            self.p(1),
            self.p(3),
            self.p(4),
            self.p(5),
            self.p(6),
            self.held_at(7)
        )
    }

    /// Whether a job (id) is still held at a lease: token, lease.
    pub fn held(&self) -> String {
        format!("SELECT id FROM pjq_jobs WHERE {}", self.held_at(1))
    }

    /// Puts a claimed job that never started back to waiting, its attempt refunded:
    /// reason, then id, token, lease.
    pub fn put_back_unrun(&self) -> String {
        format!(
            "UPDATE pjq_jobs SET status = 'waiting', attempts = attempts - 1, lease = lease + 1,
                claimed_at = NULL, started_at = NULL, worker_token = NULL, reason = {}
             WHERE {}",
            self.p(1),
            self.held_at(2)
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

    /// Requeues (attempts left) or fails a running job still at a lease and held as
    /// `holder` says. Binds finished_at, the reason if requeued, the reason if failed, id,
    /// lease, and the token for [`Holder::Token`]; returns the new status where `RETURNING`
    /// exists. MySQL evaluates assignments left to right: every condition reads columns no
    /// earlier assignment changes, and `attempts` is assigned last.
    pub fn take_back(&self, holder: Holder<'_>) -> String {
        let now = self.db_now;
        let holder_check = match holder {
            Holder::Token(_) => format!("worker_token = {}", self.p(6)),
            Holder::Lost { rescue_after } => self.orphaned(rescue_after),
        };
        let returning = if self.returning {
            " RETURNING status"
        } else {
            ""
        };
        format!(
            "UPDATE pjq_jobs SET
                status = CASE WHEN {RUNS_AGAIN} THEN 'waiting' ELSE 'failed' END,
                available_at = CASE WHEN {RUNS_AGAIN} THEN {now} ELSE available_at END,
                finished_at = CASE WHEN {RUNS_AGAIN} THEN NULL ELSE {} END,
                reason = CASE WHEN {RUNS_AGAIN} THEN {} ELSE {} END,
                lease = lease + 1, worker_token = NULL,
                attempts = CASE WHEN started_at IS NULL THEN attempts - 1 ELSE attempts END
             WHERE id = {} AND lease = {} AND status = 'running' AND {holder_check}{returning}",
            // Typed, so the statement prepares without its values (PostgreSQL would take
            // a bare parameter beside NULL for text).
            self.integer(&self.p(1)),
            self.p(2),
            self.p(3),
            self.p(4),
            self.p(5)
        )
    }

    /// A job's status, for the take-back on databases without `RETURNING`, and to say why
    /// an operator's change did not apply.
    pub fn status_of(&self) -> String {
        format!("SELECT status FROM pjq_jobs WHERE id = {}", self.p(1))
    }

    /// SQL that is true for a `pjq_jobs` row whose worker is lost or has disowned it.
    ///
    /// Lost: no worker row with this token has a heartbeat younger than `rescue_after`.
    /// Disowned: the worker is alive, but its heartbeats, for `rescue_after` since the claim,
    /// report another job or none. That is a claim whose reply never reached the worker (the
    /// commit went through, the connection died), or a result the worker gave up writing:
    /// left alone, such a job would stay `running` under a live, idle worker forever. The
    /// wait covers a heartbeat sent just before the claim's reply arrived, which cannot name
    /// the job yet (every call ends within a third of `rescue_after`). `claimed_at` and
    /// `heartbeat_at` are both written by the database's clock.
    pub fn orphaned(&self, rescue_after: Duration) -> String {
        let limit = micros(rescue_after);
        let now = self.db_now;
        format!(
            "NOT EXISTS (SELECT 1 FROM pjq_workers w WHERE w.token = pjq_jobs.worker_token
                         AND w.heartbeat_at > {now} - {limit}
                         AND (w.current_job = pjq_jobs.id
                              OR w.heartbeat_at <= pjq_jobs.claimed_at + {limit}))"
        )
    }

    /// The rescuer's round in one statement: the database's clock (always one row) and the
    /// running jobs whose worker is lost or has disowned them (see [`Dialect::orphaned`]).
    /// The paused queues ride along, as one text (`queue (reason), …`), for the workers'
    /// STATUS.
    pub fn rescue_scan(&self, rescue_after: Duration) -> String {
        let described = (self.concat)(&["queue", "' ('", "reason", "')'"]);
        format!(
            "SELECT n.now, n.paused, o.id, o.lease, o.worker_host, o.worker_instance, o.worker_pid
             FROM (SELECT {} AS now,
                          (SELECT {} FROM pjq_pauses) AS paused) n
             LEFT JOIN (SELECT id, lease, worker_host, worker_instance, worker_pid FROM pjq_jobs
                        WHERE status = 'running' AND {}) o ON 1 = 1",
            self.db_now,
            (self.joined)(&described),
            self.orphaned(rescue_after)
        )
    }

    /// Per queue with a due job, the oldest due job's due time, and the database's clock:
    /// how long the queue's head has waited.
    pub fn queue_latencies(&self) -> String {
        let now = self.db_now;
        format!(
            "SELECT queue, MIN(available_at) AS oldest, {now} AS now FROM pjq_jobs
             WHERE status = 'waiting' AND available_at <= {now}
             GROUP BY queue ORDER BY queue"
        )
    }

    /// How many jobs failed in the last so many microseconds (bound), by the database's
    /// clock.
    pub fn failed_since(&self) -> String {
        format!(
            "SELECT {} FROM pjq_jobs WHERE status = 'failed' AND finished_at >= {} - {}",
            self.integer("COUNT(*)"),
            self.db_now,
            self.p(1)
        )
    }

    /// Pauses a queue, or updates its pause: queue, reason, paused_at, paused_by.
    pub fn pause(&self) -> String {
        format!(
            "INSERT INTO pjq_pauses (queue, reason, paused_at, paused_by)
             VALUES ({}, {}, {}, {})
             {}",
            self.p(1),
            self.p(2),
            self.p(3),
            self.p(4),
            self.upsert("pjq_pauses", "queue", &["reason", "paused_at", "paused_by"])
        )
    }

    pub fn resume(&self) -> String {
        format!("DELETE FROM pjq_pauses WHERE queue = {}", self.p(1))
    }

    pub fn paused_queues(&self) -> String {
        "SELECT queue, reason, paused_at, paused_by FROM pjq_pauses ORDER BY queue".to_string()
    }

    /// Deletes the rows of workers silent for `rescue_after` that hold no running job.
    pub fn forget_lost_workers(&self, rescue_after: Duration) -> String {
        format!(
            "DELETE FROM pjq_workers WHERE heartbeat_at <= {} - {}
               AND NOT EXISTS (SELECT 1 FROM pjq_jobs j
                               WHERE j.status = 'running' AND j.worker_token = pjq_workers.token)",
            self.db_now,
            micros(rescue_after)
        )
    }

    /// The id of the next job to claim, or NULL: the oldest due job of the first of
    /// `queues` queues (bound from `first`, in priority order, each twice: see
    /// [`super::rows::bind_queues`]) that has one and is not paused. `COALESCE` stops at
    /// its first non-null argument, so a queue is looked at only while those before it are
    /// empty, each with one index seek: no sort of the waiting jobs, no temporary table,
    /// however many wait. The pause is a condition on the bound name, not on the rows, so a
    /// paused queue costs one primary-key probe of `pjq_pauses`, not a walk of its jobs.
    ///
    /// With `skip_locked`, inside a transaction, the job found is locked, and jobs other
    /// workers hold are passed over (the next one of the same queue is taken): claims never
    /// wait on each other, never take a lower queue's job while a higher one has a free one.
    ///
    /// With `capped`, each queue's lookup also binds the caps and the id of the job being
    /// finished ([`Dialect::cap_filter`]), after its queue (see [`super::rows::bind_heads`]).
    pub fn next_due_id(
        &self,
        queues: usize,
        first: usize,
        skip_locked: bool,
        capped: bool,
    ) -> String {
        let now = self.db_now;
        let lock = if skip_locked {
            " FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        let stride = if capped { 4 } else { 2 };
        let heads: Vec<String> = (0..queues)
            .map(|i| {
                let at = first + stride * i;
                let caps = if capped {
                    self.cap_filter(&self.p(at + 2), &self.p(at + 3))
                } else {
                    String::new()
                };
                format!(
                    "(SELECT id FROM pjq_jobs
                      WHERE queue = {} AND status = 'waiting' AND available_at <= {now}
                        AND NOT EXISTS (SELECT 1 FROM pjq_pauses WHERE queue = {}){caps}
                      ORDER BY available_at, id LIMIT 1{lock})",
                    self.p(at),
                    self.p(at + 1)
                )
            })
            .collect();
        format!("COALESCE({}, NULL)", heads.join(", "))
    }

    /// The idle poll: the stop-workers generation and whether any of `queues` (bound in
    /// order) has a due job.
    pub fn probe(&self, queues: usize, capped: bool) -> String {
        format!(
            "SELECT {STOP_GENERATION} AS generation, {} IS NOT NULL AS due",
            self.next_due_id(queues, 1, false, capped)
        )
    }

    pub fn stop_generation(&self) -> String {
        "SELECT value FROM pjq_control WHERE name = 'stop_generation'".to_string()
    }

    /// Moves the stop-workers generation on, returning it where `RETURNING` exists (else
    /// [`Dialect::stop_generation`] reads it in the same transaction).
    pub fn bump_stop_generation(&self) -> String {
        let returning = if self.returning {
            " RETURNING value"
        } else {
            ""
        };
        format!(
            "UPDATE pjq_control SET value = value + 1 WHERE name = 'stop_generation'{returning}"
        )
    }

    /// Jobs per queue and status, with how many of them are not due yet.
    pub fn queue_counts(&self) -> String {
        format!(
            "SELECT queue, status, {} AS n,
                    {} AS later
             FROM pjq_jobs GROUP BY queue, status ORDER BY queue",
            self.integer("COUNT(*)"),
            self.integer(&format!(
                "SUM(CASE WHEN available_at > {} THEN 1 ELSE 0 END)",
                self.db_now
            ))
        )
    }

    /// The conditions of a [`super::JobFilter`]: queue, status and code (bound first, NULL
    /// for any), created within a number of microseconds (bound fourth).
    fn job_filter(&self) -> String {
        format!(
            "queue = COALESCE({}, queue) AND status = COALESCE({}, status)
               AND code = COALESCE({}, code) AND created_at >= {} - {}",
            self.p(1),
            self.p(2),
            self.p(3),
            self.db_now,
            self.p(4)
        )
    }

    /// The jobs of a [`Dialect::job_filter`], newest first, at most a limit (bound last).
    pub fn list_jobs(&self) -> String {
        format!(
            "SELECT {JOB_RECORD_COLUMNS} FROM pjq_jobs WHERE {}
             ORDER BY id DESC LIMIT {}",
            self.job_filter(),
            self.p(5)
        )
    }

    /// The jobs [`Dialect::list_jobs`] selects (same parameters), counted by code and
    /// reason, most frequent first.
    pub fn job_stats(&self) -> String {
        format!(
            "SELECT code, reason, {} AS n, MAX(finished_at) AS last FROM pjq_jobs WHERE {}
             GROUP BY code, reason ORDER BY n DESC, code LIMIT {}",
            self.integer("COUNT(*)"),
            self.job_filter(),
            self.p(5)
        )
    }

    pub fn get_job(&self) -> String {
        format!(
            "SELECT {JOB_RECORD_COLUMNS} FROM pjq_jobs WHERE id = {}",
            self.p(1)
        )
    }

    /// The ids of every failed or cancelled job a [`Dialect::job_filter`] selects.
    pub fn retryable_ids_matching(&self) -> String {
        format!(
            "SELECT id FROM pjq_jobs WHERE {} AND {} ORDER BY id",
            Still::Retryable.condition(),
            self.job_filter()
        )
    }

    /// Puts `ids` failed or cancelled jobs (bound) back to waiting, their attempts reset.
    pub fn retry_ids(&self, ids: usize) -> String {
        format!(
            "UPDATE pjq_jobs SET status = 'waiting', attempts = 0, available_at = {},
                finished_at = NULL, cancel_requested = NULL
             WHERE id IN ({}) AND {}",
            self.db_now,
            self.placeholders(1, ids),
            Still::Retryable.condition()
        )
    }

    /// The ids of the jobs of a status (bound first, never `running`) that finished, or
    /// were created if they have not, more than some microseconds (bound second) ago.
    pub fn old_ids(&self) -> String {
        format!(
            "SELECT id FROM pjq_jobs WHERE status = {} AND status <> 'running'
               AND COALESCE(finished_at, created_at) < {} - {}
             ORDER BY id",
            self.p(1),
            self.db_now,
            self.p(2)
        )
    }

    /// Of `ids` jobs (bound), those still as `still` says, locked until the transaction
    /// ends. Locked by primary key only: a locking read that scanned an index would lock
    /// (at least for a moment) rows a worker's turn holds, and deadlock with it.
    pub fn locked_ids(&self, ids: usize, still: Still) -> String {
        format!(
            "SELECT id FROM pjq_jobs WHERE id IN ({}) AND {}{}",
            self.placeholders(1, ids),
            still.condition(),
            self.lock_rows
        )
    }

    /// Deletes `ids` jobs (bound) that are not running.
    pub fn delete_ids(&self, ids: usize) -> String {
        format!(
            "DELETE FROM pjq_jobs WHERE id IN ({}) AND status <> 'running'",
            self.placeholders(1, ids)
        )
    }

    /// `count` placeholders from the `first`-th, comma-separated.
    fn placeholders(&self, first: usize, count: usize) -> String {
        let all: Vec<String> = (first..first + count).map(|n| self.p(n)).collect();
        all.join(", ")
    }

    /// What a finished `pjq_jobs` row counts as in `pjq_jobs_finished_total`: its status,
    /// except that a failure no process reported is `lost` (a rescuer took it from a
    /// silent worker) or `interrupted` (its worker gave it back on a stop or a fence).
    /// Both are written by a take-back, the only writer that clears `worker_token` of a
    /// job it fails.
    fn finished_event(&self) -> String {
        format!(
            "CASE WHEN status = 'failed' AND worker_token IS NULL THEN
                CASE WHEN reason = '{}' THEN 'lost' ELSE 'interrupted' END
             ELSE status END",
            super::WORKER_LOST
        )
    }

    /// The histogram bucket of a duration in microseconds: the index of the first bound
    /// of [`super::HISTOGRAM_BOUNDS`] it does not exceed, their count past the last one,
    /// -1 when it is unknown (the job never started).
    fn bucket_of(&self, micros: &str) -> String {
        let mut cases = format!("CASE WHEN {micros} IS NULL THEN -1");
        for (index, bound) in super::HISTOGRAM_BOUNDS.iter().enumerate() {
            cases.push_str(&format!(
                " WHEN {micros} <= {} THEN {index}",
                bound.as_micros()
            ));
        }
        cases.push_str(&format!(" ELSE {} END", super::HISTOGRAM_BOUNDS.len()));
        cases
    }

    /// The tally columns of finished `pjq_jobs` rows, grouped by the first four: queue,
    /// event, duration and wait buckets, then jobs and the summed duration and wait
    /// (microseconds). A job's wait runs from when it was due to when it started.
    fn tally_columns(&self) -> String {
        let duration = "(finished_at - started_at)";
        let wait = "(started_at - available_at)";
        format!(
            "queue, {} AS event, {} AS duration_bucket, {} AS wait_bucket,
             {} AS jobs, {} AS duration_sum, {} AS wait_sum",
            self.finished_event(),
            self.bucket_of(duration),
            self.bucket_of(wait),
            self.integer("COUNT(*)"),
            self.integer(&format!("COALESCE(SUM({duration}), 0)")),
            self.integer(&format!("COALESCE(SUM({wait}), 0)"))
        )
    }

    /// An insert into `pjq_tallies` that adds to the row it collides with.
    fn add_to_tallies(&self, select: &str) -> String {
        let key = "queue, event, duration_bucket, wait_bucket";
        let counts = ["jobs", "duration_sum", "wait_sum"];
        let added = self.on_collision("pjq_tallies", key, &counts, |stored, brought| {
            format!("{stored} + {brought}")
        });
        format!(
            "INSERT INTO pjq_tallies ({key}, {})
             {select}
             {added}",
            counts.join(", ")
        )
    }

    /// Counts the finished jobs among `ids` (bound) into `pjq_tallies`, before a prune,
    /// a delete or a retry takes them out of the table or out of their final state: the
    /// finished counters are the finished rows plus the tallies, so they never go down,
    /// and the turn that finishes a job writes nothing more for them.
    pub fn fold_tallies(&self, ids: usize) -> String {
        self.add_to_tallies(&format!(
            "SELECT {} FROM pjq_jobs
             WHERE id IN ({}) AND status IN ('succeeded', 'failed', 'cancelled')
             GROUP BY 1, 2, 3, 4",
            self.tally_columns(),
            self.placeholders(1, ids)
        ))
    }

    /// Counts one rescue of a job (id) in `pjq_tallies`.
    pub fn count_rescue(&self) -> String {
        self.add_to_tallies(&format!(
            "SELECT queue, 'rescued', -1, -1, 1, 0, 0 FROM pjq_jobs WHERE id = {}",
            self.p(1)
        ))
    }

    /// Every tally: the finished rows' and the folded ones', summed, by queue, event and
    /// buckets.
    pub fn finished_tallies(&self) -> String {
        format!(
            "SELECT queue, event, {} AS duration_bucket, {} AS wait_bucket, {} AS jobs,
                    {} AS duration_sum, {} AS wait_sum
             FROM (SELECT {} FROM pjq_jobs
                   WHERE status IN ('succeeded', 'failed', 'cancelled') GROUP BY 1, 2, 3, 4
                   UNION ALL
                   SELECT queue, event, duration_bucket, wait_bucket, jobs, duration_sum,
                          wait_sum
                   FROM pjq_tallies) t
             GROUP BY queue, event, duration_bucket, wait_bucket
             ORDER BY queue, event, duration_bucket, wait_bucket",
            self.integer("duration_bucket"),
            self.integer("wait_bucket"),
            self.integer("SUM(jobs)"),
            self.integer("SUM(duration_sum)"),
            self.integer("SUM(wait_sum)"),
            self.tally_columns()
        )
    }

    /// Cancels a waiting job: finished_at, reason, then id.
    pub fn cancel(&self) -> String {
        format!(
            "UPDATE pjq_jobs SET status = 'cancelled', finished_at = {}, reason = {}
             WHERE id = {} AND status = 'waiting'",
            self.p(1),
            self.p(2),
            self.p(3)
        )
    }

    /// Asks the worker running a job to end it: the reason, then id. The request stays
    /// until a worker honours it (a job given back meanwhile is cancelled by the next
    /// worker that claims it) or a retry clears it.
    pub fn request_cancel(&self) -> String {
        format!(
            "UPDATE pjq_jobs SET cancel_requested = {} WHERE id = {} AND status = 'running'",
            self.p(1),
            self.p(2)
        )
    }

    /// The cancel request of a job (id) a worker (token) runs, for its heartbeat.
    pub fn cancel_request(&self) -> String {
        format!(
            "SELECT cancel_requested FROM pjq_jobs
             WHERE id = {} AND worker_token = {} AND status = 'running'",
            self.p(1),
            self.p(2)
        )
    }

    /// Adds a worker, or refreshes its heartbeat and queues: token, host, instance, pid,
    /// queues, started_at.
    pub fn register_worker(&self) -> String {
        let p: Vec<String> = (1..=6).map(|n| self.p(n)).collect();
        format!(
            "INSERT INTO pjq_workers
                (token, host, instance, pid, queues, started_at, heartbeat_at, current_job)
             VALUES ({}, {}, {}, {}, {}, {}, {}, NULL)
             {}",
            p[0],
            p[1],
            p[2],
            p[3],
            p[4],
            p[5],
            self.db_now,
            self.upsert("pjq_workers", "token", &["heartbeat_at", "queues"])
        )
    }

    /// current_job, then token.
    pub fn heartbeat(&self) -> String {
        format!(
            "UPDATE pjq_workers SET heartbeat_at = {}, current_job = {} WHERE token = {}",
            self.db_now,
            self.p(1),
            self.p(2)
        )
    }

    pub fn unregister_worker(&self) -> String {
        format!("DELETE FROM pjq_workers WHERE token = {}", self.p(1))
    }

    /// The workers, each with its heartbeat's age in microseconds by the database's clock.
    pub fn list_workers(&self) -> String {
        format!(
            "SELECT host, instance, pid, queues, started_at, heartbeat_at, current_job, {} AS age
             FROM pjq_workers ORDER BY host, instance, pid",
            self.integer(&format!("{} - heartbeat_at", self.db_now))
        )
    }

    /// The ids of at most a limit (bound second) of the jobs of `kind` that finished
    /// before a time (bound first), oldest ids first.
    pub fn prunable_ids(&self, kind: super::Finished) -> String {
        format!(
            "SELECT id FROM pjq_jobs WHERE finished_at < {} AND {} ORDER BY id LIMIT {}",
            self.p(1),
            Still::Finished(kind).condition(),
            self.p(2)
        )
    }

    /// Every statement this module builds, by name, with sample sizes where a statement's
    /// shape depends on its arguments (three queues, two kept ids, both take-back holders).
    pub fn every_statement(&self) -> Vec<(&'static str, String)> {
        let minute = Duration::from_secs(60);
        vec![
            ("database time", self.database_time()),
            ("insert job", self.insert_job()),
            ("active with key", self.active_with_key()),
            ("claim slot", self.claim_slot()),
            ("set slot job", self.set_slot_job()),
            ("schedule runs", self.schedule_runs()),
            (
                "claim",
                format!(
                    "UPDATE pjq_jobs SET {} WHERE id = {}",
                    self.claim_assignments(1, "NULL"),
                    self.next_due_id(3, 5, false, false)
                ),
            ),
            (
                "claim, capped",
                format!(
                    "UPDATE pjq_jobs SET {} WHERE id = {}",
                    self.claim_assignments(1, &self.cap_key_of_code(&self.p(5))),
                    self.next_due_id(3, 6, false, true)
                ),
            ),
            ("lock cap", self.lock_cap()),
            ("running under cap", self.running_under_cap()),
            ("running per cap", self.running_per_cap()),
            ("complete", self.complete_job(1)),
            ("put back unrun", self.put_back_unrun()),
            ("retry later", self.retry_later()),
            ("held", self.held()),
            ("put back unanswered", self.put_back_unanswered(2)),
            (
                "put back unanswered, none kept",
                self.put_back_unanswered(0),
            ),
            ("release", self.take_back(Holder::Token(""))),
            (
                "take back orphan",
                self.take_back(Holder::Lost {
                    rescue_after: minute,
                }),
            ),
            ("status of", self.status_of()),
            ("rescue scan", self.rescue_scan(minute)),
            ("forget lost workers", self.forget_lost_workers(minute)),
            ("probe", self.probe(3, false)),
            ("probe, capped", self.probe(3, true)),
            ("stop generation", self.stop_generation()),
            ("bump stop generation", self.bump_stop_generation()),
            ("queue counts", self.queue_counts()),
            ("list jobs", self.list_jobs()),
            ("job stats", self.job_stats()),
            ("get job", self.get_job()),
            ("retryable ids matching", self.retryable_ids_matching()),
            ("retry ids", self.retry_ids(2)),
            ("old ids", self.old_ids()),
            ("delete ids", self.delete_ids(2)),
            ("locked ids", self.locked_ids(2, Still::Retryable)),
            ("fold tallies", self.fold_tallies(2)),
            ("count rescue", self.count_rescue()),
            ("finished tallies", self.finished_tallies()),
            ("cancel", self.cancel()),
            ("request cancel", self.request_cancel()),
            ("cancel request", self.cancel_request()),
            ("register worker", self.register_worker()),
            ("heartbeat", self.heartbeat()),
            ("unregister worker", self.unregister_worker()),
            ("list workers", self.list_workers()),
            (
                "prunable succeeded and cancelled",
                self.prunable_ids(super::Finished::Done),
            ),
            (
                "prunable failed",
                self.prunable_ids(super::Finished::Failed),
            ),
            ("pause", self.pause()),
            ("resume", self.resume()),
            ("paused queues", self.paused_queues()),
            ("queue latencies", self.queue_latencies()),
            ("failed since", self.failed_since()),
        ]
    }
}

/// `a || b || …`, the SQL standard's concatenation (SQLite, PostgreSQL).
pub(super) fn pipes(parts: &[&str]) -> String {
    parts.join(" || ")
}

/// `CONCAT(a, b, …)`, for MariaDB and MySQL, where `||` means OR.
pub(super) fn concat_fn(parts: &[&str]) -> String {
    format!("CONCAT({})", parts.join(", "))
}

/// A duration in microseconds, written into SQL as a literal.
fn micros(duration: Duration) -> i64 {
    super::saturating_micros(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The placeholders of `statement`, in order of appearance: their numbers for numbered
    /// dialects, 0 for each `?`. Quoted text (a JSON path's `$`) holds none.
    fn placeholders(statement: &str) -> Vec<usize> {
        let bytes = statement.as_bytes();
        let mut found = Vec::new();
        let mut i = 0;
        let mut quoted = false;
        while i < bytes.len() {
            let marker = bytes[i];
            if marker == b'\'' {
                quoted = !quoted;
                i += 1;
            } else if quoted {
                i += 1;
            } else if marker == b'$' || marker == b'?' {
                let digits: String = statement[i + 1..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                found.push(digits.parse().unwrap_or(0));
                i += 1 + digits.len();
            } else {
                i += 1;
            }
        }
        found
    }

    /// Every dialect has every statement, and each statement numbers its parameters
    /// 1, 2, 3, … in order of appearance, so the one bind order serves the positional
    /// dialect too.
    #[test]
    fn every_dialect_has_every_statement_with_parameters_in_bind_order() {
        let dialects = [
            ("sqlite", super::super::sqlite::DIALECT),
            ("postgres", super::super::postgres::DIALECT),
            ("mysql", super::super::mysql::DIALECT),
        ];
        let names = |dialect: &Dialect| -> Vec<&'static str> {
            dialect.every_statement().iter().map(|(n, _)| *n).collect()
        };
        let expected = names(&dialects[0].1);
        for (backend, dialect) in &dialects {
            assert_eq!(names(dialect), expected, "{backend}");
            for (name, statement) in dialect.every_statement() {
                assert!(!statement.trim().is_empty(), "{backend}: {name}");
                let found = placeholders(&statement);
                let numbered = found.iter().any(|&n| n > 0);
                if numbered {
                    let in_order: Vec<usize> = (1..=found.len()).collect();
                    assert_eq!(found, in_order, "{backend}: {name}: {statement}");
                } else {
                    assert!(found.iter().all(|&n| n == 0), "{backend}: {name}");
                }
            }
        }
    }

    #[test]
    fn the_dialects_differ_only_where_their_databases_do() {
        let mysql = super::super::mysql::DIALECT;
        let postgres = super::super::postgres::DIALECT;
        assert!(
            mysql
                .locked_ids(1, Still::NotRunning)
                .ends_with("status <> 'running' FOR UPDATE")
        );
        assert!(
            mysql
                .fold_tallies(1)
                .contains("ON DUPLICATE KEY UPDATE jobs = jobs + VALUES(jobs)")
        );
        assert!(
            postgres
                .fold_tallies(1)
                .contains("DO UPDATE SET jobs = pjq_tallies.jobs + excluded.jobs")
        );
        assert!(!mysql.take_back(Holder::Token("")).contains("RETURNING"));
        assert!(
            postgres
                .take_back(Holder::Token(""))
                .ends_with("RETURNING status")
        );
        assert!(postgres.list_workers().contains("AS BIGINT"));
        assert!(
            mysql
                .pause()
                .contains("ON DUPLICATE KEY UPDATE reason = VALUES(reason)")
        );
        assert!(
            postgres
                .pause()
                .contains("DO UPDATE SET reason = excluded.reason")
        );
    }
}

//! The job store's roles, one trait each, so that a store implements what it supports and
//! a caller asks for what it uses: the daemon needs a [`WorkerStore`] (schema, queue,
//! fleet), the operator commands that manage jobs by id need a [`JobStore`] (all four).
//! The Akeneo transport is a worker store only; the native backends are job stores.

use std::time::Duration;

use async_trait::async_trait;

use super::{
    ChangeOutcome, ClaimedJob, Completion, Finished, JobFilter, JobId, JobRecord, JobStats,
    JobStatus, Lease, NewJob, OrphanedJob, PausedQueue, Poll, PushListener, Pushed, QueueCounts,
    QueueLatency, Release, RescueScan, RescuedJob, ScheduleRun, SchemaVersion, StoreResult, Tally,
    Timestamp, Turn, WorkerIdentity, WorkerRecord,
};

/// What every store has: a location to name it by and a schema to bring up to date.
#[async_trait]
pub trait SchemaStore: Send + Sync {
    /// Where the jobs are, for people (no password).
    fn location(&self) -> String;

    /// Creates or upgrades the schema; safe when several processes do it at once. Returns how
    /// many migrations were applied.
    async fn migrate(&self) -> StoreResult<u32>;

    async fn schema_version(&self) -> StoreResult<SchemaVersion>;

    /// Prepares every statement the store runs against its server and the schema there,
    /// so a refused statement shows at `migrate` time, named, not at a worker's first job
    /// that needs it. Returns how many were checked.
    async fn check_statements(&self) -> StoreResult<usize>;
}

/// A worker's side of the queue: take the next job, record how it ended, give it back.
/// Every change out of `running` is guarded by the claiming worker's token and the lease set
/// at claim time, so a late or repeated write (after a rescue, say) changes nothing.
#[async_trait]
pub trait QueueStore: Send + Sync {
    /// One turn of a worker between jobs, in one transaction (on PostgreSQL one statement):
    /// records the result of the job it just ran, claims the oldest due job of the first
    /// non-empty queue in `turn.queues` (due and claimed by the database's clock, as
    /// heartbeats are: rescue compares the two), and reads the stop-workers generation.
    ///
    /// A claim is the job's start record: it is written, durably, before the job's process
    /// exists, so a job whose claim is not recorded has certainly not run. A job this worker
    /// then does not start goes back with [`Self::put_back_unrun`].
    async fn next_job(&self, turn: &Turn<'_>) -> StoreResult<Poll>;

    /// Claims the next job as [`Self::next_job`] does, recording nothing.
    async fn claim(
        &self,
        queues: &[String],
        worker: &WorkerIdentity,
    ) -> StoreResult<Option<ClaimedJob>> {
        let turn = Turn {
            queues,
            worker,
            finished: None,
            pass_over: 0,
            caps: super::ConcurrencyCaps::none(),
        };
        Ok(self.next_job(&turn).await?.job)
    }

    /// Tells the job's own system that its process started, for stores that acknowledge a
    /// message only then (Akeneo's). False when the claim is no longer held.
    async fn acknowledge_start(&self, _lease: &Lease) -> StoreResult<bool> {
        Ok(true)
    }

    /// Puts back a job this worker claimed and certainly never started (a stop arrived with
    /// the claim), its attempt refunded. False when the claim is no longer held.
    async fn put_back_unrun(&self, lease: &Lease, reason: &str) -> StoreResult<bool>;

    /// Puts back, refunded, every job still claimed under this worker's token except
    /// `keep`: after a claim whose answer never arrived, a job may be claimed that this
    /// worker never learnt of, and so never started. Only the worker itself can tell (the
    /// rescuer cannot refund it). Returns how many were put back.
    async fn put_back_unanswered_claims(
        &self,
        worker: &WorkerIdentity,
        keep: &[JobId],
    ) -> StoreResult<u64>;

    /// Called every few seconds while the job runs, for stores that keep a per-job
    /// heartbeat of their own (the Akeneo 6 launcher writes `health_check_time`).
    async fn touch(&self, _lease: &Lease) -> StoreResult<()> {
        Ok(())
    }

    /// Puts back a claimed job whose process never started (the program could not be
    /// executed), as if it had not been claimed. False when this store fails such a job
    /// instead, which the caller then records.
    async fn release_unstarted(&self, _lease: &Lease, _reason: &str) -> StoreResult<bool> {
        Ok(false)
    }

    /// Whether the job, now ended, got far enough for its own system to see it start;
    /// `None` when the store cannot tell. Feeds the failed-launch circuit breaker.
    async fn launch_took_effect(&self, _lease: &Lease) -> StoreResult<Option<bool>> {
        Ok(None)
    }

    /// Records a running job's result. False (and nothing changed) if the lease is no longer
    /// held: the job was rescued, or this completion is a repeat.
    async fn complete(&self, lease: &Lease, completion: &Completion) -> StoreResult<bool>;

    /// Puts a failed running job back in its queue, due `delay` from now, with `entry` (the
    /// attempt, as one JSON line) added to its history, if it has attempts left:
    /// `Some(true)`; `Some(false)` when it has none (the caller records the failure);
    /// `None` when the lease is no longer held. A store that does not retry says
    /// `Some(false)`.
    async fn retry_later(
        &self,
        _lease: &Lease,
        _completion: &Completion,
        _delay: Duration,
        _entry: &str,
    ) -> StoreResult<Option<bool>> {
        Ok(Some(false))
    }

    /// Gives up a running job this worker holds: back to its queue if it has attempts left,
    /// failed with `reason` otherwise. Guarded like [`Self::complete`].
    async fn release(&self, lease: &Lease, reason: &str, now: Timestamp) -> StoreResult<Release>;

    /// A stream of "a job was pushed" signals from the database itself, where it has one
    /// (PostgreSQL's LISTEN/NOTIFY). Polling remains the safety net.
    async fn listen(&self) -> StoreResult<Option<Box<dyn PushListener>>> {
        Ok(None)
    }
}

/// The fleet of workers sharing the database: membership, heartbeats, rescue of the jobs of
/// lost workers, the fleet-wide stop, pruning, and the per-queue counts `status` shows.
#[async_trait]
pub trait FleetStore: Send + Sync {
    /// The database's clock, the one heartbeats and claims are written with (on SQLite,
    /// this host's).
    async fn database_time(&self) -> StoreResult<Timestamp>;

    /// The current stop-workers generation; workers exit when it moves past the one they saw
    /// at start.
    async fn stop_generation(&self) -> StoreResult<i64>;

    /// Asks every worker sharing this database to stop; returns the new generation.
    async fn request_stop(&self) -> StoreResult<i64>;

    /// Counts per queue, for the queues that have any jobs.
    async fn queue_counts(&self) -> StoreResult<Vec<QueueCounts>>;

    /// Adds this worker's row, or refreshes its heartbeat and queues. The job a registered
    /// worker names stays named: clearing it, even until the next heartbeat, would let a
    /// rescuer judge a long-running job disowned and run it twice.
    async fn register_worker(&self, worker: &WorkerIdentity, queues: &[String]) -> StoreResult<()>;

    /// Refreshes this worker's heartbeat, by the database's clock, so that workers on hosts
    /// with skewed clocks still agree on its age. False when the row is gone (it was
    /// declared lost): the caller registers again.
    async fn heartbeat(
        &self,
        worker: &WorkerIdentity,
        current_job: Option<JobId>,
    ) -> StoreResult<bool>;

    /// Removes this worker's row on a clean exit.
    async fn unregister_worker(&self, worker: &WorkerIdentity) -> StoreResult<()>;

    async fn list_workers(&self) -> StoreResult<Vec<WorkerRecord>>;

    /// The rescuer's round, one statement: the database's clock, and the running jobs whose
    /// worker's heartbeat is older than `rescue_after`, or whose worker row is gone, or whose
    /// live worker has not named them in its heartbeats for `rescue_after` since the claim
    /// (a claim whose reply was lost, a result the worker gave up writing).
    async fn rescue_scan(&self, rescue_after: Duration) -> StoreResult<RescueScan>;

    /// The orphaned jobs of a [`Self::rescue_scan`].
    async fn orphaned_jobs(&self, rescue_after: Duration) -> StoreResult<Vec<OrphanedJob>> {
        Ok(self.rescue_scan(rescue_after).await?.orphans)
    }

    /// Takes one orphaned job back if it is still orphaned and still at the lease seen:
    /// `Some(true)` requeued, `Some(false)` failed as `worker lost`, `None` left alone (its
    /// worker came back, or another rescuer was first).
    async fn take_back_orphan(
        &self,
        job: &OrphanedJob,
        rescue_after: Duration,
        now: Timestamp,
    ) -> StoreResult<Option<bool>>;

    /// Deletes the rows of workers silent for `rescue_after` that hold no running job.
    async fn forget_lost_workers(&self, rescue_after: Duration) -> StoreResult<()>;

    /// Takes back, exactly once, every running job whose worker's heartbeat is older than
    /// `rescue_after` (or whose worker row is gone), and deletes such workers' rows. A worker
    /// whose heartbeat is fresh keeps its job, however slow the job is.
    async fn rescue_orphans(
        &self,
        rescue_after: Duration,
        now: Timestamp,
    ) -> StoreResult<Vec<RescuedJob>> {
        let orphans = self.orphaned_jobs(rescue_after).await?;
        let rescued = self.take_back_orphans(orphans, rescue_after, now).await?;
        self.forget_lost_workers(rescue_after).await?;
        Ok(rescued)
    }

    /// Takes back each of `orphans` that is still orphaned at the lease seen (see
    /// [`Self::take_back_orphan`]); returns those taken.
    async fn take_back_orphans(
        &self,
        orphans: Vec<OrphanedJob>,
        rescue_after: Duration,
        now: Timestamp,
    ) -> StoreResult<Vec<RescuedJob>> {
        let mut rescued = Vec::new();
        for job in orphans {
            if let Some(requeued) = self.take_back_orphan(&job, rescue_after, now).await? {
                rescued.push(RescuedJob {
                    id: job.id,
                    requeued,
                    lost_worker: job.lost_worker,
                });
            }
        }
        Ok(rescued)
    }

    /// Pauses `queues` for the whole fleet, or updates the reason of their pause: every
    /// worker's next claim passes them over (the others keep their priority); a running
    /// job is never touched. `by` names who asked.
    async fn pause(&self, queues: &[String], reason: &str, by: &str) -> StoreResult<()>;

    /// Lifts the pause of `queues`, waking idle workers where the database can; returns
    /// how many were paused.
    async fn resume(&self, queues: &[String]) -> StoreResult<u64>;

    async fn paused_queues(&self) -> StoreResult<Vec<PausedQueue>>;

    /// The queues with a due job, each with how long its oldest due job has waited.
    async fn queue_latencies(&self) -> StoreResult<Vec<QueueLatency>>;

    /// Every finished job and rescue ever counted, by queue, event and histogram buckets
    /// (see [`Tally`]); `None` where the jobs are tracked elsewhere (the PIM's own tables).
    async fn finished_tallies(&self) -> StoreResult<Option<Vec<Tally>>>;

    /// Queues `job` as `schedule`'s run for `slot`, unless a worker (on any host) did:
    /// `None` then. The slot's row and the job are written in one transaction.
    async fn enqueue_slot(
        &self,
        schedule: &str,
        slot: Timestamp,
        job: &NewJob,
    ) -> StoreResult<Option<JobId>>;

    /// Each schedule's latest queued slot.
    async fn schedule_runs(&self) -> StoreResult<Vec<ScheduleRun>>;

    /// How many jobs run under each concurrency key (`code:NAME`, `group:NAME`), in key
    /// order; keys with none are left out.
    async fn running_per_cap(&self) -> StoreResult<Vec<(String, i64)>>;

    /// The cancel request an operator left on `job`, which `worker` runs (see
    /// [`AdminStore::cancel`]); `None` where jobs are cancelled elsewhere (the PIM's stop).
    async fn cancel_request(
        &self,
        job: JobId,
        worker: &WorkerIdentity,
    ) -> StoreResult<Option<String>>;

    /// How many jobs failed within the last `window`, by the database's clock.
    async fn failed_since(&self, window: Duration) -> StoreResult<u64>;

    /// Deletes at most `limit` finished jobs of `kind` that finished before `before`;
    /// returns how many.
    async fn prune_batch(&self, kind: Finished, before: Timestamp, limit: i64) -> StoreResult<u64>;

    /// Deletes every finished job of `kind` that finished before `before`, in batches so no
    /// statement holds its locks for long.
    async fn prune_finished(&self, kind: Finished, before: Timestamp) -> StoreResult<u64> {
        const BATCH: i64 = 5000;
        let mut total = 0;
        loop {
            let pruned = self.prune_batch(kind, before, BATCH).await?;
            total += pruned;
            if pruned < BATCH as u64 {
                return Ok(total);
            }
        }
    }
}

/// Jobs an operator queues and manages by id (`push`, `jobs`, `show`, `retry`, `cancel`).
/// Only the native store has them: in Akeneo mode the PIM queues and tracks its own jobs.
#[async_trait]
pub trait AdminStore: Send + Sync {
    async fn push(&self, job: &NewJob) -> StoreResult<JobId>;

    /// Stores a job whose `unique_key` no waiting or running job has; otherwise returns that
    /// job. The database's unique index decides, so concurrent pushes of one key from many
    /// hosts make one job.
    async fn push_unique(&self, job: &NewJob) -> StoreResult<Pushed>;

    /// Stores many jobs in one transaction (one commit, one flush), for bulk loads.
    async fn push_batch(&self, jobs: &[NewJob]) -> StoreResult<u64>;

    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<JobRecord>>;

    /// The jobs `filter` selects, counted by code and reason, most frequent first.
    async fn job_stats(&self, filter: &JobFilter) -> StoreResult<Vec<JobStats>>;

    async fn get_job(&self, id: JobId) -> StoreResult<Option<JobRecord>>;

    /// Puts a failed or cancelled job back to waiting, with its attempts reset.
    async fn retry(&self, id: JobId) -> StoreResult<ChangeOutcome>;

    /// Puts every failed or cancelled job `filter` selects (its limit unused) back to
    /// waiting, attempts reset; returns how many.
    async fn retry_matching(&self, filter: &JobFilter) -> StoreResult<u64>;

    /// Deletes a job that is not running.
    async fn delete(&self, id: JobId) -> StoreResult<ChangeOutcome>;

    /// Deletes every job of `status` (not running) that finished, or for a waiting job was
    /// created, more than `age` ago by the database's clock; returns how many.
    async fn delete_older(&self, status: JobStatus, age: Duration) -> StoreResult<u64>;

    /// Cancels a waiting job with `reason`; asks the worker running a running one to end
    /// it ([`ChangeOutcome::Requested`]: it ends `cancelled` with `reason` once its worker's
    /// next heartbeat reads the request).
    async fn cancel(&self, id: JobId, reason: &str, now: Timestamp) -> StoreResult<ChangeOutcome>;
}

/// Jobs another system queues and tracks (the PIM's job executions), stopped as that
/// system's own "stop" does.
#[async_trait]
pub trait ForeignJobs: Send + Sync {
    /// Asks a running job to stop: [`ChangeOutcome::Requested`] (also when it is stopping
    /// already); a finished one is [`ChangeOutcome::WrongState`].
    async fn stop_job(&self, id: JobId) -> StoreResult<ChangeOutcome>;
}

/// What a worker daemon needs: every role but job management by id.
pub trait WorkerStore: SchemaStore + QueueStore + FleetStore {}

impl<T: SchemaStore + QueueStore + FleetStore + ?Sized> WorkerStore for T {}

/// A store whose jobs another system tracks: what a worker needs, and that system's stop.
pub trait ConsumedStore: WorkerStore + ForeignJobs {}

impl<T: WorkerStore + ForeignJobs + ?Sized> ConsumedStore for T {}

/// A store with every role: the native job store.
pub trait JobStore: WorkerStore + AdminStore {}

impl<T: WorkerStore + AdminStore + ?Sized> JobStore for T {}

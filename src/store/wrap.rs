//! Store wrappers: a hook around every call of a store, and the one the daemon always uses,
//! a deadline on every store call.
//!
//! A connection that the network black-holes (the server or a firewall silently drops its
//! packets) answers nothing and reports no error for as long as TCP keeps retransmitting,
//! about a quarter of an hour. Server-side limits (lock wait, statement timeout) cannot help
//! there, since the server never hears the call. So each call is bounded here, on the
//! client, by a limit shorter than the fence: a worker cut off this way learns it within one
//! deadline, keeps its watchdog, its stop handling and its retries going, and stops its own
//! job before anyone may rescue it.
//!
//! A call cut short may still have taken effect (a commit whose reply was lost): every state
//! change it guards is safe to try again, and a claim whose reply never came is taken back by
//! the rescue (see [`super::FleetStore::rescue_scan`]).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;

use super::{
    AdminStore, ChangeOutcome, Completion, Detail, Finished, FleetStore, ForeignJobs, JobFilter,
    JobId, JobRecord, JobStats, JobStatus, Lease, NewJob, OrphanedJob, PausedQueue, Poll,
    PushListener, QueueCounts, QueueLatency, QueueStore, Release, RescueScan, SchemaStore,
    SchemaVersion, StoreError, StoreResult, Tally, Timestamp, Turn, WorkerIdentity, WorkerRecord,
};

/// One store call, boxed so that a hook can wrap calls of every result type.
pub type Call<'a, T> = Pin<Box<dyn Future<Output = StoreResult<T>> + Send + 'a>>;

/// What a [`Wrapped`] store does around each call of the store inside: bound it, fault it.
pub trait CallHook: Send + Sync {
    /// Runs `call` (named `what`, as in logs), or does something else with it.
    fn around<'a, T: Send + 'a>(&'a self, what: &'static str, call: Call<'a, T>) -> Call<'a, T>;
}

/// A store whose every call goes through a hook, for each role the store inside plays. Only
/// opening a listener is wrapped for [`QueueStore::listen`]: waiting for a push is what a
/// listener is for.
pub struct Wrapped<S: ?Sized, H> {
    inner: Box<S>,
    hook: H,
}

impl<S: ?Sized, H: CallHook> Wrapped<S, H> {
    pub fn new(inner: Box<S>, hook: H) -> Wrapped<S, H> {
        Wrapped { inner, hook }
    }

    fn call<'a, T: Send + 'a>(
        &'a self,
        what: &'static str,
        call: impl Future<Output = StoreResult<T>> + Send + 'a,
    ) -> Call<'a, T> {
        self.hook.around(what, Box::pin(call))
    }
}

/// The deadline on every call, as [`StoreError::Unavailable`] when the database has not
/// answered by then. Migrations may rewrite a large table and bulk loads commit many rows:
/// they get longer, never forever.
pub struct Deadline {
    pub limit: Duration,
    /// The store's location, for the error message.
    pub location: String,
}

impl Deadline {
    const MIGRATION: Duration = Duration::from_secs(300);
    const BATCH_FACTOR: u32 = 60;

    fn limit_for(&self, what: &str) -> Duration {
        match what {
            "migrate" => Self::MIGRATION,
            "push batch" => self.limit * Self::BATCH_FACTOR,
            _ => self.limit,
        }
    }
}

impl CallHook for Deadline {
    fn around<'a, T: Send + 'a>(&'a self, what: &'static str, call: Call<'a, T>) -> Call<'a, T> {
        let limit = self.limit_for(what);
        Box::pin(async move {
            match tokio::time::timeout(limit, call).await {
                Ok(result) => result,
                Err(_) => Err(StoreError::Unavailable(Detail::from(format!(
                    "{}: no answer to `{what}` within {}",
                    self.location,
                    humantime::format_duration(limit)
                )))),
            }
        })
    }
}

/// A store whose every call ends within its deadline.
pub type Deadlined<S> = Wrapped<S, Deadline>;

impl<S: SchemaStore + ?Sized> Deadlined<S> {
    pub fn with_deadline(inner: Box<S>, limit: Duration) -> Deadlined<S> {
        let location = inner.location();
        Wrapped::new(inner, Deadline { limit, location })
    }
}

#[async_trait]
impl<S: SchemaStore + ?Sized, H: CallHook> SchemaStore for Wrapped<S, H> {
    fn location(&self) -> String {
        self.inner.location()
    }

    async fn migrate(&self) -> StoreResult<u32> {
        self.call("migrate", self.inner.migrate()).await
    }

    async fn schema_version(&self) -> StoreResult<SchemaVersion> {
        self.call("schema version", self.inner.schema_version())
            .await
    }

    async fn check_statements(&self) -> StoreResult<usize> {
        self.call("check statements", self.inner.check_statements())
            .await
    }
}

#[async_trait]
impl<S: QueueStore + ?Sized, H: CallHook> QueueStore for Wrapped<S, H> {
    async fn next_job(&self, turn: &Turn<'_>) -> StoreResult<Poll> {
        let name = match turn.finished {
            None => "claim",
            Some(_) => "complete and claim",
        };
        self.call(name, self.inner.next_job(turn)).await
    }

    async fn acknowledge_start(&self, lease: &Lease) -> StoreResult<bool> {
        self.call("acknowledge", self.inner.acknowledge_start(lease))
            .await
    }

    async fn put_back_unrun(&self, lease: &Lease, reason: &str) -> StoreResult<bool> {
        self.call("put back", self.inner.put_back_unrun(lease, reason))
            .await
    }

    async fn put_back_unanswered_claims(
        &self,
        worker: &WorkerIdentity,
        keep: &[JobId],
    ) -> StoreResult<u64> {
        self.call(
            "put back unanswered",
            self.inner.put_back_unanswered_claims(worker, keep),
        )
        .await
    }

    async fn touch(&self, lease: &Lease) -> StoreResult<()> {
        self.call("job heartbeat", self.inner.touch(lease)).await
    }

    async fn release_unstarted(&self, lease: &Lease, reason: &str) -> StoreResult<bool> {
        self.call("release", self.inner.release_unstarted(lease, reason))
            .await
    }

    async fn launch_took_effect(&self, lease: &Lease) -> StoreResult<Option<bool>> {
        self.call("launch check", self.inner.launch_took_effect(lease))
            .await
    }

    async fn complete(&self, lease: &Lease, completion: &Completion) -> StoreResult<bool> {
        self.call("complete", self.inner.complete(lease, completion))
            .await
    }

    async fn retry_later(
        &self,
        lease: &Lease,
        completion: &Completion,
        delay: Duration,
        entry: &str,
    ) -> StoreResult<Option<bool>> {
        self.call(
            "retry later",
            self.inner.retry_later(lease, completion, delay, entry),
        )
        .await
    }

    async fn release(&self, lease: &Lease, reason: &str, now: Timestamp) -> StoreResult<Release> {
        self.call("release", self.inner.release(lease, reason, now))
            .await
    }

    async fn listen(&self) -> StoreResult<Option<Box<dyn PushListener>>> {
        self.call("listen", self.inner.listen()).await
    }
}

#[async_trait]
impl<S: FleetStore + ?Sized, H: CallHook> FleetStore for Wrapped<S, H> {
    async fn database_time(&self) -> StoreResult<Timestamp> {
        self.call("clock", self.inner.database_time()).await
    }

    async fn stop_generation(&self) -> StoreResult<i64> {
        self.call("stop generation", self.inner.stop_generation())
            .await
    }

    async fn request_stop(&self) -> StoreResult<i64> {
        self.call("request stop", self.inner.request_stop()).await
    }

    async fn queue_counts(&self) -> StoreResult<Vec<QueueCounts>> {
        self.call("queue counts", self.inner.queue_counts()).await
    }

    async fn register_worker(&self, worker: &WorkerIdentity, queues: &[String]) -> StoreResult<()> {
        self.call("register", self.inner.register_worker(worker, queues))
            .await
    }

    async fn heartbeat(
        &self,
        worker: &WorkerIdentity,
        current_job: Option<JobId>,
    ) -> StoreResult<bool> {
        self.call("heartbeat", self.inner.heartbeat(worker, current_job))
            .await
    }

    async fn unregister_worker(&self, worker: &WorkerIdentity) -> StoreResult<()> {
        self.call("unregister", self.inner.unregister_worker(worker))
            .await
    }

    async fn list_workers(&self) -> StoreResult<Vec<WorkerRecord>> {
        self.call("list workers", self.inner.list_workers()).await
    }

    async fn rescue_scan(&self, rescue_after: Duration) -> StoreResult<RescueScan> {
        self.call("find orphans", self.inner.rescue_scan(rescue_after))
            .await
    }

    async fn take_back_orphan(
        &self,
        job: &OrphanedJob,
        rescue_after: Duration,
        now: Timestamp,
    ) -> StoreResult<Option<bool>> {
        let take_back = self.inner.take_back_orphan(job, rescue_after, now);
        self.call("rescue", take_back).await
    }

    async fn forget_lost_workers(&self, rescue_after: Duration) -> StoreResult<()> {
        let forget = self.inner.forget_lost_workers(rescue_after);
        self.call("forget lost workers", forget).await
    }

    async fn pause(&self, queues: &[String], reason: &str, by: &str) -> StoreResult<()> {
        self.call("pause", self.inner.pause(queues, reason, by))
            .await
    }

    async fn resume(&self, queues: &[String]) -> StoreResult<u64> {
        self.call("resume", self.inner.resume(queues)).await
    }

    async fn paused_queues(&self) -> StoreResult<Vec<PausedQueue>> {
        self.call("paused queues", self.inner.paused_queues()).await
    }

    async fn queue_latencies(&self) -> StoreResult<Vec<QueueLatency>> {
        self.call("queue latencies", self.inner.queue_latencies())
            .await
    }

    async fn failed_since(&self, window: Duration) -> StoreResult<u64> {
        self.call("failed since", self.inner.failed_since(window))
            .await
    }

    async fn enqueue_slot(
        &self,
        schedule: &str,
        slot: Timestamp,
        job: &NewJob,
    ) -> StoreResult<Option<JobId>> {
        self.call(
            "queue a schedule's run",
            self.inner.enqueue_slot(schedule, slot, job),
        )
        .await
    }

    async fn schedule_runs(&self) -> StoreResult<Vec<super::ScheduleRun>> {
        self.call("schedule runs", self.inner.schedule_runs()).await
    }

    async fn running_per_cap(&self) -> StoreResult<Vec<(String, i64)>> {
        self.call("running jobs per cap", self.inner.running_per_cap())
            .await
    }

    async fn cancel_request(
        &self,
        job: JobId,
        worker: &WorkerIdentity,
    ) -> StoreResult<Option<String>> {
        self.call("cancel request", self.inner.cancel_request(job, worker))
            .await
    }

    async fn finished_tallies(&self) -> StoreResult<Option<Vec<Tally>>> {
        self.call("finished tallies", self.inner.finished_tallies())
            .await
    }

    async fn prune_batch(&self, kind: Finished, before: Timestamp, limit: i64) -> StoreResult<u64> {
        self.call("prune", self.inner.prune_batch(kind, before, limit))
            .await
    }
}

#[async_trait]
impl<S: ForeignJobs + ?Sized, H: CallHook> ForeignJobs for Wrapped<S, H> {
    async fn stop_job(&self, id: JobId) -> StoreResult<ChangeOutcome> {
        self.call("stop job", self.inner.stop_job(id)).await
    }
}

#[async_trait]
impl<S: AdminStore + ?Sized, H: CallHook> AdminStore for Wrapped<S, H> {
    async fn push_unique(&self, job: &NewJob) -> StoreResult<super::Pushed> {
        self.call("push", self.inner.push_unique(job)).await
    }

    async fn push(&self, job: &NewJob) -> StoreResult<JobId> {
        self.call("push", self.inner.push(job)).await
    }

    async fn push_batch(&self, jobs: &[NewJob]) -> StoreResult<u64> {
        self.call("push batch", self.inner.push_batch(jobs)).await
    }

    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<JobRecord>> {
        self.call("list jobs", self.inner.list_jobs(filter)).await
    }

    async fn job_stats(&self, filter: &JobFilter) -> StoreResult<Vec<JobStats>> {
        self.call("job stats", self.inner.job_stats(filter)).await
    }

    async fn get_job(&self, id: JobId) -> StoreResult<Option<JobRecord>> {
        self.call("get job", self.inner.get_job(id)).await
    }

    async fn retry(&self, id: JobId) -> StoreResult<ChangeOutcome> {
        self.call("retry", self.inner.retry(id)).await
    }

    async fn retry_matching(&self, filter: &JobFilter) -> StoreResult<u64> {
        self.call("retry matching", self.inner.retry_matching(filter))
            .await
    }

    async fn delete(&self, id: JobId) -> StoreResult<ChangeOutcome> {
        self.call("delete", self.inner.delete(id)).await
    }

    async fn delete_older(&self, status: JobStatus, age: Duration) -> StoreResult<u64> {
        self.call("delete older", self.inner.delete_older(status, age))
            .await
    }

    async fn cancel(&self, id: JobId, reason: &str, now: Timestamp) -> StoreResult<ChangeOutcome> {
        self.call("cancel", self.inner.cancel(id, reason, now))
            .await
    }
}

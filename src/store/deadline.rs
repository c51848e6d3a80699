//! A deadline on every store call.
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
//! the rescue (see [`super::JobStore::orphaned_jobs`]).

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;

use super::{
    ChangeOutcome, ClaimedJob, Completion, JobFilter, JobId, JobRecord, JobStore, Lease, NewJob,
    OrphanedJob, PushListener, QueueCounts, Release, SchemaVersion, StoreError, StoreResult,
    Timestamp, WorkerIdentity, WorkerRecord,
};

/// Migrations may rewrite a large table: they get longer, but never forever.
const MIGRATION_DEADLINE: Duration = Duration::from_secs(300);

/// A store whose every call ends within `deadline`, as [`StoreError::Unavailable`] if the
/// database has not answered by then.
pub struct Deadlined {
    inner: Box<dyn JobStore>,
    deadline: Duration,
}

impl Deadlined {
    pub fn new(inner: Box<dyn JobStore>, deadline: Duration) -> Deadlined {
        Deadlined { inner, deadline }
    }

    async fn bounded<T>(
        &self,
        what: &str,
        limit: Duration,
        call: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        match tokio::time::timeout(limit, call).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "{}: no answer to `{what}` within {}",
                self.inner.location(),
                humantime::format_duration(limit)
            ))),
        }
    }

    async fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        self.bounded(what, self.deadline, call).await
    }
}

#[async_trait]
impl JobStore for Deadlined {
    fn location(&self) -> String {
        self.inner.location()
    }

    async fn migrate(&self) -> StoreResult<u32> {
        self.bounded("migrate", MIGRATION_DEADLINE, self.inner.migrate())
            .await
    }

    async fn schema_version(&self) -> StoreResult<SchemaVersion> {
        self.call("schema version", self.inner.schema_version())
            .await
    }

    async fn push(&self, job: &NewJob) -> StoreResult<JobId> {
        self.call("push", self.inner.push(job)).await
    }

    async fn push_batch(&self, jobs: &[NewJob]) -> StoreResult<u64> {
        // One commit for the whole batch: give it the time of one call per thousand jobs.
        let limit = self.deadline * (1 + jobs.len() / 1000).min(60) as u32;
        self.bounded("push batch", limit, self.inner.push_batch(jobs))
            .await
    }

    async fn claim(
        &self,
        queues: &[String],
        worker: &WorkerIdentity,
    ) -> StoreResult<Option<ClaimedJob>> {
        self.call("claim", self.inner.claim(queues, worker)).await
    }

    async fn mark_started(&self, lease: &Lease, now: Timestamp) -> StoreResult<bool> {
        self.call("record start", self.inner.mark_started(lease, now))
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

    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<JobRecord>> {
        self.call("list jobs", self.inner.list_jobs(filter)).await
    }

    async fn get_job(&self, id: JobId) -> StoreResult<Option<JobRecord>> {
        self.call("get job", self.inner.get_job(id)).await
    }

    async fn retry(&self, id: JobId) -> StoreResult<ChangeOutcome> {
        self.call("retry", self.inner.retry(id)).await
    }

    async fn cancel(&self, id: JobId, now: Timestamp) -> StoreResult<ChangeOutcome> {
        self.call("cancel", self.inner.cancel(id, now)).await
    }

    async fn release(&self, lease: &Lease, reason: &str, now: Timestamp) -> StoreResult<Release> {
        self.call("release", self.inner.release(lease, reason, now))
            .await
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

    async fn orphaned_jobs(&self, rescue_after: Duration) -> StoreResult<Vec<OrphanedJob>> {
        self.call("find orphans", self.inner.orphaned_jobs(rescue_after))
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

    async fn prune_batch(&self, before: Timestamp, limit: i64) -> StoreResult<u64> {
        self.call("prune", self.inner.prune_batch(before, limit))
            .await
    }

    /// Only opening the listener is bounded: waiting for a push is what it is for.
    async fn listen(&self) -> StoreResult<Option<Box<dyn PushListener>>> {
        self.call("listen", self.inner.listen()).await
    }
}

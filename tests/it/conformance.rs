//! The store conformance suite: the [`JobStore`] roles' contract, checked against every backend
//! through the library, so each database behaves exactly alike.

use pim_job_queue::store::{
    Cap, ChangeOutcome, Completion, ConcurrencyCaps, Finished, JobFilter, JobResult, JobStatus,
    JobStore, NewJob, ResourceUsage, Timestamp, Turn, WorkerIdentity,
};

use crate::backend_tests;
use crate::support::*;

backend_tests!(
    claim_takes_the_first_non_empty_queue_oldest_first,
    claim_skips_jobs_not_yet_due,
    completion_is_guarded_by_token_and_lease,
    a_job_is_claimed_once_among_concurrent_claimers,
    stop_generation_counts_requests,
    migrate_twice_is_harmless,
    retry_resets_a_failed_job,
    rescue_takes_back_only_lost_workers_jobs_once,
    a_claim_whose_reply_was_lost_is_taken_back,
    registering_again_keeps_the_running_job_owned,
    prune_removes_only_old_finished_jobs,
    release_requeues_while_attempts_remain,
    a_turn_records_the_result_and_claims_the_next_together,
    an_idle_turn_reads_the_stop_generation,
    a_worker_puts_back_its_unanswered_claims_refunded,
    a_claimed_job_never_started_goes_back_refunded,
    passing_over_a_contended_head_keeps_priority,
    a_claim_passes_over_a_row_another_session_holds,
    every_statement_prepares_on_the_server,
    a_turn_that_finds_the_only_due_job_held_says_contended,
    a_paused_queue_is_passed_over_until_resumed,
    finished_counters_never_go_down,
    a_claim_passes_over_codes_whose_cap_is_reached,
    a_cap_holds_among_concurrent_claimers,
    a_claim_in_flight_counts_against_its_cap,
);

fn job(queue: &str, code: &str) -> NewJob {
    new_job(queue, code, "{}")
}

fn worker(name: &str) -> WorkerIdentity {
    WorkerIdentity::for_this_process(Some(name.into()), Some("test-host".into()))
}

fn queues() -> Vec<String> {
    ["ui_job", "import_export_job", "data_maintenance_job"]
        .map(String::from)
        .to_vec()
}

async fn open(scratch: &Scratch) -> Box<dyn JobStore> {
    scratch.store().await
}

/// A turn with no result to record and no passing over: an idle worker's poll.
fn idle_turn<'a>(queues: &'a [String], worker: &'a WorkerIdentity) -> Turn<'a> {
    Turn {
        queues,
        worker,
        finished: None,
        pass_over: 0,
        caps: ConcurrencyCaps::none(),
    }
}

/// What every test completion says the kernel measured.
const MEASURED: ResourceUsage = ResourceUsage {
    peak_rss_bytes: Some(3 << 30),
    cpu_usec: Some(4_200_000),
};

fn done(result: JobResult) -> Completion {
    Completion {
        result,
        output: vec!["line one".into(), "line two".into()],
        finished_at: Timestamp::now(),
        usage: MEASURED,
    }
}

fn claim_takes_the_first_non_empty_queue_oldest_first(backend: Backend) {
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let low = store.push(&job("data_maintenance_job", "a")).await.unwrap();
        let mid = store.push(&job("import_export_job", "b")).await.unwrap();
        let first_ui = store.push(&job("ui_job", "c")).await.unwrap();
        let second_ui = store.push(&job("ui_job", "d")).await.unwrap();
        let me = worker("1");
        let mut order = Vec::new();
        while let Some(claimed) = store.claim(&queues(), &me).await.unwrap() {
            assert_eq!(claimed.attempts, 1);
            order.push(claimed.id);
        }
        assert_eq!(order, [first_ui, second_ui, mid, low]);
        let running = store
            .list_jobs(&JobFilter {
                status: Some(JobStatus::Running),
                limit: 10,
                ..JobFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(running.len(), 4);
        assert_eq!(running[0].worker_host.as_deref(), Some("test-host"));
        assert_eq!(running[0].worker_instance.as_deref(), Some("1"));
    });
}

fn claim_skips_jobs_not_yet_due(backend: Backend) {
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let mut later = job("ui_job", "later");
        later.delay = std::time::Duration::from_secs(3600);
        store.push(&later).await.unwrap();
        let due = store
            .push(&job("data_maintenance_job", "due"))
            .await
            .unwrap();
        let claimed = store.claim(&queues(), &worker("1")).await.unwrap();
        assert_eq!(claimed.map(|c| c.id), Some(due));
        assert!(
            store
                .claim(&queues(), &worker("1"))
                .await
                .unwrap()
                .is_none()
        );
        let counts = store.queue_counts().await.unwrap();
        let ui = counts.iter().find(|c| c.queue == "ui_job").unwrap();
        assert_eq!((ui.waiting, ui.delayed), (0, 1));
    });
}

fn completion_is_guarded_by_token_and_lease(backend: Backend) {
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let id = store.push(&job("ui_job", "x")).await.unwrap();
        let claimed = store.claim(&queues(), &worker("1")).await.unwrap().unwrap();
        let mut stranger = claimed.lease.clone();
        stranger.token = "someone-else".into();
        assert!(
            !store
                .complete(&stranger, &done(JobResult::Succeeded))
                .await
                .unwrap()
        );
        let mut stale = claimed.lease.clone();
        stale.lease -= 1;
        assert!(
            !store
                .complete(&stale, &done(JobResult::Succeeded))
                .await
                .unwrap()
        );
        assert_eq!(
            store.get_job(id).await.unwrap().unwrap().status,
            JobStatus::Running
        );
        let failed = JobResult::Failed {
            exit_code: Some(2),
            signal: None,
            reason: "exit code 2".into(),
        };
        assert!(store.complete(&claimed.lease, &done(failed)).await.unwrap());
        // A repeated or late completion changes nothing.
        assert!(
            !store
                .complete(&claimed.lease, &done(JobResult::Succeeded))
                .await
                .unwrap()
        );
        let record = store.get_job(id).await.unwrap().unwrap();
        assert_eq!(record.status, JobStatus::Failed);
        assert_eq!(record.exit_code, Some(2));
        assert_eq!(record.output, ["line one", "line two"]);
        assert_eq!(record.usage, MEASURED);
        assert!(record.started_at.is_some() && record.finished_at.is_some());
    });
}

fn a_job_is_claimed_once_among_concurrent_claimers(backend: Backend) {
    let scratch = Scratch::new(backend);
    const JOBS: usize = 200;
    let ids = block_on(async {
        let store = open(&scratch).await;
        for _ in 0..JOBS {
            store.push(&job("ui_job", "x")).await.unwrap();
        }
        // Separate processes' worth of separate stores, each claiming as fast as it can.
        let claimers = (0..4).map(|n| {
            let url = scratch.url.clone();
            tokio::spawn(async move {
                let store = pim_job_queue::store::open(&url).await.unwrap();
                let me = worker(&n.to_string());
                let mut mine = Vec::new();
                while let Some(claimed) = store.claim(&queues(), &me).await.unwrap() {
                    mine.push(claimed.id);
                }
                mine
            })
        });
        let mut all = Vec::new();
        for claimer in claimers.collect::<Vec<_>>() {
            all.extend(claimer.await.unwrap());
        }
        all
    });
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), JOBS, "every job claimed exactly once");
    assert_eq!(ids.len(), JOBS);
}

fn stop_generation_counts_requests(backend: Backend) {
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let start = store.stop_generation().await.unwrap();
        assert_eq!(store.request_stop().await.unwrap(), start + 1);
        assert_eq!(store.request_stop().await.unwrap(), start + 2);
        assert_eq!(store.stop_generation().await.unwrap(), start + 2);
    });
}

fn migrate_twice_is_harmless(backend: Backend) {
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = pim_job_queue::store::open(&scratch.url).await.unwrap();
        let (a, b) = tokio::join!(store.migrate(), store.migrate());
        let version = store.schema_version().await.unwrap();
        assert_eq!(
            i64::from(a.unwrap() + b.unwrap()),
            version.latest,
            "each migration applied once"
        );
        assert_eq!(version.found, version.latest);
    });
}

fn retry_resets_a_failed_job(backend: Backend) {
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let id = store.push(&job("ui_job", "x")).await.unwrap();
        let now = Timestamp::now();
        assert_eq!(
            store.retry(id).await.unwrap(),
            ChangeOutcome::WrongState(JobStatus::Waiting)
        );
        let first = worker("1");
        let claimed = store.claim(&queues(), &first).await.unwrap().unwrap();
        // A running job's cancel is a request its worker (only) reads.
        assert_eq!(
            store
                .cancel(id, "cancelled by operator (ops)", now)
                .await
                .unwrap(),
            ChangeOutcome::Requested
        );
        assert_eq!(
            store.cancel_request(id, &first).await.unwrap().as_deref(),
            Some("cancelled by operator (ops)")
        );
        assert_eq!(store.cancel_request(id, &worker("2")).await.unwrap(), None);
        let failed = JobResult::Failed {
            exit_code: Some(1),
            signal: None,
            reason: "exit code 1".into(),
        };
        store.complete(&claimed.lease, &done(failed)).await.unwrap();
        assert_eq!(store.retry(id).await.unwrap(), ChangeOutcome::Changed);
        assert_eq!(
            store.get_job(id).await.unwrap().unwrap().cancel_requested,
            None,
            "a retry clears the old request"
        );
        let again = store.claim(&queues(), &worker("2")).await.unwrap().unwrap();
        assert_eq!(again.id, id);
        assert_eq!(again.attempts, 1, "retry resets the attempts");
        assert!(
            again.lease.lease > claimed.lease.lease,
            "a new claim gets a new lease"
        );
        assert!(
            !store
                .complete(&claimed.lease, &done(JobResult::Succeeded))
                .await
                .unwrap()
        );
        assert_eq!(store.retry(999).await.unwrap(), ChangeOutcome::NotFound);
    });
}

/// The claim committed but its reply never reached the worker (the connection died on the
/// way back), and the worker, alive and idle, reports no job in its heartbeats. Once that
/// has lasted `rescue_after` since the claim, the job is taken back (requeued, attempts
/// left; the worker itself puts such a claim back refunded before its next one, see
/// `a_worker_puts_back_its_unanswered_claims_refunded`); a job its worker names is never
/// taken, however long it runs.
fn a_claim_whose_reply_was_lost_is_taken_back(backend: Backend) {
    use std::time::Duration;
    const RESCUE_AFTER: Duration = Duration::from_secs(1);
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let (forgetful, busy) = (worker("forgetful"), worker("busy"));
        store.register_worker(&forgetful, &queues()).await.unwrap();
        store.register_worker(&busy, &queues()).await.unwrap();
        let lost_reply = store
            .push(&NewJob {
                max_attempts: 2,
                ..new_job("ui_job", "a", "{}")
            })
            .await
            .unwrap();
        let owned = store.push(&new_job("ui_job", "b", "{}")).await.unwrap();
        let claimed = store.claim(&queues(), &forgetful).await.unwrap().unwrap();
        assert_eq!(claimed.id, lost_reply);
        let running = store.claim(&queues(), &busy).await.unwrap().unwrap();
        // Just claimed: a heartbeat sent before the reply arrived cannot name it yet.
        assert!(store.heartbeat(&forgetful, None).await.unwrap());
        assert!(store.heartbeat(&busy, Some(owned)).await.unwrap());
        let early = store
            .rescue_orphans(RESCUE_AFTER, Timestamp::now())
            .await
            .unwrap();
        assert_eq!(early, vec![], "taken back before rescue_after had passed");
        tokio::time::sleep(RESCUE_AFTER + Duration::from_millis(300)).await;
        assert!(store.heartbeat(&forgetful, None).await.unwrap());
        assert!(store.heartbeat(&busy, Some(owned)).await.unwrap());
        let rescued = store
            .rescue_orphans(RESCUE_AFTER, Timestamp::now())
            .await
            .unwrap();
        let ids: Vec<_> = rescued.iter().map(|job| (job.id, job.requeued)).collect();
        assert_eq!(ids, vec![(lost_reply, true)]);
        let job = store.get_job(lost_reply).await.unwrap().unwrap();
        assert_eq!((job.status, job.attempts), (JobStatus::Waiting, 1));
        let job = store.get_job(owned).await.unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Running);
        let late = done(JobResult::Succeeded);
        assert!(!store.complete(&claimed.lease, &late).await.unwrap());
        assert!(store.complete(&running.lease, &late).await.unwrap());
        let workers = store.list_workers().await.unwrap();
        assert_eq!(
            workers.len(),
            2,
            "live workers keep their rows: {workers:?}"
        );
    });
}

/// A worker that records new queues (a reload) while a long job runs keeps naming that job:
/// a registration that cleared it, even until the next heartbeat, would let any rescuer take
/// back a job running for longer than `rescue_after` and run it a second time.
fn registering_again_keeps_the_running_job_owned(backend: Backend) {
    use std::time::Duration;
    const RESCUE_AFTER: Duration = Duration::from_secs(1);
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let me = worker("reloading");
        store.register_worker(&me, &queues()).await.unwrap();
        let id = store.push(&new_job("ui_job", "long", "{}")).await.unwrap();
        let claimed = store.claim(&queues(), &me).await.unwrap().unwrap();
        assert_eq!(claimed.id, id);
        assert!(store.heartbeat(&me, Some(id)).await.unwrap());
        tokio::time::sleep(RESCUE_AFTER + Duration::from_millis(300)).await;
        assert!(store.heartbeat(&me, Some(id)).await.unwrap());
        store
            .register_worker(&me, &["ui_job".to_string()])
            .await
            .unwrap();
        let orphaned = store.orphaned_jobs(RESCUE_AFTER).await.unwrap();
        assert_eq!(
            orphaned,
            vec![],
            "a re-registered worker's job looks disowned"
        );
        let listed = store.list_workers().await.unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].queues, "ui_job");
        assert_eq!(listed[0].current_job, Some(id));
    });
}

fn rescue_takes_back_only_lost_workers_jobs_once(backend: Backend) {
    use std::time::Duration;
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let (lost, alive) = (worker("lost"), worker("alive"));
        store.register_worker(&lost, &queues()).await.unwrap();
        store.register_worker(&alive, &queues()).await.unwrap();
        let once = store.push(&new_job("ui_job", "a", "{}")).await.unwrap();
        let twice = store
            .push(&NewJob {
                max_attempts: 2,
                ..new_job("ui_job", "b", "{}")
            })
            .await
            .unwrap();
        let kept = store.push(&new_job("ui_job", "c", "{}")).await.unwrap();
        let unstarted = store.push(&new_job("ui_job", "d", "{}")).await.unwrap();
        let first = store.claim(&queues(), &lost).await.unwrap().unwrap();
        let second = store.claim(&queues(), &lost).await.unwrap().unwrap();
        let third = store.claim(&queues(), &alive).await.unwrap().unwrap();
        // Claimed, then the worker died: the claim is the job's start record, so it counts
        // (only the worker itself can tell that it never started: see the put-backs).
        let fourth = store.claim(&queues(), &lost).await.unwrap().unwrap();
        assert_eq!(
            (first.id, second.id, third.id, fourth.id),
            (once, twice, kept, unstarted)
        );
        // Lost workers age past rescue_after; the live one's heartbeat stays well inside it
        // however slow the machine is between the calls below.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(store.heartbeat(&alive, Some(kept)).await.unwrap());
        let mut rescued = store
            .rescue_orphans(Duration::from_secs(1), Timestamp::now())
            .await
            .unwrap();
        rescued.sort_by_key(|r| r.id);
        let summary: Vec<(i64, bool)> = rescued.iter().map(|r| (r.id, r.requeued)).collect();
        assert_eq!(summary, [(once, false), (twice, true), (unstarted, false)]);
        assert!(rescued[0].lost_worker.starts_with("test-host/lost/"));
        let again = store
            .rescue_orphans(Duration::from_secs(1), Timestamp::now())
            .await
            .unwrap();
        assert!(again.is_empty(), "a rescue happens once");
        let failed = store.get_job(once).await.unwrap().unwrap();
        assert_eq!(
            (failed.status, failed.reason.as_deref()),
            (JobStatus::Failed, Some("worker lost"))
        );
        assert_eq!(
            store.get_job(twice).await.unwrap().unwrap().status,
            JobStatus::Waiting
        );
        assert_eq!(
            store.get_job(kept).await.unwrap().unwrap().status,
            JobStatus::Running
        );
        assert!(
            !store
                .complete(&first.lease, &done(JobResult::Succeeded))
                .await
                .unwrap()
        );
        let hosts: Vec<Option<String>> = store
            .list_workers()
            .await
            .unwrap()
            .into_iter()
            .map(|w| w.instance)
            .collect();
        assert_eq!(
            hosts,
            [Some("alive".to_string())],
            "the lost worker's row is gone"
        );
        assert!(
            !store.heartbeat(&lost, None).await.unwrap(),
            "a lost worker learns it"
        );
        let rerun = store.claim(&queues(), &alive).await.unwrap().unwrap();
        assert_eq!((rerun.id, rerun.attempts), (twice, 2));
    });
}

fn prune_removes_only_old_finished_jobs(backend: Backend) {
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let finished = store.push(&new_job("ui_job", "a", "{}")).await.unwrap();
        let waiting = store
            .push(&new_job("import_export_job", "b", "{}"))
            .await
            .unwrap();
        let claimed = store.claim(&queues(), &worker("1")).await.unwrap().unwrap();
        store
            .complete(&claimed.lease, &done(JobResult::Succeeded))
            .await
            .unwrap();
        let failed = store.push(&new_job("ui_job", "c", "{}")).await.unwrap();
        let claimed = store.claim(&queues(), &worker("1")).await.unwrap().unwrap();
        let failure = JobResult::Failed {
            exit_code: Some(1),
            signal: None,
            reason: "exit 1".into(),
        };
        store
            .complete(&claimed.lease, &done(failure))
            .await
            .unwrap();
        let long_ago = Timestamp(Timestamp::now().0 - 3_600_000_000);
        assert_eq!(
            store
                .prune_finished(Finished::Done, long_ago)
                .await
                .unwrap(),
            0
        );
        let soon = Timestamp::now().plus(std::time::Duration::from_secs(1));
        assert_eq!(store.prune_finished(Finished::Done, soon).await.unwrap(), 1);
        assert!(store.get_job(finished).await.unwrap().is_none());
        assert!(
            store.get_job(failed).await.unwrap().is_some(),
            "failed jobs wait longer"
        );
        assert!(store.get_job(waiting).await.unwrap().is_some());
        assert_eq!(
            store.prune_finished(Finished::Failed, soon).await.unwrap(),
            1
        );
        assert!(store.get_job(failed).await.unwrap().is_none());
        assert!(store.get_job(waiting).await.unwrap().is_some());
    });
}

/// Claims the next job for `worker` and records its start, as a worker does before it
/// spawns the job's process.
async fn claim_and_start(
    store: &dyn JobStore,
    worker: &WorkerIdentity,
) -> pim_job_queue::store::ClaimedJob {
    store.claim(&queues(), worker).await.unwrap().unwrap()
}

fn release_requeues_while_attempts_remain(backend: Backend) {
    use pim_job_queue::store::Release;
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let me = worker("1");
        let id = store
            .push(&NewJob {
                max_attempts: 2,
                ..new_job("ui_job", "a", "{}")
            })
            .await
            .unwrap();
        let first = claim_and_start(store.as_ref(), &me).await;
        let now = Timestamp::now();
        assert_eq!(
            store
                .release(&first.lease, "interrupted", now)
                .await
                .unwrap(),
            Release::Requeued
        );
        assert_eq!(
            store
                .release(&first.lease, "interrupted", now)
                .await
                .unwrap(),
            Release::NotHeld
        );
        let waiting = store.get_job(id).await.unwrap().unwrap();
        assert_eq!(waiting.status, JobStatus::Waiting);
        assert_eq!(waiting.reason.as_deref(), Some("interrupted (requeued)"));
        let second = store.claim(&queues(), &me).await.unwrap().unwrap();
        // Put back before its process started: it did not run, so it goes back, refunded.
        assert!(
            store
                .put_back_unrun(&second.lease, "stopping")
                .await
                .unwrap()
        );
        let refunded = store.get_job(id).await.unwrap().unwrap();
        assert_eq!(
            (refunded.status, refunded.attempts),
            (JobStatus::Waiting, 1)
        );
        let second = claim_and_start(store.as_ref(), &me).await;
        assert_eq!(
            store
                .release(&second.lease, "interrupted", now)
                .await
                .unwrap(),
            Release::Failed
        );
        let failed = store.get_job(id).await.unwrap().unwrap();
        assert_eq!((failed.status, failed.attempts), (JobStatus::Failed, 2));
    });
}

/// A busy worker's turn: the last job's result and the next claim in one call (one
/// transaction), guarded like `complete`; the stop generation comes with it.
fn a_turn_records_the_result_and_claims_the_next_together(backend: Backend) {
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let me = worker("busy");
        let first = store.push(&job("import_export_job", "a")).await.unwrap();
        let second = store.push(&job("data_maintenance_job", "b")).await.unwrap();
        let third = store.push(&job("ui_job", "c")).await.unwrap();
        let generation = store.request_stop().await.unwrap();
        let running = store.claim(&queues(), &me).await.unwrap().unwrap();
        assert_eq!(running.id, third, "ui_job first");
        let result = done(JobResult::Succeeded);
        let queues = queues();
        let turn = Turn {
            queues: &queues,
            worker: &me,
            finished: Some((&running.lease, &result)),
            pass_over: 0,
            caps: ConcurrencyCaps::none(),
        };
        let poll = store.next_job(&turn).await.unwrap();
        assert_eq!(poll.recorded, Some(true));
        assert_eq!(poll.stop_generation, generation);
        let next = poll.job.expect("the next job claimed with the result");
        assert_eq!((next.id, next.attempts), (first, 1));
        let record = store.get_job(third).await.unwrap().unwrap();
        assert_eq!(record.status, JobStatus::Succeeded);
        assert_eq!(record.output, ["line one", "line two"]);
        assert_eq!(record.usage, MEASURED, "measured in the turn too");
        let claimed = store.get_job(first).await.unwrap().unwrap();
        assert_eq!(claimed.status, JobStatus::Running);
        assert!(
            claimed.started_at.is_some(),
            "the claim is the start record"
        );
        // A repeat of the same turn (an answer lost on the way): the result is refused by
        // its guard, the claim still happens.
        let poll = store.next_job(&turn).await.unwrap();
        assert_eq!(poll.recorded, Some(false));
        assert_eq!(poll.job.map(|job| job.id), Some(second));
        assert_eq!(
            store.get_job(third).await.unwrap().unwrap().status,
            JobStatus::Succeeded
        );
        // The claimed job's own lease completes it.
        assert!(store.complete(&next.lease, &result).await.unwrap());
    });
}

/// An idle poll answers the stop generation with "nothing due"; a job not yet due is not
/// contention.
fn an_idle_turn_reads_the_stop_generation(backend: Backend) {
    use std::time::Duration;
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let me = worker("idle");
        store
            .push(&NewJob {
                delay: Duration::from_secs(3600),
                ..job("ui_job", "later")
            })
            .await
            .unwrap();
        let queues = queues();
        let turn = idle_turn(&queues, &me);
        let poll = store.next_job(&turn).await.unwrap();
        assert_eq!(
            (poll.stop_generation, poll.job.is_none(), poll.contended),
            (0, true, false)
        );
        store.request_stop().await.unwrap();
        store.request_stop().await.unwrap();
        let poll = store.next_job(&turn).await.unwrap();
        assert_eq!((poll.stop_generation, poll.recorded), (2, None));
    });
}

/// A claim whose answer was lost leaves a job claimed under the worker's token that it never
/// learnt of: the worker puts it back, refunded, except the jobs it says it holds.
fn a_worker_puts_back_its_unanswered_claims_refunded(backend: Backend) {
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let me = worker("unanswered");
        let other = worker("other");
        let lost = store.push(&job("ui_job", "lost")).await.unwrap();
        let held = store.push(&job("ui_job", "held")).await.unwrap();
        let theirs = store.push(&job("ui_job", "theirs")).await.unwrap();
        assert_eq!(store.claim(&queues(), &me).await.unwrap().unwrap().id, lost);
        let kept = store.claim(&queues(), &me).await.unwrap().unwrap();
        assert_eq!(kept.id, held);
        let their_job = store.claim(&queues(), &other).await.unwrap().unwrap();
        assert_eq!(their_job.id, theirs);
        let put_back = store
            .put_back_unanswered_claims(&me, &[held])
            .await
            .unwrap();
        assert_eq!(put_back, 1);
        let job = store.get_job(lost).await.unwrap().unwrap();
        assert_eq!((job.status, job.attempts), (JobStatus::Waiting, 0));
        for id in [held, theirs] {
            let job = store.get_job(id).await.unwrap().unwrap();
            assert_eq!((job.status, job.attempts), (JobStatus::Running, 1), "{id}");
        }
        assert!(
            store
                .complete(&kept.lease, &done(JobResult::Succeeded))
                .await
                .unwrap()
        );
        assert_eq!(
            store.put_back_unanswered_claims(&me, &[]).await.unwrap(),
            0,
            "nothing left to put back"
        );
        let again = store.claim(&queues(), &me).await.unwrap().unwrap();
        assert_eq!((again.id, again.attempts), (lost, 1));
    });
}

/// A job claimed while the worker was stopping goes back, refunded, under the lease guard.
fn a_claimed_job_never_started_goes_back_refunded(backend: Backend) {
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let me = worker("stopping");
        let id = store.push(&job("ui_job", "a")).await.unwrap();
        let claimed = store.claim(&queues(), &me).await.unwrap().unwrap();
        let mut stale = claimed.lease.clone();
        stale.lease -= 1;
        assert!(!store.put_back_unrun(&stale, "stopping").await.unwrap());
        assert!(
            store
                .put_back_unrun(&claimed.lease, "stopping")
                .await
                .unwrap()
        );
        assert!(
            !store
                .put_back_unrun(&claimed.lease, "stopping")
                .await
                .unwrap(),
            "once"
        );
        let job = store.get_job(id).await.unwrap().unwrap();
        assert_eq!((job.status, job.attempts), (JobStatus::Waiting, 0));
        assert!(
            !store
                .complete(&claimed.lease, &done(JobResult::Succeeded))
                .await
                .unwrap(),
            "a late result changes nothing"
        );
    });
}

/// A worker that lost a race passes over the head of the first queue with due jobs (see
/// `Turn::pass_over`), but only to a later job of the same queue, never to a lower one.
fn passing_over_a_contended_head_keeps_priority(backend: Backend) {
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let me = worker("racing");
        let mut ui = Vec::new();
        for _ in 0..2 {
            ui.push(store.push(&job("ui_job", "a")).await.unwrap());
        }
        store.push(&job("import_export_job", "b")).await.unwrap();
        let queues = queues();
        for pass_over in [3, 1, 3] {
            let turn = Turn {
                queues: &queues,
                worker: &me,
                finished: None,
                pass_over,
                caps: ConcurrencyCaps::none(),
            };
            let claimed = store.next_job(&turn).await.unwrap().job.unwrap();
            if ui.contains(&claimed.id) {
                ui.retain(|id| *id != claimed.id);
            } else {
                assert!(
                    ui.is_empty(),
                    "{} taken before ui_job was empty",
                    claimed.queue
                );
                assert_eq!(claimed.queue, "import_export_job");
            }
        }
        assert!(ui.is_empty());
    });
}

/// A row another session holds (a sibling's claim in flight) is passed over, not waited on:
/// the claim takes the next job of the same queue at once. SQLite has no row locks (its
/// writers are serialized), so there the test has nothing to hold.
/// Locks job `id` in a transaction of another session, held until the returned connection
/// is dropped; `None` on SQLite, which has no row locks.
async fn hold_row(backend: Backend, url: &str, id: i64) -> Option<Box<dyn std::any::Any>> {
    use sqlx::Connection;
    let lock = format!("SELECT id FROM pjq_jobs WHERE id = {id} FOR UPDATE");
    match backend {
        Backend::Sqlite => None,
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
            sqlx::query(&lock).execute(&mut conn).await.unwrap();
            Some(Box::new(conn))
        }
        Backend::Mariadb => {
            let mut conn = sqlx::MySqlConnection::connect(url).await.unwrap();
            sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
            sqlx::query(&lock).execute(&mut conn).await.unwrap();
            Some(Box::new(conn))
        }
    }
}

fn a_claim_passes_over_a_row_another_session_holds(backend: Backend) {
    use std::time::{Duration, Instant};
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let held = store.push(&job("ui_job", "a")).await.unwrap();
        let next = store.push(&job("ui_job", "b")).await.unwrap();
        let Some(holder) = hold_row(backend, &scratch.url, held).await else {
            return;
        };
        let started = Instant::now();
        let claimed = store.claim(&queues(), &worker("sibling")).await.unwrap();
        assert_eq!(claimed.map(|job| job.id), Some(next));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "waited on the held row: {:?}",
            started.elapsed()
        );
        drop(holder);
    });
}

/// Runs one statement on its own connection, outside the store.
async fn execute_raw(backend: Backend, url: &str, statement: &str) {
    use sqlx::Connection;
    match backend {
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
            sqlx::query(statement).execute(&mut conn).await.unwrap();
        }
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::query(statement).execute(&mut conn).await.unwrap();
        }
        Backend::Mariadb => {
            let mut conn = sqlx::MySqlConnection::connect(url).await.unwrap();
            sqlx::query(statement).execute(&mut conn).await.unwrap();
        }
    }
}

/// Every statement the store runs, shared or its backend's own, is accepted by the server
/// in the migrated schema; a schema that lost a column fails the check, naming a statement.
fn every_statement_prepares_on_the_server(backend: Backend) {
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let checked = store.check_statements().await.unwrap();
        assert!(checked >= 26, "{checked} statements");
        let drop_column = "ALTER TABLE pjq_workers DROP COLUMN current_job";
        execute_raw(backend, &scratch.url, drop_column).await;
        let error = store.check_statements().await.unwrap_err().to_string();
        assert!(error.contains("statement `"), "{error}");
    });
}

/// Another session holds the only due job (a sibling's claim in flight): the turn claims
/// nothing but says `contended`, so the worker asks again at once instead of sleeping a poll
/// interval; once the holder lets go, the job is claimed.
fn a_turn_that_finds_the_only_due_job_held_says_contended(backend: Backend) {
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let only = store.push(&job("import_export_job", "a")).await.unwrap();
        let Some(holder) = hold_row(backend, &scratch.url, only).await else {
            return;
        };
        let me = worker("1");
        let all = queues();
        let turn = idle_turn(&all, &me);
        let poll = store.next_job(&turn).await.unwrap();
        assert!(poll.job.is_none());
        assert!(poll.contended, "a held due job is not an empty queue");
        drop(holder);
        let poll = store.next_job(&turn).await.unwrap();
        assert_eq!(poll.job.map(|job| job.id), Some(only));
        assert!(!poll.contended);
    });
}

/// A paused queue is passed over by claims and idle turns, the others keep their order;
/// the rescuer's scan carries the pause for STATUS; `resume` brings the queue back.
fn a_paused_queue_is_passed_over_until_resumed(backend: Backend) {
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let ui = store.push(&job("ui_job", "a")).await.unwrap();
        let import = store.push(&job("import_export_job", "b")).await.unwrap();
        let ui_only = ["ui_job".to_string()];
        store.pause(&ui_only, "feed broken", "ops").await.unwrap();
        store
            .pause(&ui_only, "feed still broken", "ops")
            .await
            .unwrap();
        let paused = store.paused_queues().await.unwrap();
        assert_eq!(paused.len(), 1);
        assert_eq!(paused[0].reason, "feed still broken");
        let scan = store.rescue_scan(std::time::Duration::from_secs(60)).await;
        assert_eq!(scan.unwrap().paused, "ui_job (feed still broken)");
        let me = worker("1");
        let claimed = store.claim(&queues(), &me).await.unwrap();
        assert_eq!(claimed.map(|job| job.id), Some(import));
        let all = queues();
        let turn = idle_turn(&all, &me);
        let poll = store.next_job(&turn).await.unwrap();
        assert!(poll.job.is_none() && !poll.contended, "{poll:?}");
        assert_eq!(store.resume(&ui_only).await.unwrap(), 1);
        assert_eq!(store.resume(&ui_only).await.unwrap(), 0);
        let claimed = store.claim(&queues(), &me).await.unwrap();
        assert_eq!(claimed.map(|job| job.id), Some(ui));
    });
}

/// Finished jobs counted by event (over every bucket), from the store's tallies.
async fn finished_counts(store: &dyn JobStore) -> std::collections::BTreeMap<String, i64> {
    let mut counts = std::collections::BTreeMap::new();
    for tally in store.finished_tallies().await.unwrap().unwrap() {
        assert_eq!(tally.queue, "ui_job");
        *counts.entry(tally.event).or_insert(0) += tally.jobs;
    }
    counts
}

fn counted(pairs: &[(&str, i64)]) -> std::collections::BTreeMap<String, i64> {
    pairs.iter().map(|(e, n)| (e.to_string(), *n)).collect()
}

/// The finished counters are events: a retry, a delete or a prune takes a job out of its
/// final state or out of the table, never out of the count; a rescue is counted once, and
/// a job its lost worker never finished counts as `lost`.
fn finished_counters_never_go_down(backend: Backend) {
    use std::time::Duration;
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let failure = || JobResult::Failed {
            exit_code: Some(1),
            signal: None,
            reason: "exit code 1".into(),
        };
        let mut ids = Vec::new();
        for (code, result) in [
            ("a", JobResult::Succeeded),
            ("b", failure()),
            ("c", failure()),
        ] {
            let id = store.push(&job("ui_job", code)).await.unwrap();
            let claimed = store.claim(&queues(), &worker("1")).await.unwrap().unwrap();
            store.complete(&claimed.lease, &done(result)).await.unwrap();
            ids.push(id);
        }
        let waiting = store.push(&job("ui_job", "d")).await.unwrap();
        store
            .cancel(waiting, "cancelled by operator", Timestamp::now())
            .await
            .unwrap();
        let before = counted(&[("cancelled", 1), ("failed", 2), ("succeeded", 1)]);
        assert_eq!(finished_counts(store.as_ref()).await, before);

        assert_eq!(store.retry(ids[1]).await.unwrap(), ChangeOutcome::Changed);
        assert_eq!(finished_counts(store.as_ref()).await, before, "retry");
        assert_eq!(store.delete(ids[2]).await.unwrap(), ChangeOutcome::Changed);
        assert_eq!(finished_counts(store.as_ref()).await, before, "delete");
        let soon = Timestamp::now().plus(Duration::from_secs(1));
        assert_eq!(store.prune_finished(Finished::Done, soon).await.unwrap(), 2);
        assert_eq!(finished_counts(store.as_ref()).await, before, "prune");

        // The retried job runs again and succeeds: one more event.
        let again = store.claim(&queues(), &worker("1")).await.unwrap().unwrap();
        assert_eq!(again.id, ids[1]);
        store
            .complete(&again.lease, &done(JobResult::Succeeded))
            .await
            .unwrap();
        let lost = worker("lost");
        store.register_worker(&lost, &queues()).await.unwrap();
        store.push(&job("ui_job", "e")).await.unwrap();
        store.claim(&queues(), &lost).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let rescued = store
            .rescue_orphans(Duration::from_secs(1), Timestamp::now())
            .await
            .unwrap();
        assert_eq!(rescued.len(), 1);
        assert_eq!(
            finished_counts(store.as_ref()).await,
            counted(&[
                ("cancelled", 1),
                ("failed", 2),
                ("lost", 1),
                ("rescued", 1),
                ("succeeded", 2)
            ])
        );
        let tallies = store.finished_tallies().await.unwrap().unwrap();
        let succeeded: Vec<_> = tallies.iter().filter(|t| t.event == "succeeded").collect();
        assert!(
            succeeded
                .iter()
                .all(|t| t.duration_bucket >= 0 && t.wait_bucket >= 0),
            "a job that ran has a duration and a wait: {succeeded:?}"
        );
        let cancelled = tallies.iter().find(|t| t.event == "cancelled").unwrap();
        assert_eq!((cancelled.duration_bucket, cancelled.wait_bucket), (-1, -1));
    });
}

/// `capped` alone at most 1, `g1` and `g2` together at most 2.
fn test_caps() -> ConcurrencyCaps {
    let cap = |code: &str, key: &str, limit: u32| Cap {
        code: code.into(),
        key: key.into(),
        limit,
    };
    ConcurrencyCaps::new(vec![
        cap("capped", "code:capped", 1),
        cap("g1", "group:g", 2),
        cap("g2", "group:g", 2),
    ])
}

/// A head whose cap is reached is passed over for the next job in priority order (same
/// queue or lower), a full cap is not contention, and a turn that finishes a capped job
/// claims the next one of its cap at once. The caps are the worker's: a worker without
/// them claims those jobs.
fn a_claim_passes_over_codes_whose_cap_is_reached(backend: Backend) {
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let me = worker("capped");
        let caps = test_caps();
        let queues = queues();
        let mut ids = std::collections::BTreeMap::new();
        for (name, queue, code) in [
            ("a", "ui_job", "capped"),
            ("b", "ui_job", "capped"),
            ("c", "ui_job", "free"),
            ("d", "import_export_job", "g1"),
            ("e", "import_export_job", "g2"),
            ("f", "import_export_job", "g1"),
            ("g", "data_maintenance_job", "capped"),
        ] {
            ids.insert(name, store.push(&job(queue, code)).await.unwrap());
        }
        let name_of = |id: i64| *ids.iter().find(|(_, v)| **v == id).unwrap().0;
        let turn = Turn {
            caps: &caps,
            ..idle_turn(&queues, &me)
        };
        let mut claimed = Vec::new();
        let mut leases = std::collections::BTreeMap::new();
        loop {
            let poll = store.next_job(&turn).await.unwrap();
            let Some(job) = poll.job else {
                assert!(!poll.contended, "a full cap is not contention");
                break;
            };
            claimed.push(name_of(job.id));
            leases.insert(name_of(job.id), job.lease);
        }
        assert_eq!(claimed, ["a", "c", "d", "e"]);
        assert_eq!(
            store.running_per_cap().await.unwrap(),
            [("code:capped".to_string(), 1), ("group:g".to_string(), 2)]
        );
        // Finishing `a` frees its cap in the same turn: `b` next, before `f` (lower queue).
        let result = done(JobResult::Succeeded);
        let finishing = Turn {
            finished: Some((&leases["a"], &result)),
            ..turn
        };
        let poll = store.next_job(&finishing).await.unwrap();
        assert_eq!(poll.recorded, Some(true));
        assert_eq!(poll.job.map(|job| name_of(job.id)), Some("b"));
        let finishing = Turn {
            finished: Some((&leases["d"], &result)),
            ..turn
        };
        let poll = store.next_job(&finishing).await.unwrap();
        assert_eq!(
            poll.job.map(|job| name_of(job.id)),
            Some("f"),
            "the group's room"
        );
        assert!(store.next_job(&turn).await.unwrap().job.is_none());
        // Without caps, the capped `g` is just the next job.
        let uncapped = store.claim(&queues, &worker("uncapped")).await.unwrap();
        assert_eq!(uncapped.map(|job| name_of(job.id)), Some("g"));
    });
}

/// Six claimers, each a store of its own, take 40 jobs of a code capped at 2, each holding
/// its job a few milliseconds and finishing it in the turn that claims the next: the number
/// of jobs a claimer holds, counted after its claim committed and before its result does,
/// never exceeds the cap, and every job runs once.
fn a_cap_holds_among_concurrent_claimers(backend: Backend) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let scratch = Scratch::new(backend);
    const JOBS: usize = 40;
    let (ran, most) = block_on(async {
        let store = open(&scratch).await;
        for _ in 0..JOBS {
            store.push(&job("ui_job", "g1")).await.unwrap();
        }
        let holding = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let claimers = (0..6).map(|n| {
            let url = scratch.url.clone();
            let (holding, most) = (holding.clone(), most.clone());
            tokio::spawn(async move {
                let store = pim_job_queue::store::open(&url).await.unwrap();
                let me = worker(&format!("c{n}"));
                let (queues, caps) = (queues(), test_caps());
                let result = done(JobResult::Succeeded);
                let mut ran = Vec::new();
                let mut idle_turns = 0;
                let mut held: Option<pim_job_queue::store::ClaimedJob> = None;
                while idle_turns < 40 {
                    if held.is_some() {
                        holding.fetch_sub(1, Ordering::SeqCst);
                    }
                    let turn = Turn {
                        finished: held.as_ref().map(|job| (&job.lease, &result)),
                        caps: &caps,
                        ..idle_turn(&queues, &me)
                    };
                    let poll = store.next_job(&turn).await.unwrap();
                    assert_ne!(poll.recorded, Some(false));
                    held = poll.job;
                    match &held {
                        Some(job) => {
                            idle_turns = 0;
                            ran.push(job.id);
                            let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                        }
                        None => {
                            idle_turns += 1;
                            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                        }
                    }
                }
                ran
            })
        });
        let mut ran = Vec::new();
        for claimer in claimers.collect::<Vec<_>>() {
            ran.extend(claimer.await.unwrap());
        }
        (ran, most.load(Ordering::SeqCst))
    });
    let mut unique = ran.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((ran.len(), unique.len()), (JOBS, JOBS), "each job once");
    assert!(most <= 2, "{most} jobs of a cap of 2 held at once");
    assert_eq!(most, 2, "the cap's room was used");
}

/// Another worker's claim of job `id` under `cap_key`, in flight: its transaction holds the
/// cap's lock (SQLite: the write lock) and the claimed row, uncommitted, until `COMMIT` is
/// run on the returned connection.
async fn claim_in_flight(
    backend: Backend,
    url: &str,
    id: i64,
    cap_key: &str,
) -> sqlx::AnyConnection {
    let mut conn = connect_any(url).await.unwrap();
    let lock = format!("INSERT INTO pjq_concurrency (cap_key) VALUES ('{cap_key}')");
    let (begin, lock) = match backend {
        Backend::Sqlite => ("BEGIN IMMEDIATE", None),
        Backend::Postgres => (
            "BEGIN",
            Some(format!(
                "{lock} ON CONFLICT (cap_key) DO UPDATE SET cap_key = excluded.cap_key"
            )),
        ),
        Backend::Mariadb => (
            "BEGIN",
            Some(format!(
                "{lock} ON DUPLICATE KEY UPDATE cap_key = VALUES(cap_key)"
            )),
        ),
    };
    let claim = format!(
        "UPDATE pjq_jobs SET status = 'running', concurrency_key = '{cap_key}',
         worker_token = 'other', lease = lease + 1, attempts = attempts + 1, claimed_at = 1,
         started_at = 1 WHERE id = {id}"
    );
    for statement in [Some(begin.to_string()), lock, Some(claim)]
        .into_iter()
        .flatten()
    {
        sqlx::query(&statement).execute(&mut conn).await.unwrap();
    }
    conn
}

/// The race a snapshot cannot see: while another worker's claim of a capped job is in
/// flight (uncommitted, so invisible to the statement that picks the head), a claim of the
/// same cap waits for that claim's lock, then counts it: with a cap of 1, nothing is
/// claimed. A check that only read the snapshot would claim the second job.
fn a_claim_in_flight_counts_against_its_cap(backend: Backend) {
    use std::time::Duration;
    let scratch = Scratch::new(backend);
    block_on(async {
        let store = open(&scratch).await;
        let first = store.push(&job("ui_job", "capped")).await.unwrap();
        let second = store.push(&job("ui_job", "capped")).await.unwrap();
        let mut other = claim_in_flight(backend, &scratch.url, first, "code:capped").await;
        let (me, queues, caps) = (worker("second"), queues(), test_caps());
        let turn = Turn {
            caps: &caps,
            ..idle_turn(&queues, &me)
        };
        let (poll, _) = tokio::join!(store.next_job(&turn), async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            sqlx::query("COMMIT").execute(&mut other).await.unwrap();
        });
        let poll = poll.unwrap();
        assert_eq!(poll.job.map(|job| job.id), None, "the cap of 1 is taken");
        let waiting = store.get_job(second).await.unwrap().unwrap();
        assert_eq!(waiting.status, JobStatus::Waiting);
    });
}

//! What the heartbeat knows about the database, shared with the consumer: when a heartbeat
//! last got through (the fence), since when the database has been unavailable, which job
//! this worker runs, whether it was found to have lost that job, and whether an operator
//! asked to cancel it.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::FleetTimings;
use crate::store::JobId;

/// What the heartbeat task knows about the database, shared with the consumer.
#[derive(Debug)]
pub struct Contact {
    state: Mutex<ContactState>,
    /// Woken when the heartbeat learns something about the running job: this worker was
    /// declared lost while it ran it (the job is someone else's now), or an operator asked
    /// to cancel it.
    news: tokio::sync::Notify,
}

#[derive(Debug)]
struct ContactState {
    /// When the last successful heartbeat was *sent* (so never later than the database's
    /// own record of it).
    last_ok: Instant,
    /// Since when heartbeats have been failing, if they are.
    outage_since: Option<SystemTime>,
    /// Since when heartbeats have been getting through without a break.
    connected_since: Instant,
    current_job: Option<JobId>,
    /// A job this worker was found to have lost (its registration taken away while it ran).
    lost_job: Option<JobId>,
    /// A job an operator asked to cancel, and why.
    cancel: Option<(JobId, String)>,
    /// Queues a reload chose, for the heartbeat to record with its next beat.
    new_queues: Option<Vec<String>>,
    /// The queues paused fleet-wide, as the rescuer's last round read them (`queue
    /// (reason), …`; empty when none).
    paused: String,
}

impl Contact {
    pub(super) fn new() -> Contact {
        Contact {
            state: Mutex::new(ContactState {
                last_ok: Instant::now(),
                outage_since: None,
                connected_since: Instant::now(),
                current_job: None,
                lost_job: None,
                cancel: None,
                new_queues: None,
                paused: String::new(),
            }),
            news: tokio::sync::Notify::new(),
        }
    }

    /// Resolves when this worker learns it lost `job` (its registration was taken away
    /// while it ran the job, as a rescue does). Remembered, so a loop that was busy when
    /// the heartbeat found out still hears it; never about another job.
    pub async fn lease_lost(&self, job: JobId) {
        self.news_of(|state| (state.lost_job == Some(job)).then_some(()))
            .await
    }

    /// Resolves with the operator's reason once the heartbeat has read a cancel request
    /// for `job`; remembered like [`Contact::lease_lost`], never about another job.
    pub async fn cancel_requested(&self, job: JobId) -> String {
        self.news_of(|state| match &state.cancel {
            Some((id, reason)) if *id == job => Some(reason.clone()),
            _ => None,
        })
        .await
    }

    /// Waits until `found` finds its news in the state, checked after each notification
    /// (and once at first, so news that came before the wait is heard).
    async fn news_of<T>(&self, found: impl Fn(&ContactState) -> Option<T>) -> T {
        loop {
            let notified = self.news.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(news) = found(&self.lock()) {
                return news;
            }
            notified.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ContactState> {
        self.state.lock().expect("contact lock")
    }

    pub fn last_ok(&self) -> Instant {
        self.lock().last_ok
    }

    pub fn outage_since(&self) -> Option<SystemTime> {
        self.lock().outage_since
    }

    pub fn set_current_job(&self, job: Option<JobId>) {
        self.lock().current_job = job;
    }

    pub(super) fn current_job(&self) -> Option<JobId> {
        self.lock().current_job
    }

    /// Hands the queues a reload chose to the heartbeat, which records them with its next
    /// beat: the consumer never waits on the database for a reload, even while a job runs.
    /// The fleet-wide pauses, described, for STATUS, when they differ from `known` (the
    /// consumer asks every turn: no copy unless they changed).
    pub fn paused_unless(&self, known: &str) -> Option<String> {
        let state = self.state.lock().expect("contact lock");
        (state.paused != known).then(|| state.paused.clone())
    }

    pub(super) fn record_paused(&self, paused: String) {
        self.state.lock().expect("contact lock").paused = paused;
    }

    pub fn record_queues(&self, queues: Vec<String>) {
        self.lock().new_queues = Some(queues);
    }

    pub(super) fn take_new_queues(&self) -> Option<Vec<String>> {
        self.lock().new_queues.take()
    }

    /// Puts back queues the heartbeat could not record, unless a newer reload replaced them.
    pub(super) fn keep_new_queues(&self, queues: Vec<String>) {
        self.lock().new_queues.get_or_insert(queues);
    }

    /// Records a successful heartbeat; returns since when the outage it ends had lasted.
    pub(super) fn record_ok(&self, sent: Instant) -> Option<SystemTime> {
        let mut state = self.lock();
        state.last_ok = sent;
        let ended = state.outage_since.take();
        if ended.is_some() {
            state.connected_since = sent;
        }
        ended
    }

    /// Whether this worker may judge others lost: it has itself been in contact without a
    /// break for `rescue_after`, and is in contact now.
    pub(super) fn may_rescue(&self, timings: &FleetTimings) -> bool {
        let state = self.lock();
        state.outage_since.is_none()
            && state.connected_since.elapsed() >= timings.rescue_after
            && state.last_ok.elapsed() < timings.fence_after()
    }

    /// Records a failed heartbeat; returns since when the database has been unavailable.
    pub(super) fn record_failure(&self) -> SystemTime {
        *self.lock().outage_since.get_or_insert_with(SystemTime::now)
    }

    /// Resolves once no heartbeat has succeeded for `limit`.
    pub async fn lost_for(&self, limit: Duration) {
        loop {
            let last = self.last_ok();
            tokio::time::sleep_until(last + limit).await;
            if self.last_ok() == last {
                return;
            }
        }
    }

    /// Records that this worker was declared lost while it ran `job`: the job may be
    /// someone else's now, and the loop that watches it hears so.
    pub(super) fn lose_job(&self, job: JobId) {
        self.lock().lost_job = Some(job);
        self.news.notify_waiters();
    }

    /// Records an operator's request to cancel `job`; false when it was known already.
    pub(super) fn request_cancel(&self, job: JobId, reason: String) -> bool {
        let mut state = self.lock();
        if state.cancel.as_ref().is_some_and(|(id, _)| *id == job) {
            return false;
        }
        state.cancel = Some((job, reason));
        drop(state);
        self.news.notify_waiters();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Time is paused: the fence's timing is exact, not "about right on a quiet machine".
    #[tokio::test(start_paused = true)]
    async fn the_fence_falls_exactly_its_limit_after_the_last_heartbeat() {
        const FENCE: Duration = Duration::from_secs(20);
        let contact = Arc::new(Contact::new());
        let start = Instant::now();
        let watching = tokio::spawn({
            let contact = contact.clone();
            async move {
                contact.lost_for(FENCE).await;
                Instant::now()
            }
        });
        tokio::time::sleep(Duration::from_secs(15)).await;
        contact.record_ok(Instant::now());
        let fenced_at = watching.await.unwrap();
        assert_eq!(fenced_at - start, Duration::from_secs(35));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_lease_is_remembered_and_only_for_its_job() {
        let contact = Arc::new(Contact::new());
        contact.lose_job(7);
        // Heard even by a loop that starts listening afterwards.
        contact.lease_lost(7).await;
        let other = tokio::time::timeout(Duration::from_secs(3600), contact.lease_lost(8));
        assert!(other.await.is_err(), "job 8 was never lost");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_request_is_heard_once_and_only_for_its_job() {
        let contact = Arc::new(Contact::new());
        let waiting = tokio::spawn({
            let contact = contact.clone();
            async move { contact.cancel_requested(7).await }
        });
        tokio::task::yield_now().await;
        assert!(contact.request_cancel(7, "cancelled by operator".into()));
        assert!(!contact.request_cancel(7, "again".into()), "known already");
        assert_eq!(waiting.await.unwrap(), "cancelled by operator");
        let other = tokio::time::timeout(Duration::from_secs(3600), contact.cancel_requested(8));
        assert!(other.await.is_err(), "job 8 was never cancelled");
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_rescues_only_after_rescue_after_in_contact() {
        let timings = FleetTimings {
            heartbeat_interval: Duration::from_secs(5),
            rescue_after: Duration::from_secs(30),
            retention: None,
            failed_retention: None,
        };
        let contact = Contact::new();
        tokio::time::sleep(Duration::from_secs(29)).await;
        contact.record_ok(Instant::now());
        assert!(!contact.may_rescue(&timings), "in contact for 29 s only");
        tokio::time::sleep(Duration::from_secs(2)).await;
        contact.record_ok(Instant::now());
        assert!(contact.may_rescue(&timings));
        contact.record_failure();
        assert!(!contact.may_rescue(&timings), "not during an outage");
        tokio::time::sleep(Duration::from_secs(5)).await;
        contact.record_ok(Instant::now());
        assert!(
            !contact.may_rescue(&timings),
            "the outage restarted the count"
        );
        tokio::time::sleep(Duration::from_secs(30)).await;
        contact.record_ok(Instant::now());
        assert!(contact.may_rescue(&timings));
    }
}

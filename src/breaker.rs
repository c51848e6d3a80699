//! The failed-launch circuit breaker: a worker whose launches keep failing at start stops
//! claiming instead of walking down the queue failing every job.
//!
//! A launch "failed at start" when its process could not be executed, or when it ended in
//! failure within a short window without the job's own system having seen it start (for
//! Akeneo: the execution row still STARTING). After `threshold` of those in a row the
//! breaker opens: no claims for a capped, doubling delay. When the delay is over, the caller
//! checks the environment again (the Akeneo preflight) and lets one launch through; one more
//! failure at start opens the breaker again for longer, a launch that takes effect closes it.

use std::time::{Duration, Instant};

use crate::store::JobId;

const FIRST_OPEN: Duration = Duration::from_secs(10);
const MAX_OPEN: Duration = Duration::from_secs(300);

/// One launch that failed at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedLaunch {
    pub job: JobId,
    pub reason: String,
}

/// Why the breaker opened, for the journal and STATUS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trip {
    pub failures: Vec<FailedLaunch>,
    pub closed_for: Duration,
}

impl Trip {
    /// `3 launches in a row failed at start (jobs 12, 13, 14; the last: exit code 255)`.
    pub fn describe(&self) -> String {
        let ids: Vec<String> = self.failures.iter().map(|f| f.job.to_string()).collect();
        let last = self.failures.last().map_or("", |f| f.reason.as_str());
        format!(
            "{} launches in a row failed at start (jobs {}; the last: {last})",
            self.failures.len(),
            ids.join(", ")
        )
    }
}

#[derive(Debug)]
pub struct LaunchBreaker {
    /// Failures in a row that open the breaker; 0 disables it.
    threshold: u32,
    /// A failure later than this after the start is the job's own, not the launch's.
    window: Duration,
    failures: Vec<FailedLaunch>,
    trips: u32,
    open_until: Option<Instant>,
}

impl LaunchBreaker {
    pub fn new(threshold: u32, window: Duration) -> LaunchBreaker {
        LaunchBreaker {
            threshold,
            window,
            failures: Vec::new(),
            trips: 0,
            open_until: None,
        }
    }

    /// A breaker that never opens (the native transport: a job that fails fast is ordinary).
    pub fn disabled() -> LaunchBreaker {
        Self::new(0, Duration::ZERO)
    }

    pub fn is_enabled(&self) -> bool {
        self.threshold > 0
    }

    /// Whether a failure after `ran_for` can be the launch's fault.
    pub fn within_window(&self, ran_for: Duration) -> bool {
        ran_for <= self.window
    }

    /// A launch took effect: the environment works.
    pub fn record_success(&mut self) {
        self.failures.clear();
        self.trips = 0;
    }

    /// A launch failed at start; returns the trip when this opens the breaker.
    pub fn record_failure(&mut self, failure: FailedLaunch) -> Option<Trip> {
        if !self.is_enabled() {
            return None;
        }
        self.failures.push(failure);
        // After a trip one probe launch is let through: its failure opens the breaker again.
        let opens = self.trips > 0 || self.failures.len() >= self.threshold as usize;
        if !opens {
            return None;
        }
        let closed_for = (FIRST_OPEN * 2u32.saturating_pow(self.trips.min(5))).min(MAX_OPEN);
        self.trips += 1;
        self.open_until = Some(Instant::now() + closed_for);
        let keep_from = self.failures.len().saturating_sub(self.threshold as usize);
        let trip = Trip {
            failures: self.failures[keep_from..].to_vec(),
            closed_for,
        };
        Some(trip)
    }

    /// How long claims stay blocked; `None` when claiming is allowed.
    pub fn blocked_for(&self) -> Option<Duration> {
        let left = self.open_until?.saturating_duration_since(Instant::now());
        Some(left)
    }

    /// The open delay is over and the environment checked out: let one launch through.
    pub fn allow_probe(&mut self) {
        self.open_until = None;
    }

    /// How many launches have failed at start in a row.
    pub fn failures_in_a_row(&self) -> usize {
        self.failures.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(job: JobId) -> FailedLaunch {
        FailedLaunch {
            job,
            reason: format!("exit code 255 ({job})"),
        }
    }

    #[test]
    fn opens_after_the_threshold_and_reopens_on_a_failed_probe() {
        let mut breaker = LaunchBreaker::new(3, Duration::from_secs(30));
        assert_eq!(breaker.record_failure(failure(1)), None);
        assert_eq!(breaker.record_failure(failure(2)), None);
        assert_eq!(breaker.blocked_for(), None);
        let trip = breaker.record_failure(failure(3)).unwrap();
        assert_eq!(trip.closed_for, FIRST_OPEN);
        assert_eq!(
            trip.describe(),
            "3 launches in a row failed at start (jobs 1, 2, 3; the last: exit code 255 (3))"
        );
        assert!(breaker.blocked_for().is_some());
        breaker.allow_probe();
        assert_eq!(breaker.blocked_for(), None);
        let again = breaker.record_failure(failure(4)).unwrap();
        assert_eq!(again.closed_for, FIRST_OPEN * 2);
        assert_eq!(again.failures.len(), 3);
    }

    #[test]
    fn a_launch_that_takes_effect_closes_it() {
        let mut breaker = LaunchBreaker::new(2, Duration::from_secs(30));
        breaker.record_failure(failure(1));
        breaker.record_success();
        assert_eq!(breaker.record_failure(failure(2)), None);
        assert_eq!(breaker.failures_in_a_row(), 1);
    }

    #[test]
    fn the_open_delay_is_capped() {
        let mut breaker = LaunchBreaker::new(1, Duration::from_secs(30));
        let mut last = Duration::ZERO;
        for job in 0..12 {
            last = breaker.record_failure(failure(job)).unwrap().closed_for;
            breaker.allow_probe();
        }
        assert_eq!(last, MAX_OPEN);
    }

    #[test]
    fn disabled_never_opens() {
        let mut breaker = LaunchBreaker::disabled();
        for job in 0..10 {
            assert_eq!(breaker.record_failure(failure(job)), None);
        }
    }
}

//! How a claimed job ended, from the worker's side: one value from the moment its process
//! ends (or the worker learns it cannot run) to the store write that records it.
//!
//! The runner makes it, the executor logs it and feeds the launch breaker with it, the
//! completer turns it into exactly one store call: a final result ([`QueueStore::complete`]),
//! a give-back ([`QueueStore::release`]), or a put-back of a job that never started
//! ([`QueueStore::release_unstarted`]).
//!
//! [`QueueStore::complete`]: crate::store::QueueStore::complete
//! [`QueueStore::release`]: crate::store::QueueStore::release
//! [`QueueStore::release_unstarted`]: crate::store::QueueStore::release_unstarted

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use tracing::{info, warn};

use crate::store::{Completion, JobResult, ResourceUsage, Timestamp};
use crate::units::format_duration;

#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    /// The job's process ended by itself, or was ended by its timeout: the result is final.
    Finished {
        result: JobResult,
        /// The last lines of its output.
        output: Vec<String>,
        ran_for: Duration,
        /// Its peak memory and CPU time, when measured.
        usage: ResourceUsage,
    },
    /// The job cannot run, now or ever (its payload or command template does not make a
    /// launch): failed, final, no process was started.
    Refused { reason: String },
    /// The worker ended the job early, or gave it back before starting it (a stop, the
    /// fence, a lost lease, a start it could not record): back to its queue while it has
    /// attempts left.
    Interrupted {
        reason: String,
        output: Vec<String>,
        ran_for: Duration,
    },
    /// Its process could not be started (the program could not be executed): put back in
    /// its queue where the store allows it, failed elsewhere.
    NotStarted { reason: String },
}

impl JobOutcome {
    /// The outcome of a process that exited by itself with `status` (none: it could not be
    /// reaped).
    pub fn exited(status: Option<ExitStatus>, output: Vec<String>, ran_for: Duration) -> Self {
        let result = match status.map(|s| (s.code(), s.signal())) {
            Some((Some(0), _)) => JobResult::Succeeded,
            Some((Some(code), _)) => failed(Some(code), None, format!("exit code {code}")),
            Some((None, Some(number))) => failed(
                None,
                Some(number),
                format!("killed by signal {}", signal_name(number)),
            ),
            Some((None, None)) | None => failed(Some(-1), None, "exit code -1".into()),
        };
        JobOutcome::Finished {
            result,
            output,
            ran_for,
            usage: ResourceUsage::default(),
        }
    }

    /// The outcome of a process its timeout ended; `status` is how it died.
    pub fn timed_out(status: Option<ExitStatus>, output: Vec<String>, ran_for: Duration) -> Self {
        let exit_code = status.and_then(|s| s.code());
        let signal = status.and_then(|s| s.signal());
        JobOutcome::Finished {
            result: failed(exit_code, signal, "timeout".into()),
            output,
            ran_for,
            usage: ResourceUsage::default(),
        }
    }

    /// Adds what the kernel measured while the job ran: its peak memory and CPU time, and
    /// how many of its processes the OOM killer took, which a failure's reason then says
    /// (an OOM kill is SIGKILL or exit code 137, otherwise unexplained).
    pub fn measured(mut self, measured: ResourceUsage, oom_kills: u64) -> Self {
        if let JobOutcome::Finished { result, usage, .. } = &mut self {
            *usage = measured;
            if let (JobResult::Failed { reason, .. }, 1..) = (result, oom_kills) {
                reason.push_str(&format!(
                    " (the kernel's OOM killer killed {oom_kills} process(es) of this job)"
                ));
            }
        }
        self
    }

    /// The one store write that records this outcome.
    pub fn record(&self) -> Record<'_> {
        match self {
            JobOutcome::Finished {
                result,
                output,
                usage,
                ..
            } => Record::Complete(Completion {
                result: result.clone(),
                output: output.clone(),
                finished_at: Timestamp::now(),
                usage: *usage,
            }),
            JobOutcome::Refused { reason } => Record::Complete(refusal(reason)),
            JobOutcome::Interrupted { reason, .. } => Record::GiveBack(reason),
            JobOutcome::NotStarted { reason } => Record::PutBack(reason),
        }
    }

    /// How long the job's process ran, when one ran.
    pub fn ran_for(&self) -> Option<Duration> {
        match self {
            JobOutcome::Finished { ran_for, .. } | JobOutcome::Interrupted { ran_for, .. } => {
                Some(*ran_for)
            }
            JobOutcome::Refused { .. } | JobOutcome::NotStarted { .. } => None,
        }
    }

    /// The journal line that ends the job's story, with `MESSAGE_ID`, `JOB_RESULT` and a
    /// numeric `JOB_DURATION_USEC` for `journalctl` queries.
    pub fn log(&self) {
        use crate::logging::message_id::{JOB_FAILED, JOB_FINISHED};
        let duration = self.ran_for().map(format_duration).unwrap_or_default();
        let usec = self.ran_for().map_or(0, |d| d.as_micros() as u64);
        match self {
            JobOutcome::Finished {
                result: JobResult::Succeeded,
                ..
            } => info!(
                message_id = JOB_FINISHED,
                job_result = "succeeded",
                job_duration_usec = usec,
                duration = %duration,
                "job finished"
            ),
            JobOutcome::Finished {
                result: JobResult::Cancelled { reason },
                ..
            } => warn!(
                message_id = JOB_FINISHED,
                job_result = "cancelled",
                job_duration_usec = usec,
                duration = %duration,
                "job cancelled: {reason}"
            ),
            JobOutcome::Finished {
                result: JobResult::Failed { reason, .. },
                ..
            } => warn!(
                message_id = JOB_FAILED,
                job_result = "failed",
                job_duration_usec = usec,
                duration = %duration,
                "job finished: {reason}"
            ),
            JobOutcome::Refused { reason } => warn!(
                message_id = JOB_FAILED,
                job_result = "failed",
                "job failed before it started: {reason}"
            ),
            JobOutcome::Interrupted { reason, .. } => warn!(
                message_id = JOB_FINISHED,
                job_result = "interrupted",
                job_duration_usec = usec,
                duration = %duration,
                "job interrupted: {reason}"
            ),
            JobOutcome::NotStarted { reason } => warn!(
                message_id = JOB_FAILED,
                job_result = "not started",
                "job not started: {reason}"
            ),
        }
    }
}

/// How an outcome is written: exactly one of the store's three ways out of `running`.
#[derive(Debug, Clone, PartialEq)]
pub enum Record<'a> {
    /// A final result ([`QueueStore::complete`]).
    ///
    /// [`QueueStore::complete`]: crate::store::QueueStore::complete
    Complete(Completion),
    /// Back to the queue while the job has attempts left, failed with the reason otherwise
    /// ([`QueueStore::release`]).
    ///
    /// [`QueueStore::release`]: crate::store::QueueStore::release
    GiveBack(&'a str),
    /// The job never started: back to its queue, its attempt refunded, where the store
    /// allows it ([`QueueStore::release_unstarted`]); a [`refusal`] elsewhere.
    ///
    /// [`QueueStore::release_unstarted`]: crate::store::QueueStore::release_unstarted
    PutBack(&'a str),
    /// A failure that goes back to its queue, due after a delay, with the attempt recorded
    /// in its history ([`QueueStore::retry_later`]).
    ///
    /// [`QueueStore::retry_later`]: crate::store::QueueStore::retry_later
    Retry {
        completion: &'a Completion,
        delay: std::time::Duration,
        entry: &'a str,
    },
}

/// The final record of a job that failed without a process: no output, no exit status.
pub fn refusal(reason: &str) -> Completion {
    Completion {
        result: failed(None, None, reason.to_string()),
        output: Vec::new(),
        finished_at: Timestamp::now(),
        usage: ResourceUsage::default(),
    }
}

fn failed(exit_code: Option<i32>, signal: Option<i32>, reason: String) -> JobResult {
    JobResult::Failed {
        exit_code,
        signal,
        reason,
    }
}

fn signal_name(number: i32) -> String {
    nix::sys::signal::Signal::try_from(number)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| number.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit_status(raw: i32) -> Option<ExitStatus> {
        Some(ExitStatus::from_raw(raw))
    }

    #[test]
    fn exits_and_signals_become_results() {
        let of = |status| match JobOutcome::exited(status, vec![], Duration::ZERO) {
            JobOutcome::Finished { result, .. } => result,
            other => panic!("{other:?}"),
        };
        assert_eq!(of(exit_status(0)), JobResult::Succeeded);
        assert_eq!(
            of(exit_status(3 << 8)),
            failed(Some(3), None, "exit code 3".into())
        );
        assert_eq!(
            of(exit_status(9)),
            failed(None, Some(9), "killed by signal SIGKILL".into())
        );
        assert_eq!(of(None), failed(Some(-1), None, "exit code -1".into()));
    }

    #[test]
    fn each_outcome_is_written_one_way() {
        let refused = JobOutcome::Refused {
            reason: "invalid payload".into(),
        };
        let Record::Complete(completion) = refused.record() else {
            panic!("a refusal is final");
        };
        assert_eq!(
            completion.result,
            failed(None, None, "invalid payload".into())
        );
        let given_back = JobOutcome::Interrupted {
            reason: "stop".into(),
            output: vec![],
            ran_for: Duration::ZERO,
        };
        assert_eq!(given_back.record(), Record::GiveBack("stop"));
        let not_started = JobOutcome::NotStarted {
            reason: "no such file".into(),
        };
        assert_eq!(not_started.record(), Record::PutBack("no such file"));
        let timed_out = JobOutcome::timed_out(exit_status(9), vec![], Duration::ZERO);
        assert!(matches!(timed_out.record(), Record::Complete(_)));
    }
}

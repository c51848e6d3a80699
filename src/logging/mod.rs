//! Log output. Under systemd, when stderr is the journal, lines go to journald with
//! structured fields (`JOB_ID`, `JOB_QUEUE`, `JOB_CODE` on every line about a job,
//! `WORKER_INSTANCE` on every line), so `journalctl JOB_ID=42` shows exactly one job.
//! Otherwise they are human-readable text: on stdout for the daemon, on stderr for one-shot
//! commands (whose stdout is data, such as the id `push` prints). Never both, and never ANSI
//! colours into a file or pipe.
//!
//! Writing to the journal never blocks the worker's thread ([`journal`]).

mod journal;

/// Journal `MESSAGE_ID`s of the job's milestones, explained by the catalog the package
/// installs (`systemd/pim-job-queue.catalog`, shown by `journalctl -x`), so that
/// `journalctl MESSAGE_ID=…` finds every failed job of every instance.
pub mod message_id {
    pub const JOB_STARTED: &str = "c4a51d5e82be4ba9ad5a6e6b8115bd7f";
    pub const JOB_FINISHED: &str = "6ac29e07ec8f45c1b58f299e4e118cbd";
    pub const JOB_FAILED: &str = "4d68574683334192a1ac2fe9b81b7ed2";
    pub const JOB_RESCUED: &str = "4b5bc487d06f424f8904d1ae7770567f";
    pub const ALL: [&str; 4] = [JOB_STARTED, JOB_FINISHED, JOB_FAILED, JOB_RESCUED];
}

use std::io::IsTerminal;
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

/// Where text log lines go when the journal is not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    Stderr,
}

/// The filter for a verbosity: `-q` warnings only, default info, `-v` debug, `-vv` trace.
/// `PIM_JOB_QUEUE_LOG` (an `EnvFilter` directive) overrides it.
pub fn filter_for(verbosity: i8) -> EnvFilter {
    if let Ok(filter) = EnvFilter::try_from_env("PIM_JOB_QUEUE_LOG") {
        return filter;
    }
    let level = match verbosity {
        i8::MIN..=-1 => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    EnvFilter::new(format!("warn,pim_job_queue={level}"))
}

/// Sets up logging; `instance` is recorded as `WORKER_INSTANCE` in the journal.
pub fn init(verbosity: i8, target: LogTarget, instance: Option<&str>) {
    let journal_failure = if libsystemd::logging::connected_to_journal() {
        match journald_layer(instance) {
            Ok(layer) => {
                let _ = tracing_subscriber::registry()
                    .with(filter_for(verbosity))
                    .with(layer)
                    .try_init();
                return;
            }
            Err(error) => Some(error),
        }
    } else {
        None
    };
    init_text(verbosity, target);
    if let Some(error) = journal_failure {
        tracing::warn!("stderr is the journal but its socket is unusable ({error}); logging text");
    }
}

fn journald_layer(instance: Option<&str>) -> std::io::Result<journal::JournalLayer> {
    journal::JournalLayer::new(
        "pim-job-queue",
        &[("WORKER_INSTANCE", instance.unwrap_or("-"))],
    )
}

/// Waits a little for log entries still on their way to the journal; called before the
/// process exits, so its last words are not lost.
pub fn flush() {
    journal::flush(Duration::from_secs(2));
}

fn init_text(verbosity: i8, target: LogTarget) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter_for(verbosity))
        .with_target(false);
    let _ = match target {
        LogTarget::Stdout => builder
            .with_ansi(std::io::stdout().is_terminal())
            .with_writer(std::io::stdout)
            .try_init(),
        LogTarget::Stderr => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .try_init(),
    };
}

#[cfg(test)]
mod catalog_tests {
    /// Every milestone's id has an entry in the catalog the package installs.
    #[test]
    fn every_message_id_is_in_the_catalog() {
        let catalog = include_str!("../../systemd/pim-job-queue.catalog");
        for id in super::message_id::ALL {
            assert_eq!(id.len(), 32, "{id}");
            assert!(catalog.contains(&format!("-- {id}\n")), "{id}");
        }
    }
}

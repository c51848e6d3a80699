//! Log output: human-readable lines, to stdout for the daemon and to stderr for one-shot
//! commands (whose stdout is data, such as the id `push` prints).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Where the log lines go.
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

pub fn init(verbosity: i8, target: LogTarget) {
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

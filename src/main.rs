//! The `pim-job-queue` binary: parse the command line, set up logging, run one command on a
//! single-threaded runtime, and turn its result into a sysexits-style exit code.
//!
//! The runtime is single-threaded on purpose: one job at a time needs no more, it keeps the
//! idle worker small, and `PR_SET_PDEATHSIG` fires when the *thread* that forked the child
//! ends, so every child must be forked by the thread that lives as long as the process.

use clap::Parser;
use clap::error::ErrorKind;

use pim_job_queue::cli::{Cli, Command};
use pim_job_queue::commands::{self, Context};
use pim_job_queue::exit::ExitCode;
use pim_job_queue::logging::{self, LogTarget};
use pim_job_queue::notify::Notifier;
use std::sync::Arc;

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            let code = match error.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
                _ => ExitCode::Usage.code(),
            };
            std::process::exit(code);
        }
    };
    if let Command::GenerateAssets { dir } = &cli.command {
        // Packaging-time only: needs neither a config nor a database.
        if let Err(failure) = commands::generate_assets(dir) {
            eprintln!("pim-job-queue: {}", failure.message);
            std::process::exit(failure.exit.code());
        }
        return;
    }
    let is_daemon = matches!(cli.command, Command::Consume(_));
    if is_daemon {
        hide_from_jobs();
    } else {
        restore_default_sigpipe();
    }
    let target = if is_daemon {
        LogTarget::Stdout
    } else {
        LogTarget::Stderr
    };
    let instance = match &cli.command {
        Command::Consume(args) => args.instance.as_deref(),
        _ => None,
    };
    logging::init(cli.verbosity(), target, instance);
    // The watchdog settings are read before the runtime starts any thread.
    let notifier = Arc::new(if is_daemon {
        Notifier::from_env()
    } else {
        Notifier::disabled()
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build the async runtime");
    let result = runtime.block_on(async {
        let context = Context::load(&cli)?;
        commands::run(&cli, &context, notifier).await
    });
    if let Err(failure) = result {
        // The daemon's log is its voice (the journal, later); a one-shot command speaks to
        // the terminal. Saying it in both would print it twice under systemd.
        if is_daemon {
            tracing::error!("{}", failure.message);
        } else if !failure.is_already_said() {
            eprintln!("pim-job-queue: {}", failure.message);
        }
        logging::flush();
        std::process::exit(failure.exit.code());
    }
    logging::flush();
}

/// A job runs as the worker's user, so it could read the worker's `/proc/PID/environ` (the
/// database URL the worker withholds from it) or attach a debugger. Not dumpable, those
/// files belong to root. A child's own exec makes it dumpable again: jobs are unaffected.
fn hide_from_jobs() {
    if let Err(error) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("pim-job-queue: cannot set PR_SET_DUMPABLE: {error}");
    }
}

/// One-shot commands end quietly when their reader goes away (`pim-job-queue jobs | head`),
/// as Unix tools do; Rust's runtime ignores SIGPIPE, which would turn that into a panic.
/// The daemon keeps ignoring it: a closed log pipe must not kill a worker mid-job.
fn restore_default_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: called before any thread exists; SIG_DFL installs no handler code.
    unsafe {
        let _ = signal(Signal::SIGPIPE, SigHandler::SigDfl);
    }
}

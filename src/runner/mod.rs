//! Runs one job as a child process and watches it.
//!
//! The child gets its own process group, so a timeout or an abort can end the job and
//! everything it started with one `killpg`; it gets `PR_SET_PDEATHSIG`, so it dies with the
//! worker even when the worker is killed with SIGKILL. No shell is involved: the argv is
//! executed as given. Both output streams are read line by line, logged as the job's output,
//! and the last lines are kept for the job's record. [`spawn`] starts the process without
//! copying the worker (a `posix_spawn`-style clone with the death signal added).

mod oom;
mod spawn;

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::memfd::MemFdCreateFlag;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::unix::pipe;
use tokio::process::Command;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::outcome::JobOutcome;

/// How many output lines are kept with the job's record.
pub const OUTPUT_TAIL_LINES: usize = 50;
/// Longer output lines are cut, in the record and in the log.
const MAX_LINE_BYTES: usize = 4096;
/// How long to wait for the output pipes to close once the job's processes are gone; a
/// process that left the group (setsid) may still hold them.
const OUTPUT_DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Variables the worker must not pass on: systemd's notify and watchdog protocol belongs to
/// the worker alone, and the database URL may hold a password.
const WITHHELD_ENV: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "PIM_JOB_QUEUE_DATABASE_URL",
    "CREDENTIALS_DIRECTORY",
];

/// Everything needed to start one job.
#[derive(Debug, Clone)]
pub struct JobLaunch {
    pub argv: Vec<String>,
    pub working_directory: Option<PathBuf>,
    /// Configured variables, then the job's own `PIM_JOB_*` variables.
    pub env: BTreeMap<String, String>,
    /// Variables of the worker's environment the job must not see.
    pub remove_env: Vec<String>,
    pub timeout: Option<Duration>,
    pub kill_grace: Duration,
    /// Send the first SIGTERM to the main process only, and to the whole group only if it
    /// has not ended after half of `kill_grace`: a supervisor process (Akeneo's watchdog)
    /// forwards the signal to its job itself, which a group signal would reach twice.
    pub signal_leader_first: bool,
    /// Text the job can read on file descriptor [`PAYLOAD_FD`] (the payload, which may be
    /// too large for the environment).
    pub payload_on_fd: Option<String>,
}

/// The descriptor a job reads its payload from: `PIM_JOB_PAYLOAD_FILE=/dev/fd/3`.
pub const PAYLOAD_FD: i32 = 3;

/// A started job.
pub struct RunningJob {
    child: spawn::ChildProcess,
    group: Pid,
    started: Instant,
    tail: Arc<Mutex<VecDeque<String>>>,
    readers: Vec<JoinHandle<()>>,
    timeout: Option<Duration>,
    signal_leader_first: bool,
    /// The OOM killer's count in this worker's cgroup when the job started.
    oom_kills_at_start: Option<u64>,
}

/// What a job left behind once its main process is gone.
struct Ended {
    output: Vec<String>,
    ran_for: Duration,
    usage: crate::store::ResourceUsage,
    /// Processes the OOM killer killed while the job ran.
    oom_kills: u64,
}

/// Starts the job. Its output is logged inside the caller's current tracing span.
pub fn start(launch: &JobLaunch) -> io::Result<RunningJob> {
    let payload = launch
        .payload_on_fd
        .as_deref()
        .map(payload_fd)
        .transpose()?;
    let program = spawn::Program {
        argv: &launch.argv,
        env: job_environment(launch),
        working_directory: launch.working_directory.as_deref(),
        payload: payload.as_ref().map(|fd| fd.as_raw_fd()),
        payload_target: PAYLOAD_FD,
    };
    let oom_kills_at_start = oom::kills_so_far();
    let spawned = spawn::spawn(&program)?;
    drop(payload); // the child has its own copy now
    let group = spawned.process.pid();
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(OUTPUT_TAIL_LINES)));
    let span = tracing::Span::current();
    let stdout = pipe::Receiver::from_owned_fd(spawned.stdout)?;
    let stderr = pipe::Receiver::from_owned_fd(spawned.stderr)?;
    let readers = vec![
        tokio::spawn(read_lines(stdout, Stream::Stdout, tail.clone()).instrument(span.clone())),
        tokio::spawn(read_lines(stderr, Stream::Stderr, tail.clone()).instrument(span)),
    ];
    Ok(RunningJob {
        child: spawned.process,
        group,
        started: Instant::now(),
        tail,
        readers,
        timeout: launch.timeout,
        signal_leader_first: launch.signal_leader_first,
        oom_kills_at_start,
    })
}

/// The job's environment: the worker's, without what it must not pass on (see
/// [`WITHHELD_ENV`]) and the variables `remove_env` names, with the job's own added.
fn job_environment(launch: &JobLaunch) -> Vec<(OsString, OsString)> {
    let mut env: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    for name in WITHHELD_ENV {
        env.remove(std::ffi::OsStr::new(name));
    }
    for name in &launch.remove_env {
        env.remove(std::ffi::OsStr::new(name));
    }
    for (name, value) in &launch.env {
        env.insert(name.into(), value.into());
    }
    env.into_iter().collect()
}

/// A helper command (see [`capture`]), isolated as a job is: its own process group, the
/// job's environment, and death with the worker. No shell. Jobs themselves start through
/// [`spawn`], which does the same without copying the worker; helpers are rare enough for
/// std's `fork`.
fn command_for(launch: &JobLaunch) -> Command {
    let mut command = Command::new(&launch.argv[0]);
    command
        .args(&launch.argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .env_clear()
        .envs(job_environment(launch));
    if let Some(dir) = &launch.working_directory {
        command.current_dir(dir);
    }
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs between fork and exec; prctl and getppid are async-signal-safe
    // system calls and nothing here allocates or takes a lock.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            // The worker may have died before the prctl: then nobody would signal us.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::other("the worker exited while the job started"));
            }
            Ok(())
        });
    }
    command
}

/// An anonymous in-memory file holding `text`, positioned at its start.
fn payload_fd(text: &str) -> io::Result<OwnedFd> {
    use std::io::{Seek, Write};
    let fd = nix::sys::memfd::memfd_create(c"pim-job-payload", MemFdCreateFlag::MFD_CLOEXEC)
        .map_err(io::Error::from)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(text.as_bytes())?;
    file.rewind()?;
    Ok(OwnedFd::from(file))
}

/// What a short helper command (not a job) printed, for checks such as the Akeneo preflight.
#[derive(Debug)]
pub struct Captured {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `launch` to completion with the same isolation as a job, and returns its output;
/// its process group is killed when `limit` runs out.
pub async fn capture(launch: &JobLaunch, limit: Duration) -> io::Result<Captured> {
    let child = command_for(launch).spawn()?;
    let group = child.id().map(|pid| Pid::from_raw(pid as i32));
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(output) => {
            let output = output?;
            Ok(Captured {
                status: output.status,
                stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            })
        }
        Err(_) => {
            if let Some(group) = group {
                let _ = killpg(group, Signal::SIGKILL);
            }
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {}", humantime::format_duration(limit)),
            ))
        }
    }
}

impl RunningJob {
    pub fn pid(&self) -> Pid {
        self.group
    }

    /// How long the job has run.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// When the configured timeout runs out, if there is one.
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        self.timeout.map(|limit| (self.started + limit).into())
    }

    /// Resolves when the job's main process exits. Cancel-safe, so it can sit in a
    /// `select!` loop beside the worker's other duties.
    pub async fn exited(&mut self) -> Option<ExitStatus> {
        self.child.wait().await.ok()
    }

    /// The job's main process exited by itself (`status`, as [`RunningJob::exited`] gave it).
    pub async fn exited_with(self, status: Option<ExitStatus>) -> JobOutcome {
        let ended = self.conclude().await;
        JobOutcome::exited(status, ended.output, ended.ran_for)
            .measured(ended.usage, ended.oom_kills)
    }

    /// The timeout ran out and [`RunningJob::end_group`] ended the job with `status`.
    pub async fn timed_out(self, status: Option<ExitStatus>) -> JobOutcome {
        let ended = self.conclude().await;
        JobOutcome::timed_out(status, ended.output, ended.ran_for)
            .measured(ended.usage, ended.oom_kills)
    }

    /// The worker ended the job (with [`RunningJob::end_group`]) because an operator
    /// cancelled it: a final result.
    pub async fn cancelled(self, reason: String) -> JobOutcome {
        let ended = self.conclude().await;
        JobOutcome::Finished {
            result: crate::store::JobResult::Cancelled { reason },
            output: ended.output,
            ran_for: ended.ran_for,
            usage: ended.usage,
        }
    }

    /// The worker ended the job (with [`RunningJob::end_group`]) before it finished.
    pub async fn interrupted(self, reason: &str) -> JobOutcome {
        let ended = self.conclude().await;
        JobOutcome::Interrupted {
            reason: reason.to_string(),
            output: ended.output,
            ran_for: ended.ran_for,
        }
    }

    /// Cleans up once the main process is gone (leftover processes, output); returns the
    /// last lines of output, how long the job ran and what the kernel measured.
    async fn conclude(mut self) -> Ended {
        let ran_for = self.started.elapsed();
        self.kill_leftovers();
        self.drain_output().await;
        let output = self
            .tail
            .lock()
            .expect("tail lock")
            .iter()
            .cloned()
            .collect();
        let oom_kills = match (self.oom_kills_at_start, oom::kills_so_far()) {
            (Some(before), Some(after)) => after.saturating_sub(before),
            _ => 0,
        };
        Ended {
            output,
            ran_for,
            usage: self.child.usage(),
            oom_kills,
        }
    }

    /// SIGTERM (to the main process first when it forwards signals itself, then to the whole
    /// group), then SIGKILL to the group once `grace` has passed.
    pub async fn end_group(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut left = grace;
        if self.signal_leader_first {
            let _ = nix::sys::signal::kill(self.group, Signal::SIGTERM);
            let first = grace / 2;
            if let Ok(status) = tokio::time::timeout(first, self.child.wait()).await {
                return status.ok();
            }
            tracing::warn!("the job's main process is still running: SIGTERM to its group");
            left = grace - first;
        }
        let _ = killpg(self.group, Signal::SIGTERM);
        match tokio::time::timeout(left, self.child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                tracing::warn!(?grace, "job ignored SIGTERM: sending SIGKILL");
                let _ = killpg(self.group, Signal::SIGKILL);
                self.child.wait().await.ok()
            }
        }
    }

    /// A job's processes must not outlive it: whatever it left running in its group goes.
    fn kill_leftovers(&self) {
        if killpg(self.group, Signal::SIGKILL).is_ok() {
            tracing::warn!("the job left processes behind; they were killed");
        }
    }

    async fn drain_output(&mut self) {
        for reader in &mut self.readers {
            if tokio::time::timeout(OUTPUT_DRAIN_LIMIT, &mut *reader)
                .await
                .is_err()
            {
                tracing::warn!("a process outside the job's group holds its output open");
                reader.abort();
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

async fn read_lines(
    pipe: impl AsyncRead + Unpin,
    stream: Stream,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut reader = BufReader::new(pipe);
    let mut line = LineBuffer::default();
    loop {
        let completed = match reader.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(chunk) => {
                let completed = line.feed(chunk);
                let read = chunk.len();
                reader.consume(read);
                completed
            }
        };
        for text in completed {
            record_line(text, stream, &tail);
        }
    }
    if let Some(text) = line.finish() {
        record_line(text, stream, &tail);
    }
}

fn record_line(line: String, stream: Stream, tail: &Mutex<VecDeque<String>>) {
    match stream {
        Stream::Stdout => tracing::info!(stream = "stdout", "{line}"),
        Stream::Stderr => tracing::warn!(stream = "stderr", "{line}"),
    }
    let mut tail = tail.lock().expect("tail lock");
    if tail.len() == OUTPUT_TAIL_LINES {
        tail.pop_front();
    }
    tail.push_back(line);
}

/// Splits output into lines as a terminal shows them, holding at most [`MAX_LINE_BYTES`]
/// of one line whatever the job writes: a multi-gigabyte line costs no memory, and a lone
/// `\r` (a progress bar) starts the line over instead of growing it.
#[derive(Default)]
struct LineBuffer {
    bytes: Vec<u8>,
    truncated: bool,
    carriage_return: bool,
}

impl LineBuffer {
    /// Takes in a chunk of output; returns the lines it completed.
    fn feed(&mut self, chunk: &[u8]) -> Vec<String> {
        let mut completed = Vec::new();
        for &byte in chunk {
            match byte {
                b'\n' => {
                    completed.push(self.take());
                }
                b'\r' => self.carriage_return = true,
                _ => {
                    if std::mem::take(&mut self.carriage_return) {
                        self.bytes.clear();
                        self.truncated = false;
                    }
                    if self.bytes.len() < MAX_LINE_BYTES {
                        self.bytes.push(byte);
                    } else {
                        self.truncated = true;
                    }
                }
            }
        }
        completed
    }

    /// What is left when the pipe closes.
    fn finish(mut self) -> Option<String> {
        (!self.bytes.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> String {
        let line = clean_line(&self.bytes, self.truncated);
        self.bytes.clear();
        self.truncated = false;
        self.carriage_return = false;
        line
    }
}

/// One output line as text: invalid UTF-8 and NUL bytes replaced (PostgreSQL's text cannot
/// hold a NUL, and a result that cannot be written would leave the job running), a cut
/// marked.
fn clean_line(bytes: &[u8], truncated: bool) -> String {
    let mut line = String::from_utf8_lossy(bytes).replace('\0', "\u{fffd}");
    if truncated {
        line.push_str(" […]");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(chunks: &[&[u8]]) -> Vec<String> {
        let mut buffer = LineBuffer::default();
        let mut lines: Vec<String> = chunks.iter().flat_map(|c| buffer.feed(c)).collect();
        lines.extend(buffer.finish());
        lines
    }

    #[test]
    fn lines_are_cleaned() {
        assert_eq!(lines_of(&[b"hello\r\n"]), ["hello"]);
        assert_eq!(lines_of(&[b"caf\xc3", b"\xa9\n"]), ["café"]);
        assert_eq!(lines_of(&[b"bad \xff byte"]), ["bad \u{fffd} byte"]);
        assert_eq!(lines_of(&[b"a\0b\n"]), ["a\u{fffd}b"]);
    }

    #[test]
    fn a_line_is_capped_while_it_is_read() {
        let mut buffer = LineBuffer::default();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..64 {
            assert!(buffer.feed(&chunk).is_empty());
        }
        assert!(
            buffer.bytes.len() <= MAX_LINE_BYTES,
            "64 MiB held in {} bytes",
            buffer.bytes.len()
        );
        let lines = buffer.feed(b"\nnext\n");
        assert!(lines[0].ends_with(" […]") && lines[0].len() < MAX_LINE_BYTES + 10);
        assert_eq!(lines[1], "next");
    }

    #[test]
    fn a_carriage_return_starts_the_line_over() {
        assert_eq!(
            lines_of(&[b" 10%\r 20%\r", b"100%\ndone\n"]),
            ["100%", "done"]
        );
        assert_eq!(lines_of(&[b"0%\r50%\r99%"]), ["99%"]);
    }
}

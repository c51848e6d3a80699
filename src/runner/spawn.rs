//! Starting a job's process without copying the worker.
//!
//! A job needs two steps between clone and exec that `posix_spawn` cannot express:
//! `PR_SET_PDEATHSIG` (the job dies with the worker, even a `kill -9`ed one) and the check
//! that the worker is still its parent. std's `Command` falls back to `fork` as soon as a
//! `pre_exec` hook is set, and `fork` copies the worker's page tables for every job, then
//! faults its pages back in copy-on-write, while the worker waits. This does what glibc's
//! `posix_spawn` does instead, `clone(CLONE_VM | CLONE_VFORK)` on a stack of its own, with
//! those steps added: the child shares the worker's memory until it calls `execve`, and the
//! worker's thread is suspended until then. Measured on one SQLite worker draining
//! `/bin/true` jobs: a third less system time per job (see the README's benchmark).
//!
//! Between clone and exec the child may only make system calls: no allocation, no lock, no
//! thread-local (it shares the worker's memory and thread state). Everything it needs is
//! prepared beforehand in a [`Prepared`]: C strings, the descriptors, the signal mask.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::libc;
use nix::unistd::Pid;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::store::ResourceUsage;

/// What a job's process is started from.
pub struct Program<'a> {
    pub argv: &'a [String],
    /// Its whole environment, as `NAME=value`.
    pub env: Vec<(OsString, OsString)>,
    pub working_directory: Option<&'a Path>,
    /// Becomes the child's descriptor 3 when given.
    pub payload: Option<RawFd>,
    /// The descriptor number the payload gets.
    pub payload_target: RawFd,
}

/// A started job: its main process and the read ends of its output.
pub struct Spawned {
    pub process: ChildProcess,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Everything the child reads between clone and exec, built before the clone.
struct Prepared {
    path: CString,
    /// The strings `argv_ptrs` points into, kept alive with it.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    /// The strings `envp_ptrs` points into, kept alive with it.
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    cwd: Option<CString>,
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    payload: Option<RawFd>,
    payload_target: RawFd,
    parent: libc::pid_t,
    /// The signal mask to restore in the child (the worker's, before it blocked all).
    mask: libc::sigset_t,
    /// The child's `errno` when a step failed; 0 when it reached `execve`.
    error: AtomicI32,
}

/// The child's stack: ample for the few system calls it makes.
const STACK_BYTES: usize = 64 * 1024;

/// Starts `program` in its own process group, with the worker as its death signal's
/// source, stdin on /dev/null and stdout/stderr on fresh pipes.
pub fn spawn(program: &Program<'_>) -> io::Result<Spawned> {
    let path = resolve(&program.argv[0], &program.env)?;
    let stdin = std::fs::File::open("/dev/null")?;
    let (stdout_read, stdout_write) = pipe()?;
    let (stderr_read, stderr_write) = pipe()?;
    let argv = c_strings(program.argv.iter().map(|arg| OsStr::new(arg.as_str())))?;
    let envp = c_strings(program.env.iter().map(|(name, value)| {
        let mut pair = name.clone();
        pair.push("=");
        pair.push(value);
        pair
    }))?;
    let cwd = program
        .working_directory
        .map(|dir| c_string(dir.as_os_str()))
        .transpose()?;
    let mut prepared = Prepared {
        path,
        argv_ptrs: null_terminated(&argv),
        _argv: argv,
        envp_ptrs: null_terminated(&envp),
        _envp: envp,
        cwd,
        stdin: stdin.as_raw_fd(),
        stdout: stdout_write.as_raw_fd(),
        stderr: stderr_write.as_raw_fd(),
        payload: program.payload,
        payload_target: program.payload_target,
        parent: std::process::id() as libc::pid_t,
        // SAFETY: an all-zero sigset_t is a valid (empty) set; it is filled below.
        mask: unsafe { std::mem::zeroed() },
        error: AtomicI32::new(0),
    };
    let pid = clone_and_exec(&mut prepared)?;
    let failed = prepared.error.load(Ordering::SeqCst);
    if failed != 0 {
        reap_blocking(pid);
        return Err(io::Error::from_raw_os_error(failed));
    }
    Ok(Spawned {
        process: ChildProcess::new(pid)?,
        stdout: stdout_read,
        stderr: stderr_read,
    })
}

/// Clones the child with every signal blocked in this thread (so no handler of the worker
/// can run on the child's stack), and returns once it has called `execve` or exited.
fn clone_and_exec(prepared: &mut Prepared) -> io::Result<Pid> {
    let mut stack = vec![0u8; STACK_BYTES];
    // SAFETY: plain libc calls on valid pointers; the child runs `child_main` on its own
    // stack with `prepared`, which outlives it (CLONE_VFORK suspends this thread until the
    // child has exec'd or exited), and the mask is restored on every path.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut prepared.mask);
        let top = stack.as_mut_ptr().add(STACK_BYTES);
        let top = top.sub(top as usize % 16) as *mut libc::c_void;
        let pid = libc::clone(
            child_main,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            prepared as *mut Prepared as *mut libc::c_void,
        );
        let clone_error = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &prepared.mask, std::ptr::null_mut());
        if pid < 0 {
            return Err(clone_error);
        }
        Ok(Pid::from_raw(pid))
    }
}

/// The child, between clone and exec: system calls only.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Prepared` the parent passed, alive and unchanged while the
    // parent is suspended; only async-signal-safe system calls follow.
    unsafe {
        let prepared = &*(arg as *const Prepared);
        let fail = |prepared: &Prepared| -> libc::c_int {
            let errno = *libc::__errno_location();
            prepared.error.store(
                if errno == 0 { libc::EINVAL } else { errno },
                Ordering::SeqCst,
            );
            libc::_exit(127)
        };
        // The worker's handlers must not run here; exec keeps SIG_DFL and SIG_IGN as they
        // are, except that jobs get SIGPIPE's default (Rust ignores it in the worker).
        for signal in 1..=libc::SIGRTMAX() {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut old) != 0 {
                continue;
            }
            let handled = old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN;
            if handled || signal == libc::SIGPIPE {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
        if libc::sigprocmask(libc::SIG_SETMASK, &prepared.mask, std::ptr::null_mut()) != 0 {
            return fail(prepared);
        }
        for (from, to) in [
            (prepared.stdin, 0),
            (prepared.stdout, 1),
            (prepared.stderr, 2),
        ] {
            if !move_fd(from, to) {
                return fail(prepared);
            }
        }
        if let Some(payload) = prepared.payload
            && !move_fd(payload, prepared.payload_target)
        {
            return fail(prepared);
        }
        if libc::setpgid(0, 0) != 0 {
            return fail(prepared);
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            return fail(prepared);
        }
        // The worker may have died before the prctl: then nobody would signal us.
        if libc::getppid() != prepared.parent {
            *libc::__errno_location() = libc::ESRCH;
            return fail(prepared);
        }
        if let Some(dir) = &prepared.cwd
            && libc::chdir(dir.as_ptr()) != 0
        {
            return fail(prepared);
        }
        libc::execve(
            prepared.path.as_ptr(),
            prepared.argv_ptrs.as_ptr(),
            prepared.envp_ptrs.as_ptr(),
        );
        fail(prepared)
    }
}

/// Makes `from` the descriptor `to`, inherited across exec (dup2 clears close-on-exec on
/// the copy; when it already has that number, the flag is cleared instead).
///
/// # Safety
/// System calls only, for the child between clone and exec.
unsafe fn move_fd(from: RawFd, to: RawFd) -> bool {
    unsafe {
        if from == to {
            libc::fcntl(from, libc::F_SETFD, 0) == 0
        } else {
            libc::dup2(from, to) == to
        }
    }
}

/// The program to execute: a name with a slash as it is (relative to the job's working
/// directory), a bare name looked up in the job's `PATH`, as `execvp` would.
fn resolve(program: &str, env: &[(OsString, OsString)]) -> io::Result<CString> {
    if program.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    if program.contains('/') {
        return c_string(OsStr::new(program));
    }
    let path = env
        .iter()
        .find(|(name, _)| name == "PATH")
        .map(|(_, value)| value.clone())
        .unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if is_executable_file(&candidate) {
            return c_string(candidate.as_os_str());
        }
    }
    Err(io::Error::from_raw_os_error(libc::ENOENT))
}

fn is_executable_file(path: &Path) -> bool {
    path.is_file() && nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_ok()
}

fn c_string(text: &OsStr) -> io::Result<CString> {
    CString::new(text.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{text:?} contains a NUL byte"),
        )
    })
}

fn c_strings(texts: impl Iterator<Item = impl AsRef<OsStr>>) -> io::Result<Vec<CString>> {
    texts
        .map(|text| c_string(text.as_ref()))
        .collect::<io::Result<_>>()
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// A pipe, both ends close-on-exec: (read, write).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((read, write))
}

/// Linux reports `ru_maxrss` in kibibytes.
fn usage_of(rusage: &libc::rusage) -> ResourceUsage {
    let micros = |time: libc::timeval| time.tv_sec * 1_000_000 + time.tv_usec;
    ResourceUsage {
        peak_rss_bytes: Some(rusage.ru_maxrss * 1024),
        cpu_usec: Some(micros(rusage.ru_utime) + micros(rusage.ru_stime)),
    }
}

/// Waits for a child that has already ended or is about to (its exec failed).
fn reap_blocking(pid: Pid) {
    let mut status = 0;
    // SAFETY: waitpid on our own child.
    unsafe {
        while libc::waitpid(pid.as_raw(), &mut status, 0) < 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
        {}
    }
}

/// A job's main process, awaited through its pidfd, killed if dropped while it runs.
pub struct ChildProcess {
    pid: Pid,
    pidfd: AsyncFd<OwnedFd>,
    status: Option<ExitStatus>,
    /// Its resource usage, once reaped.
    usage: ResourceUsage,
}

impl ChildProcess {
    /// Watches `pid` through a pidfd; a child that cannot be watched is killed and reaped,
    /// never left running unwatched.
    fn new(pid: Pid) -> io::Result<ChildProcess> {
        Self::watch(pid).inspect_err(|_| {
            // SAFETY: our own, unreaped child.
            unsafe { libc::kill(pid.as_raw(), libc::SIGKILL) };
            reap_blocking(pid);
        })
    }

    fn watch(pid: Pid) -> io::Result<ChildProcess> {
        // SAFETY: pidfd_open on our own, unreaped child.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), libc::PIDFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just returned by pidfd_open, owned by no one else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        // SAFETY: the AsyncFd owns the descriptor, which stays open as long as it does.
        let pidfd = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(ChildProcess {
            pid,
            pidfd,
            status: None,
            usage: ResourceUsage::default(),
        })
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Resolves when the process has exited, with its status. Cancel-safe: the status is
    /// kept once reaped.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.status {
                return Ok(status);
            }
            let mut ready = self.pidfd.readable().await?;
            if let Some((status, usage)) = self.try_reap()? {
                self.status = Some(status);
                self.usage = usage;
                return Ok(status);
            }
            ready.clear_ready();
        }
    }

    /// The peak memory and CPU time of the process and of the descendants it waited for,
    /// once it has been reaped (unknown before).
    pub fn usage(&self) -> ResourceUsage {
        self.usage
    }

    /// Reaps the process if it has ended, with `wait4`, which also returns its rusage.
    fn try_reap(&self) -> io::Result<Option<(ExitStatus, ResourceUsage)>> {
        use std::os::unix::process::ExitStatusExt;
        let mut status = 0;
        // SAFETY: all-zero is a valid rusage (plain integers).
        let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child, without blocking, into locals.
        let reaped =
            unsafe { libc::wait4(self.pid.as_raw(), &mut status, libc::WNOHANG, &mut rusage) };
        match reaped {
            0 => Ok(None),
            n if n == self.pid.as_raw() => {
                Ok(Some((ExitStatus::from_raw(status), usage_of(&rusage))))
            }
            _ => Err(io::Error::last_os_error()),
        }
    }
}

impl Drop for ChildProcess {
    /// A job's process never outlives its handle: killed, then reaped so no zombie stays.
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        // SAFETY: our own, unreaped child (its pid cannot have been reused yet).
        unsafe { libc::kill(self.pid.as_raw(), libc::SIGKILL) };
        reap_blocking(self.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(argv: &[String]) -> Program<'_> {
        Program {
            argv,
            env: vec![(OsString::from("PATH"), OsString::from("/usr/bin:/bin"))],
            working_directory: None,
            payload: None,
            payload_target: 3,
        }
    }

    #[tokio::test]
    async fn a_missing_program_is_not_found_and_leaves_no_child() {
        let argv = vec!["/nonexistent/pim-job".to_string()];
        let error = spawn(&program(&argv)).err().expect("cannot start");
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        let argv = vec!["no-such-program-anywhere".to_string()];
        let error = spawn(&program(&argv)).err().expect("cannot start");
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }

    /// What `argv` printed, and its status.
    async fn run(argv: &[&str]) -> (ExitStatus, String, Pid) {
        let argv: Vec<String> = argv.iter().map(|arg| arg.to_string()).collect();
        let mut spawned = spawn(&program(&argv)).unwrap();
        let pid = spawned.process.pid();
        let status = spawned.process.wait().await.unwrap();
        let mut output = String::new();
        use std::io::Read;
        std::fs::File::from(spawned.stdout)
            .read_to_string(&mut output)
            .unwrap();
        (status, output, pid)
    }

    #[tokio::test]
    async fn the_child_leads_its_own_group() {
        let (status, output, pid) = run(&["cut", "-d", " ", "-f", "5", "/proc/self/stat"]).await;
        assert!(status.success());
        assert_eq!(output.trim(), pid.to_string());
    }

    /// Nothing blocked, SIGPIPE at its default (Rust ignores it in the worker): the job
    /// starts with signals as a shell would give them.
    #[tokio::test]
    async fn the_child_gets_signals_as_a_shell_would() {
        let (status, output, _) =
            run(&["grep", "-E", "^(SigIgn|SigBlk)", "/proc/self/status"]).await;
        assert!(status.success());
        let sigpipe = 1u64 << (libc::SIGPIPE - 1);
        for line in output.lines() {
            let mask = u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap();
            if line.starts_with("SigBlk") {
                assert_eq!(mask, 0, "{line}");
            }
            assert_eq!(mask & sigpipe, 0, "{line}");
        }
    }

    #[tokio::test]
    async fn a_dropped_child_is_killed_and_reaped() {
        let argv = ["sleep", "30"].map(String::from).to_vec();
        let spawned = spawn(&program(&argv)).unwrap();
        let pid = spawned.process.pid();
        drop(spawned);
        // Reaped: the pid no longer names a process (not even a zombie).
        assert!(nix::sys::signal::kill(pid, None).is_err());
    }
}

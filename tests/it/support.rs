//! Shared fixtures: a scratch directory with a config and a database, helpers to run the
//! binary, and polling helpers with deadlines (never bare sleeps that hope).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_pim-job-queue");

/// The databases the suite runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
}

impl Backend {
    /// A fresh, empty database for one test.
    pub fn fresh_url(self, dir: &Path) -> String {
        match self {
            Backend::Sqlite => format!("sqlite://{}/jobs.sqlite", dir.display()),
        }
    }
}

/// A scratch installation: config file, instance dir, database.
pub struct Scratch {
    pub dir: TempDir,
    pub url: String,
    pub backend: Backend,
}

impl Scratch {
    pub fn new(backend: Backend) -> Scratch {
        let dir = tempfile::Builder::new().prefix("pjq-it").tempdir().unwrap();
        let url = backend.fresh_url(dir.path());
        let scratch = Scratch { dir, url, backend };
        scratch.write_config("");
        scratch
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("worker.toml")
    }

    /// Writes worker.toml: the database, a fast poll, a job command that appends
    /// "QUEUE ID" to `ran.log`, then `extra` (more keys or tables).
    pub fn write_config(&self, extra: &str) {
        let log = self.path("ran.log");
        let text = format!(
            r#"database_url = "{url}"
instance_dir = "{dir}"
poll_interval = "50ms"
{extra}
[job]
command = ["/bin/sh", "-c", "echo \"$PIM_JOB_QUEUE $PIM_JOB_ID\" >> \"$0\"", "{log}"]
kill_grace = "1s"
"#,
            url = self.url,
            dir = self.dir.path().display(),
            log = log.display(),
        );
        std::fs::write(self.config_path(), text).unwrap();
    }

    /// Writes worker.toml exactly as given.
    pub fn write_raw_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).unwrap();
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env("PIM_JOB_QUEUE_CONFIG", self.config_path())
            .env_remove("PIM_JOB_QUEUE_DATABASE_URL")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("PIM_JOB_QUEUE_LOG")
            .stdin(Stdio::null());
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "{args:?} failed with {:?}\nstdout: {}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    pub fn push(&self, queue: &str, code: &str) -> i64 {
        self.push_with(&[queue, code])
    }

    pub fn push_with(&self, args: &[&str]) -> i64 {
        let mut all = vec!["push"];
        all.extend_from_slice(args);
        self.ok(&all).trim().parse().expect("push prints the id")
    }

    pub fn show(&self, id: i64) -> Value {
        serde_json::from_str(&self.ok(&["show", &id.to_string(), "--json"])).unwrap()
    }

    pub fn status_json(&self) -> Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).unwrap()
    }

    /// Spawns a consumer with its log captured to `<name>.log`.
    pub fn spawn_consumer(&self, name: &str, args: &[&str]) -> Child {
        let log = std::fs::File::create(self.path(&format!("{name}.log"))).unwrap();
        let mut all = vec!["consume"];
        all.extend_from_slice(args);
        self.command(&all)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    pub fn log_of(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default()
    }

    /// The "QUEUE ID" lines the default job command wrote, in run order.
    pub fn ran(&self) -> Vec<(String, i64)> {
        std::fs::read_to_string(self.path("ran.log"))
            .unwrap_or_default()
            .lines()
            .map(|line| {
                let (queue, id) = line.split_once(' ').unwrap();
                (queue.to_string(), id.parse().unwrap())
            })
            .collect()
    }

    /// Opens the store through the library, for seeding many jobs fast.
    pub async fn store(&self) -> Box<dyn pim_job_queue::store::JobStore> {
        let store = pim_job_queue::store::open(&self.url).await.unwrap();
        store.migrate().await.unwrap();
        store
    }
}

/// Polls `condition` until it holds or `limit` passes.
pub fn wait_until(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a child to exit and returns its exit code.
pub fn wait_exit(child: &mut Child, limit: Duration) -> i32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("process {} did not exit within {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn send_signal(child: &Child, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
}

/// Whether a process is gone (or only a zombie nobody reaped yet).
pub fn process_is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

pub fn exit_code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs an async block on a fresh runtime, for tests that use the library directly.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// Generates one `#[test]` per backend for each listed function taking a `Backend`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::support::Backend::Sqlite);
                }
            )*
        }
    };
}

//! Shared fixtures: a scratch directory with a config and a database, helpers to run the
//! binary, and polling helpers with deadlines (never bare sleeps that hope).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_pim-job-queue");

/// The databases the suite runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    Mariadb,
}

static DATABASE_COUNTER: AtomicU32 = AtomicU32::new(0);

impl Backend {
    /// The server URL (without a database) that tests create their databases on.
    fn server_url(self) -> Option<String> {
        match self {
            Backend::Sqlite => None,
            Backend::Postgres => Some(
                std::env::var("PJQ_TEST_POSTGRES_URL")
                    .unwrap_or_else(|_| "postgres://pjq_test:pjq_test@127.0.0.1:5432".into()),
            ),
            Backend::Mariadb => Some(
                std::env::var("PJQ_TEST_MARIADB_URL")
                    .unwrap_or_else(|_| "mysql://pjq_test:pjq_test@127.0.0.1:3306".into()),
            ),
        }
    }

    /// A fresh, empty database for one test; returns its URL and, for servers, its name.
    fn fresh_database(self, dir: &Path) -> (String, Option<String>) {
        let Some(server) = self.server_url() else {
            return (format!("sqlite://{}/jobs.sqlite", dir.display()), None);
        };
        let name = format!(
            "pjq_t{}_{}",
            std::process::id(),
            DATABASE_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let admin = self.admin_url(&server);
        block_on(async {
            let mut conn = connect_any(&admin)
                .await
                .unwrap_or_else(|error| panic!("cannot reach {self:?} at {admin}: {error}"));
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
                .unwrap();
        });
        (format!("{server}/{name}"), Some(name))
    }

    /// The URL of a database that always exists, for creating and dropping test databases.
    fn admin_url(self, server: &str) -> String {
        match self {
            Backend::Postgres => format!("{server}/postgres"),
            _ => server.to_string(),
        }
    }

    fn drop_database(self, name: &str) {
        let Some(server) = self.server_url() else {
            return;
        };
        let admin = self.admin_url(&server);
        let statement = match self {
            Backend::Postgres => format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            _ => format!("DROP DATABASE IF EXISTS {name}"),
        };
        block_on(async {
            if let Ok(mut conn) = connect_any(&admin).await {
                let _ = sqlx::query(&statement).execute(&mut conn).await;
            }
        });
    }

    /// Whether the server answers. Without it a test fails under CI (`CI=true`) and is
    /// skipped, loudly, elsewhere.
    pub fn available(self) -> bool {
        static POSTGRES: OnceLock<Result<(), String>> = OnceLock::new();
        static MARIADB: OnceLock<Result<(), String>> = OnceLock::new();
        let cell = match self {
            Backend::Sqlite => return true,
            Backend::Postgres => &POSTGRES,
            Backend::Mariadb => &MARIADB,
        };
        let probe = cell.get_or_init(|| {
            let server = self.server_url().expect("a server backend");
            let admin = self.admin_url(&server);
            block_on(async { connect_any(&admin).await.map(drop) })
                .map_err(|error| format!("{self:?} at {admin}: {error}"))
        });
        match probe {
            Ok(()) => true,
            Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("CI requires every backend, but cannot reach {why}")
            }
            Err(why) => {
                // Straight to the terminal: libtest captures `eprintln!` of passing tests,
                // which would make this skip silent.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "\n!!! SKIPPED: cannot reach {why}; run scripts/test.sh to set it up !!!\n"
                );
                false
            }
        }
    }
}

/// A single connection to any of the server backends, by URL scheme.
pub async fn connect_any(url: &str) -> Result<sqlx::AnyConnection, sqlx::Error> {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    sqlx::AnyConnection::connect(url).await
}

/// Runs `test` on `backend` if the backend is available (see [`Backend::available`]).
pub fn run_on(backend: Backend, test: fn(Backend)) {
    if backend.available() {
        test(backend);
    }
}

/// A scratch installation: config file, instance dir, database (dropped at the end).
pub struct Scratch {
    pub dir: TempDir,
    pub url: String,
    pub backend: Backend,
    database: Option<String>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.kill_leftovers();
        if let Some(name) = &self.database {
            self.backend.drop_database(name);
        }
    }
}

impl Scratch {
    /// Ends every process still running with this scratch's config: the consumers a test
    /// that panicked left behind, and their jobs (which inherit the variable). Matched by
    /// environment, not pid, so a reused pid is never someone else's process.
    fn kill_leftovers(&self) {
        let needle = format!("PIM_JOB_QUEUE_CONFIG={}", self.config_path().display());
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
                continue;
            };
            if environ
                .split(|b| *b == 0)
                .any(|var| var == needle.as_bytes())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    pub fn new(backend: Backend) -> Scratch {
        let dir = tempfile::Builder::new().prefix("pjq-it").tempdir().unwrap();
        let (url, database) = backend.fresh_database(dir.path());
        let scratch = Scratch {
            dir,
            url,
            backend,
            database,
        };
        scratch.write_config("");
        scratch
    }

    /// A scratch directory whose database is `url` (a server of the test's own).
    pub fn on_url(url: String) -> Scratch {
        let dir = tempfile::Builder::new().prefix("pjq-it").tempdir().unwrap();
        let scratch = Scratch {
            dir,
            url,
            backend: Backend::Mariadb,
            database: None,
        };
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
wake_dir = "{dir}/wake"
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
        self.spawn_consumer_logging(name, args, None)
    }

    /// Spawns a consumer like [`Scratch::spawn_consumer`], logging at debug level (each empty
    /// claim logs "no job due", which tests count).
    pub fn spawn_debug_consumer(&self, name: &str, args: &[&str]) -> Child {
        self.spawn_consumer_logging(name, args, Some("warn,pim_job_queue=debug"))
    }

    fn spawn_consumer_logging(&self, name: &str, args: &[&str], filter: Option<&str>) -> Child {
        let log = std::fs::File::create(self.path(&format!("{name}.log"))).unwrap();
        let mut all = vec!["consume"];
        all.extend_from_slice(args);
        let mut command = self.command(&all);
        if let Some(filter) = filter {
            command.env("PIM_JOB_QUEUE_LOG", filter);
        }
        command
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

/// Whether the test runs as root, which tests that change file owners need: under CI
/// (`CI=true`, run as root) a must, elsewhere a loud skip.
pub fn running_as_root(what: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI runs {what} as root");
    }
    eprintln!("\n!!! SKIPPED: {what} needs root (it changes file owners) !!!\n");
    false
}

/// Debian's libfaketime (package `faketime`, which scripts/test.sh installs), for tests that
/// step a process's wall clock; under CI a must, elsewhere a loud skip.
pub fn libfaketime(what: &str) -> Option<PathBuf> {
    let library = PathBuf::from("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1");
    if library.exists() {
        return Some(library);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "CI runs {what} with libfaketime, and {} is missing",
            library.display()
        );
    }
    eprintln!("\n!!! SKIPPED: {what} needs libfaketime (apt install faketime) !!!\n");
    None
}

/// Waits until job `id`'s start is recorded. A job is `running` from its claim on, but a
/// stop that arrives while the claim is on its way gives the job back unstarted: tests that
/// stop a worker "during a job" wait for this, not for the status.
pub fn wait_until_started(scratch: &Scratch, id: i64) {
    wait_until(Duration::from_secs(10), "the job to start", || {
        !scratch.show(id)["started_at"].is_null()
    });
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
        $crate::backend_tests!(@backend sqlite, Sqlite, $($name),*);
        $crate::backend_tests!(@backend postgres, Postgres, $($name),*);
        $crate::backend_tests!(@backend mariadb, Mariadb, $($name),*);
    };
    (@backend $module:ident, $variant:ident, $($name:ident),*) => {
        mod $module {
            $(
                #[test]
                fn $name() {
                    $crate::support::run_on($crate::support::Backend::$variant, super::$name);
                }
            )*
        }
    };
}

/// Like [`backend_tests!`], for the server backends only.
#[macro_export]
macro_rules! shared_backend_tests {
    ($($name:ident),* $(,)?) => {
        $crate::backend_tests!(@backend postgres, Postgres, $($name),*);
        $crate::backend_tests!(@backend mariadb, Mariadb, $($name),*);
    };
}

/// A job for the library-level tests and for seeding.
pub fn new_job(queue: &str, code: &str, payload: &str) -> pim_job_queue::store::NewJob {
    pim_job_queue::store::NewJob {
        queue: queue.into(),
        code: code.into(),
        payload: payload.into(),
        delay: Duration::ZERO,
        max_attempts: 1,
        unique_key: None,
    }
}

/// A TCP proxy in front of a database server, so a test can fault a worker's network path to
/// its database (and restore it) without touching the server other tests share: cut (every
/// connection reset, new ones refused) or black-holed (connections accepted, nothing
/// answered, as when a firewall drops packets; on restore the held bytes flow again, as
/// retransmissions would).
pub struct FaultProxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    held: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
}

impl FaultProxy {
    pub fn new(target_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (accept_cut, accept_held, accept_live) = (cut.clone(), held.clone(), live.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if accept_cut.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else {
                    continue;
                };
                let mut live = accept_live.lock().unwrap();
                live.push(client.try_clone().unwrap());
                live.push(server.try_clone().unwrap());
                let held = accept_held.clone();
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    held.clone(),
                );
                pipe(server, client, held);
            }
        });
        FaultProxy {
            port,
            cut,
            held,
            live,
        }
    }

    /// Drops every connection and refuses new ones until [`FaultProxy::restore`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for stream in self.live.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Stops forwarding in both directions, on every connection and on new ones, without
    /// closing anything, until [`FaultProxy::restore`].
    pub fn black_hole(&self) {
        self.held.store(true, Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
        self.held.store(false, Ordering::SeqCst);
    }

    /// `url` with its port replaced by the proxy's.
    pub fn url_for(&self, url: &str, server_port: u16) -> String {
        url.replace(&format!(":{server_port}/"), &format!(":{}/", self.port))
    }
}

/// Copies `from` to `to`, holding the bytes read while `held` is set.
fn pipe(mut from: TcpStream, mut to: TcpStream, held: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        while let Ok(read) = from.read(&mut buffer) {
            if read == 0 {
                break;
            }
            while held.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            if to.write_all(&buffer[..read]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}

impl Backend {
    pub fn server_port(self) -> u16 {
        match self {
            Backend::Sqlite => 0,
            Backend::Postgres => 5432,
            Backend::Mariadb => 3306,
        }
    }
}

/// A fake `$NOTIFY_SOCKET`: a datagram socket at a short filesystem path (sd-notify cannot use
/// abstract sockets), with every message received kept in order.
pub struct NotifySocket {
    _dir: TempDir,
    pub path: PathBuf,
    messages: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl NotifySocket {
    pub fn new() -> NotifySocket {
        let dir = tempfile::Builder::new()
            .prefix("pjqn")
            .tempdir_in("/tmp")
            .unwrap();
        let path = dir.path().join("n.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let messages: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let sink = messages.clone();
        std::thread::spawn(move || {
            let mut buffer = vec![0u8; 65536];
            while let Ok(n) = socket.recv(&mut buffer) {
                let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
                sink.lock().unwrap().push((Instant::now(), text));
            }
        });
        NotifySocket {
            _dir: dir,
            path,
            messages,
        }
    }

    pub fn messages(&self) -> Vec<String> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .map(|(_, m)| m.clone())
            .collect()
    }

    pub fn timed(&self) -> Vec<(Instant, String)> {
        self.messages.lock().unwrap().clone()
    }

    /// Points `command` at this socket as systemd would, with a watchdog when given
    /// `WATCHDOG_USEC`.
    pub fn notify(&self, command: &mut Command, watchdog_usec: Option<&str>) {
        command
            .env("NOTIFY_SOCKET", &self.path)
            .env_remove("WATCHDOG_PID")
            .env_remove("JOURNAL_STREAM");
        match watchdog_usec {
            Some(usec) => command.env("WATCHDOG_USEC", usec),
            None => command.env_remove("WATCHDOG_USEC"),
        };
    }

    /// How many WATCHDOG=1 pings came at index `from` or later, and the longest gap between
    /// two of them (or between `from`'s message and the first).
    pub fn watchdog_pings_since(&self, from: usize) -> (usize, Duration) {
        let timed = self.timed();
        let Some((start, _)) = timed.get(from) else {
            return (0, Duration::ZERO);
        };
        let pings: Vec<Instant> = std::iter::once(*start)
            .chain(
                timed[from..]
                    .iter()
                    .filter(|(_, m)| m == "WATCHDOG=1\n")
                    .map(|(at, _)| *at),
            )
            .collect();
        let longest = pings.windows(2).map(|w| w[1] - w[0]).max();
        (pings.len() - 1, longest.unwrap_or_default())
    }

    /// Waits for a message containing `needle`; returns its index.
    pub fn wait_for(&self, needle: &str, limit: Duration) -> usize {
        self.wait_for_after(needle, 0, limit)
    }

    /// Waits for a message containing `needle` at index `from` or later.
    pub fn wait_for_after(&self, needle: &str, from: usize, limit: Duration) -> usize {
        let mut found = None;
        let what = format!("a notification containing {needle:?}");
        let deadline = Instant::now() + limit;
        while found.is_none() {
            found = self
                .messages()
                .iter()
                .skip(from)
                .position(|m| m.contains(needle))
                .map(|i| i + from);
            assert!(
                found.is_some() || Instant::now() < deadline,
                "timed out waiting for {what}; got {:?}",
                self.messages()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        found.unwrap()
    }
}

/// Stores `count` jobs of code `mark` spread over the three queues, with a config whose
/// command makes one marker directory per job id; mkdir fails when the directory exists, so
/// a job run twice fails and shows up. Returns the marker directory.
pub fn seed_marker_jobs(scratch: &Scratch, count: usize) -> PathBuf {
    let markers = scratch.path("markers");
    std::fs::create_dir(&markers).unwrap();
    scratch.write_config(&format!(
        "[jobs.mark]\ncommand = [\"/bin/mkdir\", \"{}/{{id}}\"]",
        markers.display()
    ));
    let queues = ["ui_job", "import_export_job", "data_maintenance_job"];
    block_on(async {
        let store = scratch.store().await;
        for n in 0..count {
            store
                .push(&new_job(queues[n % 3], "mark", "{}"))
                .await
                .unwrap();
        }
    });
    markers
}

/// Whether no job is waiting or running in any queue.
pub fn queues_drained(scratch: &Scratch) -> bool {
    scratch.status_json()["queues"]
        .as_array()
        .unwrap()
        .iter()
        .all(|q| q["waiting"] == 0 && q["running"] == 0)
}

/// A MariaDB server of the test's own, for server settings the shared one must not have
/// (a statement-based binary log, say). Started from Debian's `mariadb-server` binaries in a
/// fresh data directory on a free loopback port; killed when dropped.
pub struct PrivateMariadb {
    child: Child,
    dir: TempDir,
    extra_args: Vec<String>,
    /// Whether the server checks privileges: without them every session is SUPER, which
    /// read_only and max_connections do not apply to.
    grants: bool,
    pub port: u16,
}

impl PrivateMariadb {
    /// A private server without privilege checks: anyone may do anything, as root.
    pub fn start(extra_args: &[&str]) -> PrivateMariadb {
        Self::start_checking(extra_args, false)
    }

    /// A private server that checks privileges; root (no password) over its socket only,
    /// other users from [`PrivateMariadb::user`].
    pub fn start_with_grants(extra_args: &[&str]) -> PrivateMariadb {
        Self::start_checking(extra_args, true)
    }

    fn start_checking(extra_args: &[&str], grants: bool) -> PrivateMariadb {
        let dir = tempfile::Builder::new()
            .prefix("pjq-mariadb")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        let mut install = Command::new("mariadb-install-db");
        install
            .args([
                "--no-defaults",
                "--skip-test-db",
                "--auth-root-authentication-method=normal",
            ])
            .arg(format!("--datadir={}", data.display()));
        if nix::unistd::geteuid().is_root() {
            install.arg("--user=root");
        }
        let installed = install
            .output()
            .expect("mariadb-install-db (mariadb-server) runs");
        assert!(
            installed.status.success(),
            "{}",
            String::from_utf8_lossy(&installed.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let extra_args: Vec<String> = extra_args.iter().map(|a| a.to_string()).collect();
        let child = spawn_mariadbd(dir.path(), port, &extra_args, grants);
        let private = PrivateMariadb {
            child,
            dir,
            extra_args,
            grants,
            port,
        };
        private.wait_until_it_answers();
        private
    }

    /// Kills the server (`SIGKILL`, as a crash or an OOM kill does), leaves it down for
    /// `down`, and starts it again on the same data and port; returns once it answers.
    pub fn restart_after(&mut self, down: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down);
        self.child = spawn_mariadbd(self.dir.path(), self.port, &self.extra_args, self.grants);
        self.wait_until_it_answers();
    }

    fn wait_until_it_answers(&self) {
        let url = self.admin_url();
        wait_until(
            Duration::from_secs(30),
            "the private MariaDB to answer",
            || block_on(async { connect_any(&url).await.is_ok() }),
        );
    }

    pub fn url(&self, database: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{database}", self.port)
    }

    /// Root's URL: over TCP without privilege checks, over the socket with them.
    fn admin_url(&self) -> String {
        if self.grants {
            let socket = self.dir.path().join("sock");
            format!("mysql://root@localhost/mysql?socket={}", socket.display())
        } else {
            self.url("mysql")
        }
    }

    /// Runs `sql` as root.
    pub async fn admin(&self, sql: &str) {
        let mut conn = connect_any(&self.admin_url()).await.unwrap();
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }

    /// A new database and a user with every privilege on it and nothing else (no SUPER);
    /// returns the user's URL for it.
    pub fn user(&self, name: &str, password: &str, database: &str) -> String {
        block_on(async {
            self.admin(&format!("CREATE DATABASE `{database}`")).await;
            self.admin(&format!(
                "CREATE USER '{name}'@'%' IDENTIFIED BY '{password}'"
            ))
            .await;
            self.admin(&format!("GRANT ALL ON `{database}`.* TO '{name}'@'%'"))
                .await;
        });
        format!(
            "mysql://{name}:{password}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// A new empty database on this server; returns its URL.
    pub fn database(&self, name: &str) -> String {
        let admin = self.admin_url();
        block_on(async {
            let mut conn = connect_any(&admin).await.unwrap();
            sqlx::query(&format!("CREATE DATABASE `{name}`"))
                .execute(&mut conn)
                .await
                .unwrap();
        });
        self.url(name)
    }
}

fn spawn_mariadbd(dir: &Path, port: u16, extra_args: &[String], grants: bool) -> Child {
    let mut server = Command::new("mariadbd");
    server
        .arg("--no-defaults")
        .arg(format!("--datadir={}", dir.join("data").display()))
        .arg(format!("--socket={}", dir.join("sock").display()))
        .arg(format!("--port={port}"))
        .arg("--bind-address=127.0.0.1");
    if !grants {
        server.arg("--skip-grant-tables");
    }
    server.args(extra_args).stdout(Stdio::null()).stderr(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("server.log"))
            .unwrap(),
    );
    if nix::unistd::geteuid().is_root() {
        server.arg("--user=root");
    }
    server.spawn().expect("mariadbd runs")
}

impl Drop for PrivateMariadb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

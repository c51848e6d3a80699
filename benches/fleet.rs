//! The benchmark behind `scripts/bench.sh`: throughput, pickup latency, claim time against
//! queue depth (and with unique keys and concurrency caps), and idle cost, per backend, printed as Markdown tables; and, measured in the
//! same run, the machine's limit for a process-per-job worker (one `/bin/true` spawn plus one
//! durable commit per job) and what a job and an idle second cost the database by its own
//! counters (MariaDB `Questions`/`Com_commit`, PostgreSQL `xact_commit`).
//!
//! `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and then this does
//! nothing, so the test suite never runs (or times) it.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pim_job_queue::store::{
    self, Cap, ConcurrencyCaps, Finished, JobFilter, JobStatus, JobStore, NewJob, Timestamp, Turn,
    WorkerIdentity,
};

const BIN: &str = env!("CARGO_BIN_EXE_pim-job-queue");
const QUEUES: [&str; 3] = ["ui_job", "import_export_job", "data_maintenance_job"];

struct Settings {
    throughput_jobs: usize,
    latency_samples: usize,
    deep_queue: usize,
    idle_seconds: u64,
    /// `PJQ_BENCH_ONLY=claims`: the claim-time rows alone.
    claims_only: bool,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("fleet benchmark: run it with scripts/bench.sh");
        return;
    }
    let quick = std::env::var("PJQ_BENCH_QUICK").is_ok_and(|v| v == "1");
    let settings = Settings {
        throughput_jobs: 10_000,
        latency_samples: 200,
        deep_queue: if quick { 100_000 } else { 1_000_000 },
        idle_seconds: if quick { 10 } else { 30 },
        claims_only: std::env::var("PJQ_BENCH_ONLY").is_ok_and(|v| v == "claims"),
    };
    let only =
        std::env::var("PJQ_BENCH_BACKENDS").unwrap_or_else(|_| "sqlite,postgres,mariadb".into());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let spawn = spawn_time(2_000);
    println!(
        "\nspawn ceiling: {:.3} ms per `/bin/true` spawn + wait ({:.0}/s)",
        spawn * 1e3,
        1.0 / spawn
    );
    for backend in only.split(',') {
        runtime.block_on(bench_backend(backend.trim(), &settings, spawn));
    }
}

/// Seconds per spawn and wait of `/bin/true`, the floor of any process-per-job worker here
/// (as `../shared/bench/spawn-ceiling.c` measures it in C).
fn spawn_time(count: u32) -> f64 {
    let started = Instant::now();
    for _ in 0..count {
        let status = Command::new("/bin/true").status().unwrap();
        assert!(status.success());
    }
    started.elapsed().as_secs_f64() / f64::from(count)
}

struct Bench {
    dir: tempfile::TempDir,
    url: String,
    store: Box<dyn JobStore>,
    backend: String,
    database: Option<String>,
}

static DATABASES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Bench {
    async fn new(backend: &str) -> Bench {
        let dir = tempfile::Builder::new()
            .prefix("pjq-bench")
            .tempdir()
            .unwrap();
        let (url, database) = fresh_database(backend, dir.path()).await;
        std::fs::write(
            dir.path().join("worker.toml"),
            format!(
                "database_url = \"{url}\"\nwake_dir = \"{}/wake\"\npoll_interval = \"200ms\"\n[job]\ncommand = [\"/bin/true\"]\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let store = store::open(&url).await.unwrap();
        store.migrate().await.unwrap();
        Bench {
            dir,
            url,
            store,
            backend: backend.into(),
            database,
        }
    }

    async fn drop_database(self) {
        if let Some(name) = self.database {
            drop(self.store);
            let (admin, _) = server_urls(&self.backend);
            let mut conn = admin_connection(&admin).await;
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
                .execute(&mut conn)
                .await;
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env("PIM_JOB_QUEUE_CONFIG", self.dir.path().join("worker.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    }

    fn consumer(&self) -> Child {
        self.command(&["consume", "-q"]).spawn().unwrap()
    }

    async fn seed(&self, count: usize, queue_of: impl Fn(usize) -> &'static str) {
        self.seed_keyed(count, queue_of, false).await
    }

    /// Seeds `count` jobs of code `bench`, each with a unique key when `unique`.
    async fn seed_keyed(
        &self,
        count: usize,
        queue_of: impl Fn(usize) -> &'static str,
        unique: bool,
    ) {
        let mut batch = Vec::with_capacity(50_000);
        for n in 0..count {
            batch.push(NewJob {
                queue: queue_of(n).into(),
                code: "bench".into(),
                payload: "{}".into(),
                delay: Duration::ZERO,
                max_attempts: 1,
                unique_key: unique.then(|| format!("bench-{n}")),
            });
            if batch.len() == 50_000 || n + 1 == count {
                self.store.push_batch(&batch).await.unwrap();
                batch.clear();
            }
        }
    }

    async fn unfinished(&self) -> i64 {
        let counts = self.store.queue_counts().await.unwrap();
        counts
            .iter()
            .map(|c| c.waiting + c.running + c.delayed)
            .sum()
    }

    async fn clear(&self) {
        // Claim-and-forget leaves running rows; finish them so prune can take everything.
        let later = Timestamp::now().plus(Duration::from_secs(60));
        for kind in [Finished::Done, Finished::Failed] {
            self.store.prune_finished(kind, later).await.unwrap();
        }
    }
}

/// (admin URL, server URL) for a server backend.
fn server_urls(backend: &str) -> (String, String) {
    match backend {
        "postgres" => {
            let server = std::env::var("PJQ_TEST_POSTGRES_URL").unwrap();
            (format!("{server}/postgres"), server)
        }
        "mariadb" => {
            let server = std::env::var("PJQ_TEST_MARIADB_URL").unwrap();
            (server.clone(), server)
        }
        other => panic!("unknown backend {other}"),
    }
}

async fn admin_connection(admin: &str) -> sqlx::AnyConnection {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    sqlx::AnyConnection::connect(admin).await.unwrap()
}

async fn fresh_database(backend: &str, dir: &std::path::Path) -> (String, Option<String>) {
    if backend == "sqlite" {
        return (format!("sqlite://{}/jobs.sqlite", dir.display()), None);
    }
    let (admin, server) = server_urls(backend);
    let mut conn = admin_connection(&admin).await;
    let name = format!(
        "pjq_bench_{}_{}",
        std::process::id(),
        DATABASES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    (format!("{server}/{name}"), Some(name))
}

async fn bench_backend(backend: &str, settings: &Settings, spawn: f64) {
    eprintln!("== {backend}");
    let bench = Bench::new(backend).await;
    let mut rows: Vec<(String, String, &'static str)> = Vec::new();
    if !settings.claims_only {
        service_rows(&bench, settings, spawn, &mut rows).await;
    }
    let shallow = claim_time(backend, 1_000, ClaimCase::Plain).await;
    let deep = claim_time(backend, settings.deep_queue, ClaimCase::Plain).await;
    rows.push((
        "claim time, 1,000 queued (median)".into(),
        format!("{shallow:.2} ms"),
        "",
    ));
    rows.push((
        format!("claim time, {} queued (median)", settings.deep_queue),
        format!("{deep:.2} ms ({:.2}×)", deep / shallow),
        "≤ 1.5×",
    ));
    for case in [
        ClaimCase::UniqueKeys,
        ClaimCase::CapsElsewhere,
        ClaimCase::CappedWithRoom,
    ] {
        let time = claim_time(backend, 1_000, case).await;
        rows.push((
            format!("claim time, 1,000 queued, {} (median)", case.describe()),
            format!("{time:.2} ms ({:.2}×)", time / shallow),
            "",
        ));
    }
    if !settings.claims_only {
        idle_rows(&bench, settings, &mut rows).await;
    }
    println!("\n### {backend} ({})\n", store::redact_url(&bench.url));
    println!("| measure | result | target |\n|---|---:|---|");
    for (measure, result, target) in rows {
        println!("| {measure} | {result} | {target} |");
    }
    bench.drop_database().await;
}

/// Throughput against the machine's limit, statements and commits per job and per idle
/// second, pickup latency.
async fn service_rows(
    bench: &Bench,
    settings: &Settings,
    spawn: f64,
    rows: &mut Vec<(String, String, &'static str)>,
) {
    let commit = commit_time(&bench.url, 500).await;
    rows.push((
        "durable commit (single-row autocommit insert, median)".into(),
        format!("{:.3} ms", commit * 1e3),
        "",
    ));
    let limit = 1.0 / (spawn + commit);
    rows.push((
        "limit: 1 / (spawn + commit)".into(),
        format!("{limit:.0} jobs/s"),
        "",
    ));
    for workers in [1, 4, 8] {
        let rate = throughput(bench, workers, settings.throughput_jobs).await;
        rows.push((
            format!(
                "throughput, {} × /bin/true, {workers} worker(s)",
                settings.throughput_jobs
            ),
            format!(
                "{rate:.0} jobs/s ({:.0} % of the limit)",
                rate / limit * 100.0
            ),
            if workers == 1 {
                "≥ 70 % of the limit"
            } else {
                ""
            },
        ));
    }
    let cost = per_job_cost(bench, settings.throughput_jobs.min(2_000)).await;
    rows.push((
        "statements per job (1 worker; PostgreSQL: transactions)".into(),
        cost.statements,
        "≤ 4",
    ));
    rows.push((
        "durable commits (log flushes) per job (1 worker)".into(),
        cost.commits,
        "1",
    ));
    for poll in ["200ms", "1s"] {
        let cost = idle_load(bench, poll, settings.idle_seconds).await;
        rows.push((
            format!("idle worker, poll_interval {poll}: statements/s (PostgreSQL: transactions)"),
            cost.statements,
            if poll == "1s" { "≤ 1.5" } else { "≤ 6" },
        ));
        rows.push((
            format!("idle worker, poll_interval {poll}: log flushes/s"),
            cost.commits,
            "",
        ));
    }

    let (p50, p95) = pickup_latency(bench, settings.latency_samples).await;
    rows.push((
        format!(
            "pickup latency p50 (idle, {} pushes)",
            settings.latency_samples
        ),
        format!("{p50:.1} ms"),
        "< 5 ms",
    ));
    rows.push(("pickup latency p95".into(), format!("{p95:.1} ms"), ""));
}

/// An idle worker's memory and CPU.
async fn idle_rows(
    bench: &Bench,
    settings: &Settings,
    rows: &mut Vec<(String, String, &'static str)>,
) {
    let (rss, cpu) = idle_cost(bench, settings.idle_seconds).await;
    rows.push((
        "idle worker RSS".into(),
        format!("{:.1} MB", rss as f64 / 1e6),
        "< 15 MB",
    ));
    rows.push((
        format!("idle worker CPU over {} s", settings.idle_seconds),
        format!("{cpu:.2} %"),
        "",
    ));
}

async fn throughput(bench: &Bench, workers: usize, jobs: usize) -> f64 {
    bench.seed(jobs, |n| QUEUES[n % 3]).await;
    let started = Instant::now();
    let mut children: Vec<Child> = (0..workers).map(|_| bench.consumer()).collect();
    while bench.unfinished().await > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed();
    stop(bench, &mut children);
    bench.clear().await;
    jobs as f64 / elapsed.as_secs_f64()
}

/// Push (through the CLI, as users do) to an idle worker; latency is the job's `started_at`
/// (just after the spawn) minus its `created_at` (just before the insert).
async fn pickup_latency(bench: &Bench, samples: usize) -> (f64, f64) {
    let mut children = vec![bench.consumer()];
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..samples {
        let status = bench
            .command(&["push", "ui_job", "latency"])
            .status()
            .unwrap();
        assert!(status.success());
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    while bench.unfinished().await > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(bench, &mut children);
    let jobs = bench
        .store
        .list_jobs(&JobFilter {
            queue: Some("ui_job".into()),
            status: Some(JobStatus::Succeeded),
            limit: samples as u32,
            ..JobFilter::default()
        })
        .await
        .unwrap();
    let mut millis: Vec<f64> = jobs
        .iter()
        .filter_map(|j| {
            j.started_at
                .map(|s| s.since(j.created_at).as_secs_f64() * 1000.0)
        })
        .collect();
    millis.sort_by(f64::total_cmp);
    bench.clear().await;
    (percentile(&millis, 0.50), percentile(&millis, 0.95))
}

/// What the claims of [`claim_time`] meet besides the queue.
#[derive(Clone, Copy)]
enum ClaimCase {
    Plain,
    /// Every job carries a `unique_key` (the unique index changes with each claim).
    UniqueKeys,
    /// The worker has a cap, on another code: each lookup checks it.
    CapsElsewhere,
    /// The jobs' own code is capped, with room: the check, then the claim under the cap's
    /// lock (and its count) where the backend needs one.
    CappedWithRoom,
}

impl ClaimCase {
    fn describe(self) -> &'static str {
        match self {
            ClaimCase::Plain => "plain",
            ClaimCase::UniqueKeys => "each job with a unique key",
            ClaimCase::CapsElsewhere => "a cap configured on another code",
            ClaimCase::CappedWithRoom => "the jobs' code capped, with room",
        }
    }

    fn caps(self) -> ConcurrencyCaps {
        let capped = match self {
            ClaimCase::Plain | ClaimCase::UniqueKeys => return ConcurrencyCaps::default(),
            ClaimCase::CapsElsewhere => "other",
            ClaimCase::CappedWithRoom => "bench",
        };
        ConcurrencyCaps::new(vec![Cap {
            code: capped.into(),
            key: format!("code:{capped}"),
            limit: 1_000_000,
        }])
    }
}

/// The median of 200 claims from the lowest queue (the claim looks at the two empty higher
/// queues first, as a worker's does) with `depth` jobs waiting, on a database of its own.
async fn claim_time(backend: &str, depth: usize, case: ClaimCase) -> f64 {
    let bench = Bench::new(backend).await;
    eprintln!("   seeding {depth} jobs ({})", case.describe());
    let unique = matches!(case, ClaimCase::UniqueKeys);
    bench
        .seed_keyed(depth, |_| "data_maintenance_job", unique)
        .await;
    let queues: Vec<String> = QUEUES.iter().map(|q| q.to_string()).collect();
    let worker = WorkerIdentity::for_this_process(Some("bench".into()), None);
    let caps = case.caps();
    let turn = Turn {
        queues: &queues,
        worker: &worker,
        finished: None,
        pass_over: 0,
        caps: &caps,
    };
    let mut millis = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        let claimed = bench.store.next_job(&turn).await.unwrap().job;
        millis.push(started.elapsed().as_secs_f64() * 1000.0);
        assert!(claimed.is_some());
    }
    millis.sort_by(f64::total_cmp);
    bench.drop_database().await;
    percentile(&millis, 0.5)
}

async fn idle_cost(bench: &Bench, seconds: u64) -> (u64, f64) {
    let mut children = vec![bench.consumer()];
    let pid = children[0].id();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let ticks = cpu_ticks(pid) - before;
    let rss = rss_bytes(pid);
    stop(bench, &mut children);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as f64;
    (rss, ticks as f64 / hz / seconds as f64 * 100.0)
}

/// Seconds per durable commit: the median of `count` single-row autocommit inserts, on a
/// connection set up as the store's are (SQLite: WAL, `synchronous = FULL`).
async fn commit_time(url: &str, count: usize) -> f64 {
    use sqlx::{Connection, Executor};
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
    if url.starts_with("sqlite:") {
        conn.execute("PRAGMA journal_mode = WAL").await.unwrap();
        conn.execute("PRAGMA synchronous = FULL").await.unwrap();
    }
    conn.execute("CREATE TABLE pjq_bench_commit (n INTEGER)")
        .await
        .unwrap();
    let mut seconds = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        sqlx::query("INSERT INTO pjq_bench_commit (n) VALUES (1)")
            .execute(&mut conn)
            .await
            .unwrap();
        seconds.push(started.elapsed().as_secs_f64());
    }
    conn.execute("DROP TABLE pjq_bench_commit").await.unwrap();
    seconds.sort_by(f64::total_cmp);
    percentile(&seconds, 0.5)
}

/// What the database counted, per job or per second, formatted.
struct Cost {
    statements: String,
    commits: String,
}

impl Cost {
    /// SQLite keeps no counters a second process can read.
    fn uncounted() -> Cost {
        let none = "n/a (SQLite has no server counters)".to_string();
        Cost {
            statements: none.clone(),
            commits: none,
        }
    }
}

/// The server's own counters, read on one connection kept open for the measurement:
/// MariaDB's `Questions` (statements) and `Innodb_data_fsyncs` (durable flushes: with one
/// client nothing is grouped), PostgreSQL's `pg_stat_wal.wal_sync` (WAL flushes) and
/// `pg_stat_database` transactions (it has no statement counter without
/// `pg_stat_statements`, which needs a server restart to load; the worker sends no
/// BEGIN/COMMIT on PostgreSQL, so each of its statements is one transaction).
/// Both are server-wide: the bench is the only client. SQLite has none.
struct Counters {
    conn: sqlx::AnyConnection,
    backend: String,
}

/// One reading: statements (when counted) and durable flushes.
type Reading = (Option<f64>, f64);

impl Counters {
    async fn open(bench: &Bench) -> Option<Counters> {
        if bench.backend == "sqlite" {
            return None;
        }
        Some(Counters {
            conn: admin_connection(&server_urls(&bench.backend).0).await,
            backend: bench.backend.clone(),
        })
    }

    async fn read(&mut self) -> Reading {
        use sqlx::Row;
        if self.backend == "postgres" {
            // Backends report their counts to the statistics at most once a second.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let row = sqlx::query(
                "SELECT (SELECT wal_sync FROM pg_stat_wal) AS syncs,
                        (SELECT SUM(xact_commit + xact_rollback)::BIGINT FROM pg_stat_database)
                            AS transactions",
            )
            .fetch_one(&mut self.conn)
            .await
            .unwrap();
            let syncs: i64 = row.get("syncs");
            let transactions: i64 = row.get("transactions");
            return (Some(transactions as f64), syncs as f64);
        }
        let rows = sqlx::query(
            "SELECT VARIABLE_NAME, VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS
             WHERE VARIABLE_NAME IN ('QUESTIONS', 'INNODB_DATA_FSYNCS')",
        )
        .fetch_all(&mut self.conn)
        .await
        .unwrap();
        let value = |name: &str| -> f64 {
            rows.iter()
                .find(|row| row.get::<String, _>(0).eq_ignore_ascii_case(name))
                .map(|row| row.get::<String, _>(1).parse().unwrap())
                .unwrap_or(f64::NAN)
        };
        (Some(value("QUESTIONS")), value("INNODB_DATA_FSYNCS"))
    }
}

/// The cost between two readings, per `per` (jobs or seconds); the second reading's own
/// statement is not the worker's.
fn cost_of(before: Reading, after: Reading, per: f64) -> Cost {
    let statements = match (before.0, after.0) {
        (Some(b), Some(a)) => format!("{:.2}", (a - b - 1.0) / per),
        _ => "n/a (no counter)".into(),
    };
    Cost {
        statements,
        commits: format!("{:.2}", (after.1 - before.1) / per),
    }
}

/// Statements and durable commits per job: one worker runs `jobs` jobs and exits
/// (`--limit`), so nothing else talks to the database meanwhile; its start-up and exit are
/// in the count, spread over the jobs.
async fn per_job_cost(bench: &Bench, jobs: usize) -> Cost {
    let Some(mut counters) = Counters::open(bench).await else {
        return Cost::uncounted();
    };
    bench.seed(jobs, |n| QUEUES[n % 3]).await;
    let before = counters.read().await;
    let limit = jobs.to_string();
    let status = bench
        .command(&["consume", "-q", "--limit", &limit])
        .status()
        .unwrap();
    assert!(status.success());
    let after = counters.read().await;
    bench.clear().await;
    cost_of(before, after, jobs as f64)
}

/// Statements and durable commits per second of one idle worker polling every `poll`.
async fn idle_load(bench: &Bench, poll: &str, seconds: u64) -> Cost {
    let Some(mut counters) = Counters::open(bench).await else {
        return Cost::uncounted();
    };
    let worker = bench
        .command(&["consume", "-q", "--sleep", poll])
        .spawn()
        .unwrap();
    let mut children = vec![worker];
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = counters.read().await;
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let after = counters.read().await;
    let window = window.elapsed().as_secs_f64();
    stop(bench, &mut children);
    cost_of(before, after, window)
}

fn stop(bench: &Bench, children: &mut Vec<Child>) {
    let _ = bench.command(&["stop-workers"]).status();
    for child in children.drain(..) {
        let mut child = child;
        let _ = child.wait();
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() - 1) as f64 * fraction).round() as usize;
    sorted[index]
}

//! The command line. Parsing only: what each command does lives in [`crate::commands`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::store::JobStatus;
use crate::units::{parse_byte_size, parse_duration, parse_poll_interval};

#[derive(Debug, Parser)]
#[command(
    name = "pim-job-queue",
    version,
    about = "A job-queue worker for Akeneo PIM: priority queues, one job at a time, systemd-native",
    max_term_width = 100
)]
pub struct Cli {
    /// The config file [default: /etc/pim_job_queue/worker.toml, if present].
    #[arg(long, global = true, env = "PIM_JOB_QUEUE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The job store, e.g. sqlite:///var/lib/pim_job_queue/jobs.sqlite; overrides the config.
    /// Without it: the systemd credential `database_url`, then $PIM_JOB_QUEUE_DATABASE_URL,
    /// then (outside systemd, when readable) /etc/pim_job_queue/database_url and
    /// /etc/pim_job_queue/environment, then `database_url` in the config. Prefer those for
    /// URLs with passwords: argv is public.
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,

    /// Where instance conf files (NAME.conf) live; overrides `instance_dir`.
    #[arg(long, global = true, value_name = "DIR")]
    pub conf_dir: Option<PathBuf>,

    /// More log detail (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Less log detail (warnings and errors only).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub quiet: u8,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    pub fn verbosity(&self) -> i8 {
        self.verbose.min(10) as i8 - self.quiet.min(10) as i8
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Store a job and print its id.
    Push(PushArgs),
    /// Run the worker: take one job at a time from the highest-priority non-empty queue.
    Consume(ConsumeArgs),
    /// Ask every running worker on this database (every host) to exit after its current job.
    StopWorkers,
    /// Show queue depths and the running jobs.
    Status(OutputArgs),
    /// List jobs, newest first.
    Jobs(JobsArgs),
    /// Show one job, with the last lines of its output.
    Show(ShowArgs),
    /// Put a failed or cancelled job back in its queue, or every one a filter selects
    /// (`retry --status failed --code csv_product_import --since 1d`).
    Retry(RetryArgs),
    /// Cancel a waiting job.
    Cancel(IdArgs),
    /// Delete jobs that are not running: by id, or every one of a status that finished
    /// (or, waiting, was created) before a time (`delete --status failed --before 30d`).
    Delete(DeleteArgs),
    /// Pause queues for every worker on this database (every host) until `resume`: claims
    /// pass them over, the other queues keep their priority, running jobs go on. Without a
    /// queue: every configured queue.
    Pause(PauseArgs),
    /// Lift the pause of queues (without a queue: every configured queue).
    Resume(QueuesArgs),
    /// Delete finished jobs past their retention now, as workers do every 10 minutes:
    /// succeeded and cancelled ones after `retention`, failed ones after `failed_retention`.
    Prune,
    /// One line for Icinga, Nagios or Zabbix (monitoring-plugin format) and its state as the
    /// exit code: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (also when the database does not
    /// answer within 10 s). Thresholds are `[WARN:]CRIT`.
    Check(CheckArgs),
    /// The fleet's state in the Prometheus text format, from the database: jobs by queue
    /// and state, queue latency, finished and rescued counters, duration and wait
    /// histograms, workers by host and state.
    Metrics(MetricsArgs),
    /// Create or upgrade the database schema.
    Migrate,
    /// Write the man page and shell completions into DIR (used when packaging).
    #[command(hide = true)]
    GenerateAssets {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The queue, e.g. ui_job, import_export_job or data_maintenance_job.
    pub queue: String,
    /// The job's code (Akeneo's job instance code).
    pub code: String,
    /// The job's payload, a JSON object (at most 1 MiB).
    #[arg(long, value_name = "JSON", conflicts_with = "payload_file")]
    pub payload: Option<String>,
    /// Read the payload from FILE, or from standard input with `-`: for payloads too large
    /// for a command line.
    #[arg(long, value_name = "FILE")]
    pub payload_file: Option<PathBuf>,
    /// Run no earlier than this long from now (seconds, or e.g. 5m).
    #[arg(long, value_name = "SECONDS", value_parser = parse_duration)]
    pub delay: Option<Duration>,
    /// At most one waiting or running job with this key: while one exists, print its id
    /// instead of queueing another (at most 255 characters).
    #[arg(long, value_name = "KEY")]
    pub unique_key: Option<String>,
    /// With --unique-key: exit 75 when a job with the key exists already.
    #[arg(long, requires = "unique_key")]
    pub fail_if_exists: bool,
}

#[derive(Debug, Default, Args)]
pub struct ConsumeArgs {
    /// Queues to consume; default: the instance conf, or all queues.
    #[arg(value_name = "QUEUE", conflicts_with = "instance")]
    pub queues: Vec<String>,
    /// Read the queues from <instance dir>/NAME.conf (NAME comes from the unit's %i).
    #[arg(long, value_name = "NAME")]
    pub instance: Option<String>,
    /// Exit after this many jobs.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    /// Exit, between jobs, after this long (seconds, or e.g. 1h).
    #[arg(long, value_name = "SECONDS", value_parser = parse_duration)]
    pub time_limit: Option<Duration>,
    /// Exit, between jobs, once the worker's own memory passes this (bytes, or e.g. 128M).
    #[arg(long, value_name = "BYTES", value_parser = parse_byte_size)]
    pub memory_limit: Option<u64>,
    /// How long to sleep when every queue is empty (seconds, or e.g. 200ms); overrides
    /// `poll_interval`.
    #[arg(long, value_name = "DURATION", value_parser = parse_poll_interval)]
    pub sleep: Option<Duration>,
    /// The host name recorded on claimed jobs (default: this machine's host name).
    #[arg(long, value_name = "NAME")]
    pub host_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    #[arg(long, value_name = "QUEUE")]
    pub queue: Option<String>,
    /// Only jobs with this code.
    #[arg(long, value_name = "CODE")]
    pub code: Option<String>,
    /// Only jobs created within this long (seconds, or e.g. 2h, 7d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// waiting, running, succeeded, failed or cancelled.
    #[arg(long, value_name = "STATUS", value_parser = parse_status)]
    pub status: Option<JobStatus>,
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub limit: u32,
    /// Count the selected jobs by code and reason instead of listing them (as Symfony's
    /// `messenger:failed:show --stats`), most frequent first.
    #[arg(long)]
    pub stats: bool,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    pub id: i64,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The longest a queue's oldest due job may wait, for every configured queue, then per
    /// queue: e.g. `5m:15m,ui_job=30s:2m`.
    #[arg(long, value_name = "[WARN:]CRIT[,QUEUE=[WARN:]CRIT]...")]
    pub max_latency: Option<String>,
    /// The fewest live workers a queue may have: e.g. `ui_job=2:1,import_export_job=1`.
    #[arg(long, value_name = "QUEUE=[WARN:]CRIT[,...]")]
    pub min_workers: Option<String>,
    /// The most jobs that may have failed within a window: e.g. `1h=5:20`.
    #[arg(long, value_name = "WINDOW=[WARN:]CRIT")]
    pub max_failed: Option<String>,
}

#[derive(Debug, Args)]
pub struct MetricsArgs {
    /// Write into FILE instead of stdout, atomically (a temporary file renamed over it), as
    /// node_exporter's textfile collector needs: e.g.
    /// `/var/lib/prometheus/node-exporter/pim_job_queue.prom`.
    #[arg(long, value_name = "FILE", conflicts_with = "listen")]
    pub output: Option<PathBuf>,
    /// Serve the metrics over HTTP at ADDR (e.g. 127.0.0.1:9469) for a direct scrape,
    /// read from the database at each request, until stopped (SIGTERM, SIGINT).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Args)]
pub struct PauseArgs {
    #[command(flatten)]
    pub queues: QueuesArgs,
    /// Why, shown by `status` and in each worker's STATUS.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
}

#[derive(Debug, Args)]
pub struct QueuesArgs {
    #[arg(value_name = "QUEUE")]
    pub queues: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    /// The job; or select with --status.
    #[arg(value_name = "ID", required_unless_present = "status", conflicts_with_all = ["status", "queue", "code", "since"])]
    pub id: Option<i64>,
    /// Retry every job with this status: failed or cancelled.
    #[arg(long, value_name = "STATUS", value_parser = parse_status)]
    pub status: Option<JobStatus>,
    #[arg(long, value_name = "QUEUE", requires = "status")]
    pub queue: Option<String>,
    #[arg(long, value_name = "CODE", requires = "status")]
    pub code: Option<String>,
    /// Only jobs created within this long.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "status")]
    pub since: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The jobs; or select with --status and --before.
    #[arg(value_name = "ID", required_unless_present = "status", conflicts_with_all = ["status", "before"])]
    pub ids: Vec<i64>,
    /// Delete every job with this status (not running) ...
    #[arg(long, value_name = "STATUS", value_parser = parse_status, requires = "before")]
    pub status: Option<JobStatus>,
    /// ... that finished (or, waiting, was created) more than this long ago.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "status")]
    pub before: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct IdArgs {
    pub id: i64,
}

fn parse_status(text: &str) -> Result<JobStatus, String> {
    JobStatus::parse(text)
        .ok_or_else(|| "expected waiting, running, succeeded, failed or cancelled".to_string())
}

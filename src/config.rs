//! The worker configuration, `worker.toml`.
//!
//! Every key is checked when the file is read: an unknown key, a wrong type, a bad duration or
//! a placeholder typo is a configuration error (exit 78) naming the file and the key, so a
//! mistake is found by `systemctl start`, not by the first job that needs the setting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::akeneo::{AkeneoSettings, JOB_QUEUES, Launcher, LauncherChoice};
use crate::exit::Failure;
use crate::secrets::scrub;
use crate::store::{Cap, ConcurrencyCaps};
use crate::template::ArgvTemplate;
use crate::units::{check_poll_interval, parse_duration, seconds_to_duration};

/// Where the packaged config lives; reading it is optional, naming another file is not.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/pim_job_queue/worker.toml";
/// Where `N.conf` instance files live unless the config or `--conf-dir` says otherwise.
pub const DEFAULT_INSTANCE_DIR: &str = "/etc/pim_job_queue";
/// Akeneo's three queues, highest priority first.
pub const DEFAULT_QUEUES: [&str; 3] = ["ui_job", "import_export_job", "data_maintenance_job"];
/// How long an idle worker sleeps between looks at the queues.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// The same in Akeneo mode: Symfony's `--sleep` default, so the PIM's database sees no more
/// polling than with the PHP consumer.
pub const DEFAULT_AKENEO_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long a job's process group gets between SIGTERM and SIGKILL when it must end.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(10);
/// How often a worker refreshes its heartbeat (and looks for orphaned jobs).
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// How old a worker's heartbeat may get before its running job is taken back.
pub const DEFAULT_RESCUE_AFTER: Duration = Duration::from_secs(30);
/// How long a stop waits for the running job before ending it.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(30 * 60);
/// How long finished jobs are kept.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 86400);
/// Failed jobs wait longer for someone to look at them.
pub const DEFAULT_FAILED_RETENTION: Duration = Duration::from_secs(30 * 86400);

/// A retention as configured: 0 keeps forever (`None`), nothing set is the default.
fn kept_for(value: Option<DurationValue>, default: Duration) -> Option<Duration> {
    match value {
        Some(DurationValue(d)) if d.is_zero() => None,
        Some(DurationValue(d)) => Some(d),
        None => Some(default),
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from; `None` when no file exists and the defaults apply.
    pub source: Option<PathBuf>,
    pub database_url: Option<String>,
    pub instance_dir: PathBuf,
    pub poll_interval: Duration,
    /// Every queue this installation knows, highest priority first.
    pub queues: Vec<String>,
    pub auto_migrate: bool,
    pub heartbeat_interval: Duration,
    pub rescue_after: Duration,
    /// How long a stop (SIGTERM) lets the running job finish before ending it.
    pub stop_grace: Duration,
    /// How long finished jobs are kept; `None` keeps them forever.
    pub retention: Option<Duration>,
    /// How long failed jobs are kept; `None` keeps them until someone deletes or retries
    /// them.
    pub failed_retention: Option<Duration>,
    /// Where same-host wake-up sockets live; `None` picks the default (see [`crate::wake`]).
    pub wake_dir: Option<PathBuf>,
    /// Where jobs come from: this project's job store, or the PIM's Messenger table.
    pub transport: Transport,
    default_job: Option<JobSpec>,
    per_code: BTreeMap<String, JobSpec>,
    /// The recurring jobs, `[schedule.NAME]`, by name.
    pub schedules: Vec<Schedule>,
    /// `max_running` per code or per group, which every claim respects.
    pub caps: ConcurrencyCaps,
}

/// A recurring job: `[schedule.NAME]`.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub name: String,
    pub cron: crate::schedule::Cron,
    /// The cron expression as written, for people.
    pub expression: String,
    pub zone: jiff::tz::TimeZone,
    /// `timezone` as written (`UTC` when not).
    pub zone_name: String,
    pub queue: String,
    pub code: String,
    pub payload: String,
    /// How old the latest slot may be and still be queued (after downtime); `None`: the
    /// schedule's period.
    pub catch_up: Option<Duration>,
}

impl Schedule {
    /// The slot to queue at `now`: the latest at or before it, while younger than
    /// `catch_up`.
    pub fn due_slot(&self, now: jiff::Timestamp) -> Option<jiff::Timestamp> {
        let slot = self.cron.latest_at_or_before(now, &self.zone)?;
        let catch_up = self
            .catch_up
            .or_else(|| self.cron.period_from(slot, &self.zone))?;
        let age = Duration::try_from(now.duration_since(slot)).ok()?;
        (age <= catch_up).then_some(slot)
    }

    pub fn next_run(&self, now: jiff::Timestamp) -> Option<jiff::Timestamp> {
        self.cron.next_after(now, &self.zone)
    }

    /// The key its slot's job carries (`pjq_jobs.unique_key`).
    pub fn unique_key(&self, slot: jiff::Timestamp) -> String {
        format!("schedule:{}:{}", self.name, slot.as_second())
    }
}

/// Where jobs come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    Native,
    Akeneo(AkeneoSettings),
}

/// How to run the jobs of one code: the `[job]` table merged with its `[jobs.CODE]` table.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub command: ArgvTemplate,
    pub working_directory: Option<PathBuf>,
    pub timeout: Option<Duration>,
    pub kill_grace: Duration,
    pub max_attempts: u32,
    pub env: BTreeMap<String, String>,
    /// Opt-in: which failures go back to the queue, and after how long.
    pub retry: Option<RetryPolicy>,
}

/// `retry_on_exit_codes` and its backoff: a failure it names goes back to the queue while
/// the job has attempts left, due after a delay that grows with each attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// The exit codes that retry; `None`: any failure (an exit code, a signal, a timeout).
    pub exit_codes: Option<Vec<i32>>,
    pub backoff: Duration,
    pub multiplier: f64,
    pub max_backoff: Duration,
    /// The delay is moved by up to this fraction, either way, so retries of many jobs that
    /// failed together do not all come back at once.
    pub jitter: f64,
}

impl RetryPolicy {
    /// Whether a failure with `exit_code` (none: a signal or a timeout) is retried.
    pub fn retries(&self, exit_code: Option<i32>) -> bool {
        match (&self.exit_codes, exit_code) {
            (None, _) => true,
            (Some(codes), Some(code)) => codes.contains(&code),
            (Some(_), None) => false,
        }
    }

    /// The delay before attempt `attempt + 1`, after `attempt` failed ones: `backoff`
    /// times `multiplier` per earlier retry, at most `max_backoff`, moved by `jitter`
    /// (`spread` in [-1, 1] picks where in it).
    pub fn delay(&self, attempt: i64, spread: f64) -> Duration {
        let grown = self.backoff.as_secs_f64()
            * self
                .multiplier
                .powi(attempt.saturating_sub(1).clamp(0, 64) as i32);
        let capped = grown.min(self.max_backoff.as_secs_f64());
        Duration::from_secs_f64((capped * (1.0 + self.jitter * spread.clamp(-1.0, 1.0))).max(0.0))
    }
}

/// `retry_on_exit_codes`: a list of codes, or "any".
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawRetryCodes {
    Codes(Vec<i32>),
    Word(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    database_url: Option<String>,
    instance_dir: Option<PathBuf>,
    poll_interval: Option<DurationValue>,
    queues: Option<Vec<String>>,
    auto_migrate: Option<bool>,
    heartbeat_interval: Option<DurationValue>,
    rescue_after: Option<DurationValue>,
    stop_grace: Option<DurationValue>,
    retention: Option<DurationValue>,
    failed_retention: Option<DurationValue>,
    wake_dir: Option<PathBuf>,
    transport: Option<String>,
    akeneo: Option<RawAkeneo>,
    job: Option<RawJob>,
    #[serde(default)]
    jobs: BTreeMap<String, RawJob>,
    #[serde(default)]
    schedule: BTreeMap<String, RawSchedule>,
    #[serde(default)]
    groups: BTreeMap<String, RawGroup>,
}

/// `[groups.NAME]`: a limit that codes share through `concurrency_group = "NAME"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    max_running: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    cron: String,
    queue: String,
    code: String,
    payload: Option<String>,
    timezone: Option<String>,
    catch_up: Option<DurationValue>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    command: Option<Vec<String>>,
    working_directory: Option<PathBuf>,
    timeout: Option<DurationValue>,
    kill_grace: Option<DurationValue>,
    max_attempts: Option<u32>,
    env: Option<BTreeMap<String, String>>,
    allow_option_values: Option<bool>,
    retry_on_exit_codes: Option<RawRetryCodes>,
    backoff: Option<DurationValue>,
    backoff_multiplier: Option<f64>,
    max_backoff: Option<DurationValue>,
    jitter: Option<f64>,
    max_running: Option<u32>,
    concurrency_group: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAkeneo {
    project_dir: Option<PathBuf>,
    php_binary: Option<PathBuf>,
    launcher: Option<String>,
    redeliver_timeout: Option<DurationValue>,
    env: Option<String>,
    debug: Option<bool>,
    environment: Option<BTreeMap<String, String>>,
    kill_grace: Option<DurationValue>,
    allow_other_queues: Option<bool>,
    max_failed_launches: Option<u32>,
    failed_launch_window: Option<DurationValue>,
}

/// A duration written as a string (`"200ms"`, `"2h"`) or a number of seconds.
#[derive(Debug, Clone, Copy)]
struct DurationValue(Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Text(String),
            Integer(u64),
            Float(f64),
        }
        let parsed = match Written::deserialize(deserializer)? {
            Written::Text(text) => parse_duration(&text),
            Written::Integer(seconds) => seconds_to_duration(seconds as f64),
            Written::Float(seconds) => seconds_to_duration(seconds),
        };
        parsed.map(DurationValue).map_err(serde::de::Error::custom)
    }
}

/// A TOML error as `FILE:LINE:COLUMN: message`, without the source line toml would quote
/// (a typo on the `database_url` line would put the password in the journal) and with any
/// secret the message itself quotes removed.
fn toml_error(name: &str, text: &str, error: &toml::de::Error) -> String {
    let mut place = String::new();
    let mut key = String::new();
    if let Some(span) = error.span() {
        let start = span.start.min(text.len());
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line = text[..start].matches('\n').count() + 1;
        let column = text[line_start..start].chars().count() + 1;
        place = format!(":{line}:{column}");
        // The key the error is about, from the text before the value (never the value).
        if let Some((name, _)) = text[line_start..start].split_once('=') {
            key = format!("`{}`: ", name.trim());
        }
    }
    format!(
        "{name}{place}: {key}{}",
        scrub(error.message().trim(), text)
    )
}

impl Config {
    /// Reads the config: the named file (which must exist), or else the default path if it
    /// exists, or else the built-in defaults.
    pub fn load(explicit: Option<&Path>) -> Result<Config, Failure> {
        match explicit {
            Some(path) => Self::from_file(path),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Self::from_file(Path::new(DEFAULT_CONFIG_PATH))
            }
            None => Self::from_raw(RawConfig::default(), None),
        }
    }

    pub fn from_file(path: &Path) -> Result<Config, Failure> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            Failure::config(format!("cannot read config {}: {error}", path.display()))
        })?;
        Self::from_toml(&text, Some(path))
    }

    /// Parses TOML text; `path` only names the source in messages.
    pub fn from_toml(text: &str, path: Option<&Path>) -> Result<Config, Failure> {
        let name = path.map_or("config".into(), |p| p.display().to_string());
        let raw: RawConfig = toml::from_str(text)
            .map_err(|error| Failure::config(toml_error(&name, text, &error)))?;
        Self::from_raw(raw, path.map(Path::to_path_buf)).map_err(|failure| {
            Failure::config(format!("{name}: {}", scrub(&failure.message, text)))
        })
    }

    fn from_raw(raw: RawConfig, source: Option<PathBuf>) -> Result<Config, Failure> {
        let queues = match raw.queues {
            Some(queues) => validate_queue_list(queues)?,
            None => DEFAULT_QUEUES.iter().map(|q| q.to_string()).collect(),
        };
        let default_raw = raw.job.unwrap_or_default();
        let default_job = match &default_raw.command {
            Some(_) => Some(build_job_spec(&default_raw, "job")?),
            None => None,
        };
        let per_code = raw
            .jobs
            .iter()
            .map(|(code, over)| {
                let merged = merge_job(&default_raw, over);
                let spec = build_job_spec(&merged, &format!("jobs.{code}"))?;
                Ok((code.clone(), spec))
            })
            .collect::<Result<_, Failure>>()?;
        if let Some(url) = &raw.database_url
            && url.trim().is_empty()
        {
            return Err(Failure::config("`database_url` is empty"));
        }
        let heartbeat_interval = raw
            .heartbeat_interval
            .map_or(DEFAULT_HEARTBEAT_INTERVAL, |d| d.0);
        let rescue_after = raw.rescue_after.map_or(DEFAULT_RESCUE_AFTER, |d| d.0);
        check_fleet_timing(heartbeat_interval, rescue_after)?;
        let allow_other_queues = raw
            .akeneo
            .as_ref()
            .and_then(|a| a.allow_other_queues)
            .unwrap_or(false);
        let transport = build_transport(raw.transport.as_deref(), raw.akeneo)?;
        if matches!(transport, Transport::Akeneo(_)) && !allow_other_queues {
            check_akeneo_queues(&queues)?;
        }
        let schedules = raw
            .schedule
            .iter()
            .map(|(name, schedule)| build_schedule(name, schedule, &queues))
            .collect::<Result<Vec<_>, Failure>>()?;
        if !schedules.is_empty() && matches!(transport, Transport::Akeneo(_)) {
            return Err(Failure::config(
                "[schedule.*] needs the native job store: with transport = \"akeneo\" the PIM \
                 schedules its own jobs",
            ));
        }
        let caps = build_caps(&default_raw, &raw.jobs, &raw.groups)?;
        if !caps.is_empty() && matches!(transport, Transport::Akeneo(_)) {
            return Err(Failure::config(
                "`max_running` and `concurrency_group` need the native job store: with \
                 transport = \"akeneo\" the PIM's own consumers would not respect them",
            ));
        }
        let default_poll = match transport {
            Transport::Akeneo(_) => DEFAULT_AKENEO_POLL_INTERVAL,
            Transport::Native => DEFAULT_POLL_INTERVAL,
        };
        Ok(Config {
            source,
            database_url: raw.database_url,
            instance_dir: raw
                .instance_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_INSTANCE_DIR)),
            poll_interval: check_poll_interval(raw.poll_interval.map_or(default_poll, |d| d.0))
                .map_err(|why| Failure::config(format!("`poll_interval`: {why}")))?,
            queues,
            auto_migrate: raw.auto_migrate.unwrap_or(true),
            heartbeat_interval,
            rescue_after,
            stop_grace: raw.stop_grace.map_or(DEFAULT_STOP_GRACE, |d| d.0),
            retention: kept_for(raw.retention, DEFAULT_RETENTION),
            failed_retention: kept_for(raw.failed_retention, DEFAULT_FAILED_RETENTION),
            wake_dir: raw.wake_dir,
            transport,
            default_job,
            per_code,
            schedules,
            caps,
        })
    }

    /// Whether this is the packaged config (or none): the installation the service runs.
    pub fn is_the_packaged_one(&self) -> bool {
        self.source
            .as_deref()
            .is_none_or(|path| path == Path::new(DEFAULT_CONFIG_PATH))
    }

    /// How to run jobs of `code`, or why they cannot run.
    pub fn job_spec(&self, code: &str) -> Result<&JobSpec, String> {
        self.per_code
            .get(code)
            .or(self.default_job.as_ref())
            .ok_or_else(|| {
                format!(
                    "no command is configured for job code `{code}` (set [job] command in {})",
                    self.source_name()
                )
            })
    }

    /// The attempts a job of `code` gets, fixed when it is pushed.
    pub fn max_attempts(&self, code: &str) -> u32 {
        self.job_spec(code).map_or(1, |spec| spec.max_attempts)
    }

    /// Whether any job at all could run; a consumer without a command is a config error.
    /// The Akeneo transport builds its commands from the messages.
    pub fn has_any_command(&self) -> bool {
        matches!(self.transport, Transport::Akeneo(_))
            || self.default_job.is_some()
            || !self.per_code.is_empty()
    }

    pub fn source_name(&self) -> String {
        self.source.as_ref().map_or_else(
            || format!("{DEFAULT_CONFIG_PATH} (not present: built-in defaults)"),
            |p| p.display().to_string(),
        )
    }

    pub fn knows_queue(&self, name: &str) -> bool {
        self.queues.iter().any(|q| q == name)
    }

    /// Puts `selected` into this installation's priority order, dropping duplicates.
    pub fn in_priority_order(&self, selected: &[String]) -> Vec<String> {
        self.queues
            .iter()
            .filter(|q| selected.contains(q))
            .cloned()
            .collect()
    }
}

fn build_transport(name: Option<&str>, raw: Option<RawAkeneo>) -> Result<Transport, Failure> {
    match name.unwrap_or("native") {
        "native" => Ok(Transport::Native),
        "akeneo" => {
            let raw = raw.ok_or_else(|| {
                Failure::config(
                    "`transport = \"akeneo\"` needs an [akeneo] table with `project_dir`",
                )
            })?;
            let project_dir = raw
                .project_dir
                .filter(|dir| dir.is_absolute())
                .ok_or_else(|| Failure::config("`akeneo.project_dir` must be an absolute path"))?;
            let launcher = match raw.launcher.as_deref().unwrap_or("auto") {
                "auto" => LauncherChoice::Auto,
                "akeneo7" => LauncherChoice::Fixed(Launcher::Watchdog),
                "akeneo6" => LauncherChoice::Fixed(Launcher::Direct),
                other => {
                    return Err(Failure::config(format!(
                        "`akeneo.launcher` = {other:?}: use \"auto\", \"akeneo7\" or \"akeneo6\""
                    )));
                }
            };
            let app_env = raw.env.unwrap_or_else(|| "prod".into());
            if !is_valid_queue_name(&app_env) {
                return Err(Failure::config(format!(
                    "`akeneo.env` = {app_env:?} is not a Symfony environment name"
                )));
            }
            let environment = raw.environment.unwrap_or_default();
            check_variable_names(&environment, "akeneo.environment")?;
            let max_failed_launches = raw.max_failed_launches.unwrap_or(3);
            if max_failed_launches == 0 {
                return Err(Failure::config(
                    "`akeneo.max_failed_launches` must be 1 or more",
                ));
            }
            Ok(Transport::Akeneo(AkeneoSettings {
                project_dir,
                php_binary: raw
                    .php_binary
                    .unwrap_or_else(|| PathBuf::from("/usr/bin/php")),
                launcher,
                detected_launcher: None,
                redeliver_timeout: raw
                    .redeliver_timeout
                    .map_or(Duration::from_secs(86_400), |d| d.0),
                app_env,
                app_debug: raw.debug,
                environment,
                kill_grace: raw.kill_grace.map_or(DEFAULT_KILL_GRACE, |d| d.0),
                max_failed_launches,
                failed_launch_window: raw
                    .failed_launch_window
                    .map_or(Duration::from_secs(30), |d| d.0),
            }))
        }
        other => Err(Failure::config(format!(
            "`transport` = {other:?}: use \"native\" or \"akeneo\""
        ))),
    }
}

/// In Akeneo mode only the PIM's job queues may be consumed: the same table holds the
/// webhook (`default`) and data-quality (`dqi_*`) queues, whose messages a job worker would
/// set aside and never deliver.
fn check_akeneo_queues(queues: &[String]) -> Result<(), Failure> {
    match queues.iter().find(|q| !JOB_QUEUES.contains(&q.as_str())) {
        Some(other) => Err(Failure::config(format!(
            "`queues` names {other:?}, which is not one of Akeneo's job queues ({}); \
             set `akeneo.allow_other_queues = true` if it really carries job messages",
            JOB_QUEUES.join(", ")
        ))),
        None => Ok(()),
    }
}

fn check_variable_names(env: &BTreeMap<String, String>, table: &str) -> Result<(), Failure> {
    match env
        .keys()
        .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
    {
        Some(bad) => Err(Failure::config(format!(
            "`{table}` has an invalid variable name {bad:?}"
        ))),
        None => Ok(()),
    }
}

/// The rescue protocol needs room: a worker cut off from the database stops its job after
/// two thirds of `rescue_after`, and several heartbeats must fit before that.
fn check_fleet_timing(heartbeat_interval: Duration, rescue_after: Duration) -> Result<(), Failure> {
    if heartbeat_interval.is_zero() {
        return Err(Failure::config(
            "`heartbeat_interval` must be more than zero",
        ));
    }
    if rescue_after < heartbeat_interval * 3 {
        return Err(Failure::config(format!(
            "`rescue_after` ({}) must be at least three times `heartbeat_interval` ({})",
            humantime::format_duration(rescue_after),
            humantime::format_duration(heartbeat_interval)
        )));
    }
    Ok(())
}

/// A queue name: what may stand in a queue list, a conf file line or the database.
pub fn is_valid_queue_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

fn validate_queue_list(queues: Vec<String>) -> Result<Vec<String>, Failure> {
    if queues.is_empty() {
        return Err(Failure::config("`queues` must name at least one queue"));
    }
    for (index, name) in queues.iter().enumerate() {
        if !is_valid_queue_name(name) {
            return Err(Failure::config(format!(
                "`queues[{index}]` = {name:?} is not a queue name (1 to 64 of A-Z a-z 0-9 _ - .)"
            )));
        }
        if queues[..index].contains(name) {
            return Err(Failure::config(format!("`queues` names {name:?} twice")));
        }
    }
    Ok(queues)
}

/// `[jobs.CODE]` keys replace `[job]` keys; `env` tables are merged, the per-code value winning.
fn merge_job(base: &RawJob, over: &RawJob) -> RawJob {
    let mut env = base.env.clone().unwrap_or_default();
    env.extend(over.env.clone().unwrap_or_default());
    RawJob {
        command: over.command.clone().or_else(|| base.command.clone()),
        working_directory: over
            .working_directory
            .clone()
            .or_else(|| base.working_directory.clone()),
        timeout: over.timeout.or(base.timeout),
        kill_grace: over.kill_grace.or(base.kill_grace),
        max_attempts: over.max_attempts.or(base.max_attempts),
        env: Some(env),
        allow_option_values: over.allow_option_values.or(base.allow_option_values),
        retry_on_exit_codes: over
            .retry_on_exit_codes
            .clone()
            .or_else(|| base.retry_on_exit_codes.clone()),
        backoff: over.backoff.or(base.backoff),
        backoff_multiplier: over.backoff_multiplier.or(base.backoff_multiplier),
        max_backoff: over.max_backoff.or(base.max_backoff),
        jitter: over.jitter.or(base.jitter),
        // Never inherited: `[job]` may not set them (see `build_caps`).
        max_running: over.max_running,
        concurrency_group: over.concurrency_group.clone(),
    }
}

/// The retry policy of a job table: none unless `retry_on_exit_codes` is set.
fn build_retry_policy(raw: &RawJob, table: &str) -> Result<Option<RetryPolicy>, Failure> {
    let key = |name: &str| format!("`{table}.{name}`");
    let Some(codes) = &raw.retry_on_exit_codes else {
        return Ok(None);
    };
    let exit_codes = match codes {
        RawRetryCodes::Codes(codes) => Some(codes.clone()),
        RawRetryCodes::Word(word) if word == "any" => None,
        RawRetryCodes::Word(word) => {
            return Err(Failure::config(format!(
                "{} = {word:?}: expected a list of exit codes or \"any\"",
                key("retry_on_exit_codes")
            )));
        }
    };
    let backoff = raw.backoff.map_or(Duration::from_secs(30), |d| d.0);
    let multiplier = raw.backoff_multiplier.unwrap_or(2.0);
    let max_backoff = raw.max_backoff.map_or(Duration::from_secs(3600), |d| d.0);
    let jitter = raw.jitter.unwrap_or(0.1);
    if !(multiplier.is_finite() && multiplier >= 1.0) {
        return Err(Failure::config(format!(
            "{} must be 1 or more",
            key("backoff_multiplier")
        )));
    }
    if !(0.0..1.0).contains(&jitter) {
        return Err(Failure::config(format!(
            "{} must be at least 0 and below 1",
            key("jitter")
        )));
    }
    if max_backoff < backoff {
        return Err(Failure::config(format!(
            "{} is shorter than `backoff`",
            key("max_backoff")
        )));
    }
    Ok(Some(RetryPolicy {
        exit_codes,
        backoff,
        multiplier,
        max_backoff,
        jitter,
    }))
}

fn build_schedule(name: &str, raw: &RawSchedule, queues: &[String]) -> Result<Schedule, Failure> {
    let key = |field: &str| format!("`schedule.{name}.{field}`");
    let named_well = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !named_well {
        return Err(Failure::config(format!(
            "[schedule.{name}]: a schedule's name may only have letters, digits, `_`, `-` and `.`"
        )));
    }
    let cron = crate::schedule::Cron::parse(&raw.cron)
        .map_err(|error| Failure::config(format!("{} = {:?}: {error}", key("cron"), raw.cron)))?;
    if !queues.contains(&raw.queue) {
        return Err(Failure::config(format!(
            "{}: unknown queue {:?}; known queues: {}",
            key("queue"),
            raw.queue,
            queues.join(", ")
        )));
    }
    if raw.code.trim().is_empty() {
        return Err(Failure::config(format!("{} is empty", key("code"))));
    }
    let payload = raw.payload.clone().unwrap_or_else(|| "{}".to_string());
    let is_object =
        serde_json::from_str::<serde_json::Value>(&payload).is_ok_and(|v| v.is_object());
    if !is_object {
        return Err(Failure::config(format!(
            "{} must be a JSON object",
            key("payload")
        )));
    }
    let zone_name = raw.timezone.clone().unwrap_or_else(|| "UTC".to_string());
    let zone = jiff::tz::TimeZone::get(&zone_name).map_err(|error| {
        Failure::config(format!("{} = {zone_name:?}: {error}", key("timezone")))
    })?;
    Ok(Schedule {
        name: name.to_string(),
        cron,
        expression: raw.cron.clone(),
        zone,
        zone_name,
        queue: raw.queue.clone(),
        code: raw.code.clone(),
        payload,
        catch_up: raw.catch_up.as_ref().map(|d| d.0),
    })
}

/// The concurrency caps: `max_running` of a `[jobs.CODE]` caps that code alone (key
/// `code:CODE`); `concurrency_group = "NAME"` makes it share `[groups.NAME] max_running`
/// (key `group:NAME`) with the other codes of the group.
fn build_caps(
    default_job: &RawJob,
    jobs: &BTreeMap<String, RawJob>,
    groups: &BTreeMap<String, RawGroup>,
) -> Result<ConcurrencyCaps, Failure> {
    if default_job.max_running.is_some() || default_job.concurrency_group.is_some() {
        return Err(Failure::config(
            "`job.max_running` and `job.concurrency_group`: a cap belongs to one code or one \
             group; set it in [jobs.CODE] or [groups.NAME]",
        ));
    }
    for (name, group) in groups {
        check_cap_name(name, &format!("[groups.{name}]"))?;
        if group.max_running == 0 {
            return Err(Failure::config(format!(
                "`groups.{name}.max_running` must be 1 or more"
            )));
        }
    }
    let mut caps = Vec::new();
    for (code, raw) in jobs {
        let table = format!("jobs.{code}");
        let (key, limit) = match (raw.max_running, &raw.concurrency_group) {
            (None, None) => continue,
            (Some(_), Some(_)) => {
                return Err(Failure::config(format!(
                    "`{table}`: set `max_running` or `concurrency_group`, not both (a group's \
                     limit is its [groups.NAME] max_running)"
                )));
            }
            (Some(0), None) => {
                return Err(Failure::config(format!(
                    "`{table}.max_running` must be 1 or more"
                )));
            }
            (Some(limit), None) => (format!("code:{code}"), limit),
            (None, Some(group)) => {
                let Some(found) = groups.get(group) else {
                    return Err(Failure::config(format!(
                        "`{table}.concurrency_group` = {group:?}: there is no [groups.{group}] \
                         table with its max_running"
                    )));
                };
                (format!("group:{group}"), found.max_running)
            }
        };
        check_cap_name(&key, &format!("`{table}`"))?;
        caps.push(Cap {
            code: code.clone(),
            key,
            limit,
        });
    }
    Ok(ConcurrencyCaps::new(caps))
}

/// A cap's key is stored with each running job it counts (255 characters at most).
fn check_cap_name(name: &str, place: &str) -> Result<(), Failure> {
    if name.is_empty() || name.len() > 249 || name.chars().any(char::is_control) {
        return Err(Failure::config(format!(
            "{place}: a code or group with a cap needs a name of 1 to 249 characters without \
             control characters"
        )));
    }
    Ok(())
}

fn build_job_spec(raw: &RawJob, table: &str) -> Result<JobSpec, Failure> {
    let command = raw.command.as_deref().ok_or_else(|| {
        Failure::config(format!("`{table}.command` is missing (and [job] has none)"))
    })?;
    let command = ArgvTemplate::parse(command, &format!("{table}.command"))
        .map_err(Failure::config)?
        .allowing_option_values(raw.allow_option_values.unwrap_or(false));
    let max_attempts = raw.max_attempts.unwrap_or(1);
    if max_attempts == 0 {
        return Err(Failure::config(format!(
            "`{table}.max_attempts` must be 1 or more"
        )));
    }
    let env = raw.env.clone().unwrap_or_default();
    check_variable_names(&env, &format!("{table}.env"))?;
    Ok(JobSpec {
        command,
        working_directory: raw.working_directory.clone(),
        timeout: raw.timeout.map(|d| d.0).filter(|d| !d.is_zero()),
        kill_grace: raw.kill_grace.map_or(DEFAULT_KILL_GRACE, |d| d.0),
        max_attempts,
        env,
        retry: build_retry_policy(raw, table)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Failure> {
        Config::from_toml(text, Some(Path::new("/etc/x/worker.toml")))
    }

    /// The latest slot is due while younger than `catch_up`, by default the period: a
    /// daily 02:00 found at 10:00 runs once; with `catch_up = "1h"` it waits for tomorrow.
    #[test]
    fn a_schedule_catches_up_its_latest_slot_only() {
        let table = "[schedule.nightly]\ncron = \"0 2 * * *\"\nqueue = \"ui_job\"\ncode = \"x\"";
        let at = |text: &str| text.parse::<jiff::Timestamp>().unwrap();
        let config = parse(table).unwrap();
        let nightly = &config.schedules[0];
        assert_eq!(
            nightly.due_slot(at("2026-12-06T10:00:00Z")),
            Some(at("2026-12-06T02:00:00Z"))
        );
        assert_eq!(nightly.payload, "{}");
        let config = parse(&format!("{table}\ncatch_up = \"1h\"")).unwrap();
        assert_eq!(
            config.schedules[0].due_slot(at("2026-12-06T10:00:00Z")),
            None
        );
        assert_eq!(
            config.schedules[0].due_slot(at("2026-12-06T02:59:00Z")),
            Some(at("2026-12-06T02:00:00Z"))
        );
        let akeneo =
            format!("transport = \"akeneo\"\n[akeneo]\nproject_dir = \"/srv/pim\"\n{table}");
        let refused = parse(&akeneo).unwrap_err().message;
        assert!(refused.contains("needs the native job store"), "{refused}");
        let unknown = table.replace("ui_job", "nope");
        assert!(
            parse(&unknown)
                .unwrap_err()
                .message
                .contains("`schedule.nightly.queue`")
        );
    }

    #[test]
    fn the_documented_example_parses() {
        let config = parse(
            r#"
            database_url = "sqlite:///var/lib/pim_job_queue/jobs.sqlite"
            instance_dir = "/etc/pim_job_queue"
            poll_interval = "200ms"
            [job]
            command = ["/usr/bin/php", "/srv/pim/bin/console", "app:import-feed", "--quiet", "{payload.file}"]
            working_directory = "/srv/pim"
            timeout = "2h"
            max_attempts = 1
            [job.env]
            APP_ENV = "prod"
            [jobs.csv_product_import]
            timeout = "6h"
            [jobs.csv_product_import.env]
            EXTRA = "1"
            "#,
        )
        .unwrap();
        assert_eq!(config.poll_interval, Duration::from_millis(200));
        let import = config.job_spec("csv_product_import").unwrap();
        assert_eq!(import.timeout, Some(Duration::from_secs(6 * 3600)));
        assert_eq!(import.env.get("APP_ENV").unwrap(), "prod");
        assert_eq!(import.env.get("EXTRA").unwrap(), "1");
        let other = config.job_spec("anything").unwrap();
        assert_eq!(other.timeout, Some(Duration::from_secs(7200)));
        assert_eq!(config.queues, DEFAULT_QUEUES);
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let error = parse("pol_interval = \"1s\"").unwrap_err();
        assert_eq!(error.exit, crate::exit::ExitCode::Config);
        assert!(
            error.message.contains("/etc/x/worker.toml") && error.message.contains("pol_interval"),
            "{}",
            error.message
        );
        let error = parse("poll_interval = true").unwrap_err();
        assert!(error.message.contains("poll_interval"), "{}", error.message);
        let error = parse("[job]\ncommand = []").unwrap_err();
        assert!(error.message.contains("job.command"), "{}", error.message);
        let error = parse("[job]\ncommand = [\"x\"]\ntimeout = \"soon\"").unwrap_err();
        assert!(error.message.contains("timeout"), "{}", error.message);
        let error = parse("[jobs.a]\ntimeout = 5").unwrap_err();
        assert!(
            error.message.contains("jobs.a.command"),
            "{}",
            error.message
        );
        let error = parse("[job]\ncommand = [\"x\", \"{nope}\"]").unwrap_err();
        assert!(
            error.message.contains("job.command[1]"),
            "{}",
            error.message
        );
    }

    /// A code's own cap, a group's shared one, and each misuse named with its table.
    #[test]
    fn caps_per_code_and_per_group() {
        let config = parse(
            "[job]\ncommand = [\"x\"]\n[jobs.csv_product_import]\nmax_running = 1\n\
             [jobs.erp_a]\nconcurrency_group = \"erp\"\n[jobs.erp_b]\nconcurrency_group = \"erp\"\n\
             [jobs.free]\ntimeout = 5\n[groups.erp]\nmax_running = 2",
        )
        .unwrap();
        let cap = config.caps.of("csv_product_import").unwrap();
        assert_eq!(
            (cap.key.as_str(), cap.limit),
            ("code:csv_product_import", 1)
        );
        assert_eq!(config.caps.of("erp_b").unwrap().key, "group:erp");
        assert!(config.caps.of("free").is_none());
        assert_eq!(
            config.caps.limits(),
            [("code:csv_product_import", 1), ("group:erp", 2)]
        );
        for (text, named) in [
            ("[jobs.a]\nmax_running = 0", "jobs.a.max_running"),
            (
                "[jobs.a]\nconcurrency_group = \"nope\"",
                "jobs.a.concurrency_group",
            ),
            ("[groups.g]\nmax_running = 0", "groups.g.max_running"),
            ("[groups.g]\nmax_runing = 2", "max_runing"),
            (
                "[groups.g]\nmax_running = 1\n[jobs.a]\nmax_running = 1\nconcurrency_group = \"g\"",
                "jobs.a",
            ),
            ("max_running = 1", "job.max_running"),
        ] {
            let text = format!("[job]\ncommand = [\"x\"]\n{text}");
            let error = match parse(&text) {
                Err(error) => error,
                Ok(_) => panic!("accepted: {text}"),
            };
            assert_eq!(error.exit, crate::exit::ExitCode::Config, "{text}");
            assert!(error.message.contains(named), "{text}: {}", error.message);
        }
        let akeneo = "transport = \"akeneo\"\n[akeneo]\nproject_dir = \"/srv/pim\"\n\
                      [jobs.a]\ncommand = [\"x\"]\nmax_running = 1";
        let error = parse(akeneo).unwrap_err();
        assert!(
            error.message.contains("native job store"),
            "{}",
            error.message
        );
    }

    #[test]
    fn queue_lists_are_validated_and_ordered() {
        let config = parse("queues = [\"b\", \"a\", \"c\"]").unwrap();
        let order = config.in_priority_order(&["c".into(), "b".into()]);
        assert_eq!(order, ["b", "c"]);
        assert!(parse("queues = []").is_err());
        assert!(parse("queues = [\"a\", \"a\"]").is_err());
        assert!(parse("queues = [\"a b\"]").is_err());
    }

    #[test]
    fn fleet_timing_is_checked() {
        let config =
            parse("heartbeat_interval = \"1s\"\nrescue_after = 10\nretention = 0").unwrap();
        assert_eq!(config.rescue_after, Duration::from_secs(10));
        assert_eq!(config.retention, None);
        let error = parse("heartbeat_interval = \"5s\"\nrescue_after = \"10s\"").unwrap_err();
        assert!(error.message.contains("rescue_after"), "{}", error.message);
        assert_eq!(parse("").unwrap().retention, Some(DEFAULT_RETENTION));
        assert_eq!(
            parse("").unwrap().failed_retention,
            Some(DEFAULT_FAILED_RETENTION)
        );
        assert_eq!(
            parse("failed_retention = 0").unwrap().failed_retention,
            None
        );
    }

    #[test]
    fn akeneo_settings_and_their_defaults() {
        let config =
            parse("transport = \"akeneo\"\n[akeneo]\nproject_dir = \"/home/akeneo/pim\"\n")
                .unwrap();
        let Transport::Akeneo(settings) = &config.transport else {
            panic!("akeneo transport");
        };
        assert_eq!(settings.launcher, LauncherChoice::Auto);
        assert_eq!(settings.app_env, "prod");
        assert_eq!(settings.kill_grace, DEFAULT_KILL_GRACE);
        assert_eq!(settings.max_failed_launches, 3);
        assert_eq!(config.poll_interval, DEFAULT_AKENEO_POLL_INTERVAL);
        let error = parse(
            "transport = \"akeneo\"\n[akeneo]\nproject_dir = \"/p\"\nlauncher = \"akeneo8\"\n",
        )
        .unwrap_err();
        assert!(
            error.message.contains("akeneo.launcher"),
            "{}",
            error.message
        );
    }

    #[test]
    fn akeneo_mode_consumes_only_job_queues() {
        let base = "transport = \"akeneo\"\nqueues = [\"ui_job\", \"dqi_launch\"]\n[akeneo]\nproject_dir = \"/p\"\n";
        let error = parse(base).unwrap_err();
        assert_eq!(error.exit, crate::exit::ExitCode::Config);
        assert!(
            error
                .message
                .contains("\"dqi_launch\", which is not one of Akeneo's job queues"),
            "{}",
            error.message
        );
        assert!(parse(&format!("{base}allow_other_queues = true\n")).is_ok());
        assert!(
            parse("queues = [\"ui_job\", \"dqi_launch\"]").is_ok(),
            "native mode: any queue"
        );
    }

    #[test]
    fn no_command_is_reported_per_code() {
        let config = parse("").unwrap();
        assert!(!config.has_any_command());
        assert!(config.job_spec("x").unwrap_err().contains("no command"));
    }
}

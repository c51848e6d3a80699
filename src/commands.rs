//! What each subcommand does. Each returns `Ok` or a [`Failure`] that carries its exit code;
//! `main` turns that into the process's exit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tracing::{info, warn};

use crate::cli::{Cli, Command, ConsumeArgs, IdArgs, JobsArgs, OutputArgs, PushArgs, ShowArgs};
use crate::config::{Config, Transport};
use crate::consumer::{Backoff, Consumer, ConsumerOptions, Reloader, StopReason};
use crate::exit::{ExitCode, Failure};
use crate::instance::read_instance_queues;
use crate::notify::Notifier;
use crate::secrets::{self, UrlSource};
use crate::signals::{Shutdown, Signals, StopLevel};
use crate::store::{
    self, ChangeOutcome, JobFilter, JobRecord, JobStatus, JobStore, MAX_PAYLOAD_BYTES, NewJob,
    QueueCounts, StoreError, Timestamp, WorkerIdentity,
};
use crate::units::format_duration;
use crate::wake::WakeDir;

/// The settings every command starts from.
pub struct Context {
    pub config: Config,
    pub database_url: String,
    /// Where `database_url` came from, said by `status` and at start.
    pub url_source: UrlSource,
}

impl Context {
    /// Reads the config and settles the database URL: the option, then the unit's
    /// credential or variable (see [`secrets::url_from_outside_config`]), then the config,
    /// then the default SQLite file.
    pub fn load(cli: &Cli) -> Result<Context, Failure> {
        let mut config = Config::load(cli.config.as_deref())?;
        if let Some(dir) = &cli.conf_dir {
            config.instance_dir = dir.clone();
        }
        let (database_url, url_source) = settle_database_url(cli, &config)?;
        Ok(Context {
            config,
            database_url,
            url_source,
        })
    }

    /// Opens the store for a one-shot command: no retries, the schema brought up to date.
    async fn open_store(&self) -> Result<Box<dyn JobStore>, Failure> {
        Ok(try_open(self).await?)
    }
}

/// The database URL and where it came from, first found wins: `--database-url`, the unit's
/// credential or variable, `database_url` in the config, the default SQLite file.
fn settle_database_url(cli: &Cli, config: &Config) -> Result<(String, UrlSource), Failure> {
    if let Some(url) = cli
        .database_url
        .clone()
        .filter(|url| !url.trim().is_empty())
    {
        return Ok((url, UrlSource::Option));
    }
    let outside =
        secrets::url_from_outside_config(config.is_the_packaged_one()).map_err(Failure::config)?;
    Ok(
        outside.unwrap_or_else(|| match config.database_url.clone() {
            Some(url) => (url, UrlSource::Config),
            None => (store::default_database_url(), UrlSource::Default),
        }),
    )
}

/// Runs the command. `notifier` talks to systemd; only the daemon uses it.
pub async fn run(cli: &Cli, context: &Context, notifier: Arc<Notifier>) -> Result<(), Failure> {
    match &cli.command {
        Command::Push(args) => push(context, args).await,
        Command::Consume(args) => {
            let reload_from = ReloadSource {
                config: cli.config.clone(),
                conf_dir: cli.conf_dir.clone(),
            };
            consume(context, args, notifier, reload_from).await
        }
        Command::StopWorkers => stop_workers(context).await,
        Command::Status(args) => status(context, args).await,
        Command::Jobs(args) => jobs(context, args).await,
        Command::Show(args) => show(context, args).await,
        Command::Retry(args) => retry(context, args).await,
        Command::Cancel(args) => cancel(context, args).await,
        Command::Migrate => migrate(context).await,
        Command::GenerateAssets { dir } => generate_assets(dir),
    }
}

/// Writes `pim-job-queue.1` and bash, zsh and fish completions, all derived from the CLI
/// definition so they never drift from it.
pub fn generate_assets(dir: &std::path::Path) -> Result<(), Failure> {
    use clap::CommandFactory;
    let io = |error: std::io::Error| {
        Failure::new(
            ExitCode::Software,
            format!("cannot write to {}: {error}", dir.display()),
        )
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let command = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .render(&mut page)
        .map_err(io)?;
    std::fs::write(dir.join("pim-job-queue.1"), page).map_err(io)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut command.clone(), "pim-job-queue", dir)
            .map_err(io)?;
    }
    Ok(())
}

/// The payload of `push`, from `--payload`, `--payload-file FILE` or `--payload-file -`,
/// checked: a JSON object of at most [`MAX_PAYLOAD_BYTES`].
fn read_payload(args: &PushArgs) -> Result<String, Failure> {
    let (text, source) = match (&args.payload, &args.payload_file) {
        (Some(text), _) => (text.clone(), "--payload".to_string()),
        (None, Some(path)) => (read_payload_file(path)?, path.display().to_string()),
        (None, None) => ("{}".to_string(), "--payload".to_string()),
    };
    if text.len() > MAX_PAYLOAD_BYTES {
        return Err(Failure::data(format!(
            "the payload from {source} is {} bytes; at most {MAX_PAYLOAD_BYTES} (1 MiB) are \
             accepted: store large data elsewhere and pass its location",
            text.len()
        )));
    }
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(Value::Object(map).to_string()),
        Ok(_) => Err(Failure::data(format!(
            "the payload from {source} must be a JSON object, e.g. '{{\"a\": 1}}'"
        ))),
        Err(error) => Err(Failure::data(format!(
            "the payload from {source} is not valid JSON: {error}"
        ))),
    }
}

/// Reads at most one byte more than the limit, so a huge file is refused without being
/// read whole.
fn read_payload_file(path: &Path) -> Result<String, Failure> {
    use std::io::Read;
    let limit = MAX_PAYLOAD_BYTES as u64 + 1;
    let mut bytes = Vec::new();
    let read = if path == Path::new("-") {
        std::io::stdin().lock().take(limit).read_to_end(&mut bytes)
    } else {
        std::fs::File::open(path).and_then(|file| file.take(limit).read_to_end(&mut bytes))
    };
    read.map_err(|error| {
        Failure::new(
            ExitCode::NoInput,
            format!("cannot read the payload from {}: {error}", path.display()),
        )
    })?;
    String::from_utf8(bytes).map_err(|_| {
        Failure::data(format!(
            "the payload from {} is not UTF-8 text",
            path.display()
        ))
    })
}

async fn push(context: &Context, args: &PushArgs) -> Result<(), Failure> {
    if !context.config.knows_queue(&args.queue) {
        return Err(Failure::data(format!(
            "unknown queue {:?}; known queues: {}",
            args.queue,
            context.config.queues.join(", ")
        )));
    }
    if args.code.trim().is_empty() {
        return Err(Failure::data("the job code is empty"));
    }
    let payload = read_payload(args)?;
    let store = context.open_store().await?;
    let id = store
        .push(&NewJob {
            queue: args.queue.clone(),
            code: args.code.clone(),
            payload,
            delay: args.delay.unwrap_or_default(),
            max_attempts: context.config.max_attempts(&args.code),
        })
        .await?;
    println!("{id}");
    if args.delay.is_none() {
        WakeDir::for_store(context.config.wake_dir.as_deref(), &store.location()).wake_all();
    }
    Ok(())
}

async fn consume(
    context: &Context,
    args: &ConsumeArgs,
    notifier: Arc<Notifier>,
    reload_from: ReloadSource,
) -> Result<(), Failure> {
    let config = &context.config;
    if !config.has_any_command() {
        return Err(Failure::config(format!(
            "no job command is configured: set [job] command in {}",
            config.source_name()
        )));
    }
    let queues = select_queues(config, args)?;
    let context = &Context {
        config: preflight(config.clone(), &notifier).await?,
        database_url: context.database_url.clone(),
        url_source: context.url_source.clone(),
    };
    let config = &context.config;
    let signals = Signals::install().map_err(|error| {
        Failure::new(
            ExitCode::Software,
            format!("cannot handle signals: {error}"),
        )
    })?;
    let Some(store) = open_store_patiently(context, &signals.shutdown, &notifier).await? else {
        info!("stopped while waiting for the database");
        return Ok(());
    };
    let worker = WorkerIdentity::for_this_process(args.instance.clone(), args.host_id.clone());
    let options = ConsumerOptions {
        queues,
        sleep: args.sleep,
        limit: args.limit,
        time_limit: args.time_limit,
        memory_limit: args.memory_limit,
    };
    let reloader = reload_from.into_reloader(args);
    let mut consumer = Consumer::new(
        store.into(),
        config.clone(),
        options,
        worker,
        signals,
        notifier.clone(),
        reloader,
    );
    let reason = consumer.run().await;
    let described = reason.describe();
    info!(reason = %described, "worker exits: {described}");
    match reason {
        StopReason::CannotLaunch(why) => {
            notifier.status(&format!("Cannot launch jobs: {why}"));
            Err(Failure::config(why))
        }
        // A graceful restart: the unit (RestartForceExitStatus=) and supervisor bring the
        // worker back, as they do for Symfony's consumer after `messenger:stop-workers`.
        StopReason::StopWorkersRequested => Err(Failure::new(
            ExitCode::Restart,
            "stop-workers requested: exiting so that the service manager restarts the worker",
        )),
        _ => Ok(()),
    }
}

/// In Akeneo mode, checks that the PIM can run jobs before anything is claimed, and settles
/// the launcher; a failure is a configuration error (exit 78), also said in STATUS.
async fn preflight(mut config: Config, notifier: &Notifier) -> Result<Config, Failure> {
    let Transport::Akeneo(settings) = &mut config.transport else {
        return Ok(config);
    };
    notifier.status("Checking that the PIM can run jobs");
    let result = notifier
        .while_pinging(crate::akeneo::preflight::check(settings))
        .await;
    match result {
        Ok(launcher) => {
            info!(
                launcher = launcher.name(),
                "the PIM can run jobs: launching with {}",
                launcher.name()
            );
            settings.detected_launcher = Some(launcher);
            Ok(config)
        }
        Err(reason) => {
            notifier.status(&format!("Cannot launch jobs: {reason}"));
            Err(Failure::config(format!(
                "preflight failed, taking no job: {reason}"
            )))
        }
    }
}

/// Where a SIGHUP re-reads the configuration from: the same files and options as at start.
pub struct ReloadSource {
    pub config: Option<PathBuf>,
    pub conf_dir: Option<PathBuf>,
}

impl ReloadSource {
    fn into_reloader(self, args: &ConsumeArgs) -> Reloader {
        let selection = ConsumeArgs {
            queues: args.queues.clone(),
            instance: args.instance.clone(),
            ..ConsumeArgs::default()
        };
        Box::new(move || {
            let mut config = Config::load(self.config.as_deref())?;
            if let Some(dir) = &self.conf_dir {
                config.instance_dir = dir.clone();
            }
            if !config.has_any_command() {
                return Err(Failure::config("no job command is configured"));
            }
            let queues = select_queues(&config, &selection)?;
            Ok((config, queues))
        })
    }
}

/// The queues a consumer serves: named on the command line, or from its instance conf, or
/// all of them; always in the installation's priority order.
fn select_queues(config: &Config, args: &ConsumeArgs) -> Result<Vec<String>, Failure> {
    if let Some(instance) = &args.instance {
        let selection = read_instance_queues(&config.instance_dir, instance, config)?;
        info!("{}", selection.describe());
        return Ok(selection.queues);
    }
    if args.queues.is_empty() {
        return Ok(config.queues.clone());
    }
    if let Some(unknown) = args.queues.iter().find(|q| !config.knows_queue(q)) {
        return Err(Failure::new(
            ExitCode::Usage,
            format!(
                "unknown queue {unknown:?}; known queues: {}",
                config.queues.join(", ")
            ),
        ));
    }
    Ok(config.in_priority_order(&args.queues))
}

/// Opens the store for the daemon: an unreachable database is waited for with capped
/// backoff (and said so in STATUS), so a worker started before its database does not exit in
/// a loop. Returns `None` when a stop signal arrives while waiting.
async fn open_store_patiently(
    context: &Context,
    shutdown: &Shutdown,
    notifier: &Notifier,
) -> Result<Option<Box<dyn JobStore>>, Failure> {
    let location = store::redact_url(&context.database_url);
    let mut backoff = Backoff::default();
    loop {
        match try_open(context).await {
            Ok(store) => {
                info!(
                    "job store ready: {} (from {})",
                    store.location(),
                    context.url_source
                );
                return Ok(Some(store));
            }
            Err(error) if error.is_transient() => {
                let delay = backoff.next_delay();
                notifier.status(&format!(
                    "Waiting for database (attempt {}, next in {})",
                    backoff.attempts,
                    format_duration(delay)
                ));
                warn!(
                    attempt = backoff.attempts,
                    "waiting for the database {location} (attempt {}, next in {}): {error}",
                    backoff.attempts,
                    format_duration(delay)
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.reached(StopLevel::Drain) => return Ok(None),
                }
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Opens the configured store and brings (or checks) its schema.
async fn try_open(context: &Context) -> Result<Box<dyn JobStore>, StoreError> {
    let store = store::open_configured(&context.config, &context.database_url).await?;
    store::prepare_schema(store.as_ref(), context.config.auto_migrate)
        .await
        .map_err(|error| error.without_secrets_of(&context.database_url))?;
    Ok(store)
}

async fn stop_workers(context: &Context) -> Result<(), Failure> {
    let store = context.open_store().await?;
    let generation = store.request_stop().await?;
    println!(
        "Stop requested (generation {generation}): every running worker on {} exits after its current job.",
        store.location()
    );
    Ok(())
}

async fn migrate(context: &Context) -> Result<(), Failure> {
    let store = store::open_configured(&context.config, &context.database_url).await?;
    let applied = store.migrate().await?;
    let version = store.schema_version().await?;
    println!(
        "{}: schema at version {} ({applied} migration(s) applied)",
        store.location(),
        version.found
    );
    Ok(())
}

async fn status(context: &Context, args: &OutputArgs) -> Result<(), Failure> {
    let store = context.open_store().await?;
    let now = Timestamp::now();
    let counts = ordered_counts(&context.config, store.queue_counts().await?);
    let running = match store
        .list_jobs(&JobFilter {
            queue: None,
            status: Some(JobStatus::Running),
            limit: 1000,
        })
        .await
    {
        // The Akeneo transport keeps no job records: the workers list shows their jobs.
        Err(StoreError::Unsupported(_)) => Vec::new(),
        other => other?,
    };
    let workers = store.list_workers().await?;
    if args.json {
        let running: Vec<Value> = running.iter().map(|job| running_json(job, now)).collect();
        let report = json!({
            "database": store.location(),
            "database_from": context.url_source.to_string(),
            "queues": counts,
            "running": running,
            "workers": workers,
        });
        println!("{report:#}");
        return Ok(());
    }
    println!(
        "Database: {} (from {})\n",
        store.location(),
        context.url_source
    );
    println!(
        "{:<24} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10}",
        "QUEUE", "WAITING", "DELAYED", "RUNNING", "FAILED", "SUCCEEDED", "CANCELLED"
    );
    for c in &counts {
        println!(
            "{:<24} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10}",
            c.queue, c.waiting, c.delayed, c.running, c.failed, c.succeeded, c.cancelled
        );
    }
    println!("\nRunning jobs: {}", running.len());
    for job in &running {
        println!(
            "  #{:<8} {:<22} {:<30} {:<28} {}",
            job.id,
            job.queue,
            job.code,
            worker_of(job),
            format_duration(running_for(job, now))
        );
    }
    println!("\nWorkers: {}", workers.len());
    for worker in &workers {
        let job = worker
            .current_job
            .map_or("idle".into(), |id| format!("job #{id}"));
        println!(
            "  {:<28} queues {:<50} heartbeat {:>5.1}s ago, {job}",
            format!(
                "{}/{}/{}",
                worker.host,
                worker.instance.as_deref().unwrap_or("-"),
                worker.pid
            ),
            worker.queues,
            worker.heartbeat_age_seconds
        );
    }
    Ok(())
}

/// Every configured queue in priority order (zeros included), then any other queue found.
fn ordered_counts(config: &Config, found: Vec<QueueCounts>) -> Vec<QueueCounts> {
    let mut ordered: Vec<QueueCounts> = config
        .queues
        .iter()
        .map(|queue| {
            found
                .iter()
                .find(|c| &c.queue == queue)
                .cloned()
                .unwrap_or(QueueCounts {
                    queue: queue.clone(),
                    ..QueueCounts::default()
                })
        })
        .collect();
    ordered.extend(found.into_iter().filter(|c| !config.knows_queue(&c.queue)));
    ordered
}

fn running_for(job: &JobRecord, now: Timestamp) -> Duration {
    now.since(job.started_at.or(job.claimed_at).unwrap_or(now))
}

fn worker_of(job: &JobRecord) -> String {
    format!(
        "{}/{}/{}",
        job.worker_host.as_deref().unwrap_or("?"),
        job.worker_instance.as_deref().unwrap_or("-"),
        job.worker_pid.map_or("?".into(), |p| p.to_string())
    )
}

fn running_json(job: &JobRecord, now: Timestamp) -> Value {
    json!({
        "id": job.id,
        "queue": job.queue,
        "code": job.code,
        "worker_host": job.worker_host,
        "worker_instance": job.worker_instance,
        "worker_pid": job.worker_pid,
        "running_seconds": running_for(job, now).as_secs_f64(),
    })
}

async fn jobs(context: &Context, args: &JobsArgs) -> Result<(), Failure> {
    let store = context.open_store().await?;
    let jobs = store
        .list_jobs(&JobFilter {
            queue: args.queue.clone(),
            status: args.status,
            limit: args.limit,
        })
        .await?;
    if args.output.json {
        println!("{:#}", json!(jobs));
        return Ok(());
    }
    println!(
        "{:>8}  {:<22} {:<30} {:<10} {:>8}  {:<20}  RESULT",
        "ID", "QUEUE", "CODE", "STATUS", "ATTEMPTS", "CREATED"
    );
    for job in &jobs {
        println!(
            "{:>8}  {:<22} {:<30} {:<10} {:>8}  {:<20}  {}",
            job.id,
            printable(&job.queue),
            printable(&job.code),
            job.status,
            job.attempts,
            job.created_at.to_string(),
            printable(job.reason.as_deref().unwrap_or(""))
        );
    }
    Ok(())
}

async fn show(context: &Context, args: &ShowArgs) -> Result<(), Failure> {
    let store = context.open_store().await?;
    let job = store
        .get_job(args.id)
        .await?
        .ok_or_else(|| Failure::new(ExitCode::NoInput, format!("no job with id {}", args.id)))?;
    if args.output.json {
        println!("{:#}", json!(job));
        return Ok(());
    }
    let optional = |t: Option<Timestamp>| t.map_or("-".into(), |t| t.to_string());
    println!("Job #{}", job.id);
    println!("  queue:     {}", printable(&job.queue));
    println!("  code:      {}", printable(&job.code));
    println!("  status:    {}", job.status);
    println!("  attempts:  {}", job.attempts);
    println!("  payload:   {}", printable(&job.payload));
    println!("  created:   {}", job.created_at);
    println!("  available: {}", job.available_at);
    println!("  claimed:   {}", optional(job.claimed_at));
    println!("  started:   {}", optional(job.started_at));
    println!("  finished:  {}", optional(job.finished_at));
    if job.worker_host.is_some() {
        println!("  worker:    {}", printable(&worker_of(&job)));
    }
    if let Some(code) = job.exit_code {
        println!("  exit code: {code}");
    }
    if let Some(signal) = job.exit_signal {
        println!("  signal:    {signal}");
    }
    if let Some(reason) = &job.reason {
        println!("  reason:    {}", printable(reason));
    }
    if !job.output.is_empty() {
        println!("  output (last {} lines):", job.output.len());
        for line in &job.output {
            println!("    {}", printable(line));
        }
    }
    Ok(())
}

/// Text from a job (its output, reason, code, payload) made safe for a terminal: control
/// characters are shown escaped, so output cannot move the cursor, retitle the window or
/// hide lines from the operator reading it.
fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    text.chars()
        .map(|c| match c {
            '\t' => "\t".to_string(),
            c if c.is_control() => c.escape_unicode().to_string(),
            c => c.to_string(),
        })
        .collect()
}

async fn retry(context: &Context, args: &IdArgs) -> Result<(), Failure> {
    let store = context.open_store().await?;
    let outcome = store.retry(args.id).await?;
    report_change(
        args.id,
        outcome,
        "queued again",
        "only failed or cancelled jobs can be retried",
    )
}

async fn cancel(context: &Context, args: &IdArgs) -> Result<(), Failure> {
    let store = context.open_store().await?;
    let outcome = store.cancel(args.id, Timestamp::now()).await?;
    report_change(
        args.id,
        outcome,
        "cancelled",
        "only waiting jobs can be cancelled",
    )
}

fn report_change(id: i64, outcome: ChangeOutcome, done: &str, rule: &str) -> Result<(), Failure> {
    match outcome {
        ChangeOutcome::Changed => {
            println!("Job #{id} {done}.");
            Ok(())
        }
        ChangeOutcome::NotFound => Err(Failure::new(
            ExitCode::NoInput,
            format!("no job with id {id}"),
        )),
        ChangeOutcome::WrongState(status) => {
            Err(Failure::data(format!("job #{id} is {status}: {rule}")))
        }
    }
}

//! `status`, `jobs` and `show`: what the store holds, for people and for `--json`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::cli::{JobsArgs, OutputArgs, ShowArgs};
use crate::config::Config;
use crate::exit::{ExitCode, Failure};
use crate::metrics::{CapView, ScheduleView};
use crate::store::{
    JobFilter, JobRecord, JobStats, JobStatus, QueueCounts, StoreError, StoreResult, Timestamp,
    WorkerStore,
};
use crate::units::format_duration;

use super::Context;

pub(super) async fn status(context: &Context, args: &OutputArgs) -> Result<(), Failure> {
    let opened = context.open_store().await?;
    let store = opened.worker();
    let now = Timestamp::now();
    let mut counts = ordered_counts(&context.config, store.queue_counts().await?);
    for latency in store.queue_latencies().await? {
        if let Some(queue) = counts.iter_mut().find(|c| c.queue == latency.queue) {
            queue.latency_seconds = latency.seconds;
        }
    }
    let running = match running_jobs(&opened).await {
        // The Akeneo transport keeps no job records: the workers list shows their jobs.
        Err(StoreError::Unsupported(_)) => Vec::new(),
        other => other?,
    };
    let workers = store.list_workers().await?;
    let paused = store.paused_queues().await?;
    let schedules = schedule_views(&context.config, store).await?;
    let caps = cap_views(&context.config, store).await?;
    if args.json {
        let running: Vec<Value> = running.iter().map(|job| running_json(job, now)).collect();
        let report = json!({
            "database": store.location(),
            "database_from": context.url_source.to_string(),
            "queues": counts,
            "paused": paused,
            "schedules": schedules,
            "caps": caps,
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
        "{:<24} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10} {:>9}",
        "QUEUE", "WAITING", "DELAYED", "RUNNING", "FAILED", "SUCCEEDED", "CANCELLED", "LATENCY"
    );
    for c in &counts {
        let latency = format_duration(Duration::from_secs(c.latency_seconds as u64));
        println!(
            "{:<24} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10} {:>9}",
            c.queue, c.waiting, c.delayed, c.running, c.failed, c.succeeded, c.cancelled, latency
        );
    }
    for pause in &paused {
        println!(
            "\nPaused: {} since {} by {}: {}",
            pause.queue,
            pause.paused_at,
            printable(&pause.paused_by),
            printable(&pause.reason)
        );
    }
    if !schedules.is_empty() {
        println!("\nSchedules: {}", schedules.len());
    }
    for view in &schedules {
        let optional = |t: Option<Timestamp>| t.map_or("-".into(), |t| t.to_string());
        println!(
            "  {:<24} {:<20} {:<16} next {}  last slot {}{}",
            view.name,
            view.cron,
            view.timezone,
            optional(view.next_run),
            optional(view.last_slot),
            view.last_job
                .map_or(String::new(), |id| format!(" (job #{id})"))
        );
    }
    if !caps.is_empty() {
        println!("\nConcurrency caps: {}", caps.len());
    }
    for cap in &caps {
        println!(
            "  {:<40} {} of {} running ({})",
            cap.key,
            cap.running,
            cap.max_running,
            cap.codes.join(", ")
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

/// The configured caps with their running jobs (no query when none is configured).
pub(super) async fn cap_views(
    config: &Config,
    store: &dyn WorkerStore,
) -> StoreResult<Vec<CapView>> {
    if config.caps.is_empty() {
        return Ok(Vec::new());
    }
    let running = store.running_per_cap().await?;
    Ok(config
        .caps
        .limits()
        .into_iter()
        .map(|(key, limit)| CapView {
            key: key.to_string(),
            codes: config.caps.codes_of(key),
            max_running: limit,
            running: running
                .iter()
                .find(|(found, _)| found == key)
                .map_or(0, |(_, count)| *count),
        })
        .collect())
}

/// The configured schedules, each with what the store recorded of it (no query when none
/// is configured).
pub(super) async fn schedule_views(
    config: &Config,
    store: &dyn WorkerStore,
) -> StoreResult<Vec<ScheduleView>> {
    if config.schedules.is_empty() {
        return Ok(Vec::new());
    }
    let runs = store.schedule_runs().await?;
    let now = jiff::Timestamp::now();
    Ok(config
        .schedules
        .iter()
        .map(|schedule| {
            let run = runs.iter().find(|run| run.name == schedule.name);
            ScheduleView {
                name: schedule.name.clone(),
                cron: schedule.expression.clone(),
                timezone: schedule.zone_name.clone(),
                next_run: schedule
                    .next_run(now)
                    .map(|at| Timestamp(at.as_microsecond())),
                last_slot: run.map(|run| run.slot_at),
                last_job: run.and_then(|run| run.job_id),
            }
        })
        .collect())
}

/// Every configured queue in priority order (zeros included), then any other queue found.
pub(super) fn ordered_counts(config: &Config, found: Vec<QueueCounts>) -> Vec<QueueCounts> {
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

pub(super) fn running_for(job: &JobRecord, now: Timestamp) -> Duration {
    now.since(job.started_at.or(job.claimed_at).unwrap_or(now))
}

pub(super) fn worker_of(job: &JobRecord) -> String {
    format!(
        "{}/{}/{}",
        job.worker_host.as_deref().unwrap_or("?"),
        job.worker_instance.as_deref().unwrap_or("-"),
        job.worker_pid.map_or("?".into(), |p| p.to_string())
    )
}

pub(super) fn running_json(job: &JobRecord, now: Timestamp) -> Value {
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

/// The jobs running now, from the job records.
async fn running_jobs(opened: &crate::store::Opened) -> StoreResult<Vec<JobRecord>> {
    let filter = JobFilter {
        status: Some(JobStatus::Running),
        limit: 1000,
        ..JobFilter::default()
    };
    opened.jobs("listing jobs")?.list_jobs(&filter).await
}

pub(super) async fn jobs(context: &Context, args: &JobsArgs) -> Result<(), Failure> {
    let opened = context.open_store().await?;
    let store = opened.jobs("listing jobs")?;
    let filter = JobFilter {
        queue: args.queue.clone(),
        status: args.status,
        code: args.code.clone(),
        since: args.since,
        limit: args.limit,
    };
    if args.stats {
        return job_stats(store.job_stats(&filter).await?, args.output.json);
    }
    let jobs = store.list_jobs(&filter).await?;
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

/// `jobs --stats`: counts by code and reason.
fn job_stats(stats: Vec<JobStats>, json: bool) -> Result<(), Failure> {
    if json {
        println!("{:#}", json!(stats));
        return Ok(());
    }
    println!(
        "{:>8}  {:<30} {:<20}  REASON",
        "COUNT", "CODE", "LAST FINISHED"
    );
    for row in &stats {
        let last = row.last_finished_at.map_or("-".into(), |t| t.to_string());
        println!(
            "{:>8}  {:<30} {:<20}  {}",
            row.count,
            printable(&row.code),
            last,
            printable(row.reason.as_deref().unwrap_or("-"))
        );
    }
    Ok(())
}

pub(super) async fn show(context: &Context, args: &ShowArgs) -> Result<(), Failure> {
    let opened = context.open_store().await?;
    let job = opened
        .jobs("show")?
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
    for attempt in &job.earlier_attempts {
        let field = |name: &str| attempt[name].as_str().unwrap_or("?").to_string();
        println!(
            "  attempt {}: {} to {}, {}",
            attempt["attempt"],
            field("started_at"),
            field("finished_at"),
            printable(&field("reason"))
        );
    }
    if let (Some(bytes), Some(cpu)) = (job.usage.peak_rss_bytes, job.usage.cpu_usec) {
        println!(
            "  resources: peak RSS {:.1} MiB, CPU {:.2} s",
            bytes as f64 / (1024.0 * 1024.0),
            cpu as f64 / 1e6
        );
    }
    if let (JobStatus::Running, Some(request)) = (job.status, &job.cancel_requested) {
        println!("  cancel:    requested, {}", printable(request));
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
pub(super) fn printable(text: &str) -> String {
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

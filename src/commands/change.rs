//! The commands that change the store: `stop-workers`, `migrate`, `retry`, `cancel`,
//! `pause`, `resume`.

use crate::cli::{DeleteArgs, IdArgs, PauseArgs, RetryArgs};
use crate::config::Config;
use crate::exit::{ExitCode, Failure};
use crate::store::{
    self, CallLimits, ChangeOutcome, Finished, JobFilter, JobStatus, JobStore, Opened, Timestamp,
};
use crate::units::format_duration;
use crate::wake::WakeDir;

use super::Context;

pub(super) async fn stop_workers(context: &Context) -> Result<(), Failure> {
    let opened = context.open_store().await?;
    let store = opened.worker();
    let generation = store.request_stop().await?;
    println!(
        "Stop requested (generation {generation}): every running worker on {} exits after its current job.",
        store.location()
    );
    Ok(())
}

pub(super) async fn migrate(context: &Context) -> Result<(), Failure> {
    let opened = store::open_configured(
        &context.config,
        &context.database_url,
        CallLimits::for_command(),
    )
    .await?;
    let store = opened.worker();
    let applied = store.migrate().await?;
    let version = store.schema_version().await?;
    let checked = store.check_statements().await?;
    println!(
        "{}: schema at version {} ({applied} migration(s) applied, {checked} statements checked)",
        store.location(),
        version.found
    );
    Ok(())
}

pub(super) async fn retry(context: &Context, args: &RetryArgs) -> Result<(), Failure> {
    let opened = context.open_store().await?;
    let store = opened.jobs("retry")?;
    let Some(id) = args.id else {
        return retry_matching(store, args).await;
    };
    let outcome = store.retry(id).await?;
    report_change(
        id,
        outcome,
        "queued again",
        "only failed or cancelled jobs can be retried",
    )
}

/// `retry --status …`: every failed (or cancelled) job the filter selects.
async fn retry_matching(store: &dyn JobStore, args: &RetryArgs) -> Result<(), Failure> {
    let status = args.status.expect("clap requires an id or --status");
    if !matches!(status, JobStatus::Failed | JobStatus::Cancelled) {
        return Err(Failure::data(format!(
            "only failed or cancelled jobs can be retried, not {status} ones"
        )));
    }
    let filter = JobFilter {
        queue: args.queue.clone(),
        status: Some(status),
        code: args.code.clone(),
        since: args.since,
        limit: 0,
    };
    let requeued = store.retry_matching(&filter).await?;
    println!("{requeued} {status} job(s) queued again.");
    Ok(())
}

pub(super) async fn delete(context: &Context, args: &DeleteArgs) -> Result<(), Failure> {
    let opened = context.open_store().await?;
    let store = opened.jobs("delete")?;
    if let (Some(status), Some(before)) = (args.status, args.before) {
        if status == JobStatus::Running {
            return Err(Failure::data(
                "running jobs cannot be deleted: cancel or stop them first",
            ));
        }
        let deleted = store.delete_older(status, before).await?;
        println!(
            "{deleted} {status} job(s) older than {} deleted.",
            format_duration(before)
        );
        return Ok(());
    }
    for &id in &args.ids {
        let outcome = store.delete(id).await?;
        report_change(id, outcome, "deleted", "running jobs cannot be deleted")?;
    }
    Ok(())
}

pub(super) async fn cancel(context: &Context, args: &IdArgs) -> Result<(), Failure> {
    let opened = context.open_store().await?;
    let reason = format!("cancelled by operator ({})", operator());
    let outcome = match &opened {
        Opened::Native(store) => store.cancel(args.id, &reason, Timestamp::now()).await?,
        Opened::Consumed(store) => {
            let outcome = store.stop_job(args.id).await?;
            if outcome == ChangeOutcome::Requested {
                println!(
                    "Job execution {} is STOPPING, as the PIM's own stop leaves it: a \
                     stoppable job stops at its next item (then STOPPED); one the PIM does \
                     not declare stoppable runs on.",
                    args.id
                );
                return Ok(());
            }
            return report_change(
                args.id,
                outcome,
                "stopped",
                "only a running job execution can be stopped",
            );
        }
    };
    if outcome == ChangeOutcome::Requested {
        println!(
            "Job #{} is running: its worker ends it within a heartbeat interval ({}) and its \
             kill_grace, and records it cancelled.",
            args.id,
            format_duration(context.config.heartbeat_interval)
        );
        return Ok(());
    }
    report_change(
        args.id,
        outcome,
        "cancelled",
        "only waiting or running jobs can be cancelled",
    )
}

pub(super) fn report_change(
    id: i64,
    outcome: ChangeOutcome,
    done: &str,
    rule: &str,
) -> Result<(), Failure> {
    match outcome {
        ChangeOutcome::Changed | ChangeOutcome::Requested => {
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

pub(super) async fn pause(context: &Context, args: &PauseArgs) -> Result<(), Failure> {
    let queues = chosen_queues(&context.config, &args.queues.queues)?;
    let reason = args
        .reason
        .as_deref()
        .map(str::trim)
        .filter(|reason| !reason.is_empty())
        .unwrap_or("no reason given");
    let opened = context.open_store().await?;
    let store = opened.worker();
    store.pause(&queues, reason, &operator()).await?;
    println!(
        "Paused {} on {}: every worker passes over {} until `pim-job-queue resume`; running jobs go on.",
        queues.join(", "),
        store.location(),
        if queues.len() == 1 { "it" } else { "them" }
    );
    Ok(())
}

pub(super) async fn resume(context: &Context, queues: &[String]) -> Result<(), Failure> {
    let queues = chosen_queues(&context.config, queues)?;
    let opened = context.open_store().await?;
    let store = opened.worker();
    let resumed = store.resume(&queues).await?;
    WakeDir::for_store(context.config.wake_dir.as_deref(), &store.location()).wake_all();
    println!(
        "Resumed {} ({resumed} of them paused) on {}.",
        queues.join(", "),
        store.location()
    );
    Ok(())
}

/// The queues a command names, each known to the config; none named: all of them.
fn chosen_queues(config: &Config, named: &[String]) -> Result<Vec<String>, Failure> {
    if named.is_empty() {
        return Ok(config.queues.clone());
    }
    if let Some(unknown) = named.iter().find(|queue| !config.knows_queue(queue)) {
        return Err(Failure::data(format!(
            "unknown queue {unknown:?}; known queues: {}",
            config.queues.join(", ")
        )));
    }
    Ok(named.to_vec())
}

/// Who runs this command, for the record of a pause or a cancel: the user behind `sudo`
/// first.
fn operator() -> String {
    ["SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .filter_map(|name| std::env::var(name).ok())
        .find(|name| !name.trim().is_empty())
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|user| user.name)
        })
        .unwrap_or_else(|| format!("uid {}", nix::unistd::getuid()))
}

pub(super) async fn prune(context: &Context) -> Result<(), Failure> {
    let opened = context.open_store().await?;
    let store = opened.worker();
    let config = &context.config;
    for (kind, retention, key) in [
        (Finished::Done, config.retention, "retention"),
        (
            Finished::Failed,
            config.failed_retention,
            "failed_retention",
        ),
    ] {
        let Some(retention) = retention else {
            println!("{} jobs: kept ({key} = 0)", kind.describe());
            continue;
        };
        let before = Timestamp::now().minus(retention);
        let pruned = store.prune_finished(kind, before).await?;
        println!(
            "{} jobs: {pruned} removed, finished before {before} ({key} = {})",
            kind.describe(),
            format_duration(retention)
        );
    }
    Ok(())
}

//! The commands that change the store: `stop-workers`, `migrate`, `retry`, `cancel`.

use crate::cli::IdArgs;
use crate::exit::{ExitCode, Failure};
use crate::store::{self, ChangeOutcome, Timestamp};

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
    let opened = store::open_configured(&context.config, &context.database_url).await?;
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

pub(super) async fn retry(context: &Context, args: &IdArgs) -> Result<(), Failure> {
    let opened = context.open_store().await?;
    let outcome = opened.jobs("retry")?.retry(args.id).await?;
    report_change(
        args.id,
        outcome,
        "queued again",
        "only failed or cancelled jobs can be retried",
    )
}

pub(super) async fn cancel(context: &Context, args: &IdArgs) -> Result<(), Failure> {
    let opened = context.open_store().await?;
    let outcome = opened
        .jobs("cancel")?
        .cancel(args.id, Timestamp::now())
        .await?;
    report_change(
        args.id,
        outcome,
        "cancelled",
        "only waiting jobs can be cancelled",
    )
}

pub(super) fn report_change(
    id: i64,
    outcome: ChangeOutcome,
    done: &str,
    rule: &str,
) -> Result<(), Failure> {
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

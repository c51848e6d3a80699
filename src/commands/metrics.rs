//! `metrics`: the fleet's state for Prometheus, on stdout or atomically into a file for
//! node_exporter's textfile collector.

use std::io::Write;
use std::path::Path;

use crate::cli::MetricsArgs;
use crate::config::Config;
use crate::exit::{ExitCode, Failure};
use crate::fleet::FleetTimings;
use crate::metrics::{Snapshot, render};
use crate::store::{StoreResult, WorkerStore};

use super::Context;
use super::inspect::{ordered_counts, schedule_views};

pub(super) async fn metrics(context: &Context, args: &MetricsArgs) -> Result<(), Failure> {
    let opened = context.open_store().await?;
    let text = render(&snapshot(&context.config, opened.worker()).await?);
    match &args.output {
        None => {
            print!("{text}");
            Ok(())
        }
        Some(path) => write_atomically(path, &text).map_err(|error| {
            Failure::new(
                ExitCode::CantCreat,
                format!("cannot write {}: {error}", path.display()),
            )
        }),
    }
}

/// Reads what the metrics say from the store, queues in the configuration's order.
async fn snapshot(config: &Config, store: &dyn WorkerStore) -> StoreResult<Snapshot> {
    let counts = ordered_counts(config, store.queue_counts().await?);
    let mut queues: Vec<String> = counts.iter().map(|c| c.queue.clone()).collect();
    let tallies = store.finished_tallies().await?;
    for tally in tallies.iter().flatten() {
        if !queues.contains(&tally.queue) {
            queues.push(tally.queue.clone());
        }
    }
    let timings = FleetTimings::of(config);
    let schedules = schedule_views(config, store.schedule_runs().await?)
        .into_iter()
        .map(|view| (view.name, view.next_run, view.last_slot))
        .collect();
    Ok(Snapshot {
        queues,
        counts,
        latencies: store.queue_latencies().await?,
        paused: store.paused_queues().await?,
        workers: store.list_workers().await?,
        tallies,
        heartbeat_interval: timings.heartbeat_interval,
        fence_after: timings.fence_after(),
        schedules,
    })
}

/// Writes `text` to a hidden temporary file beside `path` (a name the textfile collector,
/// which reads `*.prom`, passes over), flushes it to disk, and renames it over `path`: a
/// reader sees the old file or the new one, never half of one.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the path names no file"))?;
    let temporary = path.with_file_name(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

//! `metrics`: the fleet's state for Prometheus, on stdout or atomically into a file for
//! node_exporter's textfile collector.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::MetricsArgs;
use crate::config::Config;
use crate::exit::{ExitCode, Failure};
use crate::fleet::FleetTimings;
use crate::metrics::{Snapshot, render};
use crate::store::{StoreResult, WorkerStore};

use super::Context;
use super::inspect::{cap_views, ordered_counts, schedule_views};

pub(super) async fn metrics(context: &Context, args: &MetricsArgs) -> Result<(), Failure> {
    let opened = context.open_store().await?;
    if let Some(address) = args.listen {
        return serve(context, opened.worker(), address).await;
    }
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

/// Answers `GET /metrics` (and `/`) with the metrics, read from the store at each request,
/// one connection at a time (a scraper's pace), until SIGTERM or SIGINT.
async fn serve(
    context: &Context,
    store: &dyn WorkerStore,
    address: SocketAddr,
) -> Result<(), Failure> {
    let listener = TcpListener::bind(address).await.map_err(|error| {
        Failure::new(
            ExitCode::Unavailable,
            format!("cannot listen on {address}: {error}"),
        )
    })?;
    let software = |error: std::io::Error| Failure::new(ExitCode::Software, error.to_string());
    let bound = listener.local_addr().map_err(software)?;
    // Not `Signals::install`: its messages speak of a worker's running job.
    let mut terminate = signal(SignalKind::terminate()).map_err(software)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(software)?;
    eprintln!("pim-job-queue: serving metrics on http://{bound}/metrics");
    loop {
        let (connection, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        };
        // A client that sends nothing cannot hold the next scrape up for long.
        let answered = tokio::time::timeout(
            Duration::from_secs(10),
            answer(connection, &context.config, store),
        );
        let _ = answered.await;
    }
}

/// Reads one request and answers it: 200 with the metrics, 404 elsewhere, 503 when the
/// database does not answer.
async fn answer(
    mut connection: TcpStream,
    config: &Config,
    store: &dyn WorkerStore,
) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buffer = [0_u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        let read = connection.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        request.extend_from_slice(&buffer[..read]);
    }
    let line = String::from_utf8_lossy(&request);
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if !line.starts_with("GET ") || !matches!(path, "/" | "/metrics") {
        (
            "404 Not Found",
            "not found: the metrics are at /metrics\n".to_string(),
        )
    } else {
        match snapshot(config, store).await {
            Ok(snapshot) => ("200 OK", render(&snapshot)),
            Err(error) => ("503 Service Unavailable", format!("{error}\n")),
        }
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    connection.write_all(head.as_bytes()).await?;
    connection.write_all(body.as_bytes()).await?;
    connection.shutdown().await
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
    Ok(Snapshot {
        queues,
        counts,
        latencies: store.queue_latencies().await?,
        paused: store.paused_queues().await?,
        workers: store.list_workers().await?,
        tallies,
        heartbeat_interval: timings.heartbeat_interval,
        fence_after: timings.fence_after(),
        schedules: schedule_views(config, store).await?,
        caps: cap_views(config, store).await?,
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

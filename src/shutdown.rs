//! Stop requests from signals.
//!
//! The first SIGTERM or SIGINT asks the worker to drain: take no new job, let the running one
//! finish. A second one asks it to abort: end the running job's process group now. Components
//! hold a [`Shutdown`] and wait on it in their `select!`s, so a stop is noticed at once
//! instead of at the next poll.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StopLevel {
    Running,
    Drain,
    Abort,
}

/// A receiver for stop requests; cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown {
    level: watch::Receiver<StopLevel>,
}

/// The sending side, for code (and tests) that stop a worker without a signal.
#[derive(Debug, Clone)]
pub struct ShutdownTrigger {
    level: std::sync::Arc<watch::Sender<StopLevel>>,
}

impl ShutdownTrigger {
    /// Raises the stop level by one step.
    pub fn escalate(&self) -> StopLevel {
        let mut reached = StopLevel::Running;
        self.level.send_modify(|level| {
            *level = match *level {
                StopLevel::Running => StopLevel::Drain,
                _ => StopLevel::Abort,
            };
            reached = *level;
        });
        reached
    }
}

impl Shutdown {
    /// A shutdown that only `ShutdownTrigger` can fire.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (sender, receiver) = watch::channel(StopLevel::Running);
        (
            ShutdownTrigger {
                level: std::sync::Arc::new(sender),
            },
            Shutdown { level: receiver },
        )
    }

    /// A shutdown fired by SIGTERM and SIGINT. Must be called inside the runtime; the
    /// handlers are installed before it returns, so no early signal is lost.
    pub fn from_signals() -> std::io::Result<Shutdown> {
        let (trigger, shutdown) = Shutdown::new();
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        tokio::spawn(async move {
            loop {
                let name = tokio::select! {
                    _ = terminate.recv() => "SIGTERM",
                    _ = interrupt.recv() => "SIGINT",
                };
                match trigger.escalate() {
                    StopLevel::Drain => tracing::info!(
                        "{name} received: taking no new job, the running job may finish \
                         (send it again to end the running job)"
                    ),
                    _ => tracing::warn!("{name} received again: ending the running job"),
                }
            }
        });
        Ok(shutdown)
    }

    pub fn level(&self) -> StopLevel {
        *self.level.borrow()
    }

    pub fn is_stopping(&self) -> bool {
        self.level() >= StopLevel::Drain
    }

    /// Resolves once the stop level reaches `wanted`.
    pub async fn reached(&self, wanted: StopLevel) {
        let mut level = self.level.clone();
        // An error means every trigger is gone: the level can no longer change.
        if level.wait_for(|current| *current >= wanted).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

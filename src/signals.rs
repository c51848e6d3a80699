//! Signals: stop requests and reload requests.
//!
//! The first SIGTERM or SIGINT asks the worker to drain: take no new job, let the running one
//! finish. A second one asks it to abort: end the running job's process group now. SIGHUP
//! asks it to re-read its configuration. Components wait on these in their `select!`s, so a
//! signal is noticed at once instead of at the next poll.

use std::sync::Arc;

use tokio::sync::Notify;

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

/// What the worker listens for.
#[derive(Debug, Clone)]
pub struct Signals {
    pub shutdown: Shutdown,
    /// Notified on SIGHUP. A request made while nobody waits is kept for the next wait.
    pub reload: Arc<Notify>,
}

impl Signals {
    /// Installs the handlers for SIGTERM, SIGINT and SIGHUP. Must be called inside the
    /// runtime; the handlers exist when it returns, so no early signal is lost (and SIGHUP no
    /// longer kills the process).
    pub fn install() -> std::io::Result<Signals> {
        let (trigger, shutdown) = Shutdown::new();
        let reload = Arc::new(Notify::new());
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut hangup = signal(SignalKind::hangup())?;
        let reload_requests = reload.clone();
        tokio::spawn(async move {
            loop {
                let name = tokio::select! {
                    _ = terminate.recv() => "SIGTERM",
                    _ = interrupt.recv() => "SIGINT",
                    _ = hangup.recv() => {
                        tracing::info!("SIGHUP received: reloading the configuration");
                        reload_requests.notify_one();
                        continue;
                    }
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
        Ok(Signals { shutdown, reload })
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

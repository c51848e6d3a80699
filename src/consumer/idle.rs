//! Between jobs: waiting for work (a poll timer, same-host wake-ups, database notifications)
//! and backing off after errors, always in watchdog-sized slices.

use std::time::{Duration, Instant};

use tracing::warn;

use super::{Consumer, unavailable_status};
use crate::fleet::Contact;
use crate::signals::StopLevel;
use crate::store::{PushListener, StoreError};
use crate::units::format_duration;
use crate::wake::{WakeDir, WakeSocket};

impl Consumer {
    pub(super) async fn open_wake_sources(&self) -> WakeSources {
        let dir = WakeDir::for_store(self.config.wake_dir.as_deref(), &self.store.location());
        let name = format!("w-{}-{}", self.worker.pid, &self.worker.token[..8]);
        let socket = dir
            .bind(&name)
            .inspect_err(|error| {
                warn!(
                    "no same-host wake-ups ({}: {error}); polling every {}",
                    dir.path().display(),
                    format_duration(self.poll_interval())
                )
            })
            .ok();
        let listener = self
            .db(self.store.listen())
            .await
            .inspect_err(|error| warn!("no database notifications ({error}); polling"))
            .ok()
            .flatten();
        WakeSources {
            socket,
            listener,
            ..WakeSources::default()
        }
    }

    /// Sleeps one poll interval, or less when a push, a stop, a reload, the time limit or
    /// the watchdog comes first.
    pub(super) async fn idle(&mut self, contact: &Contact) {
        let mut nap = self.poll_interval().min(self.heartbeat_slice());
        if let Some(limit) = self.options.time_limit {
            nap = nap.min(limit.saturating_sub(self.started.elapsed()));
        }
        let mut listener_failed = None;
        let mut reload = false;
        let socket = self
            .wake
            .socket
            .as_ref()
            .filter(|_| !self.wake.socket_muted());
        let mut woken_by_socket = false;
        tokio::select! {
            _ = tokio::time::sleep(nap) => {}
            _ = self.signals.shutdown.reached(StopLevel::Drain) => {}
            _ = self.signals.reload.notified() => reload = true,
            _ = woken(socket) => woken_by_socket = true,
            pushed = pushed(self.wake.listener.as_mut()) => listener_failed = pushed.err(),
        }
        self.wake.woken_by_socket = woken_by_socket;
        if reload {
            self.reload(contact);
        }
        if let Some(error) = listener_failed {
            // The listener reconnects on its next use; until then polling carries on.
            warn!("database notifications interrupted: {error}");
            self.pause(nap, StopLevel::Drain).await;
        }
    }

    /// Sleeps `duration` in watchdog-sized slices, pinging between them; returns early once
    /// the stop level reaches `until`.
    pub(super) async fn pause(&mut self, duration: Duration, until: StopLevel) {
        let deadline = Instant::now() + duration;
        loop {
            self.ping_watchdog_if_due();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.shutdown().level() >= until {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(left.min(self.heartbeat_slice())) => {}
                _ = self.signals.shutdown.reached(until) => return,
            }
        }
    }

    pub(super) async fn wait_after_error(&mut self, error: &StoreError, contact: &Contact) {
        if let StoreError::SchemaMissing(_) = error
            && self.config.auto_migrate
        {
            warn!("{error}: creating them again");
            match self.db(self.store.migrate()).await {
                Ok(_) => return,
                Err(error) => warn!("could not create the job store's tables: {error}"),
            }
        }
        let delay = self.backoff.next_delay();
        warn!(
            attempt = self.backoff.attempts,
            "{error}; retrying in {}",
            format_duration(delay)
        );
        self.notifier.status(&unavailable_status(contact));
        self.pause(delay, StopLevel::Drain).await;
    }
}

/// Where wake-ups come from while idle, besides the poll timer.
#[derive(Default)]
pub(super) struct WakeSources {
    socket: Option<WakeSocket>,
    listener: Option<Box<dyn PushListener>>,
    /// The last idle ended on a same-host datagram, not yet followed by a claim.
    woken_by_socket: bool,
    /// Until then the socket is not listened to: a datagram that found nothing to claim
    /// costs at most one claim attempt per poll interval (any local user can send them).
    socket_muted_until: Option<Instant>,
}

impl WakeSources {
    /// After a claim: a wake-up that found nothing mutes the socket for `poll_interval`.
    pub(super) fn note_claim(&mut self, found_a_job: bool, poll_interval: Duration) {
        if std::mem::take(&mut self.woken_by_socket) && !found_a_job {
            self.socket_muted_until = Some(Instant::now() + poll_interval);
        }
    }

    pub(super) fn socket_muted(&self) -> bool {
        self.socket_muted_until
            .is_some_and(|until| Instant::now() < until)
    }
}

/// Resolves on a same-host wake-up; never without a socket.
pub(super) async fn woken(socket: Option<&WakeSocket>) {
    match socket {
        Some(socket) => socket.woken().await,
        None => std::future::pending().await,
    }
}

/// Resolves on a database notification; never without a listener.
pub(super) async fn pushed(listener: Option<&mut Box<dyn PushListener>>) -> Result<(), StoreError> {
    match listener {
        Some(listener) => listener.pushed().await,
        None => std::future::pending().await,
    }
}

//! The systemd notification protocol: READY, STATUS, WATCHDOG, STOPPING, RELOADING and
//! EXTEND_TIMEOUT_USEC, sent to `$NOTIFY_SOCKET` when systemd gave one (and never otherwise).
//!
//! The environment is only read, never unset: unsetting variables once threads exist is
//! unsound, and job children are spawned without these variables instead (see the runner).

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Sends notifications; every method is a no-op outside systemd.
#[derive(Debug)]
pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
    sent: Mutex<Sent>,
}

#[derive(Debug, Default)]
struct Sent {
    status: String,
    stopping: bool,
    failed_once: bool,
    last_ping: Option<Instant>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and the watchdog settings. Call it before the async runtime
    /// starts, as sd_watchdog_enabled(3) advises.
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled(),
            sent: Mutex::default(),
        }
    }

    /// A notifier that sends nothing, for one-shot commands and tests.
    pub fn disabled() -> Notifier {
        Notifier {
            enabled: false,
            watchdog: None,
            sent: Mutex::default(),
        }
    }

    /// How often to send WATCHDOG=1: half the watchdog timeout, as sd_watchdog_enabled(3)
    /// recommends.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|timeout| timeout / 2)
    }

    pub fn ready(&self, status: &str) {
        self.send_with_status(&[NotifyState::Ready], status);
    }

    /// Updates STATUS= when it changed.
    pub fn status(&self, status: &str) {
        if self.lock().status != status {
            self.send_with_status(&[], status);
        }
    }

    pub fn reloading(&self) {
        self.send_with_status(&[NotifyState::Reloading], "Reloading configuration");
    }

    /// Sends STOPPING=1 once, with the status; later calls only update the status.
    pub fn stopping(&self, status: &str) {
        let first = !std::mem::replace(&mut self.lock().stopping, true);
        if first {
            self.send_with_status(&[NotifyState::Stopping], status);
        } else {
            self.status(status);
        }
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
        self.lock().last_ping = Some(Instant::now());
    }

    /// Pings when most of the ping interval has passed; the slack keeps a timer that fires
    /// a hair early from skipping a whole period.
    pub fn watchdog_if_due(&self) {
        let Some(interval) = self.watchdog_interval() else {
            return;
        };
        let last = self.lock().last_ping;
        if last.is_none_or(|at| at.elapsed() >= interval * 3 / 4) {
            self.watchdog();
        }
    }

    /// Runs `work`, pinging the watchdog while it waits. For waits that are bounded but may
    /// outlast a ping interval: a database call up to its deadline, a process group given
    /// its grace, the PIM booting for a preflight. (A wait that is not bounded must not be
    /// wrapped here: the watchdog is there to catch it.)
    pub async fn while_pinging<T>(&self, work: impl Future<Output = T>) -> T {
        let Some(interval) = self.watchdog_interval() else {
            return work.await;
        };
        tokio::pin!(work);
        loop {
            self.watchdog_if_due();
            tokio::select! {
                result = &mut work => return result,
                _ = tokio::time::sleep(interval / 4) => {}
            }
        }
    }

    /// Asks for `extra` more time in the current state (here: the stop), as a drain waits
    /// for a running job.
    pub fn extend_timeout(&self, extra: Duration) {
        let micros = u32::try_from(extra.as_micros()).unwrap_or(u32::MAX);
        self.send(&[NotifyState::ExtendTimeoutUsec(micros)]);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sent> {
        self.sent.lock().expect("notifier lock")
    }

    fn send_with_status(&self, states: &[NotifyState<'_>], status: &str) {
        // STATUS is one line of text; a stray newline would start a new assignment.
        let status = status.replace('\n', " ");
        let mut all = states.to_vec();
        all.push(NotifyState::Status(&status));
        self.send(&all);
        self.lock().status = status;
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(error) = sd_notify::notify(states) {
            let mut sent = self.lock();
            if !std::mem::replace(&mut sent.failed_once, true) {
                tracing::warn!("cannot notify systemd: {error}");
            }
        }
    }
}

//! The Akeneo PIM drop-in (`transport = "akeneo"`): what the PIM writes into its Symfony
//! Messenger table and how Akeneo itself would run it.
//!
//! * [`message`]: decoding `messenger_messages` rows.
//! * [`launch`]: the argv and environment Akeneo's handler (7.x watchdog, or 6.0's direct
//!   `akeneo:batch:job`) would use.
//! * [`preflight`]: the checks that must pass before a worker takes any message, because a
//!   launch that cannot work must never consume the queue.
//! * [`restart_signal`]: Symfony's `messenger:stop-workers` signal, read from the PIM's cache.
//!
//! The SQL of the transport lives in [`crate::store::akeneo`], with the other backends.

pub mod launch;
pub mod message;
pub mod preflight;
pub mod restart_signal;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

pub use launch::launch;
pub use message::{JobMessage, Target};

/// Akeneo's job queues. Only these may be consumed unless `allow_other_queues` is set: the
/// same table holds webhook (`default`) and data-quality (`dqi_*`) messages, which a job
/// worker would destroy.
pub const JOB_QUEUES: [&str; 5] = [
    "ui_job",
    "import_export_job",
    "data_maintenance_job",
    "scheduled_job",
    "paused_job",
];

/// How jobs are launched, per Akeneo version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// Akeneo 7 and later: `bin/console akeneo:batch:watchdog`, which heartbeats and fixes up
    /// itself.
    Watchdog,
    /// Akeneo 6.0: `bin/console akeneo:batch:job CODE ID`; the worker heartbeats and fixes up.
    Direct,
}

impl Launcher {
    pub fn name(self) -> &'static str {
        match self {
            Launcher::Watchdog => "akeneo7",
            Launcher::Direct => "akeneo6",
        }
    }
}

/// The `launcher` setting: detected by the preflight (the default), or fixed by the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LauncherChoice {
    Auto,
    Fixed(Launcher),
}

/// The `[akeneo]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AkeneoSettings {
    pub project_dir: PathBuf,
    pub php_binary: PathBuf,
    pub launcher: LauncherChoice,
    /// What the preflight found when `launcher` is `Auto`.
    pub detected_launcher: Option<Launcher>,
    /// A claimed but unacknowledged message becomes available again after this long.
    pub redeliver_timeout: Duration,
    /// `APP_ENV` for every job, as the PHP consumer's `--env` gives it (default `prod`).
    pub app_env: String,
    /// `APP_DEBUG` for every job, when set (the PHP consumer's `--no-debug` is `0`).
    pub app_debug: Option<bool>,
    /// More variables for every job (`[akeneo.environment]`).
    pub environment: BTreeMap<String, String>,
    /// How long a job gets between SIGTERM and SIGKILL when the worker must end it.
    pub kill_grace: Duration,
    /// After this many launches in a row that fail at start, the worker stops claiming.
    pub max_failed_launches: u32,
    /// A launch that fails within this long, before the PIM saw its job start, failed at start.
    pub failed_launch_window: Duration,
}

impl AkeneoSettings {
    /// The launcher in force; `None` until the preflight detected it.
    pub fn resolved_launcher(&self) -> Option<Launcher> {
        match self.launcher {
            LauncherChoice::Fixed(launcher) => Some(launcher),
            LauncherChoice::Auto => self.detected_launcher,
        }
    }

    /// The settings as the operator wrote them, without what the preflight detected.
    pub fn as_configured(&self) -> AkeneoSettings {
        AkeneoSettings {
            detected_launcher: None,
            ..self.clone()
        }
    }

    /// `bin/console` of the PIM.
    pub fn console(&self) -> PathBuf {
        self.project_dir.join("bin/console")
    }

    /// The environment every PHP process of the PIM gets from the worker (jobs and the
    /// preflight's own `bin/console list`).
    pub fn php_environment(&self) -> BTreeMap<String, String> {
        let mut env = self.environment.clone();
        env.insert("APP_ENV".into(), self.app_env.clone());
        if let Some(debug) = self.app_debug {
            env.insert("APP_DEBUG".into(), if debug { "1" } else { "0" }.into());
        }
        env
    }

    /// Symfony's cache directory for the configured environment, where the
    /// `messenger:stop-workers` signal lives.
    pub fn cache_dir(&self) -> PathBuf {
        self.project_dir.join("var/cache").join(&self.app_env)
    }
}

//! `consume`: the daemon, from opening its store (patiently, through outages) and the
//! Akeneo preflight to the consumer loop and its exit code.

use std::path::PathBuf;
use std::sync::Arc;

use tracing::{info, warn};

use crate::cli::ConsumeArgs;
use crate::config::{Config, Transport};
use crate::consumer::{Backoff, Consumer, ConsumerOptions, Reloader, StopReason};
use crate::exit::{ExitCode, Failure};
use crate::instance::read_instance_queues;
use crate::notify::Notifier;
use crate::signals::{Shutdown, Signals, StopLevel};
use crate::store::{self, CallLimits, WorkerIdentity, WorkerStore};
use crate::units::format_duration;

use super::{Context, try_open};

pub(super) async fn consume(
    context: &Context,
    args: &ConsumeArgs,
    notifier: Arc<Notifier>,
    reload_from: ReloadSource,
) -> Result<(), Failure> {
    let config = &context.config;
    if !config.has_any_command() {
        return Err(Failure::config(format!(
            "no job command is configured: set [job] command in {}",
            config.source_name()
        )));
    }
    let queues = select_queues(config, args)?;
    let context = &Context {
        config: preflight(config.clone(), &notifier).await?,
        database_url: context.database_url.clone(),
        url_source: context.url_source.clone(),
    };
    let config = &context.config;
    let signals = Signals::install().map_err(|error| {
        Failure::new(
            ExitCode::Software,
            format!("cannot handle signals: {error}"),
        )
    })?;
    let Some(store) = open_store_patiently(context, &signals.shutdown, &notifier).await? else {
        info!("stopped while waiting for the database");
        return Ok(());
    };
    let worker = WorkerIdentity::for_this_process(args.instance.clone(), args.host_id.clone());
    let options = ConsumerOptions {
        queues,
        sleep: args.sleep,
        limit: args.limit,
        time_limit: args.time_limit,
        memory_limit: args.memory_limit,
    };
    let reloader = reload_from.into_reloader(args);
    let mut consumer = Consumer::new(
        store.into(),
        config.clone(),
        options,
        worker,
        signals,
        notifier.clone(),
        reloader,
    );
    let reason = consumer.run().await;
    let described = reason.describe();
    info!(reason = %described, "worker exits: {described}");
    match reason {
        StopReason::CannotLaunch(why) => {
            notifier.status(&format!("Cannot launch jobs: {why}"));
            Err(Failure::config(why))
        }
        // A graceful restart: the unit (RestartForceExitStatus=) and supervisor bring the
        // worker back, as they do for Symfony's consumer after `messenger:stop-workers`.
        StopReason::StopWorkersRequested => Err(Failure::new(
            ExitCode::Restart,
            "stop-workers requested: exiting so that the service manager restarts the worker",
        )),
        StopReason::StoreUnusable(exit, why) => Err(Failure::new(exit, why)),
        _ => Ok(()),
    }
}

/// In Akeneo mode, checks that the PIM can run jobs before anything is claimed, and settles
/// the launcher; a failure is a configuration error (exit 78), also said in STATUS.
pub(super) async fn preflight(mut config: Config, notifier: &Notifier) -> Result<Config, Failure> {
    let Transport::Akeneo(settings) = &mut config.transport else {
        return Ok(config);
    };
    notifier.status("Checking that the PIM can run jobs");
    let result = notifier
        .while_pinging(crate::akeneo::preflight::check(settings))
        .await;
    match result {
        Ok(launcher) => {
            info!(
                launcher = launcher.name(),
                "the PIM can run jobs: launching with {}",
                launcher.name()
            );
            settings.detected_launcher = Some(launcher);
            Ok(config)
        }
        Err(reason) => {
            notifier.status(&format!("Cannot launch jobs: {reason}"));
            Err(Failure::config(format!(
                "preflight failed, taking no job: {reason}"
            )))
        }
    }
}

/// Where a SIGHUP re-reads the configuration from: the same files and options as at start.
pub struct ReloadSource {
    pub config: Option<PathBuf>,
    pub conf_dir: Option<PathBuf>,
}

impl ReloadSource {
    fn into_reloader(self, args: &ConsumeArgs) -> Reloader {
        let selection = ConsumeArgs {
            queues: args.queues.clone(),
            instance: args.instance.clone(),
            ..ConsumeArgs::default()
        };
        Box::new(move || {
            let mut config = Config::load(self.config.as_deref())?;
            if let Some(dir) = &self.conf_dir {
                config.instance_dir = dir.clone();
            }
            if !config.has_any_command() {
                return Err(Failure::config("no job command is configured"));
            }
            let queues = select_queues(&config, &selection)?;
            Ok((config, queues))
        })
    }
}

/// The queues a consumer serves: named on the command line, or from its instance conf, or
/// all of them; always in the installation's priority order.
pub(super) fn select_queues(config: &Config, args: &ConsumeArgs) -> Result<Vec<String>, Failure> {
    if let Some(instance) = &args.instance {
        let selection = read_instance_queues(&config.instance_dir, instance, config)?;
        info!("{}", selection.describe());
        return Ok(selection.queues);
    }
    if args.queues.is_empty() {
        return Ok(config.queues.clone());
    }
    if let Some(unknown) = args.queues.iter().find(|q| !config.knows_queue(q)) {
        return Err(Failure::new(
            ExitCode::Usage,
            format!(
                "unknown queue {unknown:?}; known queues: {}",
                config.queues.join(", ")
            ),
        ));
    }
    Ok(config.in_priority_order(&args.queues))
}

/// Opens the store for the daemon: an unreachable database is waited for with capped
/// backoff (and said so in STATUS), so a worker started before its database does not exit in
/// a loop. Returns `None` when a stop signal arrives while waiting.
pub(super) async fn open_store_patiently(
    context: &Context,
    shutdown: &Shutdown,
    notifier: &Notifier,
) -> Result<Option<Box<dyn WorkerStore>>, Failure> {
    let location = store::redact_url(&context.database_url);
    let mut backoff = Backoff::default();
    loop {
        match try_open(
            context,
            CallLimits::for_rescue_after(context.config.rescue_after),
        )
        .await
        {
            Ok(opened) => {
                let store = opened.into_worker();
                info!(
                    "job store ready: {} (from {})",
                    store.location(),
                    context.url_source
                );
                return Ok(Some(store));
            }
            Err(error) if error.is_transient() => {
                let delay = backoff.next_delay();
                notifier.status(&format!(
                    "Waiting for database (attempt {}, next in {})",
                    backoff.attempts,
                    format_duration(delay)
                ));
                warn!(
                    attempt = backoff.attempts,
                    "waiting for the database {location} (attempt {}, next in {}): {error}",
                    backoff.attempts,
                    format_duration(delay)
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.reached(StopLevel::Drain) => return Ok(None),
                }
            }
            Err(error) => return Err(error.into()),
        }
    }
}

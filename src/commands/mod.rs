//! What each subcommand does. Each returns `Ok` or a [`Failure`] that carries its exit code;
//! `main` turns that into the process's exit.

use std::sync::Arc;

use crate::cli::{Cli, Command};
use crate::config::Config;
use crate::exit::{ExitCode, Failure};
use crate::notify::Notifier;
use crate::secrets::{self, UrlSource};
use crate::store::{self, CallLimits, Opened, StoreError};

mod change;
mod check;
mod consume;
mod inspect;
mod metrics;
mod push;

use change::{cancel, delete, migrate, pause, prune, resume, retry, stop_workers};
use consume::{ReloadSource, consume};
use inspect::{jobs, show, status};
use push::push;

/// The settings every command starts from.
pub struct Context {
    pub config: Config,
    pub database_url: String,
    /// Where `database_url` came from, said by `status` and at start.
    pub url_source: UrlSource,
}

impl Context {
    /// Reads the config and settles the database URL: the option, then the unit's
    /// credential or variable (see [`secrets::url_from_outside_config`]), then the config,
    /// then the default SQLite file.
    pub fn load(cli: &Cli) -> Result<Context, Failure> {
        let mut config = Config::load(cli.config.as_deref())?;
        if let Some(dir) = &cli.conf_dir {
            config.instance_dir = dir.clone();
        }
        let (database_url, url_source) = settle_database_url(cli, &config)?;
        Ok(Context {
            config,
            database_url,
            url_source,
        })
    }

    /// Opens the store for a one-shot command: no retries, the schema brought up to date.
    async fn open_store(&self) -> Result<Opened, Failure> {
        Ok(try_open(self, CallLimits::for_command()).await?)
    }
}

/// The database URL and where it came from, first found wins: `--database-url`, the unit's
/// credential or variable, `database_url` in the config, the default SQLite file.
fn settle_database_url(cli: &Cli, config: &Config) -> Result<(String, UrlSource), Failure> {
    if let Some(url) = cli
        .database_url
        .clone()
        .filter(|url| !url.trim().is_empty())
    {
        return Ok((url, UrlSource::Option));
    }
    let outside =
        secrets::url_from_outside_config(config.is_the_packaged_one()).map_err(Failure::config)?;
    Ok(
        outside.unwrap_or_else(|| match config.database_url.clone() {
            Some(url) => (url, UrlSource::Config),
            None => (store::default_database_url(), UrlSource::Default),
        }),
    )
}

/// Runs the command. `notifier` talks to systemd; only the daemon uses it.
pub async fn run(cli: &Cli, context: &Context, notifier: Arc<Notifier>) -> Result<(), Failure> {
    match &cli.command {
        Command::Push(args) => push(context, args).await,
        Command::Consume(args) => {
            let reload_from = ReloadSource {
                config: cli.config.clone(),
                conf_dir: cli.conf_dir.clone(),
            };
            consume(context, args, notifier, reload_from).await
        }
        Command::StopWorkers => stop_workers(context).await,
        Command::Status(args) => status(context, args).await,
        Command::Jobs(args) => jobs(context, args).await,
        Command::Show(args) => show(context, args).await,
        Command::Retry(args) => retry(context, args).await,
        Command::Cancel(args) => cancel(context, args).await,
        Command::Delete(args) => delete(context, args).await,
        Command::Pause(args) => pause(context, args).await,
        Command::Resume(args) => resume(context, &args.queues).await,
        Command::Check(args) => check::check(context, args).await,
        Command::Metrics(args) => metrics::metrics(context, args).await,
        Command::Prune => prune(context).await,
        Command::Migrate => migrate(context).await,
        Command::GenerateAssets { dir } => generate_assets(dir),
    }
}

/// Writes `pim-job-queue.1` and bash, zsh and fish completions, all derived from the CLI
/// definition so they never drift from it.
pub fn generate_assets(dir: &std::path::Path) -> Result<(), Failure> {
    use clap::CommandFactory;
    let io = |error: std::io::Error| {
        Failure::new(
            ExitCode::Software,
            format!("cannot write to {}: {error}", dir.display()),
        )
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let command = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .render(&mut page)
        .map_err(io)?;
    std::fs::write(dir.join("pim-job-queue.1"), page).map_err(io)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut command.clone(), "pim-job-queue", dir)
            .map_err(io)?;
    }
    Ok(())
}

/// Opens the configured store with `limits` and brings (or checks) its schema.
async fn try_open(context: &Context, limits: CallLimits) -> Result<Opened, StoreError> {
    let store = store::open_configured(&context.config, &context.database_url, limits).await?;
    store::prepare_schema(store.worker(), context.config.auto_migrate)
        .await
        .map_err(|error| error.without_secrets_of(&context.database_url))?;
    Ok(store)
}

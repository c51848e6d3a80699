//! The checks a worker runs before it takes any message, at start and after each reload.
//!
//! A message is acknowledged once its job has started, and a launch that cannot work (no
//! PHP, an unreadable `bin/console`, a read-only `var/`, a launcher the PIM does not have)
//! would otherwise fail every queued job in seconds. The PHP consumer cannot fail that way
//! because it boots the same kernel before it takes anything; the preflight does the same by
//! running `bin/console list akeneo:batch` once, with the jobs' own environment, which also
//! tells Akeneo 7 (it has `akeneo:batch:watchdog`) from Akeneo 6.0 (it has not).

use std::path::Path;
use std::time::Duration;

use nix::unistd::{AccessFlags, access};

use super::{AkeneoSettings, Launcher, LauncherChoice};
use crate::runner::{self, JobLaunch};

/// A cold PIM cache is warmed by the first `bin/console` run; that can take a while.
const LIST_LIMIT: Duration = Duration::from_secs(180);
const WATCHDOG: &str = "akeneo:batch:watchdog";
const BATCH_JOB: &str = "akeneo:batch:job";

/// Checks the PIM can run jobs as this worker and returns the launcher to use; the error
/// says what is wrong and how to fix it (always a configuration problem: exit 78).
pub async fn check(settings: &AkeneoSettings) -> Result<Launcher, String> {
    check_files(settings)?;
    let commands = list_batch_commands(settings).await?;
    choose_launcher(settings.launcher, &commands)
}

fn check_files(settings: &AkeneoSettings) -> Result<(), String> {
    let php = &settings.php_binary;
    if !php.is_file() {
        return Err(format!(
            "`akeneo.php_binary` {} does not exist (or is not a file)",
            php.display()
        ));
    }
    access(php, AccessFlags::X_OK).map_err(|e| {
        format!(
            "`akeneo.php_binary` {} is not executable: {e}",
            php.display()
        )
    })?;
    let project = &settings.project_dir;
    access(project, AccessFlags::X_OK).map_err(|e| {
        format!(
            "cannot enter `akeneo.project_dir` {}: {e}{}",
            project.display(),
            sandbox_hint(project)
        )
    })?;
    let console = settings.console();
    access(&console, AccessFlags::R_OK).map_err(|e| {
        format!(
            "cannot read {}: {e}: is `akeneo.project_dir` the PIM?",
            console.display()
        )
    })?;
    let var = project.join("var");
    access(&var, AccessFlags::W_OK).map_err(|e| {
        format!(
            "{} is not writable by this worker: {e} (PHP needs it for its cache and logs; \
             run the worker as the PIM's user and list the directory in ReadWritePaths=, \
             see examples/akeneo.conf)",
            var.display()
        )
    })?;
    Ok(())
}

/// Why a path may be invisible to the worker although it exists on the host.
fn sandbox_hint(path: &Path) -> &'static str {
    if path.starts_with("/home") || path.starts_with("/root") || path.starts_with("/run/user") {
        " (under systemd, ProtectHome=yes hides /home: use ProtectHome=read-only as \
         examples/akeneo.conf does)"
    } else {
        ""
    }
}

/// The `akeneo:batch:*` command names the PIM's console knows.
async fn list_batch_commands(settings: &AkeneoSettings) -> Result<Vec<String>, String> {
    let launch = JobLaunch {
        argv: vec![
            settings.php_binary.display().to_string(),
            settings.console().display().to_string(),
            "list".into(),
            "akeneo:batch".into(),
            "--raw".into(),
            "--no-ansi".into(),
        ],
        working_directory: Some(settings.project_dir.clone()),
        env: settings.php_environment(),
        remove_env: vec!["SYMFONY_DOTENV_VARS".into()],
        timeout: None,
        kill_grace: settings.kill_grace,
        signal_leader_first: false,
        payload_on_fd: None,
    };
    let shown = launch.argv.join(" ");
    let captured = runner::capture(&launch, LIST_LIMIT)
        .await
        .map_err(|e| format!("cannot run `{shown}`: {e}"))?;
    if !captured.status.success() {
        return Err(format!(
            "`{shown}` failed ({}), so no job could start: {}",
            captured.status,
            last_lines(&captured.stderr, &captured.stdout)
        ));
    }
    Ok(command_names(&captured.stdout))
}

/// The first word of each line of `list --raw` output.
fn command_names(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn last_lines(stderr: &str, stdout: &str) -> String {
    let text = if stderr.trim().is_empty() {
        stdout
    } else {
        stderr
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(3)..];
    if tail.is_empty() {
        "no output".into()
    } else {
        tail.join(" / ")
    }
}

fn choose_launcher(choice: LauncherChoice, commands: &[String]) -> Result<Launcher, String> {
    let has = |name: &str| commands.iter().any(|c| c == name);
    match choice {
        LauncherChoice::Auto if has(WATCHDOG) => Ok(Launcher::Watchdog),
        LauncherChoice::Auto if has(BATCH_JOB) => Ok(Launcher::Direct),
        LauncherChoice::Auto => Err(format!(
            "the PIM's console has neither {WATCHDOG} nor {BATCH_JOB}: is `akeneo.project_dir` an Akeneo PIM?"
        )),
        LauncherChoice::Fixed(Launcher::Watchdog) if !has(WATCHDOG) => Err(format!(
            "`akeneo.launcher = \"akeneo7\"` but this PIM has no {WATCHDOG} (Akeneo 6.0?): \
             use launcher = \"auto\" or \"akeneo6\""
        )),
        LauncherChoice::Fixed(Launcher::Direct) if !has(BATCH_JOB) => Err(format!(
            "`akeneo.launcher = \"akeneo6\"` but this PIM has no {BATCH_JOB}"
        )),
        LauncherChoice::Fixed(launcher) => Ok(launcher),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Symfony Console's `list akeneo:batch --raw` prints (Akeneo 7.0, trimmed).
    const AKENEO7: &str = "akeneo:batch:create-job         Create a job instance\n\
        akeneo:batch:job                Launch a registered job instance\n\
        akeneo:batch:watchdog           Launch a job execution and watch it\n";
    const AKENEO6: &str = "akeneo:batch:job   Launch a registered job instance\n\
        akeneo:batch:publish-job-to-queue   Publish a job\n";

    #[test]
    fn the_launcher_is_detected_or_checked() {
        let seven = command_names(AKENEO7);
        let six = command_names(AKENEO6);
        assert_eq!(
            choose_launcher(LauncherChoice::Auto, &seven),
            Ok(Launcher::Watchdog)
        );
        assert_eq!(
            choose_launcher(LauncherChoice::Auto, &six),
            Ok(Launcher::Direct)
        );
        let error = choose_launcher(LauncherChoice::Fixed(Launcher::Watchdog), &six).unwrap_err();
        assert!(error.contains("akeneo6"), "{error}");
        assert_eq!(
            choose_launcher(LauncherChoice::Fixed(Launcher::Direct), &seven),
            Ok(Launcher::Direct)
        );
        assert!(choose_launcher(LauncherChoice::Auto, &[]).is_err());
    }

    #[test]
    fn failures_quote_the_last_lines() {
        assert_eq!(last_lines("", "a\nb\n\nc\nd\n"), "b / c / d");
        assert_eq!(
            last_lines("Could not open input file\n", "x"),
            "Could not open input file"
        );
        assert_eq!(last_lines("", ""), "no output");
    }
}

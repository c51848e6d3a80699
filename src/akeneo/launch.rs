//! The command Akeneo's own handler would run for a job message.
//!
//! Only structured fields reach the command line: the job execution id (an integer), the job
//! code and the message options, each as one argv element; the program and its first
//! arguments come from the config. No shell is involved.

use serde_json::{Map, Value};

use super::{AkeneoSettings, JobMessage, Launcher, Target};
use crate::runner::JobLaunch;

/// The command for a job message, as Akeneo 7's handler (or Akeneo 6's) would run it.
/// `code` is the job instance code looked up for an execution (needed by Akeneo 6).
pub fn launch(
    settings: &AkeneoSettings,
    message: &JobMessage,
    code: &str,
) -> Result<JobLaunch, String> {
    let launcher = settings
        .resolved_launcher()
        .ok_or("the Akeneo launcher was not detected (preflight did not run)")?;
    let mut argv = vec![
        settings.php_binary.display().to_string(),
        settings.console().display().to_string(),
    ];
    argv.extend(command_arguments(launcher, &message.target, code)?);
    argv.extend(option_arguments(&message.options));
    let mut env = settings.php_environment();
    if let Some(tenant) = &message.tenant_id {
        env.insert("APP_TENANT_ID".to_string(), tenant.clone());
    }
    Ok(JobLaunch {
        argv,
        working_directory: Some(settings.project_dir.clone()),
        env,
        // Akeneo's handler sets SYMFONY_DOTENV_VARS=false so the job reads `.env` itself.
        remove_env: vec!["SYMFONY_DOTENV_VARS".into()],
        timeout: None,
        kill_grace: settings.kill_grace,
        // Master's watchdog forwards SIGTERM to the job and waits for it; a signal to the
        // whole group would reach the job twice.
        signal_leader_first: launcher == Launcher::Watchdog,
        payload_on_fd: None,
    })
}

fn command_arguments(
    launcher: Launcher,
    target: &Target,
    code: &str,
) -> Result<Vec<String>, String> {
    Ok(match (launcher, target) {
        (Launcher::Watchdog, Target::Execution(id)) => vec![
            "akeneo:batch:watchdog".into(),
            "--quiet".into(),
            format!("--job_execution_id={id}"),
        ],
        (Launcher::Watchdog, Target::Scheduled(code)) => vec![
            "akeneo:batch:watchdog".into(),
            "--quiet".into(),
            format!("--job_code={code}"),
        ],
        (Launcher::Direct, Target::Execution(id)) => {
            if code.is_empty() {
                return Err(format!("job execution {id} has no job instance"));
            }
            vec![
                "akeneo:batch:job".into(),
                "--quiet".into(),
                code.into(),
                id.to_string(),
            ]
        }
        (Launcher::Direct, Target::Scheduled(code)) => {
            return Err(format!(
                "scheduled job {code}: Akeneo 6 has no watchdog to create its execution; \
                 use launcher = \"akeneo7\""
            ));
        }
    })
}

/// Akeneo's option-to-argument rule (`JobMessageHandler::extractArgumentsFromMessage`):
/// `true` gives `--name`; a truthy scalar `--name=value`; a list one `--name=v` per truthy
/// element; `false`, null, `0`, `"0"`, `""` and empty lists give nothing (PHP falsiness).
/// Names that are not plain option names are dropped rather than passed on.
pub fn option_arguments(options: &Map<String, Value>) -> Vec<String> {
    let mut arguments = Vec::new();
    for (name, value) in options {
        if !is_option_name(name) {
            tracing::warn!("ignoring message option {name:?}: not an option name");
            continue;
        }
        match value {
            Value::Bool(true) => arguments.push(format!("--{name}")),
            Value::Array(items) => arguments.extend(
                items
                    .iter()
                    .filter_map(scalar_text)
                    .map(|item| format!("--{name}={item}")),
            ),
            other => arguments.extend(scalar_text(other).map(|text| format!("--{name}={text}"))),
        }
    }
    arguments
}

fn is_option_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A scalar as PHP would print it, or `None` when PHP considers it false.
fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::Bool(true) => Some("1".into()),
        Value::String(text) if text.is_empty() || text == "0" => None,
        Value::String(text) => Some(text.clone()),
        Value::Number(number) if number.as_f64() == Some(0.0) => None,
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::akeneo::LauncherChoice;
    use serde_json::json;
    use std::path::PathBuf;
    use std::time::Duration;

    const IMPORT: &str = r#"{"class":"Akeneo\\Tool\\Component\\BatchQueue\\Queue\\ImportJobExecutionMessage","correlation_id":"6f0c"}"#;

    fn settings(launcher: Launcher) -> AkeneoSettings {
        AkeneoSettings {
            project_dir: "/srv/pim".into(),
            php_binary: "/usr/bin/php".into(),
            launcher: LauncherChoice::Fixed(launcher),
            detected_launcher: None,
            redeliver_timeout: Duration::from_secs(86400),
            app_env: "prod".into(),
            app_debug: None,
            environment: [("MEMORY".to_string(), "1".to_string())].into(),
            kill_grace: Duration::from_secs(10),
            max_failed_launches: 3,
            failed_launch_window: Duration::from_secs(30),
        }
    }

    #[test]
    fn options_follow_akeneos_rule() {
        let options = json!({
            "env": "prod", "no-log": true, "quiet": false, "user": null, "zero": 0,
            "zero_text": "0", "empty": "", "email": ["a@b.c", "", "d@e.f"], "count": 3,
            "bad name": "x", "--injected": "y"
        });
        let arguments = option_arguments(options.as_object().unwrap());
        assert_eq!(
            arguments,
            [
                "--count=3",
                "--email=a@b.c",
                "--email=d@e.f",
                "--env=prod",
                "--no-log"
            ]
        );
    }

    #[test]
    fn akeneo7_runs_the_watchdog_with_the_consumers_environment() {
        let message = JobMessage::decode(
            IMPORT,
            r#"{"job_execution_id":7,"options":{"env":"prod","email":["a@b.c"]}}"#,
        )
        .unwrap();
        let launch = launch(&settings(Launcher::Watchdog), &message, "csv_import").unwrap();
        assert_eq!(
            launch.argv,
            [
                "/usr/bin/php",
                "/srv/pim/bin/console",
                "akeneo:batch:watchdog",
                "--quiet",
                "--job_execution_id=7",
                "--email=a@b.c",
                "--env=prod"
            ]
        );
        assert_eq!(launch.remove_env, ["SYMFONY_DOTENV_VARS"]);
        assert_eq!(launch.env["APP_ENV"], "prod");
        assert_eq!(launch.env["MEMORY"], "1");
        assert!(!launch.env.contains_key("APP_DEBUG"));
        assert!(launch.signal_leader_first);
        assert_eq!(launch.working_directory.unwrap(), PathBuf::from("/srv/pim"));
    }

    #[test]
    fn akeneo6_runs_the_job_directly() {
        let message = JobMessage::decode(IMPORT, r#"{"job_execution_id":7,"options":{}}"#).unwrap();
        let mut direct = settings(Launcher::Direct);
        direct.app_debug = Some(false);
        let launch = launch(&direct, &message, "csv_import").unwrap();
        assert_eq!(
            launch.argv,
            [
                "/usr/bin/php",
                "/srv/pim/bin/console",
                "akeneo:batch:job",
                "--quiet",
                "csv_import",
                "7"
            ]
        );
        assert_eq!(launch.env["APP_DEBUG"], "0");
        assert!(!launch.signal_leader_first);
        let scheduled = JobMessage::decode(
            r#"{"class":"Akeneo\\Tool\\Component\\BatchQueue\\Queue\\ScheduledJobMessage"}"#,
            r#"{"job_code":"nightly","options":{}}"#,
        )
        .unwrap();
        assert!(
            super::launch(&direct, &scheduled, "")
                .unwrap_err()
                .contains("akeneo7")
        );
        let watchdog = super::launch(&settings(Launcher::Watchdog), &scheduled, "").unwrap();
        assert!(watchdog.argv.contains(&"--job_code=nightly".to_string()));
    }

    #[test]
    fn an_undetected_launcher_runs_nothing() {
        let mut auto = settings(Launcher::Watchdog);
        auto.launcher = LauncherChoice::Auto;
        let message = JobMessage::decode(IMPORT, r#"{"job_execution_id":7}"#).unwrap();
        assert!(
            launch(&auto, &message, "x")
                .unwrap_err()
                .contains("preflight")
        );
    }
}

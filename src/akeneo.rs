//! The Akeneo PIM protocol for the drop-in transport: decoding the Symfony Messenger rows the
//! PIM writes, and turning a job message into the command Akeneo itself would run.
//!
//! Only structured fields reach the command line: the job execution id (an integer), the job
//! code and the message options, each as one argv element; the program and its first
//! arguments are fixed here and in the config. No shell is involved.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{Map, Value, json};

use crate::runner::JobLaunch;

/// Message classes whose body carries `job_execution_id` (one class per queue, plus paused
/// jobs being resumed).
const EXECUTION_CLASSES: [&str; 5] = [
    "Akeneo\\Tool\\Component\\BatchQueue\\Queue\\UiJobExecutionMessage",
    "Akeneo\\Tool\\Component\\BatchQueue\\Queue\\ImportJobExecutionMessage",
    "Akeneo\\Tool\\Component\\BatchQueue\\Queue\\ExportJobExecutionMessage",
    "Akeneo\\Tool\\Component\\BatchQueue\\Queue\\DataMaintenanceJobExecutionMessage",
    "Akeneo\\Tool\\Component\\BatchQueue\\Queue\\PausedJobExecutionMessage",
];
/// The message class whose body carries `job_code` (a scheduled job, no execution yet).
const SCHEDULED_CLASS: &str = "Akeneo\\Tool\\Component\\BatchQueue\\Queue\\ScheduledJobMessage";

/// How jobs are launched, per Akeneo version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// Akeneo 7: `bin/console akeneo:batch:watchdog`, which heartbeats and fixes up itself.
    Watchdog,
    /// Akeneo 6: `bin/console akeneo:batch:job CODE ID`; the worker heartbeats and fixes up.
    Direct,
}

/// The `[akeneo]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AkeneoSettings {
    pub project_dir: PathBuf,
    pub php_binary: PathBuf,
    pub launcher: Launcher,
    /// A claimed but unacknowledged message becomes available again after this long.
    pub redeliver_timeout: std::time::Duration,
}

/// What a message asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Execution(i64),
    Scheduled(String),
}

/// A decoded job message.
#[derive(Debug, Clone, PartialEq)]
pub struct JobMessage {
    pub class: String,
    pub target: Target,
    pub options: Map<String, Value>,
    pub tenant_id: Option<String>,
}

impl JobMessage {
    /// Decodes a `messenger_messages` row's `headers` and `body`, as Akeneo's JSON serializer
    /// writes them. An error says why the row cannot be run.
    pub fn decode(headers: &str, body: &str) -> Result<JobMessage, String> {
        let headers: Value = serde_json::from_str(headers)
            .map_err(|error| format!("headers are not JSON: {error}"))?;
        let class = headers
            .get("class")
            .and_then(Value::as_str)
            .ok_or("headers have no `class`")?
            .to_string();
        let body: Value =
            serde_json::from_str(body).map_err(|error| format!("body is not JSON: {error}"))?;
        let target = if EXECUTION_CLASSES.contains(&class.as_str()) {
            let id = body
                .get("job_execution_id")
                .and_then(Value::as_i64)
                .filter(|id| *id > 0)
                .ok_or("body has no integer `job_execution_id`")?;
            Target::Execution(id)
        } else if class == SCHEDULED_CLASS {
            let code = body
                .get("job_code")
                .and_then(Value::as_str)
                .filter(|code| !code.is_empty())
                .ok_or("body has no `job_code`")?;
            Target::Scheduled(code.to_string())
        } else {
            return Err(format!("unknown message class {class}"));
        };
        let options = match body.get("options") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(options)) => options.clone(),
            Some(Value::Array(list)) if list.is_empty() => Map::new(),
            Some(_) => return Err("`options` is not an object".into()),
        };
        let tenant_id = headers
            .get("tenant_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok(JobMessage {
            class,
            target,
            options,
            tenant_id,
        })
    }

    /// The payload the worker stores and logs for this message.
    pub fn to_payload(&self) -> Value {
        let (execution, code) = match &self.target {
            Target::Execution(id) => (json!(id), Value::Null),
            Target::Scheduled(code) => (Value::Null, json!(code)),
        };
        json!({
            "class": self.class,
            "job_execution_id": execution,
            "job_code": code,
            "options": self.options,
            "tenant_id": self.tenant_id,
        })
    }

    /// The inverse of [`JobMessage::to_payload`].
    pub fn from_payload(payload: &Map<String, Value>) -> Result<JobMessage, String> {
        let target = match (payload.get("job_execution_id"), payload.get("job_code")) {
            (Some(Value::Number(id)), _) => Target::Execution(id.as_i64().ok_or("bad id")?),
            (_, Some(Value::String(code))) => Target::Scheduled(code.clone()),
            _ => return Err("payload names neither an execution nor a job code".into()),
        };
        Ok(JobMessage {
            class: payload
                .get("class")
                .and_then(Value::as_str)
                .unwrap_or("")
                .into(),
            target,
            options: payload
                .get("options")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
            tenant_id: payload
                .get("tenant_id")
                .and_then(Value::as_str)
                .map(str::to_owned),
        })
    }
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

/// The command for a job message, as Akeneo 7's handler (or Akeneo 6's) would run it.
/// `code` is the job instance code looked up for an execution (needed by Akeneo 6).
pub fn launch(
    settings: &AkeneoSettings,
    message: &JobMessage,
    code: &str,
) -> Result<JobLaunch, String> {
    let console = settings
        .project_dir
        .join("bin/console")
        .display()
        .to_string();
    let mut argv = vec![settings.php_binary.display().to_string(), console];
    match (settings.launcher, &message.target) {
        (Launcher::Watchdog, Target::Execution(id)) => argv.extend([
            "akeneo:batch:watchdog".into(),
            "--quiet".into(),
            format!("--job_execution_id={id}"),
        ]),
        (Launcher::Watchdog, Target::Scheduled(code)) => argv.extend([
            "akeneo:batch:watchdog".into(),
            "--quiet".into(),
            format!("--job_code={code}"),
        ]),
        (Launcher::Direct, Target::Execution(id)) => {
            if code.is_empty() {
                return Err(format!("job execution {id} has no job instance"));
            }
            argv.extend([
                "akeneo:batch:job".into(),
                "--quiet".into(),
                code.into(),
                id.to_string(),
            ])
        }
        (Launcher::Direct, Target::Scheduled(code)) => {
            return Err(format!(
                "scheduled job {code}: Akeneo 6 has no watchdog to create its execution; \
                 use launcher = \"akeneo7\""
            ));
        }
    }
    argv.extend(option_arguments(&message.options));
    let mut env = BTreeMap::new();
    if let Some(tenant) = &message.tenant_id {
        env.insert("APP_TENANT_ID".to_string(), tenant.clone());
    }
    Ok(JobLaunch {
        argv,
        working_directory: Some(settings.project_dir.clone()),
        env,
        remove_env: vec!["SYMFONY_DOTENV_VARS".into()],
        timeout: None,
        kill_grace: crate::config::DEFAULT_KILL_GRACE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMPORT: &str = r#"{"class":"Akeneo\\Tool\\Component\\BatchQueue\\Queue\\ImportJobExecutionMessage","correlation_id":"6f0c"}"#;

    fn settings(launcher: Launcher) -> AkeneoSettings {
        AkeneoSettings {
            project_dir: "/srv/pim".into(),
            php_binary: "/usr/bin/php".into(),
            launcher,
            redeliver_timeout: std::time::Duration::from_secs(86400),
        }
    }

    #[test]
    fn execution_messages_decode() {
        let body = r#"{"id":"9b2d","job_execution_id":4711,"created_time":"2024-04-08T15:00:00+00:00","updated_time":null,"options":{"env":"prod"}}"#;
        let message = JobMessage::decode(IMPORT, body).unwrap();
        assert_eq!(message.target, Target::Execution(4711));
        assert_eq!(message.options["env"], "prod");
        let round = JobMessage::from_payload(message.to_payload().as_object().unwrap()).unwrap();
        assert_eq!(round, message);
    }

    #[test]
    fn bad_rows_say_why() {
        assert!(
            JobMessage::decode("{", "{}")
                .unwrap_err()
                .contains("headers")
        );
        assert!(
            JobMessage::decode("{}", "{}")
                .unwrap_err()
                .contains("class")
        );
        let unknown = r#"{"class":"App\\Other"}"#;
        assert!(
            JobMessage::decode(unknown, "{}")
                .unwrap_err()
                .contains("unknown message class")
        );
        assert!(JobMessage::decode(IMPORT, r#"{"job_execution_id":"12"}"#).is_err());
        assert!(JobMessage::decode(IMPORT, "not json").is_err());
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
    fn akeneo7_runs_the_watchdog() {
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
        assert_eq!(launch.working_directory.unwrap(), PathBuf::from("/srv/pim"));
    }

    #[test]
    fn akeneo6_runs_the_job_directly() {
        let message = JobMessage::decode(IMPORT, r#"{"job_execution_id":7,"options":{}}"#).unwrap();
        let launch = launch(&settings(Launcher::Direct), &message, "csv_import").unwrap();
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
        let scheduled = JobMessage::decode(
            r#"{"class":"Akeneo\\Tool\\Component\\BatchQueue\\Queue\\ScheduledJobMessage"}"#,
            r#"{"job_code":"nightly","options":{}}"#,
        )
        .unwrap();
        assert!(launch_err(&settings(Launcher::Direct), &scheduled).contains("akeneo7"));
        let watchdog = super::launch(&settings(Launcher::Watchdog), &scheduled, "").unwrap();
        assert!(watchdog.argv.contains(&"--job_code=nightly".to_string()));
    }

    fn launch_err(settings: &AkeneoSettings, message: &JobMessage) -> String {
        super::launch(settings, message, "").unwrap_err()
    }
}

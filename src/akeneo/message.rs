//! Decoding the Symfony Messenger rows the PIM writes into `messenger_messages`.
//!
//! Only structured fields are taken from a row: the job execution id (an integer), the job
//! code and the message options. The program to run is never read from the database.

use serde_json::{Map, Value, json};

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
    /// False for a class this worker does not know whose body names an execution (a
    /// subclass added by a later Akeneo, or a project's own message): it is run only when
    /// that execution exists and is still waiting to start.
    pub known_class: bool,
}

/// Why a row cannot be run, and the execution it names if any (so the PIM can be told).
#[derive(Debug, Clone, PartialEq)]
pub struct Undecodable {
    pub reason: String,
    pub execution: Option<i64>,
}

impl Undecodable {
    fn new(reason: impl Into<String>, execution: Option<i64>) -> Undecodable {
        Undecodable {
            reason: reason.into(),
            execution,
        }
    }
}

impl JobMessage {
    /// Decodes a `messenger_messages` row's `headers` and `body`, as Akeneo's JSON serializer
    /// writes them.
    pub fn decode(headers: &str, body: &str) -> Result<JobMessage, Undecodable> {
        let body: Result<Value, _> = serde_json::from_str(body);
        let execution = body.as_ref().ok().and_then(execution_id);
        let headers: Value = serde_json::from_str(headers).map_err(|error| {
            Undecodable::new(format!("headers are not JSON: {error}"), execution)
        })?;
        let class = headers
            .get("class")
            .and_then(Value::as_str)
            .ok_or_else(|| Undecodable::new("headers have no `class`", execution))?
            .to_string();
        let body =
            body.map_err(|error| Undecodable::new(format!("body is not JSON: {error}"), None))?;
        let known_class = EXECUTION_CLASSES.contains(&class.as_str()) || class == SCHEDULED_CLASS;
        let target = if class == SCHEDULED_CLASS {
            let code = body
                .get("job_code")
                .and_then(Value::as_str)
                .filter(|code| !code.is_empty())
                .ok_or_else(|| Undecodable::new("body has no `job_code`", None))?;
            Target::Scheduled(code.to_string())
        } else if let Some(id) = execution {
            Target::Execution(id)
        } else if known_class {
            return Err(Undecodable::new(
                "body has no integer `job_execution_id`",
                None,
            ));
        } else {
            return Err(Undecodable::new(
                format!("unknown message class {class} without an integer `job_execution_id`"),
                None,
            ));
        };
        let options = match body.get("options") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(options)) => options.clone(),
            Some(Value::Array(list)) if list.is_empty() => Map::new(),
            Some(_) => return Err(Undecodable::new("`options` is not an object", execution)),
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
            known_class,
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
        let class = payload
            .get("class")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        Ok(JobMessage {
            known_class: EXECUTION_CLASSES.contains(&class.as_str()) || class == SCHEDULED_CLASS,
            class,
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

/// The body's `job_execution_id` when it is a positive integer.
fn execution_id(body: &Value) -> Option<i64> {
    body.get("job_execution_id")
        .and_then(Value::as_i64)
        .filter(|id| *id > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMPORT: &str = r#"{"class":"Akeneo\\Tool\\Component\\BatchQueue\\Queue\\ImportJobExecutionMessage","correlation_id":"6f0c"}"#;

    #[test]
    fn execution_messages_decode() {
        let body = r#"{"id":"9b2d","job_execution_id":4711,"created_time":"2024-04-08T15:00:00+00:00","updated_time":null,"options":{"env":"prod"}}"#;
        let message = JobMessage::decode(IMPORT, body).unwrap();
        assert_eq!(message.target, Target::Execution(4711));
        assert!(message.known_class);
        assert_eq!(message.options["env"], "prod");
        let round = JobMessage::from_payload(message.to_payload().as_object().unwrap()).unwrap();
        assert_eq!(round, message);
    }

    #[test]
    fn bad_rows_say_why_and_keep_their_execution() {
        let error = JobMessage::decode("{", r#"{"job_execution_id":12}"#).unwrap_err();
        assert!(error.reason.contains("headers"));
        assert_eq!(error.execution, Some(12));
        assert!(
            JobMessage::decode("{}", "{}")
                .unwrap_err()
                .reason
                .contains("class")
        );
        let unknown = r#"{"class":"App\\Other"}"#;
        let error = JobMessage::decode(unknown, "{}").unwrap_err();
        assert!(error.reason.contains("unknown message class"), "{error:?}");
        assert_eq!(error.execution, None);
        let error = JobMessage::decode(IMPORT, r#"{"job_execution_id":"12"}"#).unwrap_err();
        assert!(error.reason.contains("job_execution_id"));
        let error =
            JobMessage::decode(IMPORT, r#"{"job_execution_id":3,"options":7}"#).unwrap_err();
        assert_eq!(error.execution, Some(3));
        assert!(JobMessage::decode(IMPORT, "not json").is_err());
    }

    #[test]
    fn unknown_classes_that_name_an_execution_are_executions() {
        let custom = r#"{"class":"Acme\\Queue\\PriorityImportMessage"}"#;
        let message = JobMessage::decode(custom, r#"{"job_execution_id":9,"options":[]}"#).unwrap();
        assert_eq!(message.target, Target::Execution(9));
        assert!(!message.known_class);
    }
}

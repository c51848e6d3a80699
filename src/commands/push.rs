//! `push`: a job into its queue, with a payload checked before anything is stored.

use std::path::Path;

use serde_json::Value;

use crate::cli::PushArgs;
use crate::exit::{ExitCode, Failure};
use crate::store::{MAX_PAYLOAD_BYTES, MAX_UNIQUE_KEY_CHARS, NewJob, Pushed};
use crate::wake::WakeDir;

use super::Context;

/// The payload of `push`, from `--payload`, `--payload-file FILE` or `--payload-file -`,
/// checked: a JSON object of at most [`MAX_PAYLOAD_BYTES`].
pub(super) fn read_payload(args: &PushArgs) -> Result<String, Failure> {
    let (text, source) = match (&args.payload, &args.payload_file) {
        (Some(text), _) => (text.clone(), "--payload".to_string()),
        (None, Some(path)) => (read_payload_file(path)?, path.display().to_string()),
        (None, None) => ("{}".to_string(), "--payload".to_string()),
    };
    if text.len() > MAX_PAYLOAD_BYTES {
        return Err(Failure::data(format!(
            "the payload from {source} is {} bytes; at most {MAX_PAYLOAD_BYTES} (1 MiB) are \
             accepted: store large data elsewhere and pass its location",
            text.len()
        )));
    }
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(Value::Object(map).to_string()),
        Ok(_) => Err(Failure::data(format!(
            "the payload from {source} must be a JSON object, e.g. '{{\"a\": 1}}'"
        ))),
        Err(error) => Err(Failure::data(format!(
            "the payload from {source} is not valid JSON: {error}"
        ))),
    }
}

/// Reads at most one byte more than the limit, so a huge file is refused without being
/// read whole.
pub(super) fn read_payload_file(path: &Path) -> Result<String, Failure> {
    use std::io::Read;
    let limit = MAX_PAYLOAD_BYTES as u64 + 1;
    let mut bytes = Vec::new();
    let read = if path == Path::new("-") {
        std::io::stdin().lock().take(limit).read_to_end(&mut bytes)
    } else {
        std::fs::File::open(path).and_then(|file| file.take(limit).read_to_end(&mut bytes))
    };
    read.map_err(|error| {
        Failure::new(
            ExitCode::NoInput,
            format!("cannot read the payload from {}: {error}", path.display()),
        )
    })?;
    String::from_utf8(bytes).map_err(|_| {
        Failure::data(format!(
            "the payload from {} is not UTF-8 text",
            path.display()
        ))
    })
}

pub(super) async fn push(context: &Context, args: &PushArgs) -> Result<(), Failure> {
    if !context.config.knows_queue(&args.queue) {
        return Err(Failure::data(format!(
            "unknown queue {:?}; known queues: {}",
            args.queue,
            context.config.queues.join(", ")
        )));
    }
    if args.code.trim().is_empty() {
        return Err(Failure::data("the job code is empty"));
    }
    if let Some(key) = &args.unique_key
        && (key.trim().is_empty() || key.chars().count() > MAX_UNIQUE_KEY_CHARS)
    {
        return Err(Failure::data(format!(
            "--unique-key must have 1 to {MAX_UNIQUE_KEY_CHARS} characters"
        )));
    }
    let payload = read_payload(args)?;
    let opened = context.open_store().await?;
    let store = opened.jobs("push")?;
    let pushed = store
        .push_unique(&NewJob {
            queue: args.queue.clone(),
            code: args.code.clone(),
            payload,
            delay: args.delay.unwrap_or_default(),
            max_attempts: context.config.max_attempts(&args.code),
            unique_key: args.unique_key.clone(),
        })
        .await?;
    match pushed {
        Pushed::Created(id) => {
            println!("{id}");
            if args.delay.is_none() {
                WakeDir::for_store(context.config.wake_dir.as_deref(), &store.location())
                    .wake_all();
            }
            Ok(())
        }
        Pushed::Existing(id) => {
            println!("{id}");
            if args.fail_if_exists {
                return Err(Failure::new(
                    ExitCode::TempFail,
                    format!("job #{id} with this unique key is waiting or running already"),
                ));
            }
            Ok(())
        }
    }
}

//! Instance conf files: `<instance dir>/NAME.conf` lists the queues that the worker started as
//! `pim_job_queue@NAME` consumes, one name a line.
//!
//! The format and its fallback follow Akeneo's own launcher script, so existing files keep
//! working: a missing or empty file means every queue.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::exit::Failure;

/// Which queues an instance consumes, and why, so the worker can say so in its log.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceQueues {
    /// The queues, in the installation's priority order.
    pub queues: Vec<String>,
    pub path: PathBuf,
    pub origin: QueueOrigin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueOrigin {
    Listed,
    FileMissing,
    FileEmpty,
}

/// Checks an instance name before any file is opened: it comes from a unit's `%i`, which a
/// user with sudo rights chooses, so it must not be able to name a path, nor read as an
/// option anywhere it is passed on (hence no leading `-`; the sudo rules agree).
pub fn validate_instance_name(name: &str) -> Result<(), Failure> {
    let valid = (1..=64).contains(&name.len())
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(Failure::config(format!(
            "invalid instance name {name:?}: use 1 to 64 of A-Z a-z 0-9 _ -, not starting with -"
        )))
    }
}

/// Reads `<dir>/<name>.conf`. The name must have been validated.
pub fn read_instance_queues(
    dir: &Path,
    name: &str,
    config: &Config,
) -> Result<InstanceQueues, Failure> {
    validate_instance_name(name)?;
    let path = dir.join(format!("{name}.conf"));
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(all_queues(config, path, QueueOrigin::FileMissing));
        }
        Err(error) => {
            return Err(Failure::config(format!(
                "cannot read instance conf {}: {error}",
                path.display()
            )));
        }
    };
    let listed = parse_queue_lines(&text, &path, config)?;
    if listed.is_empty() {
        return Ok(all_queues(config, path, QueueOrigin::FileEmpty));
    }
    Ok(InstanceQueues {
        queues: config.in_priority_order(&listed),
        path,
        origin: QueueOrigin::Listed,
    })
}

fn all_queues(config: &Config, path: PathBuf, origin: QueueOrigin) -> InstanceQueues {
    InstanceQueues {
        queues: config.queues.clone(),
        path,
        origin,
    }
}

/// Parses the lines of a conf file: blank lines and `#` comments are skipped, duplicates are
/// ignored, anything that is not a known queue name fails with the file and line number.
pub fn parse_queue_lines(text: &str, path: &Path, config: &Config) -> Result<Vec<String>, Failure> {
    let mut queues: Vec<String> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let name = line.split('#').next().unwrap_or("").trim();
        if name.is_empty() {
            continue;
        }
        if !config.knows_queue(name) {
            return Err(Failure::config(format!(
                "{}:{}: unknown queue {name:?}; known queues: {}",
                path.display(),
                index + 1,
                config.queues.join(", ")
            )));
        }
        if !queues.iter().any(|q| q == name) {
            queues.push(name.to_string());
        }
    }
    Ok(queues)
}

impl InstanceQueues {
    /// The log line that explains the selection, worded like Akeneo's launcher for the fallback.
    pub fn describe(&self) -> String {
        match self.origin {
            QueueOrigin::Listed => format!(
                "{} lists the queues {}",
                self.path.display(),
                self.queues.join(", ")
            ),
            QueueOrigin::FileMissing | QueueOrigin::FileEmpty => format!(
                "{} does not exist or is empty, this consumer will support all job types ({})",
                self.path.display(),
                self.queues.join(", ")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_toml("", None).unwrap()
    }

    #[test]
    fn instance_names_are_checked() {
        for good in ["1", "42", "eu-west_2", &"a".repeat(64)] {
            assert!(validate_instance_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a/b",
            "..",
            "a.b",
            "1 2",
            "x\\x2f",
            "é",
            &"a".repeat(65),
        ] {
            assert!(validate_instance_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lines_comments_and_duplicates() {
        let text = "# queues\n\ndata_maintenance_job\nui_job  # fast ones\nui_job\n";
        let queues = parse_queue_lines(text, Path::new("1.conf"), &config()).unwrap();
        assert_eq!(queues, ["data_maintenance_job", "ui_job"]);
    }

    #[test]
    fn unknown_queue_names_line_and_known_queues() {
        let error = parse_queue_lines("ui_job\n\nimport_job\n", Path::new("/e/3.conf"), &config())
            .unwrap_err();
        assert!(
            error
                .message
                .starts_with("/e/3.conf:3: unknown queue \"import_job\"")
        );
        assert!(
            error
                .message
                .contains("ui_job, import_export_job, data_maintenance_job")
        );
    }
}

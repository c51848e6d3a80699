//! `check`: the fleet's health in one line for Icinga, Nagios or Zabbix, in the
//! monitoring-plugin format (`STATE - text|perfdata`), with the state as the exit code.
//!
//! Thresholds are `[WARN:]CRIT`: one value is a critical level only. A paused queue's wait
//! is reported but never alerts: someone chose it. Whatever goes wrong before the state is
//! known (a threshold that cannot be read, a database that does not answer within
//! [`ANSWER_WITHIN`]) is UNKNOWN, never a hang and never a sysexits code the monitoring
//! system would not understand.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::cli::CheckArgs;
use crate::config::Config;
use crate::exit::{ExitCode, Failure};
use crate::store::{QueueLatency, WorkerRecord};
use crate::units::{format_duration, parse_duration};

use super::Context;

/// The longest `check` waits for the database, inside the usual 10 s of a plugin's timeout.
const ANSWER_WITHIN: Duration = Duration::from_secs(9);

pub(super) async fn check(context: &Context, args: &CheckArgs) -> Result<(), Failure> {
    let report = match Limits::parse(args) {
        Err(problem) => Report::unknown(problem),
        Ok(limits) => match tokio::time::timeout(ANSWER_WITHIN, measure(context, &limits)).await {
            Ok(Ok(report)) => report,
            Ok(Err(failure)) => Report::unknown(failure.message),
            Err(_) => Report::unknown(format!(
                "the database did not answer within {}",
                format_duration(ANSWER_WITHIN)
            )),
        },
    };
    println!("{report}");
    match report.state {
        State::Ok => Ok(()),
        state => Err(Failure::already_said(state.exit())),
    }
}

/// A plugin's state, worst last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum State {
    Ok,
    Warning,
    Critical,
    Unknown,
}

impl State {
    fn exit(self) -> ExitCode {
        match self {
            State::Ok => unreachable!("OK is not a failure"),
            State::Warning => ExitCode::Warning,
            State::Critical => ExitCode::Critical,
            State::Unknown => ExitCode::Unknown,
        }
    }

    fn label(self) -> &'static str {
        match self {
            State::Ok => "OK",
            State::Warning => "WARNING",
            State::Critical => "CRITICAL",
            State::Unknown => "UNKNOWN",
        }
    }
}

/// A `[WARN:]CRIT` pair of levels.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Levels {
    warn: Option<f64>,
    crit: f64,
}

impl Levels {
    fn parse(text: &str, value: impl Fn(&str) -> Result<f64, String>) -> Result<Levels, String> {
        let (warn, crit) = match text.split_once(':') {
            Some((warn, crit)) => (Some(value(warn)?), value(crit)?),
            None => (None, value(text)?),
        };
        Ok(Levels { warn, crit })
    }

    /// The state of `measured` when more than a level is bad.
    fn above(&self, measured: f64) -> State {
        if measured > self.crit {
            State::Critical
        } else if self.warn.is_some_and(|warn| measured > warn) {
            State::Warning
        } else {
            State::Ok
        }
    }

    /// The state of `measured` when fewer than a level is bad.
    fn below(&self, measured: f64) -> State {
        if measured < self.crit {
            State::Critical
        } else if self.warn.is_some_and(|warn| measured < warn) {
            State::Warning
        } else {
            State::Ok
        }
    }
}

fn seconds(text: &str) -> Result<f64, String> {
    parse_duration(text.trim()).map(|duration| duration.as_secs_f64())
}

fn count(text: &str) -> Result<f64, String> {
    text.trim()
        .parse::<u64>()
        .map(|n| n as f64)
        .map_err(|_| format!("{text:?} is not a count"))
}

/// The thresholds asked for.
#[derive(Debug, Default)]
struct Limits {
    latency_default: Option<Levels>,
    latency_by_queue: BTreeMap<String, Levels>,
    workers_by_queue: BTreeMap<String, Levels>,
    failed: Option<(Duration, Levels)>,
}

impl Limits {
    fn parse(args: &CheckArgs) -> Result<Limits, String> {
        let mut limits = Limits::default();
        if let Some(text) = &args.max_latency {
            for part in text.split(',') {
                let context = |error: String| format!("--max-latency {part:?}: {error}");
                match part.split_once('=') {
                    Some((queue, levels)) => {
                        let levels = Levels::parse(levels, seconds).map_err(context)?;
                        limits.latency_by_queue.insert(queue.trim().into(), levels);
                    }
                    None => {
                        limits.latency_default =
                            Some(Levels::parse(part, seconds).map_err(context)?)
                    }
                }
            }
        }
        if let Some(text) = &args.min_workers {
            for part in text.split(',') {
                let context = |error: String| format!("--min-workers {part:?}: {error}");
                let (queue, levels) = part
                    .split_once('=')
                    .ok_or_else(|| context("expected QUEUE=[WARN:]CRIT".into()))?;
                let levels = Levels::parse(levels, count).map_err(context)?;
                limits.workers_by_queue.insert(queue.trim().into(), levels);
            }
        }
        if let Some(text) = &args.max_failed {
            let context = |error: String| format!("--max-failed {text:?}: {error}");
            let (window, levels) = text
                .split_once('=')
                .ok_or_else(|| context("expected WINDOW=[WARN:]CRIT".into()))?;
            let window = parse_duration(window.trim()).map_err(context)?;
            limits.failed = Some((window, Levels::parse(levels, count).map_err(context)?));
        }
        Ok(limits)
    }

    fn latency_of(&self, queue: &str) -> Option<Levels> {
        self.latency_by_queue
            .get(queue)
            .copied()
            .or(self.latency_default)
    }
}

/// What `check` found: the state, what to say, the performance data.
struct Report {
    state: State,
    problems: Vec<String>,
    summary: Vec<String>,
    perfdata: Vec<String>,
}

impl Report {
    fn unknown(problem: impl Into<String>) -> Report {
        Report {
            state: State::Unknown,
            problems: vec![problem.into()],
            summary: Vec::new(),
            perfdata: Vec::new(),
        }
    }

    fn judge(&mut self, state: State, problem: impl FnOnce() -> String) {
        if state > State::Ok {
            self.problems.push(problem());
        }
        self.state = self.state.max(state);
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = if self.problems.is_empty() {
            self.summary.join("; ")
        } else {
            self.problems.join("; ")
        };
        write!(f, "{} - {}", self.state.label(), one_line(&text))?;
        if !self.perfdata.is_empty() {
            write!(f, "|{}", self.perfdata.join(" "))?;
        }
        Ok(())
    }
}

/// A plugin's output is one line, and `|` starts its performance data.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ").replace('|', "/")
}

/// One performance datum: `'label'=value[unit];warn;crit;min`.
fn perfdatum(label: &str, value: String, warn: String, crit: String) -> String {
    format!("'{}'={value};{warn};{crit};0", label.replace('\'', ""))
}

fn level(value: Option<f64>) -> String {
    value.map_or(String::new(), |v| format!("{v}"))
}

/// A "fewer than N is bad" level in the plugin range syntax (`N:`).
fn floor(value: Option<f64>) -> String {
    value.map_or(String::new(), |v| format!("{v}:"))
}

async fn measure(context: &Context, limits: &Limits) -> Result<Report, Failure> {
    let opened = context.open_store().await?;
    let store = opened.worker();
    let latencies = store.queue_latencies().await?;
    let paused = store.paused_queues().await?;
    let workers = store.list_workers().await?;
    let failed = match limits.failed {
        Some((window, _)) => Some(store.failed_since(window).await?),
        None => None,
    };
    let mut report = Report {
        state: State::Ok,
        problems: Vec::new(),
        summary: Vec::new(),
        perfdata: Vec::new(),
    };
    let paused: Vec<&str> = paused.iter().map(|p| p.queue.as_str()).collect();
    judge_latencies(&mut report, &context.config, limits, &latencies, &paused);
    judge_workers(&mut report, &context.config, limits, &workers);
    if let (Some((window, levels)), Some(failed)) = (limits.failed, failed) {
        let window_text = format_duration(window);
        let failed = failed as f64;
        report.judge(levels.above(failed), || {
            format!("{failed} jobs failed in the last {window_text}")
        });
        report
            .summary
            .push(format!("{failed} failed in the last {window_text}"));
        report.perfdata.push(perfdatum(
            &format!("failed_{window_text}"),
            failed.to_string(),
            level(levels.warn),
            level(Some(levels.crit)),
        ));
    }
    Ok(report)
}

/// Every configured queue's wait (0 when nothing is due), judged unless it is paused.
fn judge_latencies(
    report: &mut Report,
    config: &Config,
    limits: &Limits,
    latencies: &[QueueLatency],
    paused: &[&str],
) {
    let mut said = Vec::new();
    for queue in &config.queues {
        let waited = latencies
            .iter()
            .find(|latency| &latency.queue == queue)
            .map_or(0.0, |latency| latency.seconds);
        let levels = limits.latency_of(queue);
        let is_paused = paused.contains(&queue.as_str());
        let shown = format_duration(Duration::from_secs_f64(waited.floor()));
        if let Some(levels) = levels
            && !is_paused
        {
            report.judge(levels.above(waited), || {
                format!("{queue}'s oldest due job has waited {shown}")
            });
        }
        said.push(if is_paused {
            format!("{queue} {shown} (paused)")
        } else {
            format!("{queue} {shown}")
        });
        report.perfdata.push(perfdatum(
            &format!("{queue}_latency"),
            format!("{waited:.3}s"),
            level(levels.and_then(|l| l.warn)),
            level(levels.map(|l| l.crit)),
        ));
    }
    report.summary.push(format!("waiting: {}", said.join(", ")));
}

/// Live workers (a heartbeat younger than `rescue_after`) per queue asked about.
fn judge_workers(report: &mut Report, config: &Config, limits: &Limits, workers: &[WorkerRecord]) {
    let live: Vec<&WorkerRecord> = workers
        .iter()
        .filter(|w| w.heartbeat_age_seconds < config.rescue_after.as_secs_f64())
        .collect();
    let mut said = Vec::new();
    for (queue, levels) in &limits.workers_by_queue {
        let serving = live
            .iter()
            .filter(|w| w.queues.split(',').any(|q| q.trim() == queue))
            .count() as f64;
        report.judge(levels.below(serving), || {
            format!("{serving} live workers on {queue}")
        });
        said.push(format!("{queue} {serving}"));
        report.perfdata.push(perfdatum(
            &format!("{queue}_workers"),
            serving.to_string(),
            floor(levels.warn),
            floor(Some(levels.crit)),
        ));
    }
    report.summary.push(format!("{} live workers", live.len()));
    if !said.is_empty() {
        report.summary.push(format!("workers: {}", said.join(", ")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_read_warn_and_crit() {
        let both = Levels::parse("5m:15m", seconds).unwrap();
        assert_eq!(both.warn, Some(300.0));
        assert_eq!(both.crit, 900.0);
        assert_eq!(both.above(200.0), State::Ok);
        assert_eq!(both.above(301.0), State::Warning);
        assert_eq!(both.above(901.0), State::Critical);
        let floor = Levels::parse("2:1", count).unwrap();
        assert_eq!(floor.below(2.0), State::Ok);
        assert_eq!(floor.below(1.0), State::Warning);
        assert_eq!(floor.below(0.0), State::Critical);
        assert!(Levels::parse("soon", seconds).is_err());
    }

    #[test]
    fn the_report_is_one_plugin_line() {
        let mut report = Report {
            state: State::Ok,
            problems: Vec::new(),
            summary: vec!["all | fine\nreally".into()],
            perfdata: vec![perfdatum(
                "ui_job_latency",
                "1.5s".into(),
                "".into(),
                "60".into(),
            )],
        };
        assert_eq!(
            report.to_string(),
            "OK - all / fine really|'ui_job_latency'=1.5s;;60;0"
        );
        report.judge(State::Critical, || "bad".into());
        report.judge(State::Warning, || "meh".into());
        assert!(report.to_string().starts_with("CRITICAL - bad; meh|"));
    }
}

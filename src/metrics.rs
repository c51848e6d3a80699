//! The fleet's state as Prometheus metrics, read from the database: what every worker on
//! every host shares, so one scrape (or one textfile every 15 s) covers the fleet.
//!
//! The text is Prometheus' exposition format, version 0.0.4, which node_exporter's textfile
//! collector and `promtool check metrics` read, with OpenMetrics' conventions where the two
//! agree: base units (seconds), `_total` counters, every series known to exist present with
//! its 0, and a closing `# EOF` (a comment to 0.0.4 parsers). The OpenMetrics spellings that
//! 0.0.4 parsers refuse (a counter family named without `_total`, the `info` type) are left
//! out: `pjq_build_info` is a gauge of 1, as client libraries print it in 0.0.4.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::time::Duration;

use crate::store::{
    HISTOGRAM_BOUNDS, PausedQueue, QueueCounts, QueueLatency, Tally, Timestamp, WorkerRecord,
};

/// What `metrics` reads from the store, with the timings that judge a worker's heartbeat.
pub struct Snapshot {
    /// Every queue known to exist: the configured ones in priority order, then any other
    /// found in the store.
    pub queues: Vec<String>,
    pub counts: Vec<QueueCounts>,
    pub latencies: Vec<QueueLatency>,
    pub paused: Vec<PausedQueue>,
    pub workers: Vec<WorkerRecord>,
    /// `None` when the jobs are tracked elsewhere (Akeneo mode): no finished counters.
    pub tallies: Option<Vec<Tally>>,
    /// A worker heartbeats this often.
    pub heartbeat_interval: Duration,
    /// A worker that has not reached the database for this long has stopped its job.
    pub fence_after: Duration,
    pub schedules: Vec<ScheduleView>,
    pub caps: Vec<CapView>,
}

/// A configured schedule with its next run and its latest queued slot (`status` shows it
/// too).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScheduleView {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub next_run: Option<Timestamp>,
    pub last_slot: Option<Timestamp>,
    pub last_job: Option<i64>,
}

/// A configured concurrency cap and how many of its jobs run now, fleet-wide (`status`
/// shows it too).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CapView {
    /// `code:CODE` or `group:NAME`.
    pub key: String,
    pub codes: Vec<String>,
    pub max_running: u32,
    pub running: i64,
}

/// The states a worker is counted in, as the database sees it: `idle` and `busy` (a fresh
/// heartbeat, naming no job or one), `unavailable` (heartbeats late: it cannot reach the
/// database, or is stuck), `fenced` (silent past the fence: it has stopped its job, or is
/// gone and its jobs will be rescued).
const WORKER_STATES: [&str; 4] = ["idle", "busy", "unavailable", "fenced"];

/// The results of finished jobs, as `pjq_jobs_finished_total` labels them.
const RESULTS: [&str; 5] = ["succeeded", "failed", "cancelled", "lost", "interrupted"];

/// Prints the snapshot as metrics text.
pub fn render(snapshot: &Snapshot) -> String {
    let mut out = Text::default();
    job_gauges(&mut out, snapshot);
    queue_gauges(&mut out, snapshot);
    if let Some(tallies) = &snapshot.tallies {
        finished_counters(&mut out, &snapshot.queues, tallies);
        histogram(
            &mut out,
            "pjq_job_duration_seconds",
            "How long finished jobs ran, from claim to result.",
            &snapshot.queues,
            tallies,
            |t| (t.duration_bucket, t.duration_sum),
        );
        histogram(
            &mut out,
            "pjq_job_wait_seconds",
            "How long finished jobs waited in their queue, from due to start.",
            &snapshot.queues,
            tallies,
            |t| (t.wait_bucket, t.wait_sum),
        );
    }
    worker_gauges(&mut out, snapshot);
    schedule_gauges(&mut out, snapshot);
    cap_gauges(&mut out, snapshot);
    out.family(
        "pjq_build_info",
        "gauge",
        "The pim-job-queue build that printed these metrics.",
    );
    out.sample(
        "pjq_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    out.0.push_str("# EOF\n");
    out.0
}

fn job_gauges(out: &mut Text, snapshot: &Snapshot) {
    out.family(
        "pjq_jobs",
        "gauge",
        "Jobs in the store by queue and state (Akeneo mode: the PIM's queued messages).",
    );
    let states: &[&str] = if snapshot.tallies.is_some() {
        &[
            "waiting",
            "delayed",
            "running",
            "succeeded",
            "failed",
            "cancelled",
        ]
    } else {
        &["waiting", "delayed", "running", "set_aside"]
    };
    for queue in &snapshot.queues {
        let counts = snapshot.counts.iter().find(|c| &c.queue == queue);
        for state in states {
            let n = counts.map_or(0, |c| match *state {
                "waiting" => c.waiting,
                "delayed" => c.delayed,
                "running" => c.running,
                "set_aside" => c.set_aside,
                "succeeded" => c.succeeded,
                "failed" => c.failed,
                _ => c.cancelled,
            });
            out.sample("pjq_jobs", &[("queue", queue), ("state", state)], n as f64);
        }
    }
}

fn queue_gauges(out: &mut Text, snapshot: &Snapshot) {
    let latency_of = |queue: &str| snapshot.latencies.iter().find(|l| l.queue == queue);
    out.family(
        "pjq_queue_latency_seconds",
        "gauge",
        "How long the queue's oldest due job has waited (0: none is due).",
    );
    for queue in &snapshot.queues {
        let seconds = latency_of(queue).map_or(0.0, |l| l.seconds);
        out.sample("pjq_queue_latency_seconds", &[("queue", queue)], seconds);
    }
    out.family(
        "pjq_queue_oldest_due_timestamp_seconds",
        "gauge",
        "When the queue's oldest due job became due (queues with a due job only).",
    );
    for queue in &snapshot.queues {
        if let Some(latency) = latency_of(queue) {
            out.sample(
                "pjq_queue_oldest_due_timestamp_seconds",
                &[("queue", queue)],
                seconds_of(latency.oldest_due_at),
            );
        }
    }
    out.family(
        "pjq_queue_paused",
        "gauge",
        "1 while the queue is paused fleet-wide (`pim-job-queue pause`).",
    );
    for queue in &snapshot.queues {
        let paused = snapshot.paused.iter().any(|p| &p.queue == queue);
        out.sample(
            "pjq_queue_paused",
            &[("queue", queue)],
            f64::from(u8::from(paused)),
        );
    }
}

fn finished_counters(out: &mut Text, queues: &[String], tallies: &[Tally]) {
    let jobs = |queue: &str, event: &str| -> i64 {
        tallies
            .iter()
            .filter(|t| t.queue == queue && t.event == event)
            .map(|t| t.jobs)
            .sum()
    };
    out.family(
        "pjq_jobs_finished_total",
        "counter",
        "Jobs that reached a result, by queue and result; pruning never lowers it.",
    );
    for queue in queues {
        for result in RESULTS {
            out.sample(
                "pjq_jobs_finished_total",
                &[("queue", queue), ("result", result)],
                jobs(queue, result) as f64,
            );
        }
    }
    out.family(
        "pjq_jobs_rescued_total",
        "counter",
        "Running jobs taken back from a worker that stopped heartbeating.",
    );
    for queue in queues {
        let rescued = jobs(queue, "rescued") as f64;
        out.sample("pjq_jobs_rescued_total", &[("queue", queue)], rescued);
    }
}

/// A histogram per queue over the finished jobs that ran, from each tally's bucket and
/// summed microseconds as `pick` reads them.
fn histogram(
    out: &mut Text,
    name: &str,
    help: &str,
    queues: &[String],
    tallies: &[Tally],
    pick: impl Fn(&Tally) -> (i64, i64),
) {
    out.family(name, "histogram", help);
    let bucket_name = format!("{name}_bucket");
    for queue in queues {
        let mut per_bucket = vec![0_i64; HISTOGRAM_BOUNDS.len() + 1];
        let mut sum_micros = 0_i64;
        for tally in tallies.iter().filter(|t| &t.queue == queue) {
            let (bucket, sum) = pick(tally);
            if let Ok(bucket) = usize::try_from(bucket) {
                per_bucket[bucket.min(HISTOGRAM_BOUNDS.len())] += tally.jobs;
                sum_micros += sum;
            }
        }
        let mut cumulative = 0;
        for (index, count) in per_bucket.iter().enumerate() {
            cumulative += count;
            let le = HISTOGRAM_BOUNDS
                .get(index)
                .map_or("+Inf".to_string(), |b| number(b.as_secs_f64()));
            out.sample(
                &bucket_name,
                &[("queue", queue), ("le", &le)],
                cumulative as f64,
            );
        }
        out.sample(
            &format!("{name}_sum"),
            &[("queue", queue)],
            sum_micros as f64 / 1e6,
        );
        out.sample(
            &format!("{name}_count"),
            &[("queue", queue)],
            cumulative as f64,
        );
    }
}

fn worker_gauges(out: &mut Text, snapshot: &Snapshot) {
    let mut by_host: BTreeMap<&str, BTreeMap<&str, u32>> = BTreeMap::new();
    for worker in &snapshot.workers {
        *by_host
            .entry(&worker.host)
            .or_default()
            .entry(worker_state(worker, snapshot))
            .or_default() += 1;
    }
    out.family(
        "pjq_workers",
        "gauge",
        "Workers by host and state, judged by their heartbeats' age.",
    );
    for (host, states) in &by_host {
        for state in WORKER_STATES {
            let n = states.get(state).copied().unwrap_or(0);
            out.sample("pjq_workers", &[("host", host), ("state", state)], n.into());
        }
    }
    out.family(
        "pjq_worker_heartbeat_timestamp_seconds",
        "gauge",
        "When each worker last reached the database.",
    );
    let mut seen = BTreeSet::new();
    for worker in &snapshot.workers {
        let instance = worker.instance.as_deref().unwrap_or("");
        let pid = worker.pid.to_string();
        // A restarted worker keeps its pid only by chance: one series per live row.
        if !seen.insert((worker.host.as_str(), instance, worker.pid)) {
            continue;
        }
        out.sample(
            "pjq_worker_heartbeat_timestamp_seconds",
            &[
                ("host", &worker.host),
                ("instance", instance),
                ("pid", &pid),
            ],
            seconds_of(worker.heartbeat_at),
        );
    }
}

fn schedule_gauges(out: &mut Text, snapshot: &Snapshot) {
    if snapshot.schedules.is_empty() {
        return;
    }
    type Pick = fn(&ScheduleView) -> Option<Timestamp>;
    let families: [(&str, &str, Pick); 2] = [
        (
            "pjq_schedule_next_run_timestamp_seconds",
            "When each `[schedule.*]` runs next.",
            |s| s.next_run,
        ),
        (
            "pjq_schedule_last_slot_timestamp_seconds",
            "The latest slot of each schedule that was queued (0: none yet).",
            |s| s.last_slot,
        ),
    ];
    for (name, help, pick) in families {
        out.family(name, "gauge", help);
        for schedule in &snapshot.schedules {
            let at = pick(schedule).map_or(0.0, seconds_of);
            out.sample(name, &[("schedule", &schedule.name)], at);
        }
    }
}

/// Each cap's running jobs beside its limit: a cap at its limit for long holds its jobs
/// back while others run.
fn cap_gauges(out: &mut Text, snapshot: &Snapshot) {
    if snapshot.caps.is_empty() {
        return;
    }
    type Pick = fn(&CapView) -> f64;
    let families: [(&str, &str, Pick); 2] = [
        (
            "pjq_cap_running_jobs",
            "Jobs running under each concurrency cap (`code:CODE` or `group:NAME`), fleet-wide.",
            |cap| cap.running as f64,
        ),
        (
            "pjq_cap_max_running_jobs",
            "Each concurrency cap's `max_running`.",
            |cap| f64::from(cap.max_running),
        ),
    ];
    for (name, help, pick) in families {
        out.family(name, "gauge", help);
        for cap in &snapshot.caps {
            out.sample(name, &[("cap", &cap.key)], pick(cap));
        }
    }
}

fn worker_state(worker: &WorkerRecord, snapshot: &Snapshot) -> &'static str {
    let age = Duration::from_secs_f64(worker.heartbeat_age_seconds.max(0.0));
    if age >= snapshot.fence_after {
        "fenced"
    } else if age > snapshot.heartbeat_interval * 2 {
        "unavailable"
    } else if worker.current_job.is_some() {
        "busy"
    } else {
        "idle"
    }
}

fn seconds_of(at: Timestamp) -> f64 {
    at.0 as f64 / 1e6
}

/// A sample value or bound as the format writes it: integers without a fraction.
fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

/// The text being written.
#[derive(Default)]
struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(key, value)| format!("{key}=\"{}\"", escape_label(value)))
            .collect();
        let _ = writeln!(self.0, "{name}{{{}}} {}", labels.join(","), number(value));
    }
}

/// A label value as the format quotes it: backslash, double quote and newline escaped.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

fn escape_help(text: &str) -> String {
    text.replace('\\', r"\\").replace('\n', r"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            queues: vec!["ui_job".into(), "import_export_job".into()],
            counts: vec![QueueCounts {
                queue: "ui_job".into(),
                waiting: 2,
                ..QueueCounts::default()
            }],
            latencies: vec![QueueLatency {
                queue: "ui_job".into(),
                oldest_due_at: Timestamp(1_700_000_000_000_000),
                seconds: 12.5,
            }],
            paused: Vec::new(),
            workers: vec![WorkerRecord {
                host: "web\"1".into(),
                instance: Some("1".into()),
                pid: 42,
                queues: "ui_job".into(),
                started_at: Timestamp(0),
                heartbeat_at: Timestamp(1_700_000_011_500_000),
                heartbeat_age_seconds: 1.0,
                current_job: Some(7),
            }],
            tallies: Some(vec![
                Tally {
                    queue: "ui_job".into(),
                    event: "succeeded".into(),
                    duration_bucket: 2,
                    wait_bucket: 0,
                    jobs: 3,
                    duration_sum: 2_400_000,
                    wait_sum: 30_000,
                },
                Tally {
                    queue: "ui_job".into(),
                    event: "cancelled".into(),
                    duration_bucket: -1,
                    wait_bucket: -1,
                    jobs: 1,
                    duration_sum: 0,
                    wait_sum: 0,
                },
            ]),
            heartbeat_interval: Duration::from_secs(5),
            fence_after: Duration::from_secs(40),
            schedules: Vec::new(),
            caps: Vec::new(),
        }
    }

    #[test]
    fn every_known_series_is_present_with_its_zero() {
        let text = render(&snapshot());
        for line in [
            "pjq_jobs{queue=\"import_export_job\",state=\"waiting\"} 0",
            "pjq_jobs{queue=\"ui_job\",state=\"waiting\"} 2",
            "pjq_jobs_finished_total{queue=\"import_export_job\",result=\"lost\"} 0",
            "pjq_jobs_finished_total{queue=\"ui_job\",result=\"succeeded\"} 3",
            "pjq_jobs_finished_total{queue=\"ui_job\",result=\"cancelled\"} 1",
            "pjq_queue_latency_seconds{queue=\"ui_job\"} 12.5",
            "pjq_queue_latency_seconds{queue=\"import_export_job\"} 0",
            "pjq_queue_oldest_due_timestamp_seconds{queue=\"ui_job\"} 1700000000",
            "pjq_workers{host=\"web\\\"1\",state=\"busy\"} 1",
            "pjq_workers{host=\"web\\\"1\",state=\"fenced\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    /// Buckets are cumulative; a job that never started is in the counters, not in the
    /// histograms.
    #[test]
    fn histograms_are_cumulative_and_count_jobs_that_ran() {
        let text = render(&snapshot());
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("{prefix}\n{text}"))
                .to_string()
        };
        let le = "pjq_job_duration_seconds_bucket{queue=\"ui_job\",le=";
        assert!(line(&format!("{le}\"0.5\"}}")).ends_with(" 0"));
        assert!(line(&format!("{le}\"1\"}}")).ends_with(" 3"));
        assert!(line(&format!("{le}\"+Inf\"}}")).ends_with(" 3"));
        assert!(line("pjq_job_duration_seconds_sum{queue=\"ui_job\"}").ends_with(" 2.4"));
        assert!(line("pjq_job_duration_seconds_count{queue=\"ui_job\"}").ends_with(" 3"));
        assert!(line("pjq_job_wait_seconds_bucket{queue=\"ui_job\",le=\"0.1\"}").ends_with(" 3"));
    }

    #[test]
    fn akeneo_mode_has_no_finished_counters() {
        let mut snapshot = snapshot();
        snapshot.tallies = None;
        let text = render(&snapshot);
        assert!(!text.contains("pjq_jobs_finished_total"));
        assert!(!text.contains("pjq_job_duration_seconds"));
        assert!(text.contains("pjq_jobs{queue=\"ui_job\",state=\"set_aside\"} 0"));
    }

    #[test]
    fn a_workers_state_follows_its_heartbeats_age() {
        let snapshot = snapshot();
        let mut worker = snapshot.workers[0].clone();
        let state = |age: f64, worker: &mut WorkerRecord| {
            worker.heartbeat_age_seconds = age;
            worker_state(worker, &snapshot)
        };
        assert_eq!(state(1.0, &mut worker), "busy");
        assert_eq!(state(11.0, &mut worker), "unavailable");
        assert_eq!(state(40.0, &mut worker), "fenced");
        worker.current_job = None;
        assert_eq!(state(1.0, &mut worker), "idle");
    }
}

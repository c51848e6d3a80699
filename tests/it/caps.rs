//! Concurrency caps with real worker processes: `max_running` per code and per group holds
//! across workers, and jobs without a cap are not held up behind capped ones.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::backend_tests;
use crate::support::*;

backend_tests!(
    four_workers_never_run_more_than_a_codes_cap_and_others_pass,
    a_group_cap_spans_its_codes,
    a_reload_applies_a_new_cap_at_once,
);

/// A job that writes `start CODE ID NANOS` to `marks.log`, sleeps `seconds`, then writes
/// `end CODE ID NANOS`: inside its claim and its result, so marks of two jobs that overlap
/// mean their claims did.
fn marking_command(scratch: &Scratch, seconds: &str) -> String {
    let marks = scratch.path("marks.log");
    format!(
        r#"command = ["/bin/sh", "-c", "echo \"start $PIM_JOB_CODE $PIM_JOB_ID $(date +%s%N)\" >> \"$0\"; sleep {seconds}; echo \"end $PIM_JOB_CODE $PIM_JOB_ID $(date +%s%N)\" >> \"$0\"", "{}"]"#,
        marks.display()
    )
}

/// A job's run, from its marks: code, start and end in nanoseconds.
struct Run {
    code: String,
    start: u128,
    end: u128,
}

fn runs(scratch: &Scratch) -> Vec<Run> {
    let text = std::fs::read_to_string(scratch.path("marks.log")).unwrap_or_default();
    let mut started: BTreeMap<String, (String, u128)> = BTreeMap::new();
    let mut runs = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let [mark, code, id, nanos] = fields[..] else {
            panic!("bad mark {line:?}");
        };
        let at: u128 = nanos.parse().unwrap();
        match mark {
            "start" => {
                let earlier = started.insert(id.to_string(), (code.to_string(), at));
                assert!(earlier.is_none(), "job {id} started twice");
            }
            _ => {
                let (code, start) = started.remove(id).expect("an end after its start");
                runs.push(Run {
                    code,
                    start,
                    end: at,
                });
            }
        }
    }
    runs
}

/// The most runs whose code is in `codes` that were between their marks at one instant.
fn most_at_once(runs: &[Run], codes: &[&str]) -> usize {
    let mut events: Vec<(u128, i32)> = runs
        .iter()
        .filter(|run| codes.contains(&run.code.as_str()))
        .flat_map(|run| [(run.start, 1), (run.end, -1)])
        .collect();
    // At a tie, the end first: touching runs do not overlap.
    events.sort();
    let (mut now, mut most) = (0, 0);
    for (_, change) in events {
        now += change;
        most = most.max(now);
    }
    most as usize
}

/// Pushes the jobs in order, starts `workers` consumers, and waits until `total` ran.
fn run_fleet(scratch: &Scratch, jobs: &[(&str, usize)], workers: usize) -> Vec<Run> {
    block_on(async {
        let store = scratch.store().await;
        for (code, count) in jobs {
            for _ in 0..*count {
                store.push(&new_job("ui_job", code, "{}")).await.unwrap();
            }
        }
    });
    let total: usize = jobs.iter().map(|(_, count)| count).sum();
    let mut children: Vec<_> = (0..workers)
        .map(|n| scratch.spawn_consumer(&format!("w{n}"), &[]))
        .collect();
    wait_until(Duration::from_secs(90), "every job to run", || {
        runs(scratch).len() == total && queues_drained(scratch)
    });
    for child in &mut children {
        send_signal(child, nix::sys::signal::Signal::SIGTERM);
        assert_eq!(wait_exit(child, Duration::from_secs(20)), 0);
    }
    runs(scratch)
}

/// The issue's test: 4 workers, 20 jobs of a code capped at 1 pushed before 20 others. The
/// capped ones never overlap, and the others, though younger, are not held up behind them:
/// all of them end before the capped ones are half done (three workers take them while the
/// fourth runs the capped ones one by one).
fn four_workers_never_run_more_than_a_codes_cap_and_others_pass(backend: Backend) {
    let scratch = Scratch::new(backend);
    let command = marking_command(&scratch, "0.3");
    scratch.write_config(&format!(
        "[jobs.capped]\nmax_running = 1\n{command}\n[jobs.other]\n{command}\n"
    ));
    let runs = run_fleet(&scratch, &[("capped", 20), ("other", 20)], 4);
    assert_eq!(most_at_once(&runs, &["capped"]), 1, "a cap of 1");
    assert!(
        most_at_once(&runs, &["other"]) >= 2,
        "the others ran side by side"
    );
    let capped = |run: &&Run| run.code == "capped";
    let capped_start = runs.iter().filter(capped).map(|r| r.start).min().unwrap();
    let capped_end = runs.iter().filter(capped).map(|r| r.end).max().unwrap();
    let others_end = runs
        .iter()
        .filter(|run| run.code == "other")
        .map(|r| r.end)
        .max()
        .unwrap();
    let half_way = capped_start + (capped_end - capped_start) / 2;
    assert!(
        others_end < half_way,
        "the others ended {:.2} s after the first capped job started, the capped ones took \
         {:.2} s",
        (others_end - capped_start) as f64 / 1e9,
        (capped_end - capped_start) as f64 / 1e9
    );
}

/// `[groups.erp] max_running = 2` shared by two codes: never more than 2 of them at once
/// whichever the mix, and the group's room is used.
fn a_group_cap_spans_its_codes(backend: Backend) {
    let scratch = Scratch::new(backend);
    let command = marking_command(&scratch, "0.2");
    scratch.write_config(&format!(
        "[groups.erp]\nmax_running = 2\n\
         [jobs.erp_products]\nconcurrency_group = \"erp\"\n{command}\n\
         [jobs.erp_prices]\nconcurrency_group = \"erp\"\n{command}\n"
    ));
    let runs = run_fleet(&scratch, &[("erp_products", 6), ("erp_prices", 6)], 4);
    assert_eq!(runs.len(), 12);
    assert_eq!(most_at_once(&runs, &["erp_products", "erp_prices"]), 2);
    let caps = &scratch.status_json()["caps"];
    assert_eq!(
        caps,
        &serde_json::json!([{"key": "group:erp", "codes": ["erp_prices", "erp_products"],
                             "max_running": 2, "running": 0}])
    );
}

/// Caps come from the workers' configuration: raising `max_running` and reloading lets a
/// waiting capped job start without a restart. Meanwhile `metrics` shows the cap full.
fn a_reload_applies_a_new_cap_at_once(backend: Backend) {
    let scratch = Scratch::new(backend);
    let command = marking_command(&scratch, "5");
    let config = |limit: u32| format!("[jobs.capped]\nmax_running = {limit}\n{command}\n");
    scratch.write_config(&config(1));
    let ids = [
        scratch.push("ui_job", "capped"),
        scratch.push("ui_job", "capped"),
    ];
    let statuses = || ids.map(|id| scratch.show(id)["status"].as_str().unwrap().to_string());
    let mut workers: Vec<_> = (0..2)
        .map(|n| scratch.spawn_consumer(&format!("w{n}"), &[]))
        .collect();
    // Either may start first: a claim in flight for one lets the other worker's claim take
    // the next (`SKIP LOCKED`), and the cap then holds the older one back.
    wait_until(Duration::from_secs(10), "a job to start", || {
        statuses().contains(&"running".to_string())
    });
    std::thread::sleep(Duration::from_millis(700));
    let mut seen = statuses();
    seen.sort();
    assert_eq!(seen, ["running", "waiting"], "capped at 1");
    let metrics = scratch.ok(&["metrics"]);
    crate::metrics::check_with_promtool(&metrics);
    let cap =
        |name: &str| crate::metrics::value(&metrics, &format!("{name}{{cap=\"code:capped\"}}"));
    assert_eq!(
        (cap("pjq_cap_running_jobs"), cap("pjq_cap_max_running_jobs")),
        (1.0, 1.0)
    );
    scratch.write_config(&config(2));
    for worker in &workers {
        send_signal(worker, nix::sys::signal::Signal::SIGHUP);
    }
    wait_until(Duration::from_secs(2), "both jobs to run at once", || {
        statuses() == ["running", "running"]
    });
    for worker in &mut workers {
        send_signal(worker, nix::sys::signal::Signal::SIGTERM);
        assert_eq!(wait_exit(worker, Duration::from_secs(20)), 0);
    }
}

//! Recurring jobs: `[schedule.NAME]`, queued once a slot across every worker on every host.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;

use crate::shared_backend_tests;
use crate::support::*;

shared_backend_tests!(a_per_minute_schedule_queues_each_slot_once_across_hosts);

/// The slots queued so far (seconds since the epoch) with their jobs, and how many
/// scheduled jobs exist at all.
fn slots(scratch: &Scratch) -> (Vec<(i64, i64)>, i64) {
    block_on(async {
        use sqlx::Row;
        let mut conn = connect_any(&scratch.url).await.unwrap();
        let rows = sqlx::query(
            "SELECT slot_at, job_id FROM pjq_schedule_slots WHERE name = 'tick' ORDER BY slot_at",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let slots = rows
            .iter()
            .map(|row| (row.get::<i64, _>(0) / 1_000_000, row.get::<i64, _>(1)))
            .collect();
        let jobs: i64 = sqlx::query("SELECT COUNT(*) FROM pjq_jobs WHERE code = 'tick'")
            .fetch_one(&mut conn)
            .await
            .unwrap()
            .get(0);
        (slots, jobs)
    })
}

fn now_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Sleeps until `seconds` past the start of the minute after `minute` (a multiple of 60).
fn sleep_until(at: i64) {
    let wait = at - now_seconds();
    if wait > 0 {
        std::thread::sleep(Duration::from_secs(wait as u64));
    }
}

/// Two hosts run a per-minute schedule. The minute they start in was missed (nobody ran at
/// its boundary): it is queued once at start-up, the minutes before it never (no burst).
/// Then every minute boundary is queued exactly once, also across a `kill -9` of one
/// worker just after a boundary and its restart.
fn a_per_minute_schedule_queues_each_slot_once_across_hosts(backend: Backend) {
    let scratch = Scratch::new(backend);
    scratch.write_config(
        "heartbeat_interval = \"500ms\"\nrescue_after = \"3s\"\n\
         [schedule.tick]\ncron = \"* * * * *\"\nqueue = \"ui_job\"\ncode = \"tick\"",
    );
    scratch.ok(&["migrate"]);
    // Not in the last seconds of a minute: the start-up slot must be the current one.
    if now_seconds() % 60 > 50 {
        sleep_until(now_seconds() / 60 * 60 + 61);
    }
    let first = now_seconds() / 60 * 60;
    let mut a = scratch.spawn_consumer("a", &["--host-id", "host-a"]);
    let mut b = scratch.spawn_consumer("b", &["--host-id", "host-b"]);
    wait_until(
        Duration::from_secs(10),
        "the missed slot queued at start",
        || !slots(&scratch).0.is_empty(),
    );
    let (queued, _) = slots(&scratch);
    assert_eq!(queued.iter().map(|s| s.0).collect::<Vec<_>>(), [first]);

    // Just after the next boundary (while both may be queueing it), one host dies; its
    // replacement starts.
    sleep_until(first + 62);
    send_signal(&a, Signal::SIGKILL);
    a.wait().unwrap();
    let mut a2 = scratch.spawn_consumer("a2", &["--host-id", "host-a"]);
    sleep_until(first + 3 * 60 + 5);
    let (queued, jobs) = slots(&scratch);
    let expected: Vec<i64> = (0..4).map(|n| first + n * 60).collect();
    assert_eq!(
        queued.iter().map(|s| s.0).collect::<Vec<_>>(),
        expected,
        "each slot once, none missed"
    );
    assert_eq!(jobs, 4, "one job a slot");
    let status = scratch.ok(&["status"]);
    assert!(status.contains("tick"), "{status}");
    let metrics = scratch.ok(&["metrics"]);
    let last = format!(
        "pjq_schedule_last_slot_timestamp_seconds{{schedule=\"tick\"}} {}",
        first + 180
    );
    assert!(metrics.contains(&last), "{metrics}");
    for worker in [&mut b, &mut a2] {
        send_signal(worker, Signal::SIGTERM);
        assert_eq!(wait_exit(worker, Duration::from_secs(10)), 0);
    }
}

#[test]
fn a_bad_cron_expression_is_exit_78_naming_the_schedule_and_field() {
    let scratch = Scratch::new(Backend::Sqlite);
    scratch.write_config(
        "[schedule.nightly]\ncron = \"0 25 * * *\"\nqueue = \"ui_job\"\ncode = \"export\"",
    );
    let output = scratch.run(&["status"]);
    assert_eq!(exit_code(&output), 78);
    assert!(
        stderr(&output).contains(
            "`schedule.nightly.cron` = \"0 25 * * *\": hour field: 25 is out of range 0-23"
        ),
        "{}",
        stderr(&output)
    );
    scratch.write_config(
        "[schedule.nightly]\ncron = \"@daily\"\nqueue = \"ui_job\"\ncode = \"export\"\ntimezone = \"Mars/Olympus\"",
    );
    let output = scratch.run(&["status"]);
    assert_eq!(exit_code(&output), 78);
    assert!(
        stderr(&output).contains("`schedule.nightly.timezone`"),
        "{}",
        stderr(&output)
    );
}

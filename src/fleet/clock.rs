//! Clocks: the database's clock watched against this host's monotonic one, so a step of it
//! (an NTP correction, a resumed VM, `date -s`; on SQLite, this host's clock) never makes
//! live workers look lost; and wall-clock times for messages.

use std::time::{Duration, Instant, SystemTime};

use crate::store::{Timestamp, saturating_micros};

/// How far the database's clock and the monotonic clock may drift apart between two
/// readings without it being a step: NTP slews by at most 0.5 ms a second.
const CLOCK_TOLERANCE: Duration = Duration::from_millis(250);

/// The database's clock as seen against this host's monotonic clock.
#[derive(Debug, Default)]
pub(super) struct ClockWatch {
    last: Option<ClockReading>,
    /// No rescue before this: the clock stepped forward.
    frozen_until: Option<Instant>,
}

/// One reading of the database's clock, and when (monotonic) it was asked and answered.
#[derive(Debug, Clone, Copy)]
pub(super) struct ClockReading {
    pub(super) sent: Instant,
    pub(super) received: Instant,
    pub(super) database: Timestamp,
}

impl ClockWatch {
    /// Takes a reading; returns the step in microseconds (positive: forward) when the
    /// database's clock moved unlike the monotonic one by more than the two round trips and
    /// [`CLOCK_TOLERANCE`] allow. A forward step freezes rescue for `rescue_after`.
    pub(super) fn record(&mut self, reading: ClockReading, rescue_after: Duration) -> Option<i64> {
        let previous = self.last.replace(reading)?;
        let moved = reading.database.0 - previous.database.0;
        let shortest = saturating_micros(reading.sent.saturating_duration_since(previous.received));
        let longest = saturating_micros(reading.received.duration_since(previous.sent));
        let tolerance = saturating_micros(CLOCK_TOLERANCE);
        if (shortest - tolerance..=longest + tolerance).contains(&moved) {
            return None;
        }
        let step = moved - (shortest + longest) / 2;
        if step > 0 {
            self.frozen_until = Some(reading.received + rescue_after);
        }
        Some(step)
    }

    pub(super) fn allows_rescue(&self, now: Instant) -> bool {
        self.frozen_until.is_none_or(|until| now >= until)
    }
}

pub(super) fn format_micros(step: i64) -> humantime::FormattedDuration {
    // Whole milliseconds: the round trips make anything finer noise.
    humantime::format_duration(Duration::from_millis(step.unsigned_abs() / 1000))
}

/// A wall-clock time as `HH:MM:SS` UTC, for "unavailable since" messages.
pub fn clock(time: SystemTime) -> String {
    let text = humantime::format_rfc3339_seconds(time).to_string();
    text.get(11..19).unwrap_or(&text).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(at: Instant, database_secs: f64) -> ClockReading {
        ClockReading {
            sent: at,
            received: at + Duration::from_millis(2),
            database: Timestamp((database_secs * 1e6) as i64),
        }
    }

    #[test]
    fn a_clock_that_runs_with_the_monotonic_one_is_steady() {
        let start = Instant::now();
        let rescue_after = Duration::from_secs(30);
        let mut watch = ClockWatch::default();
        for n in 0..10 {
            let at = start + Duration::from_secs(5 * n);
            // A little drift and jitter, as NTP slewing and scheduling give.
            let database = 1_000.0 + 5.0 * n as f64 * 1.0005 + 0.01 * (n % 3) as f64;
            assert_eq!(watch.record(reading(at, database), rescue_after), None);
        }
        assert!(watch.allows_rescue(start + Duration::from_secs(50)));
    }

    #[test]
    fn a_forward_step_freezes_rescue_for_rescue_after() {
        let start = Instant::now();
        let rescue_after = Duration::from_secs(30);
        let mut watch = ClockWatch::default();
        assert_eq!(watch.record(reading(start, 1_000.0), rescue_after), None);
        let after_step = start + Duration::from_secs(5);
        let step = watch
            .record(reading(after_step, 1_030.0), rescue_after)
            .unwrap();
        assert!((24_990_000..=25_010_000).contains(&step), "{step}");
        assert!(!watch.allows_rescue(after_step));
        assert!(!watch.allows_rescue(after_step + Duration::from_secs(29)));
        assert!(watch.allows_rescue(after_step + Duration::from_secs(31)));
        let later = after_step + Duration::from_secs(5);
        assert_eq!(watch.record(reading(later, 1_035.0), rescue_after), None);
    }

    #[test]
    fn a_backward_step_is_seen_but_does_not_freeze() {
        let start = Instant::now();
        let rescue_after = Duration::from_secs(30);
        let mut watch = ClockWatch::default();
        watch.record(reading(start, 1_000.0), rescue_after);
        let at = start + Duration::from_secs(5);
        let step = watch.record(reading(at, 995.0), rescue_after).unwrap();
        assert!(step < -9_000_000, "{step}");
        assert!(watch.allows_rescue(at));
    }

    #[test]
    fn a_slow_answer_is_not_a_step() {
        let start = Instant::now();
        let mut watch = ClockWatch::default();
        watch.record(reading(start, 1_000.0), Duration::from_secs(30));
        // The query took 3 s to answer (a lock wait): the database read its clock somewhere
        // in that window.
        let slow = ClockReading {
            sent: start + Duration::from_secs(5),
            received: start + Duration::from_secs(8),
            database: Timestamp(1_007_500_000),
        };
        assert_eq!(watch.record(slow, Duration::from_secs(30)), None);
    }

    #[test]
    fn clock_shows_hours_minutes_seconds() {
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(3600 + 62);
        assert_eq!(clock(time), "01:01:02");
    }
}

//! Recurring jobs: `[schedule.NAME]` in `worker.toml`, a 5-field cron expression and the
//! job it queues at each of its slots.
//!
//! Every worker looks for the schedule's latest slot and tries to queue it; the store's
//! slot table (one row per schedule and slot, a primary key) lets exactly one of them do
//! it. Only the latest slot is ever considered, and only while it is younger than
//! `catch_up`: a fleet that was down queues the slot it missed last, once, never a burst.

use std::time::Duration;

use jiff::civil::{Date, DateTime, Time};
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};

/// A parsed 5-field cron expression: minute, hour, day of month, month, day of week.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    /// Whether the day-of-month and day-of-week fields were restricted (not `*`): when both
    /// are, a day matching either runs, as in Vixie cron.
    days_restricted: bool,
    weekdays_restricted: bool,
}

/// What is wrong with a cron expression, and in which field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronError {
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for CronError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} field: {}", self.field, self.message)
    }
}

struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const FIELDS: [Field; 5] = [
    Field {
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
    },
    Field {
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
    },
    Field {
        name: "day-of-month",
        min: 1,
        max: 31,
        names: &[],
    },
    Field {
        name: "month",
        min: 1,
        max: 12,
        names: &[
            "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
        ],
    },
    Field {
        name: "day-of-week",
        min: 0,
        max: 7,
        names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
    },
];

impl Cron {
    /// Parses `minute hour day-of-month month day-of-week` (each `*`, `N`, `A-B`, lists and
    /// `/STEP`; month and weekday names; 0 and 7 are Sunday) or a macro: `@yearly`
    /// (`@annually`), `@monthly`, `@weekly`, `@daily` (`@midnight`), `@hourly`.
    pub fn parse(text: &str) -> Result<Cron, CronError> {
        let expanded = match text.trim().to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *".to_string(),
            "@monthly" => "0 0 1 * *".to_string(),
            "@weekly" => "0 0 * * 0".to_string(),
            "@daily" | "@midnight" => "0 0 * * *".to_string(),
            "@hourly" => "0 * * * *".to_string(),
            other if other.starts_with('@') => {
                return Err(CronError {
                    field: "expression",
                    message: format!("unknown macro {other:?}"),
                });
            }
            other => other.to_string(),
        };
        let parts: Vec<&str> = expanded.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(CronError {
                field: "expression",
                message: format!(
                    "expected 5 fields (minute hour day-of-month month day-of-week), found {}",
                    parts.len()
                ),
            });
        }
        let mut sets = [0_u64; 5];
        for (index, (part, field)) in parts.iter().zip(&FIELDS).enumerate() {
            sets[index] = parse_field(part, field).map_err(|message| CronError {
                field: field.name,
                message,
            })?;
        }
        // Sunday is 0 and 7.
        let weekdays = (sets[4] | (sets[4] >> 7)) & 0x7f;
        Ok(Cron {
            minutes: sets[0],
            hours: sets[1] as u32,
            days: sets[2] as u32,
            months: sets[3] as u16,
            weekdays: weekdays as u8,
            days_restricted: parts[2] != "*",
            weekdays_restricted: parts[4] != "*",
        })
    }

    fn runs_on(&self, date: Date) -> bool {
        if self.months & (1 << date.month()) == 0 {
            return false;
        }
        let by_day = self.days & (1 << date.day()) != 0;
        let by_weekday = self.weekdays & (1 << date.weekday().to_sunday_zero_offset()) != 0;
        match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => by_day || by_weekday,
            _ => by_day && by_weekday,
        }
    }

    fn runs_at(&self, hour: i8, minute: i8) -> bool {
        self.hours & (1 << hour) != 0 && self.minutes & (1 << minute) != 0
    }

    /// The latest slot at or before `at`, in `zone`: `None` when there is none within five
    /// years (`0 0 30 2 *` never runs).
    pub fn latest_at_or_before(&self, at: Timestamp, zone: &TimeZone) -> Option<Timestamp> {
        let local = at.to_zoned(zone.clone()).datetime();
        let mut date = local.date();
        for day in 0..5 * 366 {
            if self.runs_on(date) {
                let last = if day == 0 { local.time() } else { Time::MAX };
                for hour in (0..=last.hour()).rev() {
                    let top = if hour == last.hour() {
                        last.minute()
                    } else {
                        59
                    };
                    for minute in (0..=top).rev() {
                        if let Some(slot) = self.slot(date, hour, minute, zone)
                            && slot <= at
                        {
                            return Some(slot);
                        }
                    }
                }
            }
            date = date.yesterday().ok()?;
        }
        None
    }

    /// The first slot after `at`, in `zone`.
    pub fn next_after(&self, at: Timestamp, zone: &TimeZone) -> Option<Timestamp> {
        let local = at.to_zoned(zone.clone()).datetime();
        let mut date = local.date();
        for day in 0..5 * 366 {
            if self.runs_on(date) {
                let first = if day == 0 { local.time() } else { Time::MIN };
                for hour in first.hour()..24 {
                    let bottom = if hour == first.hour() {
                        first.minute()
                    } else {
                        0
                    };
                    for minute in bottom..60 {
                        if let Some(slot) = self.slot(date, hour, minute, zone)
                            && slot > at
                        {
                            return Some(slot);
                        }
                    }
                }
            }
            date = date.tomorrow().ok()?;
        }
        None
    }

    /// The instant of a matching local minute; a minute a DST change skips runs as late as
    /// the gap is long (02:30 becomes 03:30), one it repeats runs once, at its first
    /// occurrence.
    fn slot(&self, date: Date, hour: i8, minute: i8, zone: &TimeZone) -> Option<Timestamp> {
        if !self.runs_at(hour, minute) {
            return None;
        }
        let local = DateTime::from_parts(date, Time::new(hour, minute, 0, 0).ok()?);
        zone.to_ambiguous_zoned(local)
            .compatible()
            .ok()
            .map(|zoned: Zoned| zoned.timestamp())
    }

    /// The gap between the slot at or before `at` and the next: the schedule's period there
    /// (a day for `@daily`), the default `catch_up`.
    pub fn period_around(&self, at: Timestamp, zone: &TimeZone) -> Option<Duration> {
        self.period_from(self.latest_at_or_before(at, zone)?, zone)
    }

    /// The gap between `slot` (one of this schedule's) and the next.
    pub fn period_from(&self, slot: Timestamp, zone: &TimeZone) -> Option<Duration> {
        let next = self.next_after(slot, zone)?;
        Duration::try_from(next.duration_since(slot)).ok()
    }
}

/// One field: a comma-separated list of `*`, `N`, `A-B`, each with an optional `/STEP`.
fn parse_field(text: &str, field: &Field) -> Result<u64, String> {
    let mut set = 0_u64;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step
                    .parse()
                    .map_err(|_| format!("step {step:?} is not a number"))?;
                if step == 0 {
                    return Err("a step of 0".to_string());
                }
                (range, step)
            }
            None => (item, 1),
        };
        let (low, high) = if range == "*" {
            (field.min, field.max)
        } else if let Some((low, high)) = range.split_once('-') {
            (value(low, field)?, value(high, field)?)
        } else {
            let single = value(range, field)?;
            // `N/STEP` runs from N to the end, as in Vixie cron.
            (
                single,
                if item.contains('/') {
                    field.max
                } else {
                    single
                },
            )
        };
        if low > high {
            return Err(format!("range {range:?} runs backwards"));
        }
        for n in (low..=high).step_by(step as usize) {
            set |= 1 << n;
        }
    }
    Ok(set)
}

fn value(text: &str, field: &Field) -> Result<u32, String> {
    let lower = text.to_ascii_lowercase();
    if let Some(index) = field.names.iter().position(|name| *name == lower) {
        return Ok(index as u32 + if field.min == 1 { 1 } else { 0 });
    }
    let n: u32 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number or a name"))?;
    if n < field.min || n > field.max {
        return Err(format!("{n} is out of range {}-{}", field.min, field.max));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn utc() -> TimeZone {
        TimeZone::UTC
    }

    #[test]
    fn fields_ranges_steps_lists_and_names() {
        let cron = Cron::parse("*/15 2-4,22 * jan-mar mon-fri").unwrap();
        assert_eq!(cron.minutes, 1 | 1 << 15 | 1 << 30 | 1 << 45);
        assert_eq!(cron.hours, 1 << 2 | 1 << 3 | 1 << 4 | 1 << 22);
        assert_eq!(cron.months, 1 << 1 | 1 << 2 | 1 << 3);
        assert_eq!(cron.weekdays, 0b0111110);
        assert_eq!(Cron::parse("0 0 * * 7").unwrap().weekdays, 1, "7 is Sunday");
        assert_eq!(
            Cron::parse("5/20 * * * *").unwrap().minutes,
            1 << 5 | 1 << 25 | 1 << 45
        );
        assert_eq!(
            Cron::parse("@daily").unwrap(),
            Cron::parse("0 0 * * *").unwrap()
        );
    }

    #[test]
    fn errors_name_the_field() {
        for (text, field) in [
            ("61 * * * *", "minute"),
            ("* 24 * * *", "hour"),
            ("* * 0 * *", "day-of-month"),
            ("* * * foo *", "month"),
            ("* * * * 8", "day-of-week"),
            ("*/0 * * * *", "minute"),
            ("5-1 * * * *", "minute"),
            ("* * * *", "expression"),
            ("@fortnightly", "expression"),
        ] {
            assert_eq!(Cron::parse(text).unwrap_err().field, field, "{text}");
        }
    }

    #[test]
    fn latest_and_next_slots() {
        let cron = Cron::parse("30 2 * * *").unwrap();
        let now = at("2026-12-06T10:00:00Z");
        assert_eq!(
            cron.latest_at_or_before(now, &utc()),
            Some(at("2026-12-06T02:30:00Z"))
        );
        assert_eq!(
            cron.next_after(now, &utc()),
            Some(at("2026-12-07T02:30:00Z"))
        );
        assert_eq!(
            cron.latest_at_or_before(at("2026-12-06T02:30:00Z"), &utc()),
            Some(at("2026-12-06T02:30:00Z")),
            "a slot is at or before itself"
        );
        assert_eq!(
            cron.period_around(now, &utc()),
            Some(Duration::from_secs(86_400))
        );
        let minutely = Cron::parse("* * * * *").unwrap();
        assert_eq!(
            minutely.latest_at_or_before(at("2026-12-06T10:00:59.9Z"), &utc()),
            Some(at("2026-12-06T10:00:00Z"))
        );
        assert_eq!(
            Cron::parse("0 0 30 2 *").unwrap().next_after(now, &utc()),
            None
        );
    }

    /// Day of month and day of week both restricted: either one (Vixie cron).
    #[test]
    fn both_day_fields_mean_either() {
        let cron = Cron::parse("0 0 1 * mon").unwrap();
        // 2026-12-07 is a Monday, 2027-01-01 a Friday.
        let after = at("2026-12-06T12:00:00Z");
        assert_eq!(
            cron.next_after(after, &utc()),
            Some(at("2026-12-07T00:00:00Z"))
        );
        let after = at("2026-12-28T12:00:00Z");
        assert_eq!(
            cron.next_after(after, &utc()),
            Some(at("2027-01-01T00:00:00Z"))
        );
    }

    /// In a zone, slots follow its wall clock: a daily 02:30 in Paris is 01:30 UTC in
    /// winter and 00:30 UTC in summer; on the night clocks jump over 02:30, it runs at
    /// 03:30 local.
    #[test]
    fn a_zone_follows_its_wall_clock() {
        let paris = TimeZone::get("Europe/Paris").unwrap();
        let cron = Cron::parse("30 2 * * *").unwrap();
        assert_eq!(
            cron.next_after(at("2026-12-06T12:00:00Z"), &paris),
            Some(at("2026-12-07T01:30:00Z"))
        );
        assert_eq!(
            cron.next_after(at("2026-07-01T12:00:00Z"), &paris),
            Some(at("2026-07-02T00:30:00Z"))
        );
        assert_eq!(
            cron.next_after(at("2026-03-28T12:00:00Z"), &paris),
            Some(at("2026-03-29T01:30:00Z"))
        );
    }
}

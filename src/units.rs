//! Parsing of the human-written quantities in the config and on the command line.

use std::time::Duration;

/// The longest duration anything takes: ten years. Longer ones are typing errors, and would
/// overflow the clocks they are added to (a `--delay` that wraps around runs the job at once).
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);

/// Parses a duration: a bare number is seconds (as Symfony Messenger's `--sleep` and
/// `--time-limit` take it), anything else is humantime syntax such as `200ms`, `2h` or `1h 30m`.
/// At most [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return seconds_to_duration(seconds);
    }
    let duration = humantime::parse_duration(text).map_err(|error| {
        format!("`{text}` is not a duration ({error}); write e.g. 30, 200ms, 5s, 2h or 7d")
    })?;
    within_bounds(duration, text)
}

/// Parses a pause between polls: a duration, but not zero (polling without a pause would
/// spin on the database).
pub fn parse_poll_interval(text: &str) -> Result<Duration, String> {
    check_poll_interval(parse_duration(text)?)
}

/// Refuses a pause between polls shorter than [`MIN_POLL_INTERVAL`], wherever it is written.
pub fn check_poll_interval(interval: Duration) -> Result<Duration, String> {
    if interval < MIN_POLL_INTERVAL {
        return Err(format!(
            "{} is too short a pause between polls (at least {}): polling without a pause \
             would spin on the database",
            format_duration(interval),
            format_duration(MIN_POLL_INTERVAL)
        ));
    }
    Ok(interval)
}

/// The shortest pause between polls.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Converts a number of seconds, refusing negative, non-finite and too long values.
pub fn seconds_to_duration(seconds: f64) -> Result<Duration, String> {
    if !(seconds.is_finite() && seconds >= 0.0) {
        return Err(format!(
            "`{seconds}` is not a duration: it must be zero or more seconds"
        ));
    }
    if seconds > MAX_DURATION.as_secs_f64() {
        return Err(too_long(&seconds.to_string()));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn within_bounds(duration: Duration, text: &str) -> Result<Duration, String> {
    if duration > MAX_DURATION {
        Err(too_long(text))
    } else {
        Ok(duration)
    }
}

fn too_long(text: &str) -> String {
    format!("`{text}` is too long: durations are at most 10 years (3650d)")
}

/// Parses a byte size: a bare number is bytes; `K`, `M`, `G` (optionally followed by `B` or
/// `iB`) multiply by 1024 as PHP's `memory_limit` and Symfony's `--memory-limit` do.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(digits_end);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a byte size; write e.g. 134217728, 128M or 1G"))?;
    let multiplier: u64 = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("`{text}` has an unknown unit; use K, M or G")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// Formats a duration for people: whole milliseconds below a minute, whole seconds above.
pub fn format_duration(duration: Duration) -> String {
    let rounded = if duration < Duration::from_secs(60) {
        Duration::from_millis(duration.as_millis() as u64)
    } else {
        Duration::from_secs(duration.as_secs())
    };
    humantime::format_duration(rounded).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_numbers_are_seconds() {
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("0.25").unwrap(), Duration::from_millis(250));
    }

    #[test]
    fn suffixed_durations_parse() {
        assert_eq!(parse_duration("200ms").unwrap(), Duration::from_millis(200));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
    }

    #[test]
    fn bad_durations_are_refused() {
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn durations_are_bounded() {
        for text in [
            "1e20",
            "300000y",
            "10000y",
            "3651d",
            "1e308",
            "18446744073709551616",
        ] {
            let error = parse_duration(text).unwrap_err();
            assert!(error.contains("too long"), "{text}: {error}");
        }
        assert_eq!(parse_duration("3650d").unwrap(), MAX_DURATION);
        assert!(parse_poll_interval("0").is_err());
        assert!(parse_poll_interval("1ms").is_err());
        assert_eq!(
            parse_poll_interval("0.1").unwrap(),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn byte_sizes_use_binary_multipliers() {
        assert_eq!(parse_byte_size("1024").unwrap(), 1024);
        assert_eq!(parse_byte_size("128M").unwrap(), 128 << 20);
        assert_eq!(parse_byte_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_byte_size("512KiB").unwrap(), 512 << 10);
        assert!(parse_byte_size("12X").is_err());
        assert!(parse_byte_size("M").is_err());
    }
}

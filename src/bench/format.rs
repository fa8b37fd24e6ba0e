//! Small text helpers that the table ([`super::report`]) and the picture ([`super::svg`])
//! share: short latencies and capacities, padding by characters, wrapping, and the UTC time a
//! run's folder is named after. Pure functions, run in the bench process.

use std::time::{SystemTime, UNIX_EPOCH};

/// A latency in µs, short: `870µs`, `2.4ms`, `1.20s`.
pub fn latency(us: u64) -> String {
    match us {
        0 => "-".to_owned(),
        1..=999 => format!("{us}µs"),
        1_000..=99_999 => format!("{:.1}ms", us as f64 / 1e3),
        100_000..=999_999 => format!("{:.0}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

/// Requests per second, short: `870`, `12.1k`, `151k`.
pub fn rate(rps: f64) -> String {
    match rps {
        r if r < 10_000.0 => format!("{r:.0}"),
        r if r < 100_000.0 => format!("{:.1}k", r / 1e3),
        r => format!("{:.0}k", r / 1e3),
    }
}

/// `text` padded with spaces to `width` characters (not bytes: `µ` and `–` are one each).
pub fn pad(text: &str, width: usize, right: bool) -> String {
    let len = text.chars().count();
    let fill = " ".repeat(width.saturating_sub(len));
    if right {
        format!("{fill}{text}")
    } else {
        format!("{text}{fill}")
    }
}

/// `prefix` then the words of `text`, broken at spaces into lines of at most `width`
/// characters (a longer word stands alone); every line after the first starts with `indent`.
pub fn wrap(prefix: &str, text: &str, width: usize, indent: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = prefix.to_owned();
    let mut words = 0;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let len = line.chars().count();
        if words > 0 && len + 1 + word.chars().count() > width {
            lines.push(std::mem::replace(&mut line, indent.to_owned()));
            words = 0;
        }
        if !line.is_empty() && !line.ends_with(' ') {
            line.push(' ');
        }
        line.push_str(word);
        words += 1;
    }
    if !line.trim().is_empty() {
        lines.push(line);
    }
    lines
}

/// A window's length in words: `750 ms`, `3.0 s`.
pub fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.1} s")
    }
}

/// The lowest and highest of `shares` (fractions) in whole percent: `17–33%`, or `25%`
/// when they round alike.
pub fn percent_range(shares: &[f64]) -> String {
    if shares.is_empty() {
        return "-".to_owned();
    }
    let lo = shares.iter().copied().fold(f64::INFINITY, f64::min) * 100.0;
    let hi = shares.iter().copied().fold(f64::NEG_INFINITY, f64::max) * 100.0;
    let (lo, hi) = (format!("{lo:.0}"), format!("{hi:.0}"));
    if lo == hi {
        format!("{lo}%")
    } else {
        format!("{lo}–{hi}%")
    }
}

/// `time` in UTC as `YYYYMMDD-HHMMSSZ`, to name a folder (sorts by time, no colons).
pub fn utc_stamp(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm), proleptic Gregorian.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}Z",
        rest / 3_600,
        rest % 3_600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn latencies_read_short() {
        assert_eq!(latency(0), "-");
        assert_eq!(latency(870), "870µs");
        assert_eq!(latency(2_400), "2.4ms");
        assert_eq!(latency(250_000), "250ms");
        assert_eq!(latency(1_200_000), "1.20s");
    }

    #[test]
    fn rates_read_short() {
        assert_eq!(rate(870.4), "870");
        assert_eq!(rate(12_139.0), "12.1k");
        assert_eq!(rate(151_200.0), "151k");
    }

    #[test]
    fn pads_by_characters() {
        assert_eq!(pad("1µs", 5, true), "  1µs");
        assert_eq!(pad("∞", 3, false), "∞  ");
        assert_eq!(pad("toolong", 3, true), "toolong");
    }

    #[test]
    fn wraps_at_spaces_after_a_verbatim_prefix() {
        assert_eq!(
            wrap("", "one two three four", 9, "  "),
            vec!["one two", "  three", "  four"]
        );
        assert_eq!(
            wrap("  ! ", "x:  long words", 11, "    "),
            vec!["  ! x: long", "    words"]
        );
        assert_eq!(
            wrap("  name    ", "a verylongword", 8, ""),
            vec!["  name    a", "verylongword"]
        );
        assert!(wrap("", "", 10, "").is_empty());
    }

    #[test]
    fn windows_and_share_ranges_read_short() {
        assert_eq!(seconds(0.75), "750 ms");
        assert_eq!(seconds(3.0), "3.0 s");
        assert_eq!(percent_range(&[0.17, 0.33, 0.25]), "17–33%");
        assert_eq!(percent_range(&[0.25, 0.2501]), "25%");
        assert_eq!(percent_range(&[]), "-");
    }

    #[test]
    fn utc_stamps_name_the_calendar_time() {
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101-000000Z");
        // 2026-12-04 06:34:55 UTC
        let t = UNIX_EPOCH + Duration::from_secs(1_796_366_095);
        assert_eq!(utc_stamp(t), "20261204-063455Z");
        // 2024-02-29 23:59:59 UTC, a leap day.
        let leap = UNIX_EPOCH + Duration::from_secs(1_709_251_199);
        assert_eq!(utc_stamp(leap), "20240229-235959Z");
    }
}

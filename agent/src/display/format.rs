//! Human formatting for the status screen: short durations, latencies and
//! counts, and text fitting (truncation with a trailing `~`, word wrap).
//!
//! Everything here is plain string work so it can be unit-tested without
//! drawing anything.

/// The character that marks truncated text.
pub const ELLIPSIS: char = '~';

/// A duration in seconds as the screen shows it: `45s`, `3m`, `2h 5m`,
/// `4d 1h`. Minutes drop their seconds, hours show minutes, days show hours
/// (a zero second part is left out: `2h`, `4d`).
pub fn format_duration(secs: u64) -> String {
    const MIN: u64 = 60;
    const HOUR: u64 = 60 * MIN;
    const DAY: u64 = 24 * HOUR;
    match secs {
        s if s < MIN => format!("{s}s"),
        s if s < HOUR => format!("{}m", s / MIN),
        s if s < DAY => with_part(s / HOUR, 'h', (s % HOUR) / MIN, 'm'),
        s => with_part(s / DAY, 'd', (s % DAY) / HOUR, 'h'),
    }
}

fn with_part(major: u64, major_unit: char, minor: u64, minor_unit: char) -> String {
    if minor == 0 {
        format!("{major}{major_unit}")
    } else {
        format!("{major}{major_unit} {minor}{minor_unit}")
    }
}

/// An inference latency given in microseconds: `850 us`, `4.2 us`,
/// `1.2 ms`, `250 ms`, `1.3 s`. A negative or non-finite value shows as `-`.
pub fn format_latency_us(us: f64) -> String {
    if !us.is_finite() || us < 0.0 {
        return "-".into();
    }
    // Each unit is used while the value rounds to less than 1000 of it, so
    // 999.7 us reads "1.0 ms", not "1000 us".
    let (value, unit) = if us < 999.5 {
        (us, "us")
    } else if us < 999_500.0 {
        (us / 1e3, "ms")
    } else {
        (us / 1e6, "s")
    };
    if value < 99.95 && !(unit == "us" && value >= 9.95) {
        format!("{value:.1} {unit}")
    } else {
        format!("{value:.0} {unit}")
    }
}

/// A count with a metric suffix: `12`, `999`, `1.2k`, `12k`, `3.4M`, `5.0G`.
pub fn format_count(n: u64) -> String {
    if n < 1000 {
        return n.to_string();
    }
    let mut value = n as f64;
    for suffix in ["k", "M", "G", "T", "P", "E"] {
        value /= 1000.0;
        if value < 9.95 {
            return format!("{value:.1}{suffix}");
        }
        if value < 999.5 {
            return format!("{value:.0}{suffix}");
        }
    }
    // u64::MAX is 18.4E, so the loop always returns.
    format!("{value:.0}E")
}

/// `text` made fit for a one-line, ASCII-font display: control characters
/// (a newline in an error message) become spaces and runs of whitespace
/// collapse to one.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `text` cut to at most `max_chars` characters; cut text ends in `~`.
pub fn truncate(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_string();
    }
    if max_chars == 0 {
        return String::new();
    }
    let mut out: String = text.chars().take(max_chars - 1).collect();
    out.push(ELLIPSIS);
    out
}

/// Word-wraps `text` into at most `max_lines` lines of at most `max_chars`
/// characters. Words longer than a line are split; when the text does not
/// fit, the last line ends in `~`.
pub fn wrap(text: &str, max_chars: usize, max_lines: usize) -> Vec<String> {
    if max_chars == 0 || max_lines == 0 {
        return Vec::new();
    }
    let mut lines: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut current_len = 0;
    let mut words = text.split_whitespace().map(str::to_string);
    let mut pending: Option<String> = None;
    while let Some(word) = pending.take().or_else(|| words.next()) {
        let word_len = word.chars().count();
        let needed = if current_len == 0 {
            word_len
        } else {
            current_len + 1 + word_len
        };
        if needed <= max_chars {
            if current_len > 0 {
                current.push(' ');
            }
            current.push_str(&word);
            current_len = needed;
            continue;
        }
        if current_len == 0 {
            // A word longer than a whole line: split it.
            current = word.chars().take(max_chars).collect();
            pending = Some(word.chars().skip(max_chars).collect());
        } else {
            pending = Some(word);
        }
        if lines.len() + 1 == max_lines {
            // No line left for the rest.
            let mut last: String = current.chars().take(max_chars - 1).collect();
            last.push(ELLIPSIS);
            lines.push(last);
            return lines;
        }
        lines.push(std::mem::take(&mut current));
        current_len = 0;
    }
    if current_len > 0 {
        lines.push(current);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(format_duration(0), "0s");
        assert_eq!(format_duration(45), "45s");
        assert_eq!(format_duration(59), "59s");
        assert_eq!(format_duration(60), "1m");
        assert_eq!(format_duration(3 * 60 + 59), "3m");
        assert_eq!(format_duration(3599), "59m");
        assert_eq!(format_duration(3600), "1h");
        assert_eq!(format_duration(2 * 3600 + 5 * 60 + 30), "2h 5m");
        assert_eq!(format_duration(86_399), "23h 59m");
        assert_eq!(format_duration(86_400), "1d");
        assert_eq!(format_duration(4 * 86_400 + 3600 + 59), "4d 1h");
        assert_eq!(format_duration(400 * 86_400), "400d");
        assert_eq!(format_duration(u64::MAX), "213503982334601d 7h");
    }

    #[test]
    fn latencies() {
        assert_eq!(format_latency_us(0.0), "0.0 us");
        assert_eq!(format_latency_us(4.24), "4.2 us");
        assert_eq!(format_latency_us(9.96), "10 us");
        assert_eq!(format_latency_us(850.0), "850 us");
        assert_eq!(format_latency_us(999.4), "999 us");
        assert_eq!(format_latency_us(999.7), "1.0 ms");
        assert_eq!(format_latency_us(1_234.0), "1.2 ms");
        assert_eq!(format_latency_us(99_940.0), "99.9 ms");
        assert_eq!(format_latency_us(99_960.0), "100 ms");
        assert_eq!(format_latency_us(250_000.0), "250 ms");
        assert_eq!(format_latency_us(999_600.0), "1.0 s");
        assert_eq!(format_latency_us(1_300_000.0), "1.3 s");
        assert_eq!(format_latency_us(250e6), "250 s");
        assert_eq!(format_latency_us(-1.0), "-");
        assert_eq!(format_latency_us(f64::NAN), "-");
        assert_eq!(format_latency_us(f64::INFINITY), "-");
    }

    #[test]
    fn counts() {
        assert_eq!(format_count(0), "0");
        assert_eq!(format_count(12), "12");
        assert_eq!(format_count(999), "999");
        assert_eq!(format_count(1000), "1.0k");
        assert_eq!(format_count(1_234), "1.2k");
        assert_eq!(format_count(9_949), "9.9k");
        assert_eq!(format_count(9_950), "10k");
        assert_eq!(format_count(12_345), "12k");
        assert_eq!(format_count(999_499), "999k");
        assert_eq!(format_count(999_500), "1.0M");
        assert_eq!(format_count(3_400_000), "3.4M");
        assert_eq!(format_count(5_000_000_000), "5.0G");
        assert_eq!(format_count(u64::MAX), "18E");
    }

    #[test]
    fn truncation() {
        assert_eq!(truncate("digits", 6), "digits");
        assert_eq!(truncate("digits", 5), "digi~");
        assert_eq!(truncate("digits", 1), "~");
        assert_eq!(truncate("digits", 0), "");
        assert_eq!(truncate("", 0), "");
        assert_eq!(truncate("ünïcödé", 4), "ünï~");
        assert_eq!(
            one_line("update\nrefused:\t bad  sig "),
            "update refused: bad sig"
        );
    }

    #[test]
    fn wrapping() {
        assert_eq!(
            wrap("update refused: bad signature", 40, 2),
            ["update refused: bad signature"]
        );
        assert_eq!(
            wrap("update refused: bad signature", 16, 2),
            ["update refused:", "bad signature"]
        );
        assert_eq!(
            wrap("update refused: bad signature on the manifest", 16, 2),
            ["update refused:", "bad signature o~"]
        );
        assert_eq!(wrap("abcdefghij", 4, 3), ["abcd", "efgh", "ij"]);
        assert_eq!(wrap("abcdefghij", 4, 2), ["abcd", "efg~"]);
        assert_eq!(wrap("a b", 1, 5), ["a", "b"]);
        assert_eq!(wrap("", 10, 2), Vec::<String>::new());
        assert_eq!(wrap("abc", 0, 2), Vec::<String>::new());
        assert_eq!(wrap("abc", 2, 0), Vec::<String>::new());
        assert_eq!(wrap("ab cd", 5, 1), ["ab cd"]);
        assert_eq!(wrap("ab cd ef", 5, 1), ["ab c~"]);
    }
}

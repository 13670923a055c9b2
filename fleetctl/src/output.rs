//! What fleetctl prints: aligned tables and relative times for people,
//! the server's JSON unchanged for `--json`. Rendering is pure (strings
//! in, a string out) so it is tested without a server.

use serde_json::Value;

/// A table: a header line, then one line per row, columns left-aligned
/// two spaces apart, trailing spaces trimmed.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    let mut out = line(&header);
    out.push('\n');
    for row in rows {
        out.push_str(&line(row));
        out.push('\n');
    }
    out
}

/// Prints a table to standard output.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    print!("{}", render_table(headers, rows));
}

/// Prints JSON on one line, as `--json` promises.
pub fn print_json(value: &Value) {
    println!("{value}");
}

/// How long before `now` the unix time `at` was, coarsely: `42s ago`,
/// `5m ago`, `3h ago`, `2d ago` (a time in the future reads `0s ago`).
pub fn ago_at(now: u64, at: u64) -> String {
    let d = now.saturating_sub(at);
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

/// How long ago the unix time `at` was.
pub fn ago(at: u64) -> String {
    ago_at(edgefleet_shared::unix_now(), at)
}

/// `-` for a missing or empty value, which a table cell must not be.
pub fn or_dash(text: impl Into<String>) -> String {
    let text = text.into();
    if text.is_empty() {
        "-".into()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_by_their_widest_cell() {
        let rows = vec![
            vec!["digits".to_string(), "12".to_string(), "onnx".to_string()],
            vec!["kws-large".to_string(), "3".to_string(), String::new()],
        ];
        assert_eq!(
            render_table(&["NAME", "VERSION", "FORMAT"], &rows),
            "NAME       VERSION  FORMAT\n\
             digits     12       onnx\n\
             kws-large  3\n"
        );
    }

    #[test]
    fn tables_count_characters_not_bytes() {
        let rows = vec![vec!["é".to_string(), "x".to_string()]];
        assert_eq!(render_table(&["A", "B"], &rows), "A  B\né  x\n");
    }

    #[test]
    fn an_empty_table_is_its_header() {
        assert_eq!(render_table(&["ID", "NAME"], &[]), "ID  NAME\n");
    }

    #[test]
    fn times_read_in_the_largest_whole_unit() {
        assert_eq!(ago_at(1000, 1000), "0s ago");
        assert_eq!(ago_at(1000, 941), "59s ago");
        assert_eq!(ago_at(1000, 940), "1m ago");
        assert_eq!(ago_at(10_000, 10_000 - 3600), "1h ago");
        assert_eq!(ago_at(200_000, 200_000 - 86_400 * 2), "2d ago");
        assert_eq!(ago_at(5, 10), "0s ago");
    }

    #[test]
    fn blanks_become_dashes() {
        assert_eq!(or_dash(""), "-");
        assert_eq!(or_dash("rpi4"), "rpi4");
    }
}

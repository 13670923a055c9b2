//! Line charts drawn on the server as inline SVG: no charting script to
//! ship or vendor, nothing to load before a page shows its data, and the
//! page stays readable without JavaScript. Each chart names its series and
//! their latest values in text, for screen readers and for the legend.

use maud::{html, Markup};

/// One line: a name and (unix time, value) points, oldest first.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(u64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(u64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
        }
    }
}

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 200.0;
const LEFT: f64 = 52.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 24.0;
/// Points drawn per series at most: more are thinned evenly.
const MAX_POINTS: usize = 320;

/// The smallest "round" number (1, 2 or 5 × 10^k) at or above `x`.
pub fn nice_ceiling(x: f64) -> f64 {
    if !x.is_finite() || x <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|v| *v >= x * 0.999_999)
        .unwrap_or(10.0 * magnitude)
}

/// A number for an axis or legend: few digits, no trailing zeros.
pub fn short_number(x: f64) -> String {
    let a = x.abs();
    if a >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", x / 1e3)
    } else if a >= 100.0 || x == x.trunc() {
        format!("{x:.0}")
    } else if a >= 1.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// "HH:MM" (UTC) of a unix time.
pub fn clock(t: u64) -> String {
    format!("{:02}:{:02}", (t / 3600) % 24, (t / 60) % 60)
}

/// "HH:MM:SS" (UTC), for spans of minutes.
pub fn clock_seconds(t: u64) -> String {
    format!("{}:{:02}", clock(t), t % 60)
}

fn thin(points: &[(u64, f64)]) -> Vec<(u64, f64)> {
    if points.len() <= MAX_POINTS {
        return points.to_vec();
    }
    let step = points.len() as f64 / MAX_POINTS as f64;
    let mut out: Vec<(u64, f64)> = (0..MAX_POINTS)
        .map(|i| points[(i as f64 * step) as usize])
        .collect();
    out.push(
        *points
            .last()
            .expect("past the early return there are more than MAX_POINTS points"),
    );
    out
}

/// A chart of `series` over `[from, to]` (unix seconds). `id` names the
/// element (the live refresh swaps it by id).
pub fn line_chart(
    id: &str,
    title: &str,
    unit: &str,
    from: u64,
    to: u64,
    series: &[Series],
) -> Markup {
    // Data that covers only part of the window (a device that just came
    // up) fills the chart rather than hugging its right edge.
    let first = series
        .iter()
        .filter_map(|s| s.points.first().map(|p| p.0))
        .min();
    let from = first.map_or(from, |f| from.max(f.min(to.saturating_sub(60))));
    let to = to.max(from + 1);
    let label = if to - from < 600 {
        clock_seconds
    } else {
        clock
    };
    let max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let top = nice_ceiling(max);
    let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let x = |t: u64| LEFT + (t.clamp(from, to) - from) as f64 / (to - from) as f64 * plot_w;
    let y = |v: f64| TOP + plot_h - (v.max(0.0) / top).min(1.0) * plot_h;
    let total_points: usize = series.iter().map(|s| s.points.len()).sum();
    let title_id = format!("{id}-title");
    let summary: Vec<String> = series
        .iter()
        .map(|s| match s.points.last() {
            Some((_, v)) => format!("{}: {} {unit}", s.name, short_number(*v)),
            None => format!("{}: no data", s.name),
        })
        .collect();
    html! {
        figure.chart id=(id) data-live data-points=(total_points) {
            figcaption id=(title_id) {
                (title) span.unit { " (" (unit) ")" }
            }
            svg viewBox={"0 0 " (WIDTH) " " (HEIGHT)} role="img" aria-labelledby=(title_id) aria-describedby={(id) "-summary"} preserveAspectRatio="none" {
                @for i in 0..=2 {
                    @let v = top * f64::from(i) / 2.0;
                    line.grid x1=(LEFT) x2=(WIDTH - RIGHT) y1=(y(v)) y2=(y(v)) {}
                    text.axis x=(LEFT - 6.0) y=(y(v) + 4.0) text-anchor="end" { (short_number(v)) }
                }
                text.axis x=(LEFT) y=(HEIGHT - 6.0) { (label(from)) }
                text.axis x=(WIDTH - RIGHT) y=(HEIGHT - 6.0) text-anchor="end" { (label(to)) " UTC" }
                @for (i, s) in series.iter().enumerate() {
                    @let pts = thin(&s.points);
                    @if pts.len() == 1 {
                        circle class={"line s" (i % 6)} cx=(x(pts[0].0)) cy=(y(pts[0].1)) r="3" {}
                    } @else if !pts.is_empty() {
                        polyline class={"line s" (i % 6)} data-series=(s.name) points=(
                            pts.iter().map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v))).collect::<Vec<_>>().join(" ")
                        ) {}
                    }
                }
                @if total_points == 0 {
                    text.empty x=(LEFT + plot_w / 2.0) y=(TOP + plot_h / 2.0) text-anchor="middle" { "No data in this window" }
                }
            }
            ul.legend id={(id) "-summary"} {
                @for (i, line) in summary.iter().enumerate() {
                    li { span class={"swatch s" (i % 6)} aria-hidden="true" {} (line) }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_round_up_to_readable_numbers() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(11.0), 20.0);
        assert_eq!(nice_ceiling(100.0), 100.0);
        assert_eq!(nice_ceiling(f64::NAN), 1.0);
        assert_eq!(short_number(12_345.0), "12k");
        assert_eq!(short_number(2.345), "2.3");
        assert_eq!(short_number(0.125), "0.12");
        assert_eq!(clock(3600 * 25 + 61), "01:01");
    }

    #[test]
    fn charts_draw_every_series_and_say_when_empty() {
        let s = vec![
            Series::new("p50", vec![(100, 1.0), (160, 2.0), (220, 4.0)]),
            Series::new("p95 <b>", vec![(100, 3.0)]),
        ];
        let svg = line_chart("lat", "Latency", "ms", 100, 220, &s).into_string();
        assert!(svg.contains("data-points=\"4\""), "{svg}");
        assert!(svg.contains("<polyline"));
        assert!(svg.contains("<circle"));
        // Names are escaped.
        assert!(svg.contains("p95 &lt;b&gt;: 3 ms"));
        assert!(!svg.contains("No data"));
        let empty =
            line_chart("e", "Empty", "ms", 0, 60, &[Series::new("x", vec![])]).into_string();
        assert!(empty.contains("No data in this window"));
        assert!(empty.contains("x: no data"));
        // Many points are thinned.
        let many: Vec<(u64, f64)> = (0..5000).map(|i| (i, i as f64)).collect();
        let big = line_chart("b", "Big", "n", 0, 5000, &[Series::new("n", many)]).into_string();
        let drawn = big
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert!(drawn.split(' ').count() <= MAX_POINTS + 1);
    }
}

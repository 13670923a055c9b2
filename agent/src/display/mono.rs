//! The 128x64 monochrome layout (SSD1306-class OLEDs).
//!
//! ```text
//!  y  0  pi-kitchen-01              device id (or "edgefleet agent")
//!  y 10  ─────────────────────
//!  y 11  ONLINE 3m     3 models
//!  y 21  digits v3
//!  y 31  latency 1.2 ms
//!  y 41  outbox 12 (5m)
//!  y 52  ███ alert, inverted ██      one line, when present
//! ```
//!
//! An alert too long for one line gets two (from y 42), and latency and
//! outbox share the row at y 31.
//!
//! Rows are 10 px (FONT_6X10, 21 characters on 128 px; its glyphs leave the
//! top row of their cell blank, which the header uses to sit one pixel
//! higher). Every string is cut to fit with a trailing `~`.

use embedded_graphics::mono_font::ascii::FONT_6X10;
use embedded_graphics::mono_font::{MonoFont, MonoTextStyle};
use embedded_graphics::pixelcolor::BinaryColor;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::{Line, PrimitiveStyle, Rectangle};
use embedded_graphics::text::{Baseline, Text};

use super::format::{format_count, format_duration, format_latency_us, one_line, truncate, wrap};
use super::{Connectivity, StatusView};

const FONT: MonoFont<'static> = FONT_6X10;
/// The layout's width; wider targets get it in their top left corner.
const WIDTH: u32 = 128;
const HEIGHT: i32 = 64;
const ROW: i32 = 10;
const HEADER_Y: i32 = -1;
const HEADER_RULE_Y: i32 = 10;
const FIRST_BODY_ROW_Y: i32 = 11;

/// Characters of `font` that fit in `width_px`.
pub(crate) fn chars_in(font: &MonoFont<'_>, width_px: u32) -> usize {
    let advance = font.character_size.width + font.character_spacing;
    (width_px / advance.max(1)) as usize
}

/// The text of the connectivity line: `ONLINE 3m`, `OFFLINE 2h 5m`,
/// `STANDALONE`.
pub(crate) fn connectivity_text(c: &Connectivity) -> String {
    match c {
        Connectivity::Standalone => "STANDALONE".into(),
        Connectivity::Online { since_secs } => format!("ONLINE {}", format_duration(*since_secs)),
        Connectivity::Offline { for_secs } => format!("OFFLINE {}", format_duration(*for_secs)),
    }
}

/// `name vN` fitted in `max_chars`: the name is cut, the version kept.
pub(crate) fn model_text(name: &str, version: u64, max_chars: usize) -> String {
    let version = format!(" v{version}");
    let room = max_chars.saturating_sub(version.chars().count());
    if room < 2 {
        return truncate(&format!("{name}{version}"), max_chars);
    }
    format!("{}{version}", truncate(&one_line(name), room))
}

/// `12 (5m)`: the backlog and, when records wait, the age of the oldest.
pub(crate) fn outbox_text(view: &StatusView) -> String {
    if view.outbox_backlog == 0 {
        return "empty".into();
    }
    match view.outbox_oldest_secs {
        Some(age) => format!(
            "{} ({})",
            format_count(view.outbox_backlog),
            format_duration(age)
        ),
        None => format_count(view.outbox_backlog),
    }
}

/// Draws `view` for a 128x64 monochrome screen. A larger target gets the
/// layout in its top left corner; a narrower one gets it cut to its width.
/// The target is cleared first.
pub fn draw_mono<D>(view: &StatusView, target: &mut D) -> Result<(), D::Error>
where
    D: DrawTarget<Color = BinaryColor>,
{
    target.clear(BinaryColor::Off)?;
    let area = target.bounding_box();
    let origin = area.top_left;
    let width = area.size.width.min(WIDTH);
    let cols = chars_in(&FONT, width);
    let on = MonoTextStyle::new(&FONT, BinaryColor::On);
    let at = |x: i32, y: i32| origin + Point::new(x, y);

    // Header: the device id, or the product name when standalone.
    let header = if view.device_id.is_empty() {
        "edgefleet agent".to_string()
    } else {
        one_line(&view.device_id)
    };
    let header = truncate(&header, cols);
    Text::with_baseline(&header, at(0, HEADER_Y), on, Baseline::Top).draw(target)?;
    Line::new(at(0, HEADER_RULE_Y), at(width as i32 - 1, HEADER_RULE_Y))
        .into_styled(PrimitiveStyle::with_stroke(BinaryColor::On, 1))
        .draw(target)?;

    let alert = view.alert.as_deref().map(one_line);
    let alert_cols = chars_in(&FONT, width.saturating_sub(2));
    let alert_lines = match &alert {
        Some(text) if text.chars().count() > alert_cols => wrap(text, alert_cols, 2),
        Some(text) => vec![text.clone()],
        None => Vec::new(),
    };

    let mut rows: Vec<String> = Vec::with_capacity(4);
    // Connectivity, with the served model count on the right when it fits.
    let conn = connectivity_text(&view.connectivity);
    let count = match view.models_total {
        0 => String::new(),
        1 => "1 model".to_string(),
        n => format!("{} models", format_count(n as u64)),
    };
    let conn_len = conn.chars().count();
    let count_len = count.chars().count();
    rows.push(if count_len > 0 && conn_len + 1 + count_len <= cols {
        format!("{conn}{}{count}", " ".repeat(cols - conn_len - count_len))
    } else {
        conn
    });
    rows.push(match &view.model {
        Some(m) => model_text(&m.name, m.version, cols),
        None => "no model".to_string(),
    });
    let latency = view
        .last_latency_us
        .map_or_else(|| "-".to_string(), format_latency_us);
    if alert_lines.len() > 1 {
        rows.push(format!(
            "{latency}  outbox {}",
            format_count(view.outbox_backlog)
        ));
    } else {
        rows.push(format!("latency {latency}"));
        rows.push(format!("outbox {}", outbox_text(view)));
    }
    for (i, row) in rows.iter().enumerate() {
        let y = FIRST_BODY_ROW_Y + i as i32 * ROW;
        Text::with_baseline(&truncate(row, cols), at(0, y), on, Baseline::Top).draw(target)?;
    }

    if !alert_lines.is_empty() {
        // White box, black text, on the bottom rows.
        let box_height = alert_lines.len() as i32 * ROW + 2;
        let top = HEIGHT - box_height;
        Rectangle::new(at(0, top), Size::new(width, box_height as u32))
            .into_styled(PrimitiveStyle::with_fill(BinaryColor::On))
            .draw(target)?;
        let off = MonoTextStyle::new(&FONT, BinaryColor::Off);
        for (i, line) in alert_lines.iter().enumerate() {
            let text = truncate(line, alert_cols);
            // The glyphs' blank top row sits on the box's first row.
            let y = top + i as i32 * ROW;
            Text::with_baseline(&text, at(1, y), off, Baseline::Top).draw(target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts() {
        assert_eq!(model_text("digits", 3, 21), "digits v3");
        assert_eq!(
            model_text("a-very-long-model-name-indeed", 12, 21),
            "a-very-long-mode~ v12"
        );
        assert_eq!(model_text("abc", 123_456, 5), "abc ~");
        assert_eq!(
            connectivity_text(&Connectivity::Offline { for_secs: 7500 }),
            "OFFLINE 2h 5m"
        );
        let mut v = StatusView {
            outbox_backlog: 1234,
            outbox_oldest_secs: Some(300),
            ..StatusView::default()
        };
        assert_eq!(outbox_text(&v), "1.2k (5m)");
        v.outbox_oldest_secs = None;
        assert_eq!(outbox_text(&v), "1.2k");
        v.outbox_backlog = 0;
        assert_eq!(outbox_text(&v), "empty");
        assert_eq!(chars_in(&FONT, 128), 21);
    }
}

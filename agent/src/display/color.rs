//! The colour layout for larger framebuffers (320x240 and up).
//!
//! ```text
//! ┌──────────────────────────────────────┐
//! │ pi-kitchen-01          [ ONLINE 3m ] │  header bar + connectivity badge
//! │ MODEL                                │
//! │ digits v3                            │  FONT_10X20
//! │ tract-onnx, 3 models served          │
//! │ ──────────────────────────────────── │
//! │ LATENCY            OUTBOX            │
//! │ 1.2 ms             12                │  two tiles
//! │ last inference     oldest 5m         │
//! │██ update refused: bad signature █████│  alert bar (red), 1-2 lines
//! └──────────────────────────────────────┘
//! ```
//!
//! Sizes come from the target's `bounding_box()`; from 480x300 up a larger
//! set of fonts and margins is used. Blocks that would run into the alert
//! bar (on very small targets) are left out rather than overlapped.

use embedded_graphics::mono_font::ascii::{
    FONT_10X20, FONT_6X10, FONT_7X13, FONT_7X13_BOLD, FONT_9X15, FONT_9X15_BOLD,
};
use embedded_graphics::mono_font::{MonoFont, MonoTextStyle};
use embedded_graphics::pixelcolor::Rgb565;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::{Line, PrimitiveStyle, Rectangle, RoundedRectangle};
use embedded_graphics::text::{Baseline, Text};

use super::format::{format_count, format_duration, format_latency_us, one_line, truncate, wrap};
use super::mono::{chars_in, connectivity_text, model_text};
use super::{Connectivity, StatusView};

/// A colour from 8-bit channels.
const fn rgb(r: u8, g: u8, b: u8) -> Rgb565 {
    Rgb565::new(r >> 3, g >> 2, b >> 3)
}

const BACKGROUND: Rgb565 = rgb(0, 0, 0);
const HEADER: Rgb565 = rgb(0x1e, 0x29, 0x3b);
const TEXT: Rgb565 = rgb(0xff, 0xff, 0xff);
const DIM: Rgb565 = rgb(0x9e, 0xa3, 0xab);
const RULE: Rgb565 = rgb(0x3a, 0x44, 0x52);
const ONLINE: Rgb565 = rgb(0x1b, 0x9e, 0x3e);
const OFFLINE: Rgb565 = rgb(0xc6, 0x28, 0x28);
const STANDALONE: Rgb565 = rgb(0x60, 0x66, 0x70);
const WAITING: Rgb565 = rgb(0xff, 0xb3, 0x00);
const ALERT: Rgb565 = rgb(0xb7, 0x1c, 0x1c);

/// Fonts and spacing for one class of screen size.
struct Theme {
    margin: i32,
    header_height: u32,
    header: MonoFont<'static>,
    badge: MonoFont<'static>,
    badge_height: u32,
    label: MonoFont<'static>,
    model: MonoFont<'static>,
    detail: MonoFont<'static>,
    value: MonoFont<'static>,
    alert: MonoFont<'static>,
    gap: i32,
}

const SMALL: Theme = Theme {
    margin: 8,
    header_height: 28,
    header: FONT_9X15_BOLD,
    badge: FONT_7X13_BOLD,
    badge_height: 20,
    label: FONT_6X10,
    model: FONT_10X20,
    detail: FONT_7X13,
    value: FONT_10X20,
    alert: FONT_9X15_BOLD,
    gap: 6,
};

const LARGE: Theme = Theme {
    margin: 14,
    header_height: 40,
    header: FONT_10X20,
    badge: FONT_9X15_BOLD,
    badge_height: 26,
    label: FONT_7X13,
    model: FONT_10X20,
    detail: FONT_9X15,
    value: FONT_10X20,
    alert: FONT_10X20,
    gap: 10,
};

fn line_height(font: &MonoFont<'_>) -> i32 {
    font.character_size.height as i32
}

fn text_width(font: &MonoFont<'_>, text: &str) -> u32 {
    text.chars().count() as u32 * (font.character_size.width + font.character_spacing)
}

/// Draws `view` laid out for the target's size. The target is cleared first.
pub fn draw_color<D>(view: &StatusView, target: &mut D) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb565>,
{
    target.clear(BACKGROUND)?;
    let area = target.bounding_box();
    let origin = area.top_left;
    let (w, h) = (area.size.width, area.size.height);
    let t = if w >= 480 && h >= 300 { &LARGE } else { &SMALL };
    let m = t.margin;
    let inner = w.saturating_sub(2 * m as u32);
    let at = |x: i32, y: i32| origin + Point::new(x, y);

    // The alert bar is placed first (everything else must end above it)
    // and drawn last.
    let mut content_bottom = h as i32;
    let alert = view.alert.as_ref().map(|alert| {
        let lines = wrap(&one_line(alert), chars_in(&t.alert, inner), 2);
        let line_h = line_height(&t.alert) + 2;
        let bar_h = lines.len().max(1) as i32 * line_h + 2 * t.gap;
        let top = h as i32 - bar_h;
        content_bottom = top - t.gap;
        (top, bar_h, line_h, lines)
    });
    let fits = |y: i32, height: i32| y + height <= content_bottom;

    if fits(0, t.header_height as i32) {
        draw_header(view, t, w, origin, target)?;
    }

    // The active model: a small label, the name in the big font, details.
    let mut y = t.header_height as i32 + t.gap + 2;
    let label_style = MonoTextStyle::new(&t.label, DIM);
    let model_block =
        line_height(&t.label) + 2 + line_height(&t.model) + 2 + line_height(&t.detail);
    if fits(y, model_block) {
        Text::with_baseline("MODEL", at(m, y), label_style, Baseline::Top).draw(target)?;
        y += line_height(&t.label) + 2;
        let (model, model_color) = match &view.model {
            Some(model) => (
                model_text(&model.name, model.version, chars_in(&t.model, inner)),
                TEXT,
            ),
            None => ("no model".to_string(), DIM),
        };
        Text::with_baseline(
            &model,
            at(m, y),
            MonoTextStyle::new(&t.model, model_color),
            Baseline::Top,
        )
        .draw(target)?;
        y += line_height(&t.model) + 2;
        let served = match view.models_total {
            0 => "no models served".to_string(),
            1 => "1 model served".to_string(),
            n => format!("{} models served", format_count(n as u64)),
        };
        let detail = match &view.model {
            Some(model) if !model.runtime.is_empty() => {
                format!("{}, {served}", one_line(&model.runtime))
            }
            _ => served,
        };
        Text::with_baseline(
            &truncate(&detail, chars_in(&t.detail, inner)),
            at(m, y),
            MonoTextStyle::new(&t.detail, DIM),
            Baseline::Top,
        )
        .draw(target)?;
        y += line_height(&t.detail) + t.gap;
    }

    // A rule, then two tiles: latency and outbox.
    if fits(y, 1) {
        Line::new(at(m, y), at(m + inner as i32 - 1, y))
            .into_styled(PrimitiveStyle::with_stroke(RULE, 1))
            .draw(target)?;
    }
    y += 1 + t.gap;
    let tile_block = line_height(&t.label) + 2 + line_height(&t.value) + 2 + line_height(&t.label);
    if fits(y, tile_block) {
        let latency = (
            "LATENCY",
            view.last_latency_us
                .map_or_else(|| "-".to_string(), format_latency_us),
            TEXT,
            if view.last_latency_us.is_some() {
                "last inference"
            } else {
                "no inference yet"
            }
            .to_string(),
        );
        let outbox = (
            "OUTBOX",
            format_count(view.outbox_backlog),
            if view.outbox_backlog > 0 {
                WAITING
            } else {
                TEXT
            },
            match (view.outbox_backlog, view.outbox_oldest_secs) {
                (0, _) => "nothing waiting".to_string(),
                (_, Some(age)) => format!("oldest {}", format_duration(age)),
                (_, None) => "waiting to send".to_string(),
            },
        );
        let tile_w = inner / 2;
        let room = tile_w.saturating_sub(t.gap as u32);
        for (i, (label, value, value_color, note)) in [latency, outbox].iter().enumerate() {
            let x = m + i as i32 * tile_w as i32;
            let mut ty = y;
            Text::with_baseline(
                &truncate(label, chars_in(&t.label, room)),
                at(x, ty),
                label_style,
                Baseline::Top,
            )
            .draw(target)?;
            ty += line_height(&t.label) + 2;
            Text::with_baseline(
                &truncate(value, chars_in(&t.value, room)),
                at(x, ty),
                MonoTextStyle::new(&t.value, *value_color),
                Baseline::Top,
            )
            .draw(target)?;
            ty += line_height(&t.value) + 2;
            Text::with_baseline(
                &truncate(note, chars_in(&t.label, room)),
                at(x, ty),
                label_style,
                Baseline::Top,
            )
            .draw(target)?;
        }
    }

    if let Some((top, bar_h, line_h, lines)) = alert {
        Rectangle::new(at(0, top), Size::new(w, bar_h as u32))
            .into_styled(PrimitiveStyle::with_fill(ALERT))
            .draw(target)?;
        let style = MonoTextStyle::new(&t.alert, TEXT);
        for (i, line) in lines.iter().enumerate() {
            let y = top + t.gap + i as i32 * line_h + 1;
            Text::with_baseline(line, at(m, y), style, Baseline::Top).draw(target)?;
        }
    }
    Ok(())
}

/// The header bar: device id on the left, connectivity badge on the right.
fn draw_header<D>(
    view: &StatusView,
    t: &Theme,
    w: u32,
    origin: Point,
    target: &mut D,
) -> Result<(), D::Error>
where
    D: DrawTarget<Color = Rgb565>,
{
    let m = t.margin;
    let inner = w.saturating_sub(2 * m as u32);
    let at = |x: i32, y: i32| origin + Point::new(x, y);
    Rectangle::new(origin, Size::new(w, t.header_height))
        .into_styled(PrimitiveStyle::with_fill(HEADER))
        .draw(target)?;

    const BADGE_PAD: u32 = 6;
    let badge_text = truncate(
        &connectivity_text(&view.connectivity),
        chars_in(&t.badge, inner.saturating_sub(2 * BADGE_PAD)),
    );
    let badge_w = text_width(&t.badge, &badge_text) + 2 * BADGE_PAD;
    let badge_x = w as i32 - m - badge_w as i32;
    let badge_y = (t.header_height as i32 - t.badge_height as i32) / 2;
    let badge_color = match view.connectivity {
        Connectivity::Standalone => STANDALONE,
        Connectivity::Online { .. } => ONLINE,
        Connectivity::Offline { .. } => OFFLINE,
    };
    RoundedRectangle::with_equal_corners(
        Rectangle::new(at(badge_x, badge_y), Size::new(badge_w, t.badge_height)),
        Size::new(4, 4),
    )
    .into_styled(PrimitiveStyle::with_fill(badge_color))
    .draw(target)?;
    let badge_text_y = badge_y + (t.badge_height as i32 - line_height(&t.badge)) / 2;
    Text::with_baseline(
        &badge_text,
        at(badge_x + BADGE_PAD as i32, badge_text_y),
        MonoTextStyle::new(&t.badge, TEXT),
        Baseline::Top,
    )
    .draw(target)?;

    let (id, id_color) = if view.device_id.is_empty() {
        ("edgefleet agent".to_string(), DIM)
    } else {
        (one_line(&view.device_id), TEXT)
    };
    let id_room = (badge_x - m - t.gap).max(0) as u32;
    Text::with_baseline(
        &truncate(&id, chars_in(&t.header, id_room)),
        at(m, (t.header_height as i32 - line_height(&t.header)) / 2),
        MonoTextStyle::new(&t.header, id_color),
        Baseline::Top,
    )
    .draw(target)?;
    Ok(())
}

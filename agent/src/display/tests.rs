//! Reference-image tests: known states rendered to PNG and compared, pixel
//! by pixel, with the images in `agent/tests/display/`.
//!
//! After an intended layout change, regenerate them with
//! `EDGEFLEET_BLESS=1 cargo test -p edgefleet-agent --lib display` and look
//! at every image before committing.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use super::*;

fn references() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/display")
}

/// Where mismatching images are written for inspection (never the source
/// tree).
fn actual_dir() -> PathBuf {
    std::env::temp_dir().join("edgefleet-display-actual")
}

/// Width, height and RGB pixels of a PNG, whatever its colour type.
fn decode(bytes: &[u8]) -> (u32, u32, Vec<[u8; 3]>) {
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let data = &buf[..info.buffer_size()];
    let pixels = match info.color_type {
        png::ColorType::Grayscale => data.iter().map(|&g| [g, g, g]).collect(),
        png::ColorType::GrayscaleAlpha => {
            data.chunks_exact(2).map(|p| [p[0], p[0], p[0]]).collect()
        }
        png::ColorType::Rgb => data.chunks_exact(3).map(|p| [p[0], p[1], p[2]]).collect(),
        png::ColorType::Rgba => data.chunks_exact(4).map(|p| [p[0], p[1], p[2]]).collect(),
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    (info.width, info.height, pixels)
}

/// Compares `actual` (PNG bytes) with the reference `NAME.png`, or writes
/// the reference when `EDGEFLEET_BLESS=1`.
fn check(name: &str, actual: &[u8]) {
    let reference = references().join(format!("{name}.png"));
    if std::env::var_os("EDGEFLEET_BLESS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(references()).unwrap();
        std::fs::write(&reference, actual).unwrap();
        return;
    }
    let bless = "EDGEFLEET_BLESS=1 cargo test -p edgefleet-agent --lib display";
    let expected = std::fs::read(&reference).unwrap_or_else(|e| {
        panic!(
            "cannot read the reference image {}: {e}\n(create it with `{bless}`, then look at it)",
            reference.display()
        )
    });
    let (ew, eh, expected_px) = decode(&expected);
    let (aw, ah, actual_px) = decode(actual);
    let differing = if (ew, eh) == (aw, ah) {
        expected_px
            .iter()
            .zip(&actual_px)
            .filter(|(e, a)| e != a)
            .count()
    } else {
        usize::MAX
    };
    if differing == 0 {
        return;
    }
    let dir = actual_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let actual_path = dir.join(format!("{name}.actual.png"));
    std::fs::write(&actual_path, actual).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), &expected).unwrap();
    let what = if differing == usize::MAX {
        format!("is {aw}x{ah}, the reference is {ew}x{eh}")
    } else {
        format!("differs in {differing} of {} pixels", actual_px.len())
    };
    panic!(
        "{name}: the rendered image {what} ({}).\n\
         The actual image is {}, next to a copy of the reference.\n\
         If the change is intended, regenerate the references with `{bless}` and look at them before committing.",
        reference.display(),
        actual_path.display()
    );
}

fn digits(version: u64) -> Option<ModelLine> {
    Some(ModelLine {
        name: "digits".into(),
        version,
        runtime: "tract-onnx".into(),
    })
}

fn online() -> StatusView {
    StatusView {
        device_id: "pi-kitchen-01".into(),
        connectivity: Connectivity::Online { since_secs: 185 },
        model: digits(3),
        models_total: 2,
        last_latency_us: Some(1_234.0),
        outbox_backlog: 0,
        outbox_oldest_secs: None,
        alert: None,
    }
}

fn offline_alert() -> StatusView {
    StatusView {
        device_id: "warehouse-north-conveyor-cam-07".into(),
        connectivity: Connectivity::Offline { for_secs: 7_530 },
        model: digits(4),
        models_total: 1,
        last_latency_us: Some(850.0),
        outbox_backlog: 1_234,
        outbox_oldest_secs: Some(7_300),
        alert: Some("update refused: bad signature".into()),
    }
}

fn standalone_long_names() -> StatusView {
    StatusView {
        device_id: String::new(),
        connectivity: Connectivity::Standalone,
        model: Some(ModelLine {
            name: "mobilenet-v2-quantized-int8-imagenet".into(),
            version: 123,
            runtime: "tract-tflite".into(),
        }),
        models_total: 12,
        last_latency_us: Some(1_300_000.0),
        outbox_backlog: 3_400_000,
        outbox_oldest_secs: Some(4 * 86_400 + 3_600),
        alert: Some(
            "rolled back mobilenet-v2-quantized-int8-imagenet v123: health check failed on 3 of 3 samples after activation"
                .into(),
        ),
    }
}

fn nothing_yet() -> StatusView {
    StatusView {
        device_id: "pi-1".into(),
        connectivity: Connectivity::Online { since_secs: 45 },
        ..StatusView::default()
    }
}

#[test]
fn mono_online() {
    check(
        "mono_online",
        &render_png(&online(), Layout::Mono128x64, 128, 64),
    );
}

#[test]
fn mono_offline_alert() {
    check(
        "mono_offline_alert",
        &render_png(&offline_alert(), Layout::Mono128x64, 128, 64),
    );
}

#[test]
fn mono_standalone_long_names() {
    check(
        "mono_standalone_long_names",
        &render_png(&standalone_long_names(), Layout::Mono128x64, 128, 64),
    );
}

#[test]
fn color_online() {
    check(
        "color_online",
        &render_png(&online(), Layout::Color, 320, 240),
    );
}

#[test]
fn color_offline_alert() {
    check(
        "color_offline_alert",
        &render_png(&offline_alert(), Layout::Color, 320, 240),
    );
}

#[test]
fn color_standalone_long_names() {
    check(
        "color_standalone_long_names",
        &render_png(&standalone_long_names(), Layout::Color, 320, 240),
    );
}

#[test]
fn color_480x320() {
    let view = StatusView {
        alert: Some("rolled back digits v3: new version failed its health check".into()),
        outbox_backlog: 12,
        outbox_oldest_secs: Some(300),
        ..online()
    };
    check("color_480x320", &render_png(&view, Layout::Color, 480, 320));
}

#[test]
fn color_nothing_yet() {
    check(
        "color_nothing_yet",
        &render_png(&nothing_yet(), Layout::Color, 320, 240),
    );
}

#[test]
fn png_sizes_and_types() {
    let (w, h, _) = decode(&render_png(&online(), Layout::Mono128x64, 128, 64));
    assert_eq!((w, h), (128, 64));
    let (w, h, px) = decode(&render_png(&online(), Layout::Color, 480, 320));
    assert_eq!((w, h, px.len()), (480, 320, 480 * 320));
    // The mono image is pure black and white.
    let (_, _, px) = decode(&render_png(&offline_alert(), Layout::Mono128x64, 128, 64));
    assert!(px.iter().all(|p| *p == [0, 0, 0] || *p == [255, 255, 255]));
}

#[test]
fn odd_sizes_never_panic() {
    let views = [
        online(),
        offline_alert(),
        standalone_long_names(),
        StatusView::default(),
    ];
    for view in &views {
        for (w, h) in [
            (0, 0),
            (1, 1),
            (10, 10),
            (64, 32),
            (100, 50),
            (160, 128),
            (240, 320),
            (1000, 700),
        ] {
            assert!(!render_png(view, Layout::Color, w, h).is_empty());
            assert!(!render_png(view, Layout::Mono128x64, w, h).is_empty());
        }
    }
}

#[test]
fn mono_keeps_within_128x64() {
    // Drawn on a larger canvas, nothing of the layout lands outside the
    // 128x64 corner.
    for view in [online(), offline_alert(), standalone_long_names()] {
        let mut canvas = Canvas::<embedded_graphics::pixelcolor::BinaryColor>::new(200, 100);
        let Ok(()) = draw_mono(&view, &mut canvas);
        for y in 0..100 {
            for x in 0..200 {
                if x >= 128 || y >= 64 {
                    assert!(!canvas.pixel(x, y).unwrap().is_on(), "({x}, {y}) is lit");
                }
            }
        }
    }
}

#[test]
fn color_alert_keeps_clear_of_the_content() {
    // With and without an alert, the rows above the alert bar are the same:
    // the bar never covers content.
    use embedded_graphics::pixelcolor::Rgb565;
    for (w, h) in [(320, 240), (480, 320)] {
        let plain = StatusView {
            alert: None,
            ..standalone_long_names()
        };
        let mut without = Canvas::<Rgb565>::new(w, h);
        let Ok(()) = draw_color(&plain, &mut without);
        let mut with = Canvas::<Rgb565>::new(w, h);
        let Ok(()) = draw_color(&standalone_long_names(), &mut with);
        let bar_top = (0..h)
            .find(|&y| with.row(y) != without.row(y))
            .expect("the alert is drawn");
        // Everything drawn without the alert ends above the bar.
        for y in bar_top..h {
            assert!(
                without.row(y).iter().all(|&p| p == Rgb565::new(0, 0, 0)),
                "{w}x{h}: row {y} under the alert bar has content"
            );
        }
    }
}

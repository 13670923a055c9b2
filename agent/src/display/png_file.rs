//! PNG output: encoding a canvas, and a target that keeps a file up to date
//! by writing `PATH.tmp` and renaming it over `PATH`, so a reader never sees
//! a half-written image.

use std::path::PathBuf;

use embedded_graphics::pixelcolor::{BinaryColor, Rgb565};

use super::canvas::Canvas;
use super::config::Layout;
use super::{draw_color, draw_mono, DisplayError, Sink, StatusView};

/// Encodes 8-bit grey (`rgb == false`) or RGB pixel bytes as a PNG.
fn encode(width: u32, height: u32, rgb: bool, data: &[u8]) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(if rgb {
        png::ColorType::Rgb
    } else {
        png::ColorType::Grayscale
    });
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(data)?;
    writer.finish()?;
    Ok(out)
}

/// A monochrome canvas as a greyscale PNG (on = white).
pub fn encode_mono(canvas: &Canvas<BinaryColor>) -> Result<Vec<u8>, png::EncodingError> {
    encode(canvas.width(), canvas.height(), false, &canvas.to_gray8())
}

/// A colour canvas as an 8-bit RGB PNG.
pub fn encode_color(canvas: &Canvas<Rgb565>) -> Result<Vec<u8>, png::EncodingError> {
    encode(canvas.width(), canvas.height(), true, &canvas.to_rgb8())
}

/// A drawn frame, before encoding: compared to skip identical rewrites.
#[derive(Debug, PartialEq)]
enum Frame {
    Mono(Canvas<BinaryColor>),
    Color(Canvas<Rgb565>),
}

fn render(view: &StatusView, layout: Layout, width: u32, height: u32) -> Frame {
    match layout {
        Layout::Mono128x64 => {
            let mut canvas = Canvas::<BinaryColor>::new(width, height);
            let Ok(()) = draw_mono(view, &mut canvas);
            Frame::Mono(canvas)
        }
        Layout::Color => {
            let mut canvas = Canvas::<Rgb565>::new(width, height);
            let Ok(()) = draw_color(view, &mut canvas);
            Frame::Color(canvas)
        }
    }
}

fn encode_frame(frame: &Frame) -> Result<Vec<u8>, png::EncodingError> {
    match frame {
        Frame::Mono(c) => encode_mono(c),
        Frame::Color(c) => encode_color(c),
    }
}

/// `view` drawn with `layout` at `width` x `height` (each clamped to
/// 1..=8192), as PNG file bytes.
pub fn render_png(view: &StatusView, layout: Layout, width: u32, height: u32) -> Vec<u8> {
    // Encoding into memory only fails for an empty image, which the canvas
    // rules out.
    encode_frame(&render(view, layout, width, height)).unwrap_or_default()
}

/// `path` with `.tmp` appended to its file name.
/// Keeps a PNG file showing the status.
pub(super) struct PngSink {
    path: PathBuf,
    layout: Layout,
    size: (u32, u32),
    last: Option<Frame>,
}

impl PngSink {
    pub(super) fn new(path: PathBuf, layout: Layout, size: (u32, u32)) -> Self {
        Self {
            path,
            layout,
            size,
            last: None,
        }
    }
}

impl Sink for PngSink {
    fn show(&mut self, view: &StatusView) -> Result<(), DisplayError> {
        let frame = render(view, self.layout, self.size.0, self.size.1);
        if self.last.as_ref() == Some(&frame) {
            return Ok(());
        }
        let bytes = encode_frame(&frame)?;
        crate::durable::write_replace(&self.path, &bytes).map_err(|source| DisplayError::Io {
            action: "cannot write",
            path: self.path.clone(),
            source,
        })?;
        self.last = Some(frame);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.png");
        crate::durable::write_replace(&path, b"first").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        // A reader holding the old file keeps a complete old copy.
        let mut old = std::fs::File::open(&path).unwrap();
        crate::durable::write_replace(&path, b"second, longer").unwrap();
        let mut seen = String::new();
        std::io::Read::read_to_string(&mut old, &mut seen).unwrap();
        assert_eq!(seen, "first");
        assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [OsString::from("status.png")]);
    }

    #[test]
    fn atomic_write_failure_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.png");
        crate::durable::write_replace(&path, b"old").unwrap();
        // A non-empty directory where the image should go: the rename
        // fails, and the temp file is cleaned up.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("x"), b"").unwrap();
        assert!(crate::durable::write_replace(&blocked, b"new").is_err());
        assert!(!crate::durable::temp_path(&blocked).exists());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        // A missing directory is an error, not a panic.
        assert!(crate::durable::write_replace(&dir.path().join("no/such/dir.png"), b"x").is_err());
    }

    #[test]
    fn sink_rewrites_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.png");
        let mut sink = PngSink::new(path.clone(), Layout::Mono128x64, (128, 64));
        let view = StatusView::default();
        sink.show(&view).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            render_png(&view, Layout::Mono128x64, 128, 64)
        );
        std::fs::remove_file(&path).unwrap();
        sink.show(&view).unwrap();
        assert!(!path.exists(), "an unchanged frame is not rewritten");
        let changed = StatusView {
            device_id: "pi-1".into(),
            ..view
        };
        sink.show(&changed).unwrap();
        assert!(path.exists());
    }
}

//! Linux framebuffer target (`/dev/fbN`), without mmap or ioctls: the
//! geometry comes from sysfs (`/sys/class/graphics/fbN/`), each frame is
//! drawn in memory and written with one positioned write at offset 0.
//!
//! Pixel formats: 16 bpp is taken as RGB565 and 32 bpp as XRGB8888 (both
//! little endian, the usual layouts of fbdev drivers); 24 bpp as BGR888.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use embedded_graphics::pixelcolor::{BinaryColor, Rgb565, Rgb888};
use embedded_graphics::prelude::*;

use super::canvas::{Canvas, MAX_SIDE};
use super::config::{Layout, MONO_SIZE};
use super::{draw_color, draw_mono, DisplayError, Sink, StatusView};

/// What sysfs says about a framebuffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FbGeometry {
    /// Visible size in pixels.
    pub width: u32,
    pub height: u32,
    /// Bytes from one row to the next.
    pub stride: usize,
    pub bits_per_pixel: u32,
}

/// `1920,1080` (sysfs `virtual_size`).
fn parse_pair(text: &str) -> Option<(u32, u32)> {
    let (w, h) = text.trim().split_once(',')?;
    Some((w.trim().parse().ok()?, h.trim().parse().ok()?))
}

/// The size in the first line of sysfs `modes`, e.g. `U:800x480p-0`.
fn parse_mode(text: &str) -> Option<(u32, u32)> {
    let line = text.lines().next()?;
    let spec = line.split_once(':').map_or(line, |(_, s)| s);
    let (w, rest) = spec.split_once('x')?;
    let h: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((w.trim().parse().ok()?, h.parse().ok()?))
}

impl FbGeometry {
    /// Reads the geometry of framebuffer `name` (`fb0`) from
    /// `SYSFS_ROOT/class/graphics/NAME/`: `virtual_size` (required),
    /// `bits_per_pixel` and `stride` (each derived from the other when
    /// missing), and `modes` for the visible size when the virtual one is
    /// larger (double-buffering drivers).
    pub fn read(sysfs_root: &Path, name: &str) -> Result<Self, DisplayError> {
        let dir = sysfs_root.join("class/graphics").join(name);
        let read = |file: &str| std::fs::read_to_string(dir.join(file));
        let number = |file: &str| -> Option<u64> { read(file).ok()?.trim().parse().ok() };

        let bail = |reason: String| Err(DisplayError::Framebuffer(reason));
        let virtual_size = read("virtual_size").map_err(|source| DisplayError::Io {
            action: "cannot read",
            path: dir.join("virtual_size"),
            source,
        })?;
        let Some((vw, vh)) = parse_pair(&virtual_size) else {
            return bail(format!(
                "{}: expected \"WIDTH,HEIGHT\", got {:?}",
                dir.join("virtual_size").display(),
                virtual_size.trim()
            ));
        };
        if vw == 0 || vh == 0 || vw > MAX_SIDE || vh > MAX_SIDE {
            return bail(format!("framebuffer {name}: unusable size {vw}x{vh}"));
        }
        let stride = number("stride");
        let bits_per_pixel = match (number("bits_per_pixel"), stride) {
            (Some(bpp), _) => bpp,
            (None, Some(stride)) => stride * 8 / u64::from(vw),
            (None, None) => {
                return bail(format!(
                    "cannot read {} or {}",
                    dir.join("bits_per_pixel").display(),
                    dir.join("stride").display()
                ))
            }
        };
        let bits_per_pixel = u32::try_from(bits_per_pixel).unwrap_or(0);
        if !matches!(bits_per_pixel, 16 | 24 | 32) {
            return bail(format!(
                "framebuffer {name}: {bits_per_pixel} bits per pixel is not supported (16, 24 or 32)"
            ));
        }
        let row_bytes = vw as usize * (bits_per_pixel as usize / 8);
        let stride = stride.map_or(row_bytes, |s| s as usize);
        if stride < row_bytes {
            return bail(format!("framebuffer {name}: stride {stride} is shorter than a row of {vw} pixels at {bits_per_pixel} bpp"));
        }
        let (width, height) = read("modes")
            .ok()
            .as_deref()
            .and_then(parse_mode)
            .filter(|&(w, h)| w > 0 && h > 0 && w <= vw && h <= vh)
            .unwrap_or((vw, vh));
        Ok(Self {
            width,
            height,
            stride,
            bits_per_pixel,
        })
    }

    /// Bytes of one full visible frame.
    pub fn frame_len(&self) -> usize {
        self.stride * self.height as usize
    }
}

/// Packs `canvas` into the framebuffer's memory layout (rows `stride`
/// bytes apart, padding zeroed). Pixels outside the canvas stay black.
pub fn pack(canvas: &Canvas<Rgb565>, geometry: &FbGeometry) -> Vec<u8> {
    let mut out = vec![0u8; geometry.frame_len()];
    let bytes_pp = geometry.bits_per_pixel as usize / 8;
    let rows = canvas.height().min(geometry.height);
    let cols = canvas.width().min(geometry.width) as usize;
    for y in 0..rows {
        let start = y as usize * geometry.stride;
        let dst = &mut out[start..start + cols * bytes_pp];
        let src = &canvas.row(y)[..cols];
        match geometry.bits_per_pixel {
            16 => {
                for (d, c) in dst.chunks_exact_mut(2).zip(src) {
                    d.copy_from_slice(&c.into_storage().to_le_bytes());
                }
            }
            24 => {
                for (d, &c) in dst.chunks_exact_mut(3).zip(src) {
                    let c = Rgb888::from(c);
                    d.copy_from_slice(&[c.b(), c.g(), c.r()]);
                }
            }
            _ => {
                for (d, &c) in dst.chunks_exact_mut(4).zip(src) {
                    let c = Rgb888::from(c);
                    d.copy_from_slice(&[c.b(), c.g(), c.r(), 0xff]);
                }
            }
        }
    }
    out
}

/// Draws the status on a framebuffer device.
pub(super) struct FramebufferSink {
    device: PathBuf,
    file: File,
    geometry: FbGeometry,
    layout: Layout,
    last: Option<Vec<u8>>,
}

impl FramebufferSink {
    /// Opens `device` (e.g. `/dev/fb0`), its geometry read under
    /// `sysfs_root` (`/sys` on a real system).
    pub(super) fn open(
        device: &Path,
        sysfs_root: &Path,
        layout: Layout,
    ) -> Result<Self, DisplayError> {
        let name = device.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            DisplayError::Framebuffer(format!(
                "{} is not a framebuffer device path",
                device.display()
            ))
        })?;
        let geometry = FbGeometry::read(sysfs_root, name)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(device)
            .map_err(|source| DisplayError::Io {
                action: "cannot open for writing",
                path: device.to_path_buf(),
                source,
            })?;
        tracing::info!(
            device = %device.display(),
            width = geometry.width,
            height = geometry.height,
            bpp = geometry.bits_per_pixel,
            "status display on framebuffer"
        );
        Ok(Self {
            device: device.to_path_buf(),
            file,
            geometry,
            layout,
            last: None,
        })
    }

    fn render(&self, view: &StatusView) -> Canvas<Rgb565> {
        let (w, h) = (self.geometry.width, self.geometry.height);
        match self.layout {
            Layout::Color => {
                let mut canvas = Canvas::<Rgb565>::new(w, h);
                let Ok(()) = draw_color(view, &mut canvas);
                canvas
            }
            Layout::Mono128x64 => {
                let mut mono = Canvas::<BinaryColor>::new(MONO_SIZE.0, MONO_SIZE.1);
                let Ok(()) = draw_mono(view, &mut mono);
                mono.upscaled_rgb565(w, h)
            }
        }
    }
}

impl Sink for FramebufferSink {
    fn show(&mut self, view: &StatusView) -> Result<(), DisplayError> {
        let frame = pack(&self.render(view), &self.geometry);
        if self.last.as_ref() == Some(&frame) {
            return Ok(());
        }
        self.file
            .write_all_at(&frame, 0)
            .map_err(|source| DisplayError::Io {
                action: "cannot write to",
                path: self.device.clone(),
                source,
            })?;
        self.last = Some(frame);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs with `fb0` and its attributes, and a plain file as the
    /// device.
    fn fake(files: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let sysfs = dir.path().join("sys");
        let fb = sysfs.join("class/graphics/fb0");
        std::fs::create_dir_all(&fb).unwrap();
        for (name, text) in files {
            std::fs::write(fb.join(name), text).unwrap();
        }
        let device = dir.path().join("fb0");
        std::fs::write(&device, b"").unwrap();
        (dir, sysfs, device)
    }

    fn tiny_canvas() -> Canvas<Rgb565> {
        let mut c = Canvas::<Rgb565>::new(2, 2);
        let Ok(()) = c.draw_iter([
            Pixel(Point::new(0, 0), Rgb565::RED),
            Pixel(Point::new(1, 0), Rgb565::new(0b10101, 0b101010, 0b01010)),
            Pixel(Point::new(0, 1), Rgb565::WHITE),
            Pixel(Point::new(1, 1), Rgb565::BLUE),
        ]);
        c
    }

    #[test]
    fn packs_rgb565() {
        let g = FbGeometry {
            width: 2,
            height: 2,
            stride: 6,
            bits_per_pixel: 16,
        };
        // 0b10101_101010_01010 = 0xAD4A
        assert_eq!(
            pack(&tiny_canvas(), &g),
            [0x00, 0xf8, 0x4a, 0xad, 0, 0, 0xff, 0xff, 0x1f, 0x00, 0, 0]
        );
    }

    #[test]
    fn packs_xrgb8888() {
        let g = FbGeometry {
            width: 2,
            height: 2,
            stride: 8,
            bits_per_pixel: 32,
        };
        // 5 and 6 bit channels widened with rounding.
        let widen = |v: u32, max: u32| ((v * 255 + max / 2) / max) as u8;
        let (r, gr, b) = (widen(0b10101, 31), widen(0b101010, 63), widen(0b01010, 31));
        assert_eq!(
            pack(&tiny_canvas(), &g),
            [
                0, 0, 0xff, 0xff, b, gr, r, 0xff, //
                0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0xff,
            ]
        );
        // A larger framebuffer: the rest stays black, rows keep their stride.
        let g = FbGeometry {
            width: 3,
            height: 3,
            stride: 16,
            bits_per_pixel: 32,
        };
        let packed = pack(&tiny_canvas(), &g);
        assert_eq!(packed.len(), 48);
        assert_eq!(&packed[16..20], [0xff, 0xff, 0xff, 0xff]);
        assert!(packed[8..16].iter().all(|&b| b == 0));
        assert!(packed[32..].iter().all(|&b| b == 0));
    }

    #[test]
    fn geometry_from_sysfs() {
        let (_d, sysfs, _) = fake(&[
            ("virtual_size", "800,960\n"),
            ("bits_per_pixel", "32\n"),
            ("stride", "3328\n"),
            ("modes", "U:800x480p-0\n"),
        ]);
        assert_eq!(
            FbGeometry::read(&sysfs, "fb0").unwrap(),
            FbGeometry {
                width: 800,
                height: 480,
                stride: 3328,
                bits_per_pixel: 32
            }
        );
        // No stride, no modes: a packed row, the virtual size.
        let (_d, sysfs, _) = fake(&[("virtual_size", "320,240"), ("bits_per_pixel", "16")]);
        assert_eq!(
            FbGeometry::read(&sysfs, "fb0").unwrap(),
            FbGeometry {
                width: 320,
                height: 240,
                stride: 640,
                bits_per_pixel: 16
            }
        );
        // No bits_per_pixel: derived from the stride.
        let (_d, sysfs, _) = fake(&[("virtual_size", "320,240"), ("stride", "1280")]);
        assert_eq!(FbGeometry::read(&sysfs, "fb0").unwrap().bits_per_pixel, 32);
    }

    #[test]
    fn bad_geometry_is_explained() {
        let (_d, sysfs, _) = fake(&[]);
        let err = format!("{:#}", FbGeometry::read(&sysfs, "fb0").unwrap_err());
        assert!(err.contains("virtual_size"), "{err}");
        let (_d, sysfs, _) = fake(&[("virtual_size", "320,240"), ("bits_per_pixel", "8")]);
        let err = format!("{:#}", FbGeometry::read(&sysfs, "fb0").unwrap_err());
        assert!(err.contains("8 bits per pixel is not supported"), "{err}");
        let (_d, sysfs, _) = fake(&[("virtual_size", "320"), ("bits_per_pixel", "16")]);
        let err = format!("{:#}", FbGeometry::read(&sysfs, "fb0").unwrap_err());
        assert!(err.contains("WIDTH,HEIGHT"), "{err}");
        let (_d, sysfs, _) = fake(&[
            ("virtual_size", "320,240"),
            ("bits_per_pixel", "32"),
            ("stride", "640"),
        ]);
        let err = format!("{:#}", FbGeometry::read(&sysfs, "fb0").unwrap_err());
        assert!(err.contains("stride 640"), "{err}");
    }

    #[test]
    fn writes_whole_frames_to_the_device() {
        for (bpp, stride) in [(16u32, 700usize), (32, 1280)] {
            let (_d, sysfs, device) = fake(&[
                ("virtual_size", "320,240"),
                ("bits_per_pixel", &bpp.to_string()),
                ("stride", &stride.to_string()),
            ]);
            let mut sink = FramebufferSink::open(&device, &sysfs, Layout::Color).unwrap();
            let view = StatusView {
                device_id: "pi-1".into(),
                ..StatusView::default()
            };
            sink.show(&view).unwrap();
            let written = std::fs::read(&device).unwrap();
            assert_eq!(written.len(), stride * 240, "{bpp} bpp");
            // Identical to drawing the colour layout and packing it.
            let mut canvas = Canvas::<Rgb565>::new(320, 240);
            let Ok(()) = draw_color(&view, &mut canvas);
            assert_eq!(written, pack(&canvas, &sink.geometry));
            // The top left pixel is the header bar's colour.
            let header = canvas.pixel(0, 0).unwrap();
            assert_ne!(header, Rgb565::BLACK);
            let expected: Vec<u8> = if bpp == 16 {
                header.into_storage().to_le_bytes().to_vec()
            } else {
                let c = Rgb888::from(header);
                vec![c.b(), c.g(), c.r(), 0xff]
            };
            assert_eq!(&written[..expected.len()], expected);
        }
    }

    #[test]
    fn mono_layout_is_scaled_up() {
        let (_d, sysfs, device) = fake(&[("virtual_size", "256,128"), ("bits_per_pixel", "16")]);
        let mut sink = FramebufferSink::open(&device, &sysfs, Layout::Mono128x64).unwrap();
        sink.show(&StatusView::default()).unwrap();
        let written = std::fs::read(&device).unwrap();
        assert_eq!(written.len(), 256 * 128 * 2);
        // The header rule (y = 10 of the mono layout) is 2 px thick at y = 20, 21.
        let px = |x: usize, y: usize| {
            u16::from_le_bytes([written[(y * 256 + x) * 2], written[(y * 256 + x) * 2 + 1]])
        };
        assert_eq!(px(0, 20), 0xffff);
        assert_eq!(px(255, 21), 0xffff);
        assert_eq!(px(0, 22), 0);
    }

    #[test]
    fn missing_device_is_an_error() {
        let (d, sysfs, _) = fake(&[("virtual_size", "320,240"), ("bits_per_pixel", "16")]);
        let missing = d.path().join("fb9");
        assert!(FramebufferSink::open(&missing, &sysfs, Layout::Color).is_err());
        std::fs::create_dir_all(sysfs.join("class/graphics/fb9")).unwrap();
        std::fs::write(sysfs.join("class/graphics/fb9/virtual_size"), "320,240").unwrap();
        std::fs::write(sysfs.join("class/graphics/fb9/bits_per_pixel"), "16").unwrap();
        let err = FramebufferSink::open(&missing, &sysfs, Layout::Color)
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("cannot open"), "{err:#}");
    }
}

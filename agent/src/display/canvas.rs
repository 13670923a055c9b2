//! An in-memory frame that the layouts draw into; the targets then encode
//! it (PNG), pack it (Linux framebuffer) or copy it (SSD1306).

use std::convert::Infallible;

use embedded_graphics::pixelcolor::{BinaryColor, Rgb565, Rgb888};
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::Rectangle;

/// The largest frame a canvas is made for (each side), so that a bogus
/// size from a config file or sysfs cannot ask for gigabytes.
pub const MAX_SIDE: u32 = 8192;

/// A `width` x `height` frame of pixels held in memory, row by row.
/// Pixels drawn outside it are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canvas<C> {
    size: Size,
    pixels: Vec<C>,
}

impl<C: PixelColor + Default> Canvas<C> {
    /// A canvas filled with the colour's default (black / off). Each side is
    /// clamped to `1..=MAX_SIDE`.
    pub fn new(width: u32, height: u32) -> Self {
        let size = Size::new(width.clamp(1, MAX_SIDE), height.clamp(1, MAX_SIDE));
        Self {
            size,
            pixels: vec![C::default(); size.width as usize * size.height as usize],
        }
    }
}

impl<C: PixelColor> Canvas<C> {
    pub fn width(&self) -> u32 {
        self.size.width
    }

    pub fn height(&self) -> u32 {
        self.size.height
    }

    /// All pixels, row by row from the top left.
    pub fn pixels(&self) -> &[C] {
        &self.pixels
    }

    /// The pixel at (`x`, `y`), or `None` outside the canvas.
    pub fn pixel(&self, x: u32, y: u32) -> Option<C> {
        self.index(Point::new(i32::try_from(x).ok()?, i32::try_from(y).ok()?))
            .map(|i| self.pixels[i])
    }

    /// One row of pixels (`y` must be inside the canvas).
    pub fn row(&self, y: u32) -> &[C] {
        let w = self.size.width as usize;
        let start = y as usize * w;
        &self.pixels[start..start + w]
    }

    fn index(&self, p: Point) -> Option<usize> {
        let (x, y) = (u32::try_from(p.x).ok()?, u32::try_from(p.y).ok()?);
        (x < self.size.width && y < self.size.height)
            .then(|| y as usize * self.size.width as usize + x as usize)
    }
}

impl<C: PixelColor> OriginDimensions for Canvas<C> {
    fn size(&self) -> Size {
        self.size
    }
}

impl<C: PixelColor> DrawTarget for Canvas<C> {
    type Color = C;
    type Error = Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Self::Color>>,
    {
        for Pixel(point, color) in pixels {
            if let Some(i) = self.index(point) {
                self.pixels[i] = color;
            }
        }
        Ok(())
    }

    fn fill_solid(&mut self, area: &Rectangle, color: Self::Color) -> Result<(), Self::Error> {
        let area = area.intersection(&self.bounding_box());
        let Some(bottom_right) = area.bottom_right() else {
            return Ok(());
        };
        let w = self.size.width as usize;
        let (x0, x1) = (area.top_left.x as usize, bottom_right.x as usize);
        for y in area.top_left.y as usize..=bottom_right.y as usize {
            self.pixels[y * w + x0..=y * w + x1].fill(color);
        }
        Ok(())
    }
}

impl Canvas<BinaryColor> {
    /// The frame as 8-bit grey levels (on = 255).
    pub fn to_gray8(&self) -> Vec<u8> {
        self.pixels
            .iter()
            .map(|c| if c.is_on() { 0xff } else { 0 })
            .collect()
    }

    /// The frame scaled by a whole factor as large as fits `width` x
    /// `height`, centred on a black canvas of that size, on = white.
    pub fn upscaled_rgb565(&self, width: u32, height: u32) -> Canvas<Rgb565> {
        let mut out = Canvas::<Rgb565>::new(width, height);
        let scale = (out.width() / self.width())
            .min(out.height() / self.height())
            .max(1);
        let x_off = out.width().saturating_sub(self.width() * scale) / 2;
        let y_off = out.height().saturating_sub(self.height() * scale) / 2;
        for y in 0..self.height() {
            for (x, c) in self.row(y).iter().enumerate() {
                if c.is_on() {
                    let block = Rectangle::new(
                        Point::new(
                            (x_off + x as u32 * scale) as i32,
                            (y_off + y * scale) as i32,
                        ),
                        Size::new(scale, scale),
                    );
                    let Ok(()) = out.fill_solid(&block, Rgb565::WHITE);
                }
            }
        }
        out
    }
}

impl Canvas<Rgb565> {
    /// The frame as 8-bit RGB triples (each channel widened to the full
    /// 0..=255 range).
    pub fn to_rgb8(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.pixels.len() * 3);
        for &c in &self.pixels {
            let c = Rgb888::from(c);
            out.extend_from_slice(&[c.r(), c.g(), c.b()]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_graphics::primitives::{PrimitiveStyle, StyledDrawable};

    #[test]
    fn draws_clips_and_fills() {
        let mut c = Canvas::<BinaryColor>::new(4, 3);
        assert_eq!(c.size(), Size::new(4, 3));
        let Ok(()) = c.draw_iter([
            Pixel(Point::new(1, 1), BinaryColor::On),
            Pixel(Point::new(-1, 1), BinaryColor::On),
            Pixel(Point::new(4, 0), BinaryColor::On),
            Pixel(Point::new(0, 3), BinaryColor::On),
        ]);
        assert_eq!(c.to_gray8(), [0, 0, 0, 0, 0, 255, 0, 0, 0, 0, 0, 0]);
        let Ok(()) = Rectangle::new(Point::new(2, -5), Size::new(10, 7))
            .draw_styled(&PrimitiveStyle::with_fill(BinaryColor::On), &mut c);
        assert_eq!(c.to_gray8(), [0, 0, 255, 255, 0, 255, 255, 255, 0, 0, 0, 0]);
        assert_eq!(c.pixel(3, 1), Some(BinaryColor::On));
        assert_eq!(c.pixel(4, 1), None);
        // A rectangle entirely outside is a no-op.
        let Ok(()) = c.fill_solid(
            &Rectangle::new(Point::new(9, 9), Size::new(2, 2)),
            BinaryColor::On,
        );
        assert_eq!(c.pixels().iter().filter(|p| p.is_on()).count(), 5);
    }

    #[test]
    fn sizes_are_clamped() {
        let c = Canvas::<Rgb565>::new(0, 100_000);
        assert_eq!((c.width(), c.height()), (1, MAX_SIDE));
    }

    #[test]
    fn rgb_channels_use_the_full_range() {
        let mut c = Canvas::<Rgb565>::new(2, 1);
        let Ok(()) = c.draw_iter([Pixel(Point::new(0, 0), Rgb565::WHITE)]);
        assert_eq!(c.to_rgb8(), [255, 255, 255, 0, 0, 0]);
    }

    #[test]
    fn mono_upscales_centred() {
        let mut m = Canvas::<BinaryColor>::new(2, 1);
        let Ok(()) = m.draw_iter([Pixel(Point::new(1, 0), BinaryColor::On)]);
        let big = m.upscaled_rgb565(8, 3);
        // Scale 3 (limited by the height), 1 column of margin on the left.
        let on: Vec<(u32, u32)> = (0..3)
            .flat_map(|y| (0..8).map(move |x| (x, y)))
            .filter(|&(x, y)| big.pixel(x, y) == Some(Rgb565::WHITE))
            .collect();
        let expected: Vec<(u32, u32)> = (0..3).flat_map(|y| (4..7).map(move |x| (x, y))).collect();
        assert_eq!(on, expected);
    }
}

//! SSD1306 128x64 OLED over Linux I2C (`/dev/i2c-N`), in the driver's
//! buffered graphics mode. Built only with the `ssd1306` feature on Linux.

use std::path::{Path, PathBuf};

use embedded_graphics::pixelcolor::BinaryColor;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::Rectangle;
use linux_embedded_hal::I2cdev;
use ssd1306::mode::BufferedGraphicsMode;
use ssd1306::prelude::*;
use ssd1306::{I2CDisplayInterface, Ssd1306};

use super::canvas::Canvas;
use super::config::MONO_SIZE;
use super::{draw_mono, DisplayError, Sink, StatusView};

type Display =
    Ssd1306<I2CInterface<I2cdev>, DisplaySize128x64, BufferedGraphicsMode<DisplaySize128x64>>;

/// Draws the status on an SSD1306.
pub(super) struct OledSink {
    bus: PathBuf,
    address: u8,
    display: Display,
    last: Option<Canvas<BinaryColor>>,
}

impl OledSink {
    /// Opens the I2C `bus` and initialises the controller at `address`.
    pub(super) fn open(bus: &Path, address: u8) -> Result<Self, DisplayError> {
        let i2c = I2cdev::new(bus).map_err(|e| {
            DisplayError::Panel(format!("cannot open I2C bus {}: {e}", bus.display()))
        })?;
        let interface = I2CDisplayInterface::new_custom_address(i2c, address);
        let mut display = Ssd1306::new(interface, DisplaySize128x64, DisplayRotation::Rotate0)
            .into_buffered_graphics_mode();
        display.init().map_err(|e| {
            DisplayError::Panel(format!(
                "no SSD1306 answers at {address:#04x} on {}: {e:?}",
                bus.display()
            ))
        })?;
        tracing::info!(bus = %bus.display(), address = format!("{address:#04x}"), "status display on SSD1306");
        Ok(Self {
            bus: bus.to_path_buf(),
            address,
            display,
            last: None,
        })
    }
}

impl Sink for OledSink {
    fn show(&mut self, view: &StatusView) -> Result<(), DisplayError> {
        let mut canvas = Canvas::<BinaryColor>::new(MONO_SIZE.0, MONO_SIZE.1);
        let Ok(()) = draw_mono(view, &mut canvas);
        if self.last.as_ref() == Some(&canvas) {
            return Ok(());
        }
        // Forget the last frame first: if the transfer fails half way, the
        // next attempt sends everything again.
        self.last = None;
        self.display.clear_buffer();
        let area = Rectangle::new(Point::zero(), canvas.size());
        let sent = self
            .display
            .fill_contiguous(&area, canvas.pixels().iter().copied())
            .and_then(|()| self.display.flush());
        sent.map_err(|e| {
            DisplayError::Panel(format!(
                "cannot update the SSD1306 at {:#04x} on {}: {e:?}",
                self.address,
                self.bus.display()
            ))
        })?;
        self.last = Some(canvas);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_wrong_bus_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = OledSink::open(&dir.path().join("i2c-9"), 0x3c)
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").contains("cannot open I2C bus"),
            "{err:#}"
        );
        // A plain file is not an I2C adapter: the driver's ioctl fails.
        let file = dir.path().join("i2c-1");
        std::fs::write(&file, b"").unwrap();
        assert!(OledSink::open(&file, 0x3c).is_err());
    }
}

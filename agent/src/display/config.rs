//! The `[display]` config table. The display is off unless a kind is set:
//!
//! ```toml
//! [display]
//! kind = "png"                 # off | png | framebuffer | ssd1306
//! path = "/run/edgefleet/status.png"
//! layout = "color"             # mono-128x64 | color
//! width = 320
//! height = 240
//! refresh_ms = 1000
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why the `[display]` table is unusable: the message names the field to
/// fix and the value it has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DisplayConfigError(pub String);

/// Where the status screen goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DisplayKind {
    /// No display (the default).
    #[default]
    Off,
    /// A PNG file, rewritten atomically on each change (headless boards,
    /// tests, a web page that shows it).
    Png,
    /// A Linux framebuffer device (`/dev/fbN`), 16 or 32 bits per pixel.
    Framebuffer,
    /// An SSD1306 128x64 OLED on Linux I2C (needs the `ssd1306` feature).
    Ssd1306,
}

impl DisplayKind {
    /// The name used in the config file.
    pub fn name(self) -> &'static str {
        match self {
            DisplayKind::Off => "off",
            DisplayKind::Png => "png",
            DisplayKind::Framebuffer => "framebuffer",
            DisplayKind::Ssd1306 => "ssd1306",
        }
    }
}

/// Which of the two screen layouts to draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Layout {
    /// Monochrome, 128x64 (SSD1306-class).
    #[serde(rename = "mono-128x64")]
    Mono128x64,
    /// Colour, laid out for the target's size.
    #[serde(rename = "color")]
    Color,
}

/// Default PNG size of the colour layout.
pub const DEFAULT_COLOR_SIZE: (u32, u32) = (320, 240);
/// Size of the monochrome layout.
pub const MONO_SIZE: (u32, u32) = (128, 64);
/// Largest PNG side accepted in the config.
pub const MAX_PNG_SIDE: u32 = 4096;
const MIN_REFRESH_MS: u64 = 50;
/// Longest accepted `refresh_ms` (an hour).
pub const MAX_REFRESH_MS: u64 = 3_600_000;

/// `[display]`: the on-device status screen. An empty table (or none) means
/// no display.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DisplayConfig {
    pub kind: DisplayKind,
    /// png: the output file (required); framebuffer: the device (default
    /// `/dev/fb0`).
    pub path: Option<PathBuf>,
    /// Default: `mono-128x64` for ssd1306, `color` otherwise.
    pub layout: Option<Layout>,
    /// png only: image size. Default 320x240 for `color`, 128x64 for
    /// `mono-128x64`.
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Shortest time between two redraws; also how often ticking durations
    /// ("ONLINE 3m") are brought up to date.
    pub refresh_ms: u64,
    /// ssd1306: the I2C bus device (default `/dev/i2c-1`).
    pub i2c_bus: Option<PathBuf>,
    /// ssd1306: the 7-bit I2C address (default 0x3c).
    pub i2c_address: Option<u8>,
}

impl Default for DisplayConfig {
    fn default() -> Self {
        Self {
            kind: DisplayKind::Off,
            path: None,
            layout: None,
            width: None,
            height: None,
            refresh_ms: 1000,
            i2c_bus: None,
            i2c_address: None,
        }
    }
}

impl DisplayConfig {
    /// The layout to draw, defaults applied.
    pub fn effective_layout(&self) -> Layout {
        self.layout.unwrap_or(match self.kind {
            DisplayKind::Ssd1306 => Layout::Mono128x64,
            _ => Layout::Color,
        })
    }

    /// The PNG image size, defaults applied.
    pub fn png_size(&self) -> (u32, u32) {
        let (w, h) = match self.effective_layout() {
            Layout::Mono128x64 => MONO_SIZE,
            Layout::Color => DEFAULT_COLOR_SIZE,
        };
        (self.width.unwrap_or(w), self.height.unwrap_or(h))
    }

    /// The framebuffer device, default `/dev/fb0`.
    pub fn framebuffer_path(&self) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| PathBuf::from("/dev/fb0"))
    }

    /// The I2C bus device, default `/dev/i2c-1`.
    pub fn i2c_bus(&self) -> PathBuf {
        self.i2c_bus
            .clone()
            .unwrap_or_else(|| PathBuf::from("/dev/i2c-1"))
    }

    /// The I2C address, default 0x3c.
    pub fn i2c_address(&self) -> u8 {
        self.i2c_address.unwrap_or(0x3c)
    }

    /// Makes a relative `path` / `i2c_bus` relative to `base` (the config
    /// file's directory).
    pub fn resolve_relative_to(&mut self, base: &Path) {
        for p in [&mut self.path, &mut self.i2c_bus].into_iter().flatten() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Checks the table; each error names the field to fix. Nothing is
    /// checked when the display is off.
    pub fn validate(&self) -> Result<(), DisplayConfigError> {
        let invalid = |m: String| Err(DisplayConfigError(m));
        let kind = self.kind;
        let kind_name = kind.name();
        if kind == DisplayKind::Off {
            return Ok(());
        }
        if !(MIN_REFRESH_MS..=MAX_REFRESH_MS).contains(&self.refresh_ms) {
            return invalid(format!(
                "display.refresh_ms must be between {MIN_REFRESH_MS} and {MAX_REFRESH_MS} (got {})",
                self.refresh_ms
            ));
        }
        if kind != DisplayKind::Png {
            for (field, set) in [("width", self.width), ("height", self.height)] {
                if set.is_some() {
                    return invalid(format!(
                        "display.{field} only applies to kind = \"png\"; a {kind_name} display has its own size"
                    ));
                }
            }
        }
        if kind != DisplayKind::Ssd1306 {
            if self.i2c_bus.is_some() {
                return invalid(format!(
                    "display.i2c_bus only applies to kind = \"ssd1306\" (kind is \"{kind_name}\")"
                ));
            }
            if self.i2c_address.is_some() {
                return invalid(format!(
                    "display.i2c_address only applies to kind = \"ssd1306\" (kind is \"{kind_name}\")"
                ));
            }
        }
        match kind {
            DisplayKind::Off => {}
            DisplayKind::Png => {
                if self.path.is_none() {
                    return invalid(
                        "display.path is required for kind = \"png\" (the image file to write)"
                            .into(),
                    );
                }
                for (field, value) in [("width", self.width), ("height", self.height)] {
                    if let Some(v) = value {
                        if !(1..=MAX_PNG_SIDE).contains(&v) {
                            return invalid(format!(
                                "display.{field} must be between 1 and {MAX_PNG_SIDE} (got {v})"
                            ));
                        }
                    }
                }
            }
            DisplayKind::Framebuffer => {
                if !cfg!(unix) {
                    return invalid(
                        "display.kind = \"framebuffer\" is only supported on Linux".into(),
                    );
                }
            }
            DisplayKind::Ssd1306 => {
                if !cfg!(all(feature = "ssd1306", target_os = "linux")) {
                    return invalid(
                        "display.kind = \"ssd1306\" is not available: this agent was built without the `ssd1306` cargo feature (Linux only)".into(),
                    );
                }
                if self.path.is_some() {
                    return invalid(
                        "display.path does not apply to kind = \"ssd1306\"; set display.i2c_bus (default /dev/i2c-1)".into(),
                    );
                }
                if self.effective_layout() != Layout::Mono128x64 {
                    return invalid(
                        "display.layout = \"color\" cannot be shown on kind = \"ssd1306\" (a 128x64 monochrome screen); use \"mono-128x64\"".into(),
                    );
                }
                let address = self.i2c_address();
                if !(0x03..=0x77).contains(&address) {
                    return invalid(format!(
                        "display.i2c_address {address:#04x} is not a valid 7-bit I2C device address (0x03..=0x77; SSD1306 modules use 0x3c or 0x3d)"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DisplayConfig, String> {
        let config: DisplayConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }

    #[test]
    fn empty_table_is_off() {
        let c = parse("").unwrap();
        assert_eq!(c, DisplayConfig::default());
        assert_eq!(c.kind, DisplayKind::Off);
        assert_eq!(c.refresh_ms, 1000);
        // As a table inside a bigger document, too.
        #[derive(Deserialize)]
        struct Outer {
            #[serde(default)]
            display: DisplayConfig,
        }
        let o: Outer = toml::from_str("[display]\n").unwrap();
        assert_eq!(o.display, DisplayConfig::default());
        let o: Outer = toml::from_str("").unwrap();
        assert_eq!(o.display.kind, DisplayKind::Off);
    }

    #[test]
    fn png_defaults_and_sizes() {
        let c = parse("kind = \"png\"\npath = \"/tmp/s.png\"").unwrap();
        assert_eq!(c.effective_layout(), Layout::Color);
        assert_eq!(c.png_size(), (320, 240));
        let c = parse("kind = \"png\"\npath = \"s.png\"\nlayout = \"mono-128x64\"").unwrap();
        assert_eq!(c.effective_layout(), Layout::Mono128x64);
        assert_eq!(c.png_size(), (128, 64));
        let c =
            parse("kind = \"png\"\npath = \"s.png\"\nwidth = 480\nheight = 320\nrefresh_ms = 250")
                .unwrap();
        assert_eq!(c.png_size(), (480, 320));
        assert_eq!(c.refresh_ms, 250);
        let mut c = c;
        c.resolve_relative_to(Path::new("/etc/edgefleet"));
        assert_eq!(c.path.as_deref(), Some(Path::new("/etc/edgefleet/s.png")));
    }

    #[test]
    fn framebuffer_and_ssd1306_defaults() {
        let c = parse("kind = \"framebuffer\"").unwrap();
        assert_eq!(c.framebuffer_path(), PathBuf::from("/dev/fb0"));
        assert_eq!(c.effective_layout(), Layout::Color);
        let c =
            parse("kind = \"framebuffer\"\npath = \"/dev/fb1\"\nlayout = \"mono-128x64\"").unwrap();
        assert_eq!(c.framebuffer_path(), PathBuf::from("/dev/fb1"));
        assert_eq!(c.effective_layout(), Layout::Mono128x64);

        let c: DisplayConfig = toml::from_str("kind = \"ssd1306\"\ni2c_address = 0x3d").unwrap();
        assert_eq!(c.effective_layout(), Layout::Mono128x64);
        assert_eq!(c.i2c_bus(), PathBuf::from("/dev/i2c-1"));
        assert_eq!(c.i2c_address(), 0x3d);
    }

    #[test]
    fn ssd1306_depends_on_the_feature() {
        let result = parse("kind = \"ssd1306\"");
        if cfg!(all(feature = "ssd1306", target_os = "linux")) {
            result.unwrap();
            let err = parse("kind = \"ssd1306\"\nlayout = \"color\"").unwrap_err();
            assert!(err.contains("display.layout"), "{err}");
            let err = parse("kind = \"ssd1306\"\ni2c_address = 0x78").unwrap_err();
            assert!(err.contains("display.i2c_address 0x78"), "{err}");
            let err = parse("kind = \"ssd1306\"\npath = \"/dev/fb0\"").unwrap_err();
            assert!(err.contains("display.path does not apply"), "{err}");
        } else {
            let err = result.unwrap_err();
            assert!(err.contains("without the `ssd1306` cargo feature"), "{err}");
        }
    }

    #[test]
    fn problems_name_the_field() {
        let cases = [
            (
                "kind = \"png\"",
                "display.path is required for kind = \"png\"",
            ),
            (
                "kind = \"png\"\npath = \"a\"\nwidth = 0",
                "display.width must be between 1 and 4096",
            ),
            (
                "kind = \"png\"\npath = \"a\"\nheight = 5000",
                "display.height must be between 1 and 4096",
            ),
            (
                "kind = \"png\"\npath = \"a\"\nrefresh_ms = 0",
                "display.refresh_ms must be between 50 and 3600000",
            ),
            (
                "kind = \"framebuffer\"\nwidth = 100",
                "display.width only applies to kind = \"png\"",
            ),
            (
                "kind = \"png\"\npath = \"a\"\ni2c_bus = \"/dev/i2c-0\"",
                "display.i2c_bus only applies",
            ),
            (
                "kind = \"framebuffer\"\ni2c_address = 60",
                "display.i2c_address only applies",
            ),
            ("kind = \"lcd\"", "unknown variant `lcd`"),
            (
                "kind = \"png\"\nlayout = \"mono\"",
                "unknown variant `mono`",
            ),
            ("kidn = \"png\"", "unknown field `kidn`"),
            ("kind = \"ssd1306\"\ni2c_address = 300", "i2c_address"),
        ];
        for (text, expected) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
        // Off ignores the rest: a display can be switched off without
        // deleting its settings.
        parse("kind = \"off\"\nwidth = 0").unwrap();
    }
}

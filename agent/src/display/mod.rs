//! The on-device status display.
//!
//! The agent fills in a [`StatusView`] (plain data, sent on a `watch`
//! channel); [`run`] draws it on the target chosen in [`DisplayConfig`]:
//! a PNG file, a Linux framebuffer, or an SSD1306 OLED on I2C (with the
//! `ssd1306` feature). Two layouts, both drawn with `embedded-graphics` to
//! any `DrawTarget`: [`draw_mono`] for 128x64 monochrome screens and
//! [`draw_color`] for colour framebuffers of 320x240 and up.
//!
//! Files: `format` (human strings), `mono` / `color` (the layouts),
//! `canvas` (the in-memory frame), `config`, `png_file`, `linux_fb`,
//! `oled` (the targets) and `task` (the redraw loop).

mod canvas;
mod color;
mod config;
pub mod format;
#[cfg(unix)]
mod linux_fb;
mod mono;
#[cfg(all(feature = "ssd1306", target_os = "linux"))]
mod oled;
mod png_file;
mod task;
#[cfg(test)]
mod tests;

pub use canvas::Canvas;
pub use color::draw_color;
pub use config::{DisplayConfig, DisplayConfigError, DisplayKind, Layout};
#[cfg(unix)]
pub use linux_fb::FbGeometry;
pub use mono::draw_mono;
pub use png_file::{encode_color, encode_mono, render_png};
pub use task::run;

/// How the device is connected to its fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Connectivity {
    /// No fleet configured.
    #[default]
    Standalone,
    /// Connected to the broker for `since_secs`.
    Online { since_secs: u64 },
    /// Disconnected for `for_secs`.
    Offline { for_secs: u64 },
}

/// The active model.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelLine {
    pub name: String,
    pub version: u64,
    /// The inference runtime serving it (`tract-onnx`, ...).
    pub runtime: String,
}

/// Everything the status screen shows; the agent fills it in.
///
/// Durations are as of the moment the view is sent: the display adds the
/// time elapsed since then, so the agent need not resend a view just to
/// make "ONLINE 3m" tick.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StatusView {
    /// This device's id; empty when standalone.
    pub device_id: String,
    pub connectivity: Connectivity,
    /// The active model, if any.
    pub model: Option<ModelLine>,
    /// How many models are served.
    pub models_total: usize,
    /// The last inference latency, in microseconds.
    pub last_latency_us: Option<f64>,
    /// Records waiting to be sent.
    pub outbox_backlog: u64,
    /// Age of the oldest waiting record, in seconds.
    pub outbox_oldest_secs: Option<u64>,
    /// A one-line alert shown in a box at the bottom ("update refused: bad
    /// signature", "rolled back digits v3").
    pub alert: Option<String>,
}

impl StatusView {
    /// The view `elapsed_secs` after it was made: connectivity durations
    /// and the outbox age advanced.
    pub fn aged(&self, elapsed_secs: u64) -> StatusView {
        let mut view = self.clone();
        view.connectivity = match view.connectivity {
            Connectivity::Standalone => Connectivity::Standalone,
            Connectivity::Online { since_secs } => Connectivity::Online {
                since_secs: since_secs.saturating_add(elapsed_secs),
            },
            Connectivity::Offline { for_secs } => Connectivity::Offline {
                for_secs: for_secs.saturating_add(elapsed_secs),
            },
        };
        if view.outbox_backlog > 0 {
            view.outbox_oldest_secs = view
                .outbox_oldest_secs
                .map(|s| s.saturating_add(elapsed_secs));
        }
        view
    }
}

/// Why the status display could not be opened or drawn: each names the
/// device or file and what went wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum DisplayError {
    /// This build or configuration has no such display.
    #[error("{0}")]
    Unavailable(&'static str),
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The framebuffer's geometry cannot be used.
    #[error("{0}")]
    Framebuffer(String),
    #[error("cannot encode the status PNG: {0}")]
    Png(#[from] png::EncodingError),
    /// The I2C panel did not answer or take a frame.
    #[error("{0}")]
    Panel(String),
    #[error("the display target panicked: {0}")]
    Panicked(String),
}

/// One place the status is shown. `show` may skip the device write when
/// the picture has not changed; after an error the sink is dropped and
/// opened again later.
trait Sink: Send {
    fn show(&mut self, view: &StatusView) -> Result<(), DisplayError>;
}

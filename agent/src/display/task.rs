//! The display task: redraws when the view changes or a shown duration
//! ticks over, at most once per `refresh_ms`, with the blocking device work
//! on tokio's blocking pool. A failing target is reported once and retried
//! at a slower pace; nothing here takes the agent down.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::{DisplayConfig, DisplayKind, MAX_REFRESH_MS};
use super::png_file::PngSink;
use super::{Connectivity, DisplayError, Sink, StatusView};

/// Shown on the last frame when the agent stops.
pub(super) const STOPPED_ALERT: &str = "agent stopped";
/// How long the last frame may take at shutdown.
const FINAL_FRAME_TIMEOUT: Duration = Duration::from_secs(1);

/// Opens the configured target (blocking).
fn open_sink(config: &DisplayConfig) -> Result<Box<dyn Sink>, DisplayError> {
    let layout = config.effective_layout();
    match config.kind {
        DisplayKind::Off => Err(DisplayError::Unavailable("the display is off")),
        DisplayKind::Png => {
            let Some(path) = config.path.clone() else {
                return Err(DisplayError::Unavailable(
                    "display.path is required for kind = \"png\"",
                ));
            };
            Ok(Box::new(PngSink::new(path, layout, config.png_size())))
        }
        #[cfg(unix)]
        DisplayKind::Framebuffer => Ok(Box::new(super::linux_fb::FramebufferSink::open(
            &config.framebuffer_path(),
            std::path::Path::new("/sys"),
            layout,
        )?)),
        #[cfg(not(unix))]
        DisplayKind::Framebuffer => Err(DisplayError::Unavailable(
            "the framebuffer display is only supported on Linux",
        )),
        #[cfg(all(feature = "ssd1306", target_os = "linux"))]
        DisplayKind::Ssd1306 => Ok(Box::new(super::oled::OledSink::open(
            &config.i2c_bus(),
            config.i2c_address(),
        )?)),
        #[cfg(not(all(feature = "ssd1306", target_os = "linux")))]
        DisplayKind::Ssd1306 => Err(DisplayError::Unavailable(
            "this agent was built without the `ssd1306` feature (Linux only)",
        )),
    }
}

/// `secs` cut to what `format_duration` shows, so that views which look the
/// same compare equal and are not redrawn.
fn shown_secs(secs: u64) -> u64 {
    match secs {
        s if s < 60 => s,
        s if s < 86_400 => s - s % 60,
        s => s - s % 3600,
    }
}

/// `view` with every duration cut to its shown precision.
fn as_shown(view: &StatusView) -> StatusView {
    let mut view = view.clone();
    view.connectivity = match view.connectivity {
        Connectivity::Standalone => Connectivity::Standalone,
        Connectivity::Online { since_secs } => Connectivity::Online {
            since_secs: shown_secs(since_secs),
        },
        Connectivity::Offline { for_secs } => Connectivity::Offline {
            for_secs: shown_secs(for_secs),
        },
    };
    view.outbox_oldest_secs = view.outbox_oldest_secs.map(shown_secs);
    view
}

/// Runs `work` on the blocking pool. `None` when `shutdown` came first (the
/// work then finishes on its own); a panic in `work` becomes an error.
async fn blocking<T: Send + 'static>(
    shutdown: &CancellationToken,
    work: impl FnOnce() -> Result<T, DisplayError> + Send + 'static,
) -> Option<Result<T, DisplayError>> {
    let handle = tokio::task::spawn_blocking(work);
    tokio::select! {
        _ = shutdown.cancelled() => None,
        joined = handle => Some(match joined {
            Ok(result) => result,
            Err(e) => Err(DisplayError::Panicked(e.to_string())),
        }),
    }
}

/// One attempt: opens the target if needed, then shows `view`. The sink
/// comes back when it worked; after an error it is dropped.
fn attempt(
    sink: Option<Box<dyn Sink>>,
    config: &DisplayConfig,
    view: StatusView,
) -> Result<Box<dyn Sink>, DisplayError> {
    let mut sink = match sink {
        Some(sink) => sink,
        None => open_sink(config)?,
    };
    sink.show(&view)?;
    Ok(sink)
}

/// Shows `view` on the configured display until `shutdown`: redraws when
/// the view changes, at most once per `refresh_ms`, and when a shown
/// duration ("ONLINE 3m", the outbox age) ticks over. Returns at once when
/// the display is off or the config is invalid (logged). A failing target
/// is logged once and retried every `5 * refresh_ms` (at most a minute).
/// At shutdown the last frame says "agent stopped".
pub async fn run(
    config: DisplayConfig,
    mut view: watch::Receiver<StatusView>,
    shutdown: CancellationToken,
) {
    if config.kind == DisplayKind::Off {
        return;
    }
    if let Err(e) = config.validate() {
        tracing::warn!(error = %e, "status display disabled");
        return;
    }
    let kind = config.kind.name();
    let config = std::sync::Arc::new(config);
    let refresh = Duration::from_millis(config.refresh_ms.clamp(1, MAX_REFRESH_MS));
    let retry = (refresh * 5).min(Duration::from_secs(60));

    let mut sink: Option<Box<dyn Sink>> = None;
    let mut failing = false;
    let mut current = view.borrow_and_update().clone();
    let mut received = Instant::now();
    let mut view_open = true;
    let mut last_shown: Option<StatusView> = None;
    let mut last_attempt: Option<Instant> = None;

    loop {
        let now = Instant::now();
        let shown = as_shown(&current.aged(now.duration_since(received).as_secs()));
        let interval = if failing { retry } else { refresh };
        let due_at = last_attempt.map(|t| t + interval);
        let wanted = failing || last_shown.as_ref() != Some(&shown);
        if wanted && due_at.is_none_or(|due| now >= due) {
            last_attempt = Some(now);
            let cfg = config.clone();
            let frame = shown.clone();
            let previous = sink.take();
            match blocking(&shutdown, move || attempt(previous, &cfg, frame)).await {
                None => return,
                Some(Ok(s)) => {
                    sink = Some(s);
                    last_shown = Some(shown);
                    if failing {
                        tracing::info!(display = %kind, "status display working again");
                        failing = false;
                    }
                }
                Some(Err(e)) => {
                    last_shown = None;
                    if !failing {
                        tracing::warn!(
                            display = %kind,
                            error = %format!("{e:#}"),
                            "status display failed; retrying every {}s",
                            retry.as_secs_f32()
                        );
                        failing = true;
                    }
                }
            }
            continue;
        }
        // Sleep until the attempt is due, or until the next tick when there
        // is nothing to draw; a new view wakes the loop early.
        let deadline = match due_at {
            Some(due) if wanted => due,
            _ => now + refresh,
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(deadline) => {}
            changed = view.changed(), if view_open => match changed {
                Ok(()) => {
                    current = view.borrow_and_update().clone();
                    received = Instant::now();
                }
                Err(_) => view_open = false,
            },
        }
    }

    // Leave a frame that does not claim the agent is still running.
    if let (Some(sink), false) = (sink, failing) {
        let mut last = as_shown(&current.aged(received.elapsed().as_secs()));
        last.alert = Some(STOPPED_ALERT.to_string());
        let cfg = config.clone();
        let work = tokio::task::spawn_blocking(move || attempt(Some(sink), &cfg, last));
        if let Ok(Ok(Err(e))) = tokio::time::timeout(FINAL_FRAME_TIMEOUT, work).await {
            tracing::debug!(error = %format!("{e:#}"), "cannot draw the last status frame");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::display::format::format_duration;
    use crate::display::{render_png, Layout};
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    #[test]
    fn shown_precision_keeps_the_text() {
        for secs in (0..200_000).step_by(7).chain([u64::MAX, u64::MAX - 3599]) {
            assert_eq!(
                format_duration(shown_secs(secs)),
                format_duration(secs),
                "{secs}"
            );
        }
        assert_eq!(shown_secs(125), 120);
        assert_eq!(shown_secs(90_061), 90_000);
    }

    #[test]
    fn views_age() {
        let view = StatusView {
            connectivity: Connectivity::Online { since_secs: 10 },
            outbox_backlog: 3,
            outbox_oldest_secs: Some(5),
            ..StatusView::default()
        };
        let aged = view.aged(60);
        assert_eq!(aged.connectivity, Connectivity::Online { since_secs: 70 });
        assert_eq!(aged.outbox_oldest_secs, Some(65));
        let offline = StatusView {
            connectivity: Connectivity::Offline { for_secs: u64::MAX },
            outbox_oldest_secs: Some(5),
            ..StatusView::default()
        };
        let aged = offline.aged(1);
        assert_eq!(
            aged.connectivity,
            Connectivity::Offline { for_secs: u64::MAX }
        );
        // Nothing waiting: a stale age is left alone.
        assert_eq!(aged.outbox_oldest_secs, Some(5));
        assert_eq!(StatusView::default().aged(100), StatusView::default());
    }

    fn png_config(path: &Path, refresh_ms: u64) -> DisplayConfig {
        DisplayConfig {
            kind: DisplayKind::Png,
            path: Some(path.to_path_buf()),
            layout: Some(Layout::Mono128x64),
            refresh_ms,
            ..DisplayConfig::default()
        }
    }

    /// Waits up to `secs` for `path` to hold exactly `expected`.
    async fn wait_for_file(path: &Path, expected: &[u8], secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if std::fs::read(path).ok().as_deref() == Some(expected) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never showed the expected frame",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn mono(view: &StatusView) -> Vec<u8> {
        render_png(view, Layout::Mono128x64, 128, 64)
    }

    #[tokio::test]
    async fn redraws_on_change_and_leaves_a_stopped_frame() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.png");
        let first = StatusView {
            device_id: "pi-1".into(),
            ..StatusView::default()
        };
        let (tx, rx) = watch::channel(first.clone());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(png_config(&path, 50), rx, shutdown.clone()));
        wait_for_file(&path, &mono(&first), 5).await;

        let second = StatusView {
            model: Some(crate::display::ModelLine {
                name: "digits".into(),
                version: 3,
                runtime: "tract-onnx".into(),
            }),
            ..first.clone()
        };
        tx.send(second.clone()).unwrap();
        wait_for_file(&path, &mono(&second), 5).await;

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the display task stops on shutdown")
            .unwrap();
        let stopped = StatusView {
            alert: Some(STOPPED_ALERT.into()),
            ..second
        };
        assert_eq!(std::fs::read(&path).unwrap(), mono(&stopped));
    }

    #[tokio::test]
    async fn durations_tick_without_a_new_view() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.png");
        let view = StatusView {
            connectivity: Connectivity::Online { since_secs: 59 },
            ..StatusView::default()
        };
        let (_tx, rx) = watch::channel(view.clone());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(png_config(&path, 50), rx, shutdown.clone()));
        wait_for_file(&path, &mono(&view), 5).await;
        wait_for_file(&path, &mono(&view.aged(1)), 5).await;
        shutdown.cancel();
        task.await.unwrap();
    }

    /// Collects what tracing writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    #[tokio::test]
    async fn a_failing_target_warns_once_and_recovers() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let dir = tempfile::tempdir().unwrap();
        let missing_dir = dir.path().join("later");
        let path = missing_dir.join("status.png");
        let view = StatusView::default();
        let (_tx, rx) = watch::channel(view.clone());
        let shutdown = CancellationToken::new();
        // Retries every 5 * 50 ms.
        let task = tokio::spawn(run(png_config(&path, 50), rx, shutdown.clone()));
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!task.is_finished());
        let log = captured.text();
        assert_eq!(log.matches("status display failed").count(), 1, "{log}");
        assert!(log.contains("WARN"), "{log}");
        assert!(
            log.contains("status.png"),
            "the error names the file: {log}"
        );

        std::fs::create_dir(&missing_dir).unwrap();
        wait_for_file(&path, &mono(&view), 5).await;
        assert!(captured.text().contains("status display working again"));
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn off_and_invalid_configs_return_at_once() {
        let (_tx, rx) = watch::channel(StatusView::default());
        let shutdown = CancellationToken::new();
        run(DisplayConfig::default(), rx.clone(), shutdown.clone()).await;
        let invalid = DisplayConfig {
            kind: DisplayKind::Png,
            ..DisplayConfig::default()
        };
        run(invalid, rx, shutdown).await;
    }

    #[tokio::test]
    async fn a_dropped_sender_keeps_the_last_view() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.png");
        let view = StatusView {
            device_id: "gone".into(),
            ..StatusView::default()
        };
        let (tx, rx) = watch::channel(view.clone());
        drop(tx);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(png_config(&path, 50), rx, shutdown.clone()));
        wait_for_file(&path, &mono(&view), 5).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!task.is_finished());
        shutdown.cancel();
        task.await.unwrap();
    }
}

//! systemd's service notification protocol, by hand (a datagram to
//! `$NOTIFY_SOCKET`; no library needed): `READY=1` once the local API
//! listens, `STOPPING=1` on shutdown, and `WATCHDOG=1` every half of
//! `$WATCHDOG_USEC` while the runtime still schedules work. Outside systemd
//! (no `NOTIFY_SOCKET`) every call does nothing.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends one notification; errors are logged, never fatal.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| -> std::io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket (the usual case).
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            socket.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(error = %e, state, "cannot notify systemd");
    }
}

/// How often to feed the watchdog: half of `$WATCHDOG_USEC`, when systemd
/// asks for it (and asks this process: `$WATCHDOG_PID`).
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Feeds the watchdog until `shutdown`. It runs on the agent's runtime, so
/// a runtime that stops scheduling tasks stops feeding it.
pub async fn feed_watchdog(shutdown: tokio_util::sync::CancellationToken) {
    let Some(every) = watchdog_interval() else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => notify("WATCHDOG=1"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real datagram socket stands in for systemd's.
    #[test]
    fn notifications_reach_the_socket_in_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // The variables are process-wide: this is the only test that sets them.
        std::env::set_var("NOTIFY_SOCKET", &path);
        std::env::set_var("WATCHDOG_USEC", "4000000");
        std::env::remove_var("WATCHDOG_PID");
        notify("READY=1");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert_eq!(watchdog_interval(), Some(Duration::from_secs(2)));
        std::env::set_var("WATCHDOG_PID", "1");
        assert_eq!(
            watchdog_interval(),
            None,
            "the watchdog is another process's"
        );
        std::env::remove_var("NOTIFY_SOCKET");
        std::env::remove_var("WATCHDOG_USEC");
        std::env::remove_var("WATCHDOG_PID");
        notify("READY=1");
    }
}

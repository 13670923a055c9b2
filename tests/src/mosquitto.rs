//! A Mosquitto of a test's own (the Debian binary this machine kind has),
//! locked down with the password file and ACL `fleetctl broker mosquitto`
//! writes: before the server exists only the server's user may connect.
//!
//! Mosquitto cannot listen on a TCP port the OS picks, so it listens on a
//! Unix socket in the test's dir, and a [`Proxy`] on an OS-assigned
//! loopback port carries TCP clients to it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::proxy::{Proxy, Upstream};
use crate::{expect_success, wait_for, Proc, Server};

/// The server's user and password on it.
pub const SERVER_USER: &str = "edgefleet-server";
pub const SERVER_PASSWORD: &str = "server-secret";

/// A running Mosquitto of one test.
pub struct Mosquitto {
    pub proc: Proc,
    /// The loopback TCP port clients connect to.
    pub port: u16,
    pub conf_dir: PathBuf,
    /// Carries TCP connections on `port` to the broker's socket.
    _front: Proxy,
}

impl Mosquitto {
    /// Starts a broker, reached on a loopback port of its own, that only
    /// the server's user may use, until [`Mosquitto::allow_enrolled`].
    pub async fn start_locked(dir: &Path) -> anyhow::Result<Self> {
        let mosquitto = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .ok_or_else(|| {
                anyhow::anyhow!("mosquitto not installed (Debian: apt-get install mosquitto)")
            })?;
        let conf_dir = dir.join("mosquitto");
        std::fs::create_dir_all(&conf_dir)?;
        std::fs::write(
            conf_dir.join("passwords"),
            format!(
                "{SERVER_USER}:{}\n",
                fleet_server::auth::mosquitto_hash(SERVER_PASSWORD)
            ),
        )?;
        std::fs::write(
            conf_dir.join("acl"),
            format!("user {SERVER_USER}\ntopic readwrite #\n"),
        )?;
        let socket = conf_dir.join("mosquitto.sock");
        std::fs::write(
            conf_dir.join("mosquitto.conf"),
            format!(
                // Run as root, it would drop to the mosquitto user and could
                // not re-read the private (0600, root's) password file on
                // SIGHUP; an operator gives the files to that user instead.
                "user root\nlistener 0 {socket}\nallow_anonymous false\npassword_file {0}/passwords\nacl_file {0}/acl\npersistence false\nlog_dest stderr\n",
                conf_dir.display(),
                socket = socket.display(),
            ),
        )?;
        let mut cmd = std::process::Command::new(mosquitto);
        cmd.arg("-c").arg(conf_dir.join("mosquitto.conf"));
        let proc = Proc::spawn(cmd, dir.join("mosquitto.log"))?;
        wait_for("mosquitto listening", Duration::from_secs(5), || async {
            tokio::net::UnixStream::connect(&socket)
                .await
                .ok()
                .map(drop)
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}; log:\n{}", proc.log_text()))?;
        let front = Proxy::start_to(Upstream::Unix(socket)).await?;
        Ok(Self {
            proc,
            port: front.addr.port(),
            conf_dir,
            _front: front,
        })
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The `fleet-server serve` arguments for a server on this broker.
    pub fn server_args() -> [&'static str; 4] {
        [
            "--broker-user",
            SERVER_USER,
            "--broker-password",
            SERVER_PASSWORD,
        ]
    }

    /// Writes the password file and ACL for the fleet's enrolled, unrevoked
    /// devices (`fleetctl broker mosquitto`) and makes the broker re-read
    /// them (SIGHUP).
    pub async fn allow_enrolled(&self, server: &Server) -> anyhow::Result<()> {
        let out = server.ctl(&[
            "broker",
            "mosquitto",
            "--out",
            self.conf_dir.to_str().unwrap_or_default(),
            "--server-user",
            SERVER_USER,
            "--server-password",
            SERVER_PASSWORD,
        ]);
        expect_success(&out, "broker mosquitto");
        let hup = std::process::Command::new("kill")
            .args(["-HUP", &self.proc.child.id().to_string()])
            .status()?;
        anyhow::ensure!(hup.success(), "cannot signal mosquitto");
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(())
    }
}

//! Harness for fleetctl's tests: a real `fleet-server` on free ports in a
//! temp dir (keys made by `fleetctl keys init`, its first admin token in
//! its data dir), and the real `fleetctl` binary run against it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context};

/// The `fleetctl` under test.
pub fn fleetctl_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fleetctl"))
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("fleetctl/ has a parent")
        .to_path_buf()
}

/// The `fleet-server` binary beside fleetctl in the target dir, built
/// once if it is not there (cargo builds only this package's binaries
/// for its tests).
fn server_binary() -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<bool> = OnceLock::new();
    let path =
        fleetctl_binary().with_file_name(format!("fleet-server{}", std::env::consts::EXE_SUFFIX));
    if !path.exists() {
        let ok = *BUILT.get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            Command::new(cargo)
                .current_dir(repo_root())
                .args(["build", "-p", "fleet-server", "--bin", "fleet-server"])
                .status()
                .is_ok_and(|s| s.success())
        });
        if !ok || !path.exists() {
            bail!("{} is missing and building it failed", path.display());
        }
    }
    Ok(path)
}

/// A `fleetctl` command with no settings from the environment.
pub fn fleetctl() -> Command {
    let mut cmd = Command::new(fleetctl_binary());
    cmd.env_remove("FLEETCTL_SERVER")
        .env_remove("EDGEFLEET_TOKEN")
        .env_remove("FLEETCTL_CA_CERT")
        .env_remove("EDGEFLEET_BROKER_PASSWORD");
    cmd
}

/// A running fleet server, killed when dropped.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Where the server wrote its first admin token.
    pub token_file: PathBuf,
}

impl Server {
    /// Starts a server with its embedded broker, on port 0 for HTTP and
    /// MQTT, and waits for its "fleet server ready" line.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let keys = dir.join("keys");
        let out = fleetctl()
            .args(["keys", "init", "--dir"])
            .arg(&keys)
            .output()?;
        if !out.status.success() {
            bail!("keys init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let data = dir.join("server");
        let mut child = Command::new(server_binary()?)
            .arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .arg("--keys-dir")
            .arg(&keys)
            .args(["--http", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0"])
            .env("EDGEFLEET_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start fleet-server")?;
        let stderr = child
            .stderr
            .take()
            .context("the server's stderr is piped")?;
        let (ready, address) = mpsc::channel();
        let log_path = dir.join("server.log");
        // Reads the log to its end (a full pipe would stall the server),
        // keeping a copy for failures.
        std::thread::spawn(move || {
            let mut log = std::fs::File::create(log_path).ok();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(log) = log.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(log, "{line}");
                }
                if let Some(addr) = ready_address(&line) {
                    let _ = ready.send(addr);
                }
            }
        });
        let server = |child| Self {
            child,
            url: String::new(),
            token_file: data.join("admin.token"),
        };
        let mut started = server(child);
        match address.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => started.url = format!("http://{addr}"),
            Err(_) => {
                let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
                bail!("the fleet server did not get ready; its log:\n{log}");
            }
        }
        Ok(started)
    }

    /// `fleetctl --server URL --token-file ADMIN ARGS...`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        fleetctl()
            .arg("--server")
            .arg(&self.url)
            .arg("--token-file")
            .arg(&self.token_file)
            .args(args)
            .output()
            .expect("run fleetctl")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The HTTP address of a "fleet server ready http=ADDR ..." log line.
fn ready_address(line: &str) -> Option<String> {
    let rest = &line[line.find("fleet server ready")?..];
    let field = rest
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))?;
    Some(field.to_string())
}

/// Standard output, as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Standard error, as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a run succeeded, showing its stderr if not.
pub fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "fleetctl {what} failed ({}): {}",
        out.status,
        stderr(out)
    );
}

//! A child process of a test (server, agent, broker, simulator): its output
//! goes to a log file the test can read and show on failure, and it dies
//! with the test's handle on it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// A child process killed when dropped, with its log kept for failures.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr into `log` (created anew) and
    /// debug logging on, unless `cmd` sets its own `EDGEFLEET_LOG`.
    pub fn spawn(mut cmd: Command, log: PathBuf) -> anyhow::Result<Self> {
        let file = std::fs::File::create(&log)?;
        if cmd.get_envs().all(|(k, _)| k != "EDGEFLEET_LOG") {
            cmd.env("EDGEFLEET_LOG", "debug,hyper=info,reqwest=info");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("spawn {cmd:?}"))?;
        Ok(Self { child, log })
    }

    /// Everything the process wrote so far (empty if the log is unreadable).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait up to `grace` for a clean exit.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        // A blocking wait: callers hold no runtime work that this delays
        // beyond the grace period.
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

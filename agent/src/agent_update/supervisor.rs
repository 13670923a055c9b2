//! The supervisor: what `edgefleet-agent run` is. It binds the local API
//! socket once (or takes it from systemd's socket activation), then runs
//! the agent as a child process: the executable of the active slot, or
//! itself, the packaged executable, when no release is installed. The
//! child serves on the inherited socket, so connections made while one
//! agent process stops and the next starts wait in the socket's backlog
//! instead of failing.
//!
//! The supervisor is the part of the agent a release cannot replace, so it
//! is the one that judges a release on trial ([`AgentState`]): it counts
//! the release's starts and goes back to the previous one after a crash
//! loop, when its executable cannot start, or when it has not reached the
//! fleet server by the deadline (stopping it first). It is plain `std`
//! code, no async runtime, and idles in a 200 ms wait loop.

// Signal handling, descriptor passing and the child's death signal are
// system calls std does not wrap (libc); each block says why it is sound.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use super::state::{AgentState, Slot, TrialLimits};
use super::{ENV_FACTORY_EXE, ENV_LISTEN_FD, ENV_SUPERVISED, EXIT_SWITCH};
use crate::config::AgentConfig;

/// The signal that asked the supervisor to stop (0: none yet).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(signal: libc::c_int) {
    STOP_SIGNAL.store(signal, Ordering::SeqCst);
}

/// The descriptor number the child finds the listening socket at (the
/// first one systemd's socket activation uses too).
const CHILD_LISTEN_FD: RawFd = 3;

/// How long a child has to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(20);

/// How supervision ended.
pub enum Outcome {
    /// The supervisor stopped (asked to, or it could not go on).
    Exit(ExitCode),
    /// This executable cannot start a child of itself (under qemu-user
    /// without binfmt_misc, for one): the agent runs in this process on
    /// the socket (as [`ENV_LISTEN_FD`] says), without self-updates.
    Unsupervised,
}

/// Runs the agent under supervision until SIGTERM or SIGINT.
pub fn run(config_path: &Path, config: &AgentConfig) -> Outcome {
    let listener = match listening_socket(&config.api.socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("edgefleet-agent: {e}");
            return Outcome::Exit(ExitCode::FAILURE);
        }
    };
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe {
            libc::signal(
                signal,
                on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
    let factory = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let limits = super::trial_limits(&config.update);
    let supervisor = Supervisor {
        config_path: config_path.to_path_buf(),
        data_dir: config.data_dir.clone(),
        factory,
        listen_fd: listener.as_raw_fd(),
        limits,
    };
    // Under systemd (Type=notify): the socket listens; requests wait in
    // its backlog until the agent child serves them.
    crate::systemd::notify("READY=1");
    match supervisor.run() {
        Some(code) => Outcome::Exit(code),
        None => {
            // The descriptor stays open for the agent in this process.
            let fd = std::os::fd::IntoRawFd::into_raw_fd(listener);
            // No other thread runs yet (no runtime, no child): nothing
            // reads the environment concurrently.
            std::env::set_var(ENV_LISTEN_FD, fd.to_string());
            for signal in [libc::SIGTERM, libc::SIGINT] {
                // SAFETY: restores the default disposition; the agent's
                // runtime installs its own handlers.
                unsafe {
                    libc::signal(signal, libc::SIG_DFL);
                }
            }
            Outcome::Unsupervised
        }
    }
}

/// The listening socket: systemd's (socket activation) or a new one.
fn listening_socket(path: &Path) -> Result<std::os::fd::OwnedFd, crate::api::server::BindError> {
    use std::os::fd::FromRawFd;
    let pid_matches = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let fds: u32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if pid_matches && fds >= 1 {
        tracing::info!("local API socket from systemd (socket activation)");
        // SAFETY: systemd passes the listening socket as descriptor 3 to
        // this process (LISTEN_PID), and nothing else owns it.
        return Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(CHILD_LISTEN_FD) });
    }
    let listener = crate::api::bind_unix_std(path)?;
    tracing::info!(socket = %path.display(), "local API listening (supervisor)");
    Ok(listener.into())
}

struct Supervisor {
    config_path: PathBuf,
    data_dir: PathBuf,
    /// The packaged executable: this one.
    factory: PathBuf,
    listen_fd: RawFd,
    limits: TrialLimits,
}

/// How a child ended.
enum Ended {
    /// It switched to a new release: start that one now.
    Switch,
    /// It stopped because the supervisor was asked to stop.
    Stopped,
    /// It exited or was killed otherwise.
    Crashed(String),
    /// The supervisor stopped it: its trial is over.
    GivenUp(String),
}

impl Supervisor {
    /// Whether this executable can start a copy of itself: it must answer
    /// `--version` as this build. Under qemu-user without binfmt_misc the
    /// kernel refuses the foreign executable, and some C libraries then
    /// hand it to `/bin/sh`, which fails on it in its own way.
    fn can_start_itself(&self) -> bool {
        let answer = Command::new(&self.factory)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output();
        match answer {
            Ok(out) => {
                out.status.success()
                    && String::from_utf8_lossy(&out.stdout)
                        .trim()
                        .ends_with(env!("CARGO_PKG_VERSION"))
            }
            Err(_) => false,
        }
    }

    /// Supervises until asked to stop; `None` when the packaged
    /// executable cannot be started at all (see [`Outcome::Unsupervised`]).
    fn run(&self) -> Option<ExitCode> {
        if !self.can_start_itself() {
            tracing::error!(exe = %self.factory.display(), "this executable cannot start a copy of itself; running the agent in this process, without self-updates");
            return None;
        }
        let mut backoff = Duration::from_secs(1);
        loop {
            if STOP_SIGNAL.load(Ordering::SeqCst) != 0 {
                return Some(ExitCode::SUCCESS);
            }
            let slot = self.launch();
            let started = Instant::now();
            let ended = match self.spawn(slot) {
                Ok(child) => self.watch(child),
                Err(e) if slot.is_none() => {
                    tracing::error!(error = %e, exe = %self.factory.display(), "cannot start the agent as a child of its supervisor; running it in this process, without self-updates");
                    return None;
                }
                Err(e) => Ended::Crashed(format!("cannot start: {e}")),
            };
            match ended {
                Ended::Switch => {
                    tracing::info!("agent switched release; starting it");
                    backoff = Duration::from_secs(1);
                    continue;
                }
                Ended::Stopped => return Some(ExitCode::SUCCESS),
                Ended::GivenUp(reason) => {
                    self.roll_back(&reason);
                    continue;
                }
                Ended::Crashed(reason) => {
                    tracing::error!(slot = slot.map_or("factory", Slot::as_str), %reason, "agent stopped unexpectedly; restarting it");
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                backoff = Duration::from_secs(1);
            }
            if self.sleep(backoff) {
                return Some(ExitCode::SUCCESS);
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    /// Decides what to start, counting the start of a release on trial.
    fn launch(&self) -> Option<Slot> {
        let mut state = match AgentState::load(&self.data_dir) {
            Ok(state) => state,
            Err(e) => {
                tracing::error!(error = %e, "agent state unreadable; starting the packaged agent");
                return None;
            }
        };
        let before = state.clone();
        if state.yield_to_newer_package(env!("CARGO_PKG_VERSION")) {
            tracing::info!(
                package = env!("CARGO_PKG_VERSION"),
                release = ?before.release(),
                "the packaged agent is newer than the installed release; running it"
            );
        }
        let mut launch = state.launch(&self.limits, edgefleet_shared::unix_now());
        if let Some(slot) = launch.slot {
            let exe = AgentState::executable(&self.data_dir, slot);
            if !exe.is_file() {
                let reason = format!("its executable {} is missing", exe.display());
                if state.trial.is_some() {
                    state.roll_back(reason, edgefleet_shared::unix_now());
                    launch.slot = state.active.as_ref().map(|i| i.slot);
                } else {
                    tracing::error!(%reason, "the active release cannot start; starting the packaged agent");
                    launch.slot = None;
                }
            }
        }
        if state != before {
            if let Err(e) = state.save(&self.data_dir) {
                tracing::error!(error = %e, "cannot save the agent state");
            }
        }
        if let Some(reason) = &launch.rolled_back {
            tracing::error!(%reason, release = ?state.release(), "agent release given up; the previous one runs again");
        }
        launch.slot
    }

    fn roll_back(&self, reason: &str) {
        let Ok(mut state) = AgentState::load(&self.data_dir) else {
            return;
        };
        if state
            .roll_back(reason.to_string(), edgefleet_shared::unix_now())
            .is_some()
        {
            tracing::error!(%reason, release = ?state.release(), "agent release given up; the previous one runs again");
            if let Err(e) = state.save(&self.data_dir) {
                tracing::error!(error = %e, "cannot save the agent state");
            }
        }
    }

    fn spawn(&self, slot: Option<Slot>) -> std::io::Result<Child> {
        let exe = match slot {
            Some(slot) => AgentState::executable(&self.data_dir, slot),
            None => self.factory.clone(),
        };
        let mut command = Command::new(&exe);
        command
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env(ENV_SUPERVISED, slot.map_or("factory", Slot::as_str))
            .env(ENV_LISTEN_FD, CHILD_LISTEN_FD.to_string())
            .env(ENV_FACTORY_EXE, &self.factory)
            // systemd's watchdog is fed by the child (NotifyAccess=all).
            .env_remove("WATCHDOG_PID")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_FDNAMES");
        let fd = self.listen_fd;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // dup2 leaves the new descriptor without close-on-exec.
                if fd != CHILD_LISTEN_FD && libc::dup2(fd, CHILD_LISTEN_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if fd == CHILD_LISTEN_FD {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                }
                // The child goes with the supervisor (a SIGKILL to it must
                // not leave an agent running unsupervised).
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        tracing::info!(exe = %exe.display(), slot = slot.map_or("factory", Slot::as_str), "starting agent");
        command.spawn()
    }

    /// Waits for `child` to end, forwarding a stop request and stopping
    /// a release on trial that missed its deadline.
    fn watch(&self, mut child: Child) -> Ended {
        // What the supervisor ran to start (config parsing, logging set-up)
        // is not needed while it waits: give the pages back. Its child
        // maps the same executable, and a page two processes map cannot
        // be paged out: the supervisor unmaps its copies, so the agent
        // can page out its own start-up code.
        crate::trim::release_free_heap();
        crate::trim::unmap_clean_code();
        let mut next_check = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    return match status.code() {
                        Some(EXIT_SWITCH) => Ended::Switch,
                        _ if STOP_SIGNAL.load(Ordering::SeqCst) != 0 => Ended::Stopped,
                        // A service never ends on its own.
                        Some(0) => Ended::Crashed("exited without being asked to".into()),
                        Some(code) => Ended::Crashed(format!("exited with status {code}")),
                        None => Ended::Crashed(format!(
                            "killed by signal {}",
                            status.signal().unwrap_or(0)
                        )),
                    };
                }
                Ok(None) => {}
                Err(e) => return Ended::Crashed(format!("cannot wait for it: {e}")),
            }
            let signal = STOP_SIGNAL.load(Ordering::SeqCst);
            if signal != 0 {
                crate::systemd::notify("STOPPING=1");
                stop(&mut child, signal);
                return Ended::Stopped;
            }
            if Instant::now() >= next_check {
                next_check = Instant::now() + Duration::from_secs(1);
                if let Some(reason) = self.overdue() {
                    tracing::error!(%reason, "stopping the agent release on trial");
                    stop(&mut child, libc::SIGTERM);
                    return Ended::GivenUp(reason);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Why the running release on trial must be given up now, if it must:
    /// only its deadline counts while it runs.
    fn overdue(&self) -> Option<String> {
        let state = AgentState::load(&self.data_dir).ok()?;
        let limits = TrialLimits {
            max_starts: u32::MAX,
            ..self.limits
        };
        state.trial_verdict(&limits, edgefleet_shared::unix_now())
    }

    /// Sleeps `for_how_long`; true if a stop was asked for meanwhile.
    fn sleep(&self, for_how_long: Duration) -> bool {
        let until = Instant::now() + for_how_long;
        while Instant::now() < until {
            if STOP_SIGNAL.load(Ordering::SeqCst) != 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

/// Sends `signal` to `child`, waits up to [`STOP_GRACE`], then kills it.
fn stop(child: &mut Child, signal: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
    let until = Instant::now() + STOP_GRACE;
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::warn!("agent did not stop within {STOP_GRACE:?}; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

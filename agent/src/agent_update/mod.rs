//! The agent updates itself: a signed release (the `agent` slot of the
//! desired state, one build per target triple) is downloaded and verified
//! like a model, installed into the free one of two slots in the data dir,
//! made to pass a self-test, and only then switched to. The switch is a
//! restart under the [`supervisor`], which holds the local API socket
//! across it and judges the new release on trial: it must reach the fleet
//! server by a deadline and then run through a soak, or the supervisor
//! goes back to the previous release by itself ([`state`]).
//!
//! This module holds what the agent process does about it: which
//! executable it is ([`Identity`]), installing and self-testing a release
//! ([`install`]), and watching its own trial ([`watch_trial`]).

pub mod install;
pub mod self_test;
pub mod state;
pub mod supervisor;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use edgefleet_shared::{AgentStatus, EventKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::report::Reporter;
use crate::uplink::LinkState;
use state::{AgentState, Slot, TrialLimits};

/// The target triple this executable was built for: which build of a
/// release it takes.
pub const TARGET: &str = env!("EDGEFLEET_TARGET");

/// The exit status with which an agent asks its supervisor to start the
/// release it has just switched to.
pub const EXIT_SWITCH: i32 = 75;

/// Set by the supervisor for its child: `a`, `b` or `factory`.
pub const ENV_SUPERVISED: &str = "EDGEFLEET_SUPERVISED";
/// The descriptor of the listening API socket the child inherits.
pub const ENV_LISTEN_FD: &str = "EDGEFLEET_LISTEN_FD";
/// The packaged executable (whose package holds the native libraries).
pub use crate::engine::runtimes::ENV_FACTORY_EXE;

static SWITCH_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Whether the agent stopped to switch to a new release (its process
/// then exits with [`EXIT_SWITCH`]).
pub fn switch_requested() -> bool {
    SWITCH_REQUESTED.load(Ordering::SeqCst)
}

/// Which executable this process is, as its supervisor started it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Started by the supervisor (`edgefleet-agent run`): it can switch.
    pub supervised: bool,
    /// The slot it runs from; `None`: the packaged executable.
    pub slot: Option<Slot>,
    /// The release it is, from the agent state (`None`: the packaged
    /// executable).
    pub release: Option<String>,
}

impl Identity {
    /// Reads the supervisor's environment and the agent state.
    pub fn detect(data_dir: &Path) -> Self {
        let Ok(supervised) = std::env::var(ENV_SUPERVISED) else {
            return Self {
                supervised: false,
                slot: None,
                release: None,
            };
        };
        let slot = Slot::parse(&supervised);
        let release = slot.and_then(|slot| {
            let state = AgentState::load(data_dir).ok()?;
            state.active.filter(|i| i.slot == slot).map(|i| i.release)
        });
        Self {
            supervised: true,
            slot,
            release,
        }
    }

    /// What the status message says about the agent.
    pub fn status(&self) -> AgentStatus {
        AgentStatus {
            target: TARGET.into(),
            release: self.release.clone(),
        }
    }
}

/// The limits a new release's trial runs under (`[update]`).
pub fn trial_limits(update: &crate::config::UpdateConfig) -> TrialLimits {
    TrialLimits {
        max_starts: update.agent_max_starts,
        report_deadline_secs: update.agent_report_deadline_secs,
        soak_secs: update.agent_soak_secs,
    }
}

/// The listening socket the supervisor passed, if it passed one.
#[allow(unsafe_code)]
pub fn inherited_listener() -> Option<std::os::unix::net::UnixListener> {
    use std::os::fd::FromRawFd;
    let fd: i32 = std::env::var(ENV_LISTEN_FD).ok()?.parse().ok()?;
    // SAFETY: the supervisor put a listening socket at this descriptor
    // for this process alone, and nothing else here owns it.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    // Not inherited by this process's own children (probes, self-tests).
    // SAFETY: fcntl on a descriptor this process owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
    }
    Some(listener)
}

/// Stops the agent so that its supervisor starts the release just
/// switched to.
pub fn request_switch(shutdown: &CancellationToken) {
    SWITCH_REQUESTED.store(true, Ordering::SeqCst);
    shutdown.cancel();
}

/// Reports a rollback the supervisor made, then watches this release's
/// trial: once the fleet server has stored a message from it, it is
/// reported; after the soak it is confirmed. Runs until `shutdown`.
pub async fn watch_trial(
    data_dir: PathBuf,
    identity: Identity,
    limits: TrialLimits,
    reporter: Reporter,
    mut link: watch::Receiver<LinkState>,
    shutdown: CancellationToken,
) {
    let load = || AgentState::load(&data_dir);
    let Ok(mut state) = load() else { return };
    if let Some(note) = state.rollback.take() {
        reporter.agent_event(
            EventKind::RolledBack,
            None,
            &note.from,
            Some(format!(
                "{} (running {} again)",
                note.reason,
                note.to.as_deref().unwrap_or("the packaged agent")
            )),
        );
        if let Err(e) = state.save(&data_dir) {
            tracing::error!(error = %e, "cannot save the agent state");
        }
    }
    let on_trial = |state: &AgentState| {
        state.trial.is_some()
            && identity.slot.is_some()
            && state.active.as_ref().map(|i| i.slot) == identity.slot
    };
    if !on_trial(&state) {
        return;
    }
    let release = identity.release.clone().unwrap_or_default();
    if state
        .trial
        .as_ref()
        .is_some_and(|t| t.reported_at.is_none())
    {
        tracing::info!(%release, "agent release on trial: waiting to reach the fleet server");
        let reached = async {
            loop {
                if link.borrow_and_update().stored {
                    return true;
                }
                if link.changed().await.is_err() {
                    return false;
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            reached = reached => if !reached { return },
        }
        let Ok(mut fresh) = load() else { return };
        if !on_trial(&fresh) {
            return;
        }
        fresh.reported(edgefleet_shared::unix_now());
        if let Err(e) = fresh.save(&data_dir) {
            tracing::error!(error = %e, "cannot save the agent state");
            return;
        }
        tracing::info!(%release, soak_secs = limits.soak_secs, "agent release reached the fleet server; soaking");
        state = fresh;
    }
    let Some(confirm_at) = state.confirm_at(&limits) else {
        return;
    };
    let wait = confirm_at.saturating_sub(edgefleet_shared::unix_now());
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = tokio::time::sleep(Duration::from_secs(wait)) => {}
    }
    let Ok(mut fresh) = load() else { return };
    if !on_trial(&fresh) {
        return;
    }
    fresh.confirm();
    if let Err(e) = fresh.save(&data_dir) {
        tracing::error!(error = %e, "cannot save the agent state");
        return;
    }
    tracing::info!(%release, "agent release confirmed");
    reporter.agent_event(EventKind::Confirmed, None, &release, None);
}

//! The state of the fleet link as other tasks see it: whether it is up
//! ([`LinkState`], for the status display) and what the agent refused from
//! the fleet ([`LinkCounters`], for telemetry).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use edgefleet_shared::messages::LinkHealth;

/// Messages from the fleet that the agent refused (forged or unsigned
/// receipts and server statuses), shared with telemetry.
#[derive(Debug, Clone, Default)]
pub struct LinkCounters(Arc<(AtomicU64, Mutex<Option<String>>)>);

impl LinkCounters {
    /// Counts one refused message: `what` it was and why.
    pub fn rejected(&self, what: &str, reason: &str) {
        let count = self.0 .0.fetch_add(1, Ordering::Relaxed) + 1;
        // The first few are logged; after that every thousandth, so a flood
        // cannot fill the log.
        if count <= 10 || count % 1000 == 0 {
            tracing::warn!(what, reason, count, "message from the fleet refused");
        }
        *self.0 .1.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{what}: {reason}"));
    }

    /// The counts so far, for telemetry.
    pub fn snapshot(&self) -> LinkHealth {
        LinkHealth {
            rejected_messages: self.0 .0.load(Ordering::Relaxed),
            last_rejection: self.0 .1.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}

/// Whether the fleet connection is up, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkState {
    /// Connected to the broker.
    pub connected: bool,
    /// When it last connected or disconnected.
    pub since: Instant,
    /// The fleet server stored a message sent on this connection (a
    /// signed receipt arrived; with `delete_on = "puback"`, the broker
    /// acknowledged one).
    pub stored: bool,
}

impl Default for LinkState {
    fn default() -> Self {
        Self {
            connected: false,
            since: Instant::now(),
            stored: false,
        }
    }
}

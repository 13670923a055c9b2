//! Time as the server's drivers see it: unix seconds from a [`Clock`], so
//! the rollout driver and the desired-state publisher can be run in unit
//! tests on a [`ManualClock`] that moves only when the test moves it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Where "now" comes from.
pub trait Clock: Send + Sync + 'static {
    /// Seconds since the unix epoch.
    fn now(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        edgefleet_shared::unix_now()
    }
}

/// A clock that stands still until told to move; clones share the time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn at(now: u64) -> Self {
        Self(Arc::new(AtomicU64::new(now)))
    }

    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The clock the server runs on.
pub fn system() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

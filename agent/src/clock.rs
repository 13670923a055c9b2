//! Time as a side effect behind a small trait: the wall clock in unix
//! seconds (document expiry, soak periods), a monotonic clock (refusal
//! summaries, check intervals) and sleeping until a monotonic instant.
//!
//! Tasks that judge time take an `Arc<dyn Clock>`: [`SystemClock`] in the
//! agent, [`FakeClock`] in unit tests, which only moves when the test
//! calls [`FakeClock::advance`], and wakes the sleepers whose time came.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// A future that completes when a sleep is over.
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The time, and waiting for it.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Wall-clock time in seconds since the Unix epoch.
    fn unix_now(&self) -> u64;
    /// Monotonic time.
    fn now(&self) -> Instant;
    /// Completes once [`Clock::now`] has reached `deadline` (at once if
    /// it already has).
    fn sleep_until(&self, deadline: Instant) -> Sleep;
}

/// The real clock. Monotonic time is tokio's, the clock its timers sleep
/// on (so tests that pause tokio's time move it too); the wall clock may
/// jump on boards without a real-time clock, which is why intervals are
/// measured on the monotonic one.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn unix_now(&self) -> u64 {
        edgefleet_shared::unix_now()
    }

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn sleep_until(&self, deadline: Instant) -> Sleep {
        Box::pin(tokio::time::sleep_until(tokio::time::Instant::from_std(
            deadline,
        )))
    }
}

/// A clock that moves only when told to: both its wall and monotonic time
/// advance together by [`FakeClock::advance`]. Clones share one time.
#[derive(Clone)]
pub struct FakeClock {
    inner: Arc<FakeInner>,
}

struct FakeInner {
    /// The monotonic instant the fake started at; its wall time then.
    base: Instant,
    base_unix: u64,
    /// How far it has been advanced; both times derive from it, so they
    /// move as one, and sleepers watch it.
    elapsed: watch::Sender<Duration>,
}

impl fmt::Debug for FakeClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeClock")
            .field("unix_now", &self.unix_now())
            .field("elapsed", &self.elapsed())
            .finish()
    }
}

impl FakeClock {
    /// A fake clock whose wall time is `unix` seconds.
    pub fn at(unix: u64) -> Self {
        Self {
            inner: Arc::new(FakeInner {
                base: Instant::now(),
                base_unix: unix,
                elapsed: watch::Sender::new(Duration::ZERO),
            }),
        }
    }

    /// How far the clock has been advanced since it was made.
    pub fn elapsed(&self) -> Duration {
        *self.inner.elapsed.borrow()
    }

    /// Moves the clock forward by `by`, waking every sleeper whose
    /// deadline it reaches.
    pub fn advance(&self, by: Duration) {
        self.inner.elapsed.send_modify(|elapsed| *elapsed += by);
    }
}

impl Clock for FakeClock {
    fn unix_now(&self) -> u64 {
        self.inner.base_unix + self.elapsed().as_secs()
    }

    fn now(&self) -> Instant {
        self.inner.base + self.elapsed()
    }

    fn sleep_until(&self, deadline: Instant) -> Sleep {
        let wait = deadline.saturating_duration_since(self.inner.base);
        let mut elapsed = self.inner.elapsed.subscribe();
        Box::pin(async move {
            // The sender lives in the clock this future was made from and
            // in every clone; once all are gone nothing can move the time,
            // so the sleep never ends, as a real one past its end of time.
            if elapsed.wait_for(|now| *now >= wait).await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fake_sleep_ends_only_when_the_clock_is_advanced_to_it() {
        let clock = FakeClock::at(1_000);
        let deadline = clock.now() + Duration::from_secs(10);
        let mut sleep = tokio::spawn(clock.sleep_until(deadline));
        clock.advance(Duration::from_secs(9));
        tokio::task::yield_now().await;
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut sleep)
                .await
                .is_err(),
            "woke a second early"
        );
        assert_eq!(clock.unix_now(), 1_009);
        clock.advance(Duration::from_secs(1));
        tokio::time::timeout(Duration::from_secs(5), sleep)
            .await
            .expect("woke at its deadline")
            .unwrap();
        assert_eq!(clock.unix_now(), 1_010);
        // A deadline already passed does not wait.
        tokio::time::timeout(Duration::from_secs(5), clock.sleep_until(deadline))
            .await
            .expect("a past deadline ends at once");
    }

    #[test]
    fn clones_share_one_time() {
        let clock = FakeClock::at(5);
        let other = clock.clone();
        other.advance(Duration::from_millis(1_500));
        assert_eq!(clock.unix_now(), 6);
        assert_eq!(clock.elapsed(), Duration::from_millis(1_500));
        assert_eq!(clock.now(), other.now());
    }
}

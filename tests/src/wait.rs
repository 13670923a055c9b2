//! Waiting for a condition in end-to-end tests: every poll of a server, an
//! agent or a log goes through [`wait_for`] (or [`wait_for_showing`] when
//! the last thing seen belongs in the failure), so each wait has a name, a
//! deadline and one polling interval.

use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

/// How long to sleep between two tries: short beside the seconds most
/// waits allow, long enough not to load the processes under test.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// A wait that ran out of time, with what the last try saw.
#[derive(Debug)]
pub struct TimedOut<S> {
    /// What was waited for.
    pub what: String,
    /// How long it was waited for.
    pub timeout: Duration,
    /// What the last try saw.
    pub last: S,
}

impl<S: fmt::Display> fmt::Display for TimedOut<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "timed out after {:?} waiting for {}; last seen: {}",
            self.timeout, self.what, self.last
        )
    }
}

impl<S: fmt::Debug + fmt::Display> std::error::Error for TimedOut<S> {}

/// Polls `f` until it returns `Some`, or fails after `timeout`. It tries at
/// least once, however short the timeout.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let found = wait_for_showing(what, timeout, || {
        let attempt = f();
        async move { attempt.await.ok_or(NothingYet) }
    })
    .await;
    found.map_err(|e| anyhow::anyhow!("timed out after {timeout:?} waiting for {}", e.what))
}

/// What [`wait_for`] saw on a try that did not find its value.
#[derive(Debug)]
struct NothingYet;

impl fmt::Display for NothingYet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("nothing yet")
    }
}

/// Polls `f` until it returns `Ok`; each `Err` says what that try saw. After
/// `timeout` the error carries the last one, for the failure message or
/// for a test that asserts on it.
pub async fn wait_for_showing<T, S, F, Fut>(
    what: &str,
    timeout: Duration,
    mut f: F,
) -> Result<T, TimedOut<S>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, S>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(found) => return Ok(found),
            Err(last) if Instant::now() >= deadline => {
                return Err(TimedOut {
                    what: what.to_string(),
                    timeout,
                    last,
                })
            }
            Err(_) => tokio::time::sleep(POLL_EVERY).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[tokio::test]
    async fn returns_the_first_value_found() {
        let tries = Cell::new(0);
        let found = wait_for("the third try", Duration::from_secs(5), || {
            tries.set(tries.get() + 1);
            let n = tries.get();
            async move { (n == 3).then_some(n * 10) }
        })
        .await;
        assert_eq!(found.ok(), Some(30));
        assert_eq!(tries.get(), 3);
    }

    #[tokio::test]
    async fn a_timeout_names_the_wait_and_keeps_the_last_value_seen() {
        let tries = Cell::new(0);
        let err = wait_for_showing("a value above 100", Duration::from_millis(250), || {
            tries.set(tries.get() + 1);
            let n = tries.get();
            async move { Err::<(), _>(n) }
        })
        .await
        .expect_err("nothing is ever above 100");
        assert!(err.last >= 2, "it tried more than once: {}", err.last);
        assert_eq!(err.last, tries.get(), "the last try's value");
        let message = err.to_string();
        assert!(message.contains("a value above 100"), "{message}");
        assert!(
            message.contains(&format!("last seen: {}", err.last)),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_zero_timeout_still_tries_once() {
        let found = wait_for("an answer at once", Duration::ZERO, || async { Some(7) }).await;
        assert_eq!(found.ok(), Some(7));
        let missing = wait_for("nothing", Duration::ZERO, || async { None::<u8> }).await;
        let message = missing.expect_err("never found").to_string();
        assert!(message.contains("waiting for nothing"), "{message}");
    }
}

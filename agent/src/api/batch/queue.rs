//! The batching policy of one model, without I/O or clocks: which waiting
//! requests run together, and when. The caller passes the time in, so the
//! rules are tested without sleeping.
//!
//! The rules, in order:
//! - a request that finds nothing waiting and a run slot free runs at once,
//!   alone: a lone client never waits for companions that will not come;
//! - waiting requests go as one batch as soon as a slot is free and either
//!   the batch is full (`max_batch` rows), or no run is in progress (the
//!   model would otherwise sit idle), or the oldest of them has waited
//!   `max_delay`;
//! - a batch takes the oldest request and, in arrival order, every later
//!   one with the same [`super::tensors::Key`] that still fits; a request
//!   larger than `max_batch` by itself runs alone.

use std::collections::VecDeque;
use std::time::Instant;

pub use crate::config::batching::Policy;

struct Waiting<K, T> {
    key: K,
    rows: usize,
    arrived: Instant,
    item: T,
}

/// The requests waiting for one model, and how many runs are in progress.
pub struct Queue<K, T> {
    pending: VecDeque<Waiting<K, T>>,
    running: usize,
}

impl<K, T> Default for Queue<K, T> {
    fn default() -> Self {
        Self {
            pending: VecDeque::new(),
            running: 0,
        }
    }
}

impl<K: PartialEq, T> Queue<K, T> {
    /// Whether a request arriving now runs at once by itself; if so it
    /// counts as running until [`Queue::finished`].
    pub fn start_alone(&mut self, policy: &Policy) -> bool {
        let free = self.pending.is_empty() && self.running < policy.concurrent_runs;
        if free {
            self.running += 1;
        }
        free
    }

    /// Queues a request of `rows` rows.
    pub fn push(&mut self, key: K, rows: usize, item: T, now: Instant) {
        self.pending.push_back(Waiting {
            key,
            rows,
            arrived: now,
            item,
        });
    }

    /// The next batch to run now, oldest request first; it counts as
    /// running until [`Queue::finished`].
    pub fn next_batch(&mut self, policy: &Policy, now: Instant) -> Option<Vec<T>> {
        if self.running >= policy.concurrent_runs {
            return None;
        }
        let head = self.pending.front()?;
        let mut chosen = vec![0];
        let mut rows = head.rows;
        let mut full = rows >= policy.max_batch;
        for (index, waiting) in self.pending.iter().enumerate().skip(1) {
            if full {
                break;
            }
            if waiting.key != head.key {
                continue;
            }
            if rows + waiting.rows > policy.max_batch {
                full = true;
                break;
            }
            rows += waiting.rows;
            chosen.push(index);
            full = rows >= policy.max_batch;
        }
        let overdue = now.saturating_duration_since(head.arrived) >= policy.max_delay;
        if !(full || overdue || self.running == 0) {
            return None;
        }
        self.running += 1;
        // Removed from the back so the earlier indices stay valid.
        let mut items: Vec<T> = chosen
            .iter()
            .rev()
            .filter_map(|&i| self.pending.remove(i).map(|w| w.item))
            .collect();
        items.reverse();
        Some(items)
    }

    /// A run (batch or lone request) ended.
    pub fn finished(&mut self) {
        self.running = self.running.saturating_sub(1);
    }

    /// When [`Queue::next_batch`] may next give a batch without any other
    /// event (an arrival or a finished run); `None` when only such an
    /// event can.
    pub fn deadline(&self, policy: &Policy) -> Option<Instant> {
        if self.running >= policy.concurrent_runs {
            return None;
        }
        self.pending.front().map(|w| w.arrived + policy.max_delay)
    }

    /// Whether no request waits.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const POLICY: Policy = Policy {
        max_batch: 4,
        max_delay: Duration::from_millis(2),
        concurrent_runs: 1,
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_lone_request_on_an_idle_model_runs_at_once() {
        let mut q: Queue<u8, u32> = Queue::default();
        assert!(q.start_alone(&POLICY));
        // The slot is taken: the next one waits.
        assert!(!q.start_alone(&POLICY));
        q.finished();
        assert!(q.start_alone(&POLICY));
    }

    #[test]
    fn requests_wait_while_the_model_is_busy_and_go_together_when_it_is_free() {
        let t0 = Instant::now();
        let mut q: Queue<u8, u32> = Queue::default();
        assert!(q.start_alone(&POLICY));
        for i in 0..3 {
            q.push(0, 1, i, t0);
        }
        // Past the delay, but no slot is free.
        assert_eq!(q.next_batch(&POLICY, t0 + ms(10)), None);
        assert_eq!(q.deadline(&POLICY), None);
        q.finished();
        assert_eq!(q.next_batch(&POLICY, t0), Some(vec![0, 1, 2]));
        assert!(q.is_empty());
    }

    #[test]
    fn a_batch_goes_when_full_or_when_its_oldest_has_waited_the_delay() {
        let policy = Policy {
            concurrent_runs: 2,
            ..POLICY
        };
        let t0 = Instant::now();
        let mut q: Queue<u8, u32> = Queue::default();
        assert!(q.start_alone(&policy));
        q.push(0, 1, 1, t0);
        q.push(0, 1, 2, t0 + ms(1));
        // A slot is free but a run is in progress: wait for companions.
        assert_eq!(q.next_batch(&policy, t0 + ms(1)), None);
        assert_eq!(q.deadline(&policy), Some(t0 + ms(2)));
        assert_eq!(q.next_batch(&policy, t0 + ms(2)), Some(vec![1, 2]));
        q.finished();
        // Full: goes at once, the rest waits.
        for i in 10..15 {
            q.push(0, 1, i, t0 + ms(3));
        }
        assert_eq!(
            q.next_batch(&policy, t0 + ms(3)),
            Some(vec![10, 11, 12, 13])
        );
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn batches_respect_max_rows_and_never_mix_shapes() {
        let t0 = Instant::now();
        let mut q: Queue<&str, u32> = Queue::default();
        q.push("a", 2, 1, t0);
        q.push("b", 1, 2, t0);
        q.push("a", 3, 3, t0); // 2 + 3 > 4: does not fit
        q.push("a", 1, 4, t0);
        assert_eq!(q.next_batch(&POLICY, t0), Some(vec![1]));
        q.finished();
        assert_eq!(q.next_batch(&POLICY, t0), Some(vec![2]));
        q.finished();
        assert_eq!(q.next_batch(&POLICY, t0), Some(vec![3, 4]));
        q.finished();
        // Larger than a batch by itself: runs alone.
        q.push("a", 9, 5, t0);
        q.push("a", 1, 6, t0);
        assert_eq!(q.next_batch(&POLICY, t0), Some(vec![5]));
        q.finished();
        assert_eq!(q.next_batch(&POLICY, t0), Some(vec![6]));
        assert_eq!(q.next_batch(&POLICY, t0), None);
    }

    #[test]
    fn arrivals_queue_behind_waiting_requests() {
        let policy = Policy {
            concurrent_runs: 2,
            ..POLICY
        };
        let t0 = Instant::now();
        let mut q: Queue<u8, u32> = Queue::default();
        assert!(q.start_alone(&policy));
        q.push(0, 1, 1, t0);
        // A slot is free, but someone waits already: no overtaking.
        assert!(!q.start_alone(&policy));
    }
}

//! Streams, their caps and overflow policies, and when a delivered record
//! leaves the outbox: plain decisions, tested without a database.

use edgefleet_shared::TopicKind;
use serde::Deserialize;

/// What a stream carries, in drain priority order (first = highest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stream {
    Events,
    Status,
    Telemetry,
    Results,
}

impl Stream {
    pub const ALL: [Stream; 4] = [Self::Events, Self::Status, Self::Telemetry, Self::Results];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Events => "events",
            Self::Status => "status",
            Self::Telemetry => "telemetry",
            Self::Results => "results",
        }
    }

    pub(crate) fn priority(self) -> i64 {
        self as i64
    }

    /// The MQTT topic kind records of this stream are published on.
    pub fn topic(self) -> TopicKind {
        match self {
            Self::Events => TopicKind::Events,
            Self::Status => TopicKind::Status,
            Self::Telemetry => TopicKind::Telemetry,
            Self::Results => TopicKind::Results,
        }
    }

    /// Status is a retained latest value; everything else is a record.
    pub fn retained(self) -> bool {
        self == Self::Status
    }

    /// Telemetry and results may travel several records to a publish (a
    /// JSON array); events and status go one by one.
    pub fn batched(self) -> bool {
        matches!(self, Self::Telemetry | Self::Results)
    }
}

/// What to do when a stream is over its cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    /// Delete the oldest records to make room.
    DropOldest,
    /// Refuse the new record.
    RejectNew,
    /// Thin out the older half (delete every second record of it), so the
    /// history keeps its span at a coarser resolution.
    Downsample,
    /// Never drop: the append fails only when the disk does.
    Never,
}

/// Caps of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamPolicy {
    pub max_rows: u64,
    pub max_bytes: u64,
    pub overflow: Overflow,
}

impl StreamPolicy {
    /// No cap at all: nothing is ever dropped (tests and benchmarks).
    pub fn keep_all() -> Self {
        Self {
            max_rows: u64::MAX,
            max_bytes: u64::MAX,
            overflow: Overflow::Never,
        }
    }

    /// Defaults sized for a 32 MB-class device with a few MB of disk to
    /// spare: events are never dropped.
    pub fn default_for(stream: Stream) -> Self {
        match stream {
            Stream::Events => Self {
                max_rows: u64::MAX,
                max_bytes: u64::MAX,
                overflow: Overflow::Never,
            },
            // A retained latest value: only the newest one matters.
            Stream::Status => Self {
                max_rows: 1,
                max_bytes: 256 * 1024,
                overflow: Overflow::DropOldest,
            },
            Stream::Telemetry => Self {
                max_rows: 50_000,
                max_bytes: 8 * 1024 * 1024,
                overflow: Overflow::Downsample,
            },
            Stream::Results => Self {
                max_rows: 20_000,
                max_bytes: 16 * 1024 * 1024,
                overflow: Overflow::DropOldest,
            },
        }
    }
}

/// Rows and bytes a stream holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub rows: u64,
    pub bytes: u64,
}

/// The overflow decision for adding one record of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverflowPlan {
    /// It fits.
    Append,
    /// Append after deleting the `n` oldest records.
    DropOldest(u64),
    /// Append after thinning the older half.
    Downsample,
    /// Do not append.
    Reject,
}

/// Decides how to make room for a record of `size` bytes. `oldest` yields
/// the sizes of the stream's records, oldest first, for drop-oldest.
pub fn plan_overflow(
    policy: &StreamPolicy,
    usage: Usage,
    size: u64,
    oldest: impl IntoIterator<Item = u64>,
) -> OverflowPlan {
    let fits =
        |u: Usage| u.rows < policy.max_rows && u.bytes.saturating_add(size) <= policy.max_bytes;
    if fits(usage) || policy.overflow == Overflow::Never {
        return OverflowPlan::Append;
    }
    if size > policy.max_bytes {
        return OverflowPlan::Reject;
    }
    match policy.overflow {
        Overflow::RejectNew => OverflowPlan::Reject,
        Overflow::Downsample => OverflowPlan::Downsample,
        Overflow::Never => OverflowPlan::Append,
        Overflow::DropOldest => {
            let mut left = usage;
            let mut n = 0;
            for s in oldest {
                if fits(left) {
                    break;
                }
                left.rows -= 1;
                left.bytes -= s;
                n += 1;
            }
            if fits(left) {
                OverflowPlan::DropOldest(n)
            } else {
                OverflowPlan::Reject
            }
        }
    }
}

/// When a record counts as delivered and leaves the outbox (config
/// `mqtt.delete_on`; the uplink acts on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeleteOn {
    /// The fleet server's receipt says it is stored (default).
    #[default]
    Receipt,
    /// The broker acknowledged it (for a broker with some other consumer
    /// that holds a persistent session).
    Puback,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A policy from its three parts (shared with the store's tests).
    pub(crate) fn policy(max_rows: u64, max_bytes: u64, overflow: Overflow) -> StreamPolicy {
        StreamPolicy {
            max_rows,
            max_bytes,
            overflow,
        }
    }

    #[test]
    fn plans_follow_each_policy() {
        let full = Usage { rows: 3, bytes: 30 };
        let sizes = [10, 10, 10];
        assert_eq!(
            plan_overflow(&policy(10, 100, Overflow::RejectNew), full, 10, sizes),
            OverflowPlan::Append
        );
        assert_eq!(
            plan_overflow(&policy(3, 100, Overflow::RejectNew), full, 10, sizes),
            OverflowPlan::Reject
        );
        assert_eq!(
            plan_overflow(&policy(3, 100, Overflow::DropOldest), full, 10, sizes),
            OverflowPlan::DropOldest(1)
        );
        assert_eq!(
            plan_overflow(&policy(10, 35, Overflow::DropOldest), full, 20, sizes),
            OverflowPlan::DropOldest(2)
        );
        assert_eq!(
            plan_overflow(&policy(3, 100, Overflow::Downsample), full, 10, sizes),
            OverflowPlan::Downsample
        );
        assert_eq!(
            plan_overflow(&policy(3, 30, Overflow::Never), full, 10, sizes),
            OverflowPlan::Append
        );
        // A record bigger than the whole cap can never fit.
        assert_eq!(
            plan_overflow(&policy(10, 15, Overflow::DropOldest), full, 20, sizes),
            OverflowPlan::Reject
        );
    }
}

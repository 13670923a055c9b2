//! Per-device message sequence numbers.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::durable::write_atomic;

/// Per-device sequence numbers that only ever increase, across restarts
/// and whatever the clock does (boards without a real-time clock often
/// boot in 1970). Numbers are reserved in blocks recorded durably in a
/// file; after a crash the rest of the block is skipped, which leaves a
/// gap but never a repeat. The server de-duplicates on (device, seq).
#[derive(Debug, Clone)]
pub struct Sequence(Arc<Mutex<SequenceState>>);

#[derive(Debug)]
struct SequenceState {
    next: u64,
    reserved_until: u64,
    path: PathBuf,
}

/// Numbers reserved per durable write.
const SEQUENCE_BLOCK: u64 = 1 << 16;

impl Sequence {
    /// A sequence persisted in `path`, continuing after the last block any
    /// previous run reserved.
    pub fn persistent(path: &Path) -> std::io::Result<Self> {
        let start = match std::fs::read_to_string(path) {
            Ok(text) => text.trim().parse::<u64>().map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            // A fresh install (or a reflashed device) starts from the
            // clock in microseconds, above anything an earlier install of
            // the same device id can have sent, so the server's
            // de-duplication does not swallow its messages.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0),
            Err(e) => return Err(e),
        };
        let reserved_until = start + SEQUENCE_BLOCK;
        write_atomic(path, reserved_until.to_string().as_bytes())?;
        Ok(Self(Arc::new(Mutex::new(SequenceState {
            next: start,
            reserved_until,
            path: path.to_path_buf(),
        }))))
    }

    pub fn next(&self) -> u64 {
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if state.next + 1 >= state.reserved_until {
            let until = state.reserved_until + SEQUENCE_BLOCK;
            if let Err(e) = write_atomic(&state.path, until.to_string().as_bytes()) {
                // Keep counting in memory; a restart before the next
                // successful write may reuse numbers of this block.
                tracing::error!(error = %e, path = %state.path.display(), "cannot persist sequence numbers");
            }
            state.reserved_until = until;
        }
        state.next += 1;
        state.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persistent_sequence_never_repeats_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seq");
        let first = Sequence::persistent(&path).unwrap();
        let a: Vec<u64> = (0..3).map(|_| first.next()).collect();
        assert_eq!(a[1], a[0] + 1);
        assert!(
            a[0] > 1_600_000_000_000_000,
            "a fresh install starts from the clock"
        );
        drop(first); // a crash: the rest of the block is never used
        let second = Sequence::persistent(&path).unwrap();
        let b = second.next();
        assert!(b > a[2], "{b}");
        // Crossing a block boundary reserves the next block durably.
        for _ in 0..SEQUENCE_BLOCK {
            second.next();
        }
        let last = second.next();
        let third = Sequence::persistent(&path).unwrap();
        assert!(third.next() > last);
    }

    #[test]
    fn a_corrupt_sequence_file_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seq");
        std::fs::write(&path, "garbage").unwrap();
        assert!(Sequence::persistent(&path).is_err());
    }
}

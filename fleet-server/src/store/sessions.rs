//! What several replicas of one fleet read from each other through the
//! database: dashboard login sessions, and the telemetry and update events
//! every replica stored, in arrival order (each replica's dashboard view
//! takes in what the others ingested).

use serde::{Deserialize, Serialize};

use super::rows::{self, Columns, EVENT_COLUMNS};
use super::{EventRecord, StoreError};

/// One dashboard login as stored: the SHA-256 (hex) of the session id the
/// cookie carries, never the id itself, so a copy of the database does not
/// log anyone in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DashboardSession {
    pub id_sha256: String,
    /// The operator token the session acts as (looked up on every use).
    pub token_id: String,
    pub csrf: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; written at most about once a minute per session.
    pub last_used: u64,
}

/// When sessions end, and how many one token keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRules {
    /// A session unused for longer than this (seconds) has ended.
    pub idle_secs: u64,
    /// A session older than this (seconds) has ended, used or not.
    pub lifetime_secs: u64,
    /// Sessions kept per token; past this the least recently used go.
    pub per_token: u32,
}

impl SessionRules {
    /// Whether `session` is live at `now`.
    pub fn live(&self, session: &DashboardSession, now: u64) -> bool {
        now.saturating_sub(session.last_used) <= self.idle_secs
            && now.saturating_sub(session.created_at) <= self.lifetime_secs
    }

    /// The oldest `last_used` and `created_at` a live session may have at
    /// `now` (as stored).
    pub(crate) fn cutoffs(&self, now: u64) -> (i64, i64) {
        (
            super::rows::stored(now.saturating_sub(self.idle_secs)),
            super::rows::stored(now.saturating_sub(self.lifetime_secs)),
        )
    }
}

/// A place in the arrival order of telemetry or update events: arrival
/// time (unix seconds, the storing server's clock), then device and
/// sequence number. Reading "after" a key returns rows strictly past it.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ArrivalKey {
    pub received_at: u64,
    pub device_id: String,
    pub seq: u64,
}

impl ArrivalKey {
    /// Just before everything that arrived at `received_at` or later.
    pub fn before(received_at: u64) -> Self {
        Self {
            received_at,
            device_id: String::new(),
            seq: 0,
        }
    }
}

/// The columns a [`DashboardSession`] is read with.
pub(crate) const SESSION_COLUMNS: &str = "id_sha256, token_id, csrf, created_at, last_used";

/// A session row (selected with [`SESSION_COLUMNS`]).
pub(crate) fn session(r: &dyn Columns) -> Result<DashboardSession, StoreError> {
    Ok(DashboardSession {
        id_sha256: r.text(0)?,
        token_id: r.text(1)?,
        csrf: r.text(2)?,
        created_at: r.unsigned(3)?,
        last_used: r.unsigned(4)?,
    })
}

/// The columns of a telemetry row in arrival order.
pub(crate) const ARRIVED_TELEMETRY_COLUMNS: &str = "received_at, device_id, seq, body";

/// A telemetry row (selected with [`ARRIVED_TELEMETRY_COLUMNS`]): its key
/// and body.
pub(crate) fn arrived_telemetry(r: &dyn Columns) -> Result<(ArrivalKey, String), StoreError> {
    Ok((
        ArrivalKey {
            received_at: r.unsigned(0)?,
            device_id: r.text(1)?,
            seq: r.unsigned(2)?,
        },
        r.text(3)?,
    ))
}

/// An update event row selected with [`EVENT_COLUMNS`] then `received_at`:
/// its key and the event.
pub(crate) fn arrived_event(r: &dyn Columns) -> Result<(ArrivalKey, EventRecord), StoreError> {
    let event = rows::event(r)?;
    let key = ArrivalKey {
        received_at: r.unsigned(9)?,
        device_id: event.device_id.clone(),
        seq: event.seq,
    };
    Ok((key, event))
}

/// Columns read in arrival order: `{EVENT_COLUMNS}, received_at`.
pub(crate) fn arrived_event_columns() -> String {
    format!("{EVENT_COLUMNS}, received_at")
}

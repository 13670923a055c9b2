//! The operations every store backend provides: one method per thing the
//! server does with its records, each run by the backend as a single
//! transaction. [`super::Store`] holds one backend behind this trait, so
//! the SQLite and PostgreSQL backends (and an in-memory fake in unit
//! tests) are interchangeable.
//!
//! The trait is object-safe: methods return a [`StoreFuture`] (a boxed,
//! `Send` future) rather than being `async fn`, so a `dyn StoreBackend`
//! can sit behind an `Arc` in the cloneable [`super::Store`].

use std::future::Future;
use std::pin::Pin;

use edgefleet_shared::{StatusMessage, UpdateEvent};

use crate::auth::TokenRecord;

use super::{
    AgentBuildRecord, AssignedAgent, Attachment, AuditEntry, AuditRecord, DeviceFilter,
    DeviceRecord, Enrollment, EventRecord, KeyWrite, ModelRecord, Page, SignFn, StatusOutcome,
    StoreError, Streamed, Target,
};

/// What a backend operation returns: a boxed future of its result, which
/// may borrow the backend and the arguments for `'a`.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A database holding the fleet's records.
pub trait StoreBackend: Send + Sync + 'static {
    /// The backend's name, for logs (`sqlite`, `postgres`).
    fn name(&self) -> &'static str;

    /// Records a batch of status messages and update events in one
    /// transaction. For each status: whether the device was new and, for
    /// an online one, its current desired-state version and document.
    /// Stale (lower-sequence) online statuses change nothing; offline
    /// last-will statuses always mark the device offline. For each event:
    /// whether it was new (a redelivered copy is ignored).
    fn record_messages<'a>(
        &'a self,
        statuses: &'a [StatusMessage],
        events: &'a [UpdateEvent],
        now: u64,
    ) -> StoreFuture<'a, (Vec<StatusOutcome>, Vec<bool>)>;

    /// Signs and stores the next desired state of `device` from its
    /// assignments (models and agent release), allocating the version and
    /// storing the document in one transaction. `None` when nothing is
    /// assigned to it.
    fn sign_desired<'a>(
        &'a self,
        device: &'a str,
        now: u64,
        sign: SignFn,
    ) -> StoreFuture<'a, Option<(u64, Vec<u8>)>>;

    /// Every stored desired-state document, by device id.
    fn all_desired(&self) -> StoreFuture<'_, Vec<(String, Vec<u8>)>>;

    /// The stored desired-state document of `device`, if one was signed.
    fn desired_json<'a>(&'a self, device: &'a str) -> StoreFuture<'a, Option<Vec<u8>>>;

    /// A device's newest update events, newest first, at most `limit`.
    fn events_for_device<'a>(
        &'a self,
        device: &'a str,
        limit: u32,
    ) -> StoreFuture<'a, Vec<EventRecord>>;

    /// Every device, by id.
    fn list_devices(&self) -> StoreFuture<'_, Vec<DeviceRecord>>;

    /// One device, if the store has it.
    fn get_device<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<DeviceRecord>>;

    /// Devices matching `filter`, by id: ids after `filter.after`, at most
    /// `filter.limit`.
    fn find_devices<'a>(&'a self, filter: &'a DeviceFilter) -> StoreFuture<'a, Vec<DeviceRecord>>;

    /// Enrolls a device (or enrolls it again: new credential, tags,
    /// hardware and key, no longer revoked).
    fn enroll_device<'a>(
        &'a self,
        enrollment: &'a Enrollment,
        now: u64,
    ) -> StoreFuture<'a, DeviceRecord>;

    /// Revokes a device's credential (again keeps the first time); `None`
    /// for an unknown device.
    fn revoke_device<'a>(&'a self, id: &'a str, now: u64) -> StoreFuture<'a, Option<DeviceRecord>>;

    /// Replaces a device's tags; `None` for an unknown device.
    fn set_tags<'a>(
        &'a self,
        id: &'a str,
        tags: &'a std::collections::BTreeMap<String, String>,
    ) -> StoreFuture<'a, Option<DeviceRecord>>;

    /// Deletes a model version no assignment points at. Returns it and
    /// whether another version still has the same file (sha256).
    fn delete_model<'a>(
        &'a self,
        name: &'a str,
        version: u64,
    ) -> StoreFuture<'a, (ModelRecord, bool)>;

    /// Sets a device's public key (hex) as `who` may; returns the key the
    /// device has afterwards (`None`: no such device).
    fn set_device_key<'a>(
        &'a self,
        id: &'a str,
        key: &'a str,
        who: KeyWrite,
    ) -> StoreFuture<'a, Option<String>>;

    /// A device's credential hash, if it is enrolled and not revoked.
    fn device_credential<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<String>>;

    /// Adds a model version. Re-adding the identical file is a no-op; a
    /// different file under an existing version is a conflict.
    fn add_model<'a>(&'a self, model: &'a ModelRecord) -> StoreFuture<'a, ModelRecord>;

    /// One model version, if the store has it.
    fn get_model<'a>(&'a self, name: &'a str, version: u64)
        -> StoreFuture<'a, Option<ModelRecord>>;

    /// Every model version, by name then version.
    fn list_models(&self) -> StoreFuture<'_, Vec<ModelRecord>>;

    /// Attaches a spec or test vector to a model version that exists and
    /// is not deployed yet (devices may already run a deployed one).
    fn attach<'a>(
        &'a self,
        name: &'a str,
        version: u64,
        attachment: Attachment,
    ) -> StoreFuture<'a, ModelRecord>;

    /// Points `target` at a model version (which must exist); returns the
    /// ids of the devices whose desired state changes.
    fn deploy<'a>(
        &'a self,
        model: &'a str,
        version: u64,
        target: &'a Target,
        now: u64,
    ) -> StoreFuture<'a, Vec<String>>;

    /// Changes the shadow or A/B settings of `model`'s assignments for
    /// `target` (the version a change names must exist; a device must run
    /// the model); returns the ids of the devices whose desired state
    /// changes.
    fn set_quality<'a>(
        &'a self,
        model: &'a str,
        change: &'a super::quality::QualityChange,
        target: &'a Target,
    ) -> StoreFuture<'a, Vec<String>>;

    /// The models `device` should run: fleet-wide assignments, overridden
    /// per model by the device's own, by model name.
    fn models_for_device<'a>(&'a self, device: &'a str) -> StoreFuture<'a, Vec<ModelRecord>>;

    /// Stores a batch of streamed records in one transaction, each once
    /// (per device and sequence number); returns how many were new.
    fn record_streamed<'a>(&'a self, batch: &'a [Streamed], now: u64) -> StoreFuture<'a, usize>;

    /// Telemetry of a device in sequence order, each sample as the device
    /// sent it plus `received_at`; `None` for an unknown device.
    fn telemetry_for_device<'a>(
        &'a self,
        device: &'a str,
        page: &'a Page,
    ) -> StoreFuture<'a, Option<Vec<serde_json::Value>>>;

    /// A device's newest telemetry (at most `limit` samples whose device
    /// time is `since` or later), oldest first; empty for an unknown device.
    fn recent_telemetry<'a>(
        &'a self,
        device: &'a str,
        since: u64,
        limit: u32,
    ) -> StoreFuture<'a, Vec<serde_json::Value>>;

    /// Uploaded inference results of a device in sequence order,
    /// optionally of one model; `None` for an unknown device.
    fn results_for_device<'a>(
        &'a self,
        device: &'a str,
        model: Option<&'a str>,
        page: &'a Page,
    ) -> StoreFuture<'a, Option<Vec<serde_json::Value>>>;

    /// Stores a rollout's definition and state (JSON), replacing it; a
    /// rollout keeps its place in the listing order.
    fn save_rollout<'a>(&'a self, id: &'a str, active: bool, state: &'a str)
        -> StoreFuture<'a, ()>;

    /// Every stored rollout (id, active, state), oldest first.
    fn list_rollouts(&self) -> StoreFuture<'_, Vec<(String, bool, String)>>;

    /// Takes or renews lease `name` for `holder` for `ttl_ms` (timed by
    /// the database's clock): its epoch when `holder` holds it now (one
    /// more than before when it changed hands), `None` while another
    /// holder's lease runs.
    fn lease<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        ttl_ms: u64,
    ) -> StoreFuture<'a, Option<u64>>;

    /// Ends `holder`'s lease `name` now (nothing if another holds it).
    fn release_lease<'a>(&'a self, name: &'a str, holder: &'a str) -> StoreFuture<'a, ()>;

    /// Appends messages (JSON) to the rollout driver's inbox in one
    /// transaction; returns their ids.
    fn push_rollout_inbox<'a>(
        &'a self,
        bodies: &'a [String],
        now: u64,
    ) -> StoreFuture<'a, Vec<i64>>;

    /// The oldest unanswered inbox messages (id, body), at most `limit`.
    fn rollout_inbox(&self, limit: u32) -> StoreFuture<'_, Vec<(i64, String)>>;

    /// Deletes the inbox messages `done` and answers `answers` (id,
    /// outcome JSON), in one transaction.
    fn settle_rollout_inbox<'a>(
        &'a self,
        done: &'a [i64],
        answers: &'a [(i64, String)],
    ) -> StoreFuture<'a, ()>;

    /// The answer to inbox message `id`, once there is one (taking it
    /// deletes the message).
    fn take_rollout_outcome(&self, id: i64) -> StoreFuture<'_, Option<String>>;

    /// Deletes telemetry and results that arrived before `cutoff` (unix
    /// seconds; arrival time, since device clocks may be wrong). Returns
    /// how many rows went.
    fn prune_streamed(&self, cutoff: u64) -> StoreFuture<'_, usize>;

    /// Stores a new operator token (its hash, never the secret).
    fn create_token<'a>(&'a self, token: &'a TokenRecord, hash: &'a str) -> StoreFuture<'a, ()>;

    /// A token and its stored hash, by id (revoked ones too).
    fn token_for_auth<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<(TokenRecord, String)>>;

    /// Every operator token, oldest first.
    fn list_tokens(&self) -> StoreFuture<'_, Vec<TokenRecord>>;

    /// Revokes a token (again keeps the first time); `None` for an unknown
    /// id.
    fn revoke_token<'a>(&'a self, id: &'a str, now: u64) -> StoreFuture<'a, Option<TokenRecord>>;

    /// Appends to the audit log.
    fn record_audit<'a>(&'a self, entry: &'a AuditEntry) -> StoreFuture<'a, ()>;

    /// Audit entries after `after_id`, oldest first, at most `limit`.
    fn list_audit(&self, after_id: u64, limit: u32) -> StoreFuture<'_, Vec<AuditRecord>>;

    /// Adds a build of an agent release. Re-adding the identical file is a
    /// no-op; a different file under an existing (version, target) is a
    /// conflict.
    fn add_agent_build<'a>(
        &'a self,
        build: &'a AgentBuildRecord,
    ) -> StoreFuture<'a, AgentBuildRecord>;

    /// The builds of one release (`Some(version)`) or of every release,
    /// by version text then target.
    fn agent_builds<'a>(
        &'a self,
        version: Option<&'a str>,
    ) -> StoreFuture<'a, Vec<AgentBuildRecord>>;

    /// Points `target` at an agent release (which must have a build);
    /// returns the ids of the devices whose desired state changes.
    fn deploy_agent<'a>(
        &'a self,
        version: &'a str,
        allow_downgrade: bool,
        target: &'a Target,
        now: u64,
    ) -> StoreFuture<'a, Vec<String>>;

    /// The agent release `device` should run: its own assignment, else
    /// the fleet-wide one; `None` when neither exists.
    fn agent_for_device<'a>(&'a self, device: &'a str) -> StoreFuture<'a, Option<AssignedAgent>>;

    /// Deletes every build of a release no assignment points at. Returns
    /// each build and whether another build or a model still has its file
    /// (sha256).
    fn delete_agent_release<'a>(
        &'a self,
        version: &'a str,
    ) -> StoreFuture<'a, Vec<(AgentBuildRecord, bool)>>;

    /// Stores a new dashboard session; drops ended sessions and, past
    /// `rules.per_token`, the token's least recently used ones (the
    /// session's `created_at` is now).
    fn create_dashboard_session<'a>(
        &'a self,
        session: &'a super::DashboardSession,
        rules: &'a super::SessionRules,
    ) -> StoreFuture<'a, ()>;

    /// The dashboard session with this id hash if it is live at `now`
    /// (an ended one is deleted).
    fn dashboard_session<'a>(
        &'a self,
        id_sha256: &'a str,
        now: u64,
        rules: &'a super::SessionRules,
    ) -> StoreFuture<'a, Option<super::DashboardSession>>;

    /// Marks a dashboard session used at `now`.
    fn touch_dashboard_session<'a>(&'a self, id_sha256: &'a str, now: u64) -> StoreFuture<'a, ()>;

    /// Ends a dashboard session (logout).
    fn delete_dashboard_session<'a>(&'a self, id_sha256: &'a str) -> StoreFuture<'a, ()>;

    /// Telemetry stored after `after` in arrival order (arrival time,
    /// device, sequence number), at most `limit` rows: each row's key and
    /// its body as the device sent it.
    fn telemetry_arrived<'a>(
        &'a self,
        after: &'a super::ArrivalKey,
        limit: u32,
    ) -> StoreFuture<'a, Vec<(super::ArrivalKey, String)>>;

    /// Stores `profile` (JSON) as the drift reference of a model version
    /// that exists, replacing any.
    fn set_reference<'a>(
        &'a self,
        name: &'a str,
        version: u64,
        profile: &'a str,
        now: u64,
    ) -> StoreFuture<'a, ()>;

    /// A model version's drift reference (JSON), if it has one.
    fn get_reference<'a>(&'a self, name: &'a str, version: u64) -> StoreFuture<'a, Option<String>>;

    /// Every drift reference: model name, version, profile (JSON).
    fn list_references(&self) -> StoreFuture<'_, Vec<(String, u64, String)>>;

    /// Update events stored after `after` in arrival order, at most
    /// `limit` (events stored before they carried an arrival time never
    /// are).
    fn events_arrived<'a>(
        &'a self,
        after: &'a super::ArrivalKey,
        limit: u32,
    ) -> StoreFuture<'a, Vec<(super::ArrivalKey, EventRecord)>>;
}

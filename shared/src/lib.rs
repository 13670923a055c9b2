//! The edgefleet protocol, shared by the edge agent and the fleet server.
//!
//! Everything that crosses the wire between the two deployables is defined
//! here, once: the MQTT topic layout ([`topics`]), the JSON messages
//! ([`messages`]) and the signatures every message carries
//! ([`signed_message`]), the signed documents that carry trust and desired state
//! ([`documents`]; the agent release slot in [`agent_release`]), the one
//! canonical byte encoding those signatures cover
//! ([`canonical`]) and the ed25519 keys that make them ([`crypto`]). Both
//! sides write their secrets through [`secret_file`].

pub mod agent_release;
pub mod artifact;
pub mod broker_url;
pub mod canonical;
pub mod crypto;
pub mod documents;
pub mod drift;
pub mod ids;
pub mod messages;
pub mod quality;
pub mod secret_file;
pub mod signed_message;
pub mod topics;

pub use agent_release::{AgentBuild, AgentSlot, AgentStatus, ReleaseVersion};
pub use crypto::{KeyId, PublicKey, SecretKey};
pub use documents::{
    ChainWalk, Compressed, DesiredState, ModelFormat, ModelSlot, RoleKeys, RootDocument, Signed,
    SoakPolicy, TensorSpec, TestVector, VerifyError,
};
pub use ids::{DeviceId, InvalidId};
pub use messages::{
    EventKind, Health, InferenceResult, ModelStatus, ModelTelemetry, OutboxHealth, Receipt,
    ServerStatus, StatusMessage, TelemetryMessage, Temperature, UpdateEvent,
};
pub use signed_message::{MessageError, SignedMessage};
pub use topics::{DeviceTopic, TopicKind, TopicPrefix};

/// Version of the JSON schema every message and document carries in its
/// `schema` field. Bumped on incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

/// Seconds since the Unix epoch, the one time unit used on the wire.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

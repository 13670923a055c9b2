//! The handles the running server's parts share: the HTTP API, the
//! dashboard and the MQTT bridge each get a [`Fleet`] and use the owners
//! inside it (the store, the desired-state publisher, the rollout driver,
//! device keys, the dashboard's view and its logins). It holds no logic of
//! its own beyond forwarding to them.

use std::sync::Arc;

use edgefleet_shared::{DeviceId, TopicPrefix};
use rumqttc::AsyncClient;

use crate::artifacts::ArtifactStore;
use crate::desired::DesiredStates;
use crate::keys::Signer;
use crate::store::{Store, StoreError};

/// Shared state of the running server.
#[derive(Clone)]
pub struct Fleet {
    pub store: Store,
    pub artifacts: ArtifactStore,
    pub signer: Arc<Signer>,
    pub mqtt: AsyncClient,
    pub prefix: TopicPrefix,
    /// Base URL for artifact downloads, without trailing slash.
    pub public_url: String,
    pub max_upload_bytes: u64,
    pub metrics: crate::metrics::Metrics,
    /// The broker URL device bundles carry.
    pub device_mqtt_url: String,
    /// The private CA (PEM) device bundles carry for an `mqtts://` broker.
    pub device_ca_pem: Option<String>,
    /// Signs, stores and publishes desired state; knows the revoked
    /// devices.
    pub desired: DesiredStates,
    /// An external broker's address and the server's login there, to end
    /// a revoked device's session.
    pub external_broker: Option<crate::config::BrokerLogin>,
    /// The embedded broker, when it runs here: a revoked device is cut
    /// off through it, and `/metrics` reads its counters.
    pub broker: Option<crate::broker::Broker>,
    /// Each device's message-signing key, and what was refused.
    pub device_keys: Arc<crate::device_keys::DeviceKeys>,
    /// Staged rollouts (planner state, stored after every change).
    pub rollouts: crate::rollout::Rollouts,
    /// Each device's latest MQTT connection number, from its "online"
    /// status: a last will of an older connection is stale.
    pub sessions: Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
    /// The dashboard's in-memory view: latest health, last events, fleet
    /// series.
    pub insights: Arc<crate::insights::Insights>,
    /// Dashboard login sessions.
    pub logins: Arc<crate::logins::Sessions>,
    /// Session cookies carry `Secure` (the server is reached over HTTPS).
    pub secure_cookies: bool,
}

impl Fleet {
    pub fn is_revoked(&self, device: &str) -> bool {
        self.desired.revoked.contains(device)
    }

    /// Records a revocation (`true`) or a new enrollment (`false`).
    pub fn set_revoked(&self, device: &str, revoked: bool) {
        self.desired.revoked.set(device, revoked);
    }

    /// Signs, stores and publishes `device`'s desired state
    /// ([`DesiredStates::publish`]).
    pub async fn publish_desired(&self, device: &DeviceId) -> Result<Option<u64>, StoreError> {
        self.desired.publish(device).await
    }
}

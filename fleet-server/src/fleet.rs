//! The fleet service's core: turns assignments into signed desired state
//! and publishes it, and records what devices report.

use std::sync::Arc;

use edgefleet_shared::{
    DesiredState, DeviceId, ModelSlot, StatusMessage, TopicKind, TopicPrefix, UpdateEvent,
};
use rumqttc::{AsyncClient, QoS};

use crate::artifacts::ArtifactStore;
use crate::keys::Signer;
use crate::store::{self, ModelRecord, Store, StoreError};

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
    pub desired_expiry_secs: u64,
    pub max_upload_bytes: u64,
    pub metrics: crate::metrics::Metrics,
    /// The broker URL device bundles carry.
    pub device_mqtt_url: String,
    /// The private CA (PEM) device bundles carry for an `mqtts://` broker.
    pub device_ca_pem: Option<String>,
    /// Revoked devices: their messages are dropped and no desired state
    /// is published to them. Loaded at start, kept up to date by this
    /// server's revocations and enrollments (other servers on the same
    /// database learn them at their next start).
    pub revoked: Arc<std::sync::RwLock<std::collections::HashSet<String>>>,
    /// An external broker's address and the server's login there, to end
    /// a revoked device's session.
    pub external_broker: Option<crate::bridge::BrokerLogin>,
    /// The embedded broker, when it runs here: a revoked device is cut
    /// off through it, and `/metrics` reads its counters.
    pub broker: Option<crate::broker::Broker>,
    /// Each device's message-signing key, and what was refused.
    pub device_keys: Arc<crate::device_keys::DeviceKeys>,
    /// Staged rollouts (planner state, stored after every change).
    pub rollouts: crate::rollouts::Rollouts,
    /// Each device's latest MQTT connection number, from its "online"
    /// status: a last will of an older connection is stale.
    pub sessions: Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
    /// The dashboard's in-memory view: latest health, last events, fleet
    /// series.
    pub insights: Arc<crate::insights::Insights>,
    /// Dashboard login sessions.
    pub logins: Arc<crate::dashboard::session::Sessions>,
    /// Session cookies carry `Secure` (the server is reached over HTTPS).
    pub secure_cookies: bool,
}

impl Fleet {
    fn slot(&self, m: &ModelRecord) -> ModelSlot {
        ModelSlot {
            name: m.name.clone(),
            version: m.version,
            format: m.format,
            sha256: m.sha256.clone(),
            size: m.size,
            urls: vec![format!("{}/artifacts/{}", self.public_url, m.sha256)],
            inputs: m.spec.inputs.clone(),
            outputs: m.spec.outputs.clone(),
            test_vector: m.test_vector.clone(),
            soak: None,
            upload_results: false,
            zstd: self
                .artifacts
                .zst_size(&m.sha256)
                .map(|size| edgefleet_shared::Compressed {
                    size,
                    urls: vec![format!("{}/artifacts/{}.zst", self.public_url, m.sha256)],
                }),
        }
    }

    pub fn is_revoked(&self, device: &str) -> bool {
        self.revoked
            .read()
            .map(|set| set.contains(device))
            .unwrap_or(false)
    }

    /// Records a revocation (`true`) or a new enrollment (`false`).
    pub fn set_revoked(&self, device: &str, revoked: bool) {
        if let Ok(mut set) = self.revoked.write() {
            if revoked {
                set.insert(device.to_string());
            } else {
                set.remove(device);
            }
        }
    }

    /// Signs a new desired state for `device` from its assignments, stores
    /// it and publishes it retained. Returns the new document version, or
    /// `None` when the device has nothing assigned.
    pub async fn publish_desired(&self, device: &DeviceId) -> Result<Option<u64>, StoreError> {
        if self.is_revoked(device.as_str()) {
            tracing::info!(device = %device, "revoked: no desired state published");
            return Ok(None);
        }
        let fleet = self.clone();
        let id = device.clone();
        let now = edgefleet_shared::unix_now();
        let sign: store::SignFn = Box::new(move |models, version| {
            let slots: Vec<ModelSlot> = models.iter().map(|m| fleet.slot(m)).collect();
            let doc = DesiredState::new(id, version, now, now + fleet.desired_expiry_secs, slots);
            fleet.signer.sign(&doc).to_json()
        });
        let signed = self.store.sign_desired(device.as_str(), now, sign).await?;
        let Some((version, bytes)) = signed else {
            return Ok(None);
        };
        self.publish_retained(device, bytes).await;
        tracing::info!(device = %device, version, "desired state published");
        Ok(Some(version))
    }

    /// Signs again every device's desired state that is signed by a key
    /// the current root no longer trusts (after a rotation or revocation).
    /// Returns how many were re-signed.
    pub async fn resign_untrusted(&self) -> Result<usize, StoreError> {
        let stored = self.store.all_desired().await?;
        let mut count = 0;
        for (id, bytes) in stored {
            let trusted = edgefleet_shared::Signed::from_json(&bytes)
                .is_ok_and(|env| self.signer.trusts_signer_of(&env));
            if trusted {
                continue;
            }
            let Ok(device) = DeviceId::new(&id) else {
                continue;
            };
            if self.publish_desired(&device).await?.is_some() {
                count += 1;
            }
        }
        if count > 0 {
            tracing::info!(
                devices = count,
                root_version = self.signer.root().version,
                "desired state re-signed with the current online key"
            );
        }
        Ok(count)
    }

    /// Publishes a stored, signed desired state retained on the device's
    /// topic. A failure is logged: the document stays stored and is
    /// re-published when the device next reports.
    async fn publish_retained(&self, device: &DeviceId, bytes: Vec<u8>) {
        let topic = self.prefix.device(device, TopicKind::Desired).to_string();
        self.metrics.published("desired");
        if let Err(e) = self
            .mqtt
            .publish(topic, QoS::AtLeastOnce, true, bytes)
            .await
        {
            tracing::error!(device = %device, error = %e, "could not queue desired state; it is stored and will be re-published when the device reports");
        }
    }

    /// Records a batch of status messages and update events in one
    /// transaction (each status also reads back what its device should
    /// run), then acts on them in order: rollouts hear of presence, versions
    /// and outcomes; a device seen for the first time joins the rollouts
    /// that select it and gets its desired state.
    pub async fn on_messages(
        &self,
        statuses: Vec<StatusMessage>,
        events: Vec<UpdateEvent>,
    ) -> Result<(), StoreError> {
        let statuses: Vec<StatusMessage> = statuses
            .into_iter()
            .filter(|m| {
                let stale = self.stale_will(m);
                if stale {
                    tracing::debug!(device = %m.device_id, session = ?m.session, "last will of a replaced connection ignored");
                }
                !stale
            })
            .collect();
        if statuses.is_empty() && events.is_empty() {
            return Ok(());
        }
        let now = edgefleet_shared::unix_now();
        let (outcomes, new) = self.store.record_messages(&statuses, &events, now).await?;
        for (msg, outcome) in statuses.iter().zip(outcomes) {
            self.after_status(msg, outcome).await?;
        }
        for (event, new) in events.iter().zip(new) {
            if event.reason.is_some() {
                tracing::warn!(device = %event.device_id, kind = event.kind.as_str(), reason = ?event.reason, "device event");
            } else {
                tracing::info!(device = %event.device_id, kind = event.kind.as_str(), model = ?event.model, version = ?event.model_version, "device event");
            }
            if new {
                self.insights.on_event(event);
                self.rollouts.on_event(event).await;
            }
        }
        Ok(())
    }

    /// What follows a stored status message.
    async fn after_status(
        &self,
        msg: &StatusMessage,
        outcome: store::StatusOutcome,
    ) -> Result<(), StoreError> {
        let store::StatusOutcome {
            is_new,
            desired: stored,
        } = outcome;
        self.rollouts.on_status(msg).await;
        if is_new {
            if let Some(device) = self.store.get_device(msg.device_id.as_str()).await? {
                self.rollouts.on_join(self, &device).await;
            }
        }
        match stored {
            None => {}
            Some((_, None)) => {
                self.publish_desired(&msg.device_id).await?;
            }
            Some(_) if is_new => {
                self.publish_desired(&msg.device_id).await?;
            }
            Some((version, Some(bytes))) if msg.desired_version.unwrap_or(0) < version => {
                // The retained message may have been lost (e.g. an external
                // broker restarted without persistence): publish it again.
                self.publish_retained(&msg.device_id, bytes).await;
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// Records an online status's connection number; true for an offline
    /// message from a connection that a newer one has replaced (the broker
    /// publishes the old connection's will when it drops it, which may be
    /// after the new connection said it is online).
    fn stale_will(&self, msg: &StatusMessage) -> bool {
        let Some(session) = msg.session else {
            return false;
        };
        let Ok(mut sessions) = self.sessions.lock() else {
            return false;
        };
        let device = msg.device_id.as_str();
        if msg.online {
            let latest = sessions.entry(device.to_string()).or_insert(session);
            *latest = (*latest).max(session);
            false
        } else {
            sessions.get(device).is_some_and(|&latest| session < latest)
        }
    }
}

//! Desired state, from assignment to device: signs a device's document
//! from what the store says it should run, stores it and publishes it
//! retained on the device's topic. The rollout driver, the API and the
//! message ingest all go through [`DesiredStates`]; the broker is reached
//! only through a [`Publisher`], so the whole path runs in unit tests
//! against a [`MemoryPublisher`].

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};

use edgefleet_shared::quality::{ModelArtifact, ShadowSpec, SplitSpec};
use edgefleet_shared::{
    AgentBuild, AgentSlot, Compressed, DesiredState, DeviceId, ModelSlot, TopicKind, TopicPrefix,
};

use crate::artifacts::ArtifactStore;
use crate::clock::Clock;
use crate::keys::Signer;
use crate::store::quality::ResolvedQuality;
use crate::store::{self, AssignedAgent, ModelRecord, Store, StoreError};

/// Sampled requests a device keeps waiting for a shadow candidate.
const SHADOW_QUEUE: u32 = 8;
/// Share of one core a shadow candidate may use on a device.
const SHADOW_CPU_BUDGET: f64 = 0.25;

/// A future a [`Publisher`] returns.
pub type PublishFuture<'a> = Pin<Box<dyn Future<Output = Result<(), PublishError>> + Send + 'a>>;

/// Why a message could not be handed to the broker.
#[derive(Debug, thiserror::Error)]
#[error("cannot publish on {topic}: {reason}")]
pub struct PublishError {
    pub topic: String,
    pub reason: String,
}

/// Where retained messages for devices go: the broker, in the server.
pub trait Publisher: Send + Sync + 'static {
    /// Queues `payload` retained, at least once, on `topic`.
    fn publish_retained(&self, topic: String, payload: Vec<u8>) -> PublishFuture<'_>;
}

impl Publisher for rumqttc::AsyncClient {
    fn publish_retained(&self, topic: String, payload: Vec<u8>) -> PublishFuture<'_> {
        Box::pin(async move {
            self.publish(topic.clone(), rumqttc::QoS::AtLeastOnce, true, payload)
                .await
                .map_err(|e| PublishError {
                    topic,
                    reason: e.to_string(),
                })
        })
    }
}

/// One published message: topic and payload.
pub type Published = (String, Vec<u8>);

/// A publisher that keeps what it was given, in order.
#[derive(Debug, Clone, Default)]
pub struct MemoryPublisher(Arc<Mutex<Vec<Published>>>);

impl MemoryPublisher {
    /// Every message published so far, oldest first.
    pub fn published(&self) -> Vec<Published> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

impl Publisher for MemoryPublisher {
    fn publish_retained(&self, topic: String, payload: Vec<u8>) -> PublishFuture<'_> {
        Box::pin(async move {
            self.0
                .lock()
                .map_err(|_| PublishError {
                    topic: topic.clone(),
                    reason: "publisher poisoned".into(),
                })?
                .push((topic, payload));
            Ok(())
        })
    }
}

/// Revoked devices: no desired state is published to them and their
/// messages are dropped. Loaded at start, kept up to date by this server's
/// revocations and enrollments (other servers on the same database learn
/// them at their next start).
#[derive(Debug, Clone, Default)]
pub struct Revoked(Arc<RwLock<HashSet<String>>>);

impl Revoked {
    pub fn new(devices: HashSet<String>) -> Self {
        Self(Arc::new(RwLock::new(devices)))
    }

    pub fn contains(&self, device: &str) -> bool {
        self.0
            .read()
            .map(|set| set.contains(device))
            .unwrap_or(false)
    }

    /// Records a revocation (`true`) or a new enrollment (`false`).
    pub fn set(&self, device: &str, revoked: bool) {
        if let Ok(mut set) = self.0.write() {
            if revoked {
                set.insert(device.to_string());
            } else {
                set.remove(device);
            }
        }
    }
}

/// Signs, stores and publishes devices' desired state.
#[derive(Clone)]
pub struct DesiredStates {
    pub store: Store,
    pub artifacts: ArtifactStore,
    pub signer: Arc<Signer>,
    pub publisher: Arc<dyn Publisher>,
    pub clock: Arc<dyn Clock>,
    pub prefix: TopicPrefix,
    /// Base URL for artifact downloads, without trailing slash.
    pub public_url: String,
    /// How long a signed document stays valid.
    pub expiry_secs: u64,
    pub revoked: Revoked,
    pub metrics: crate::metrics::Metrics,
    /// Drift references: a version's bins go into its slot.
    pub drift: crate::drift::DriftView,
}

impl DesiredStates {
    /// The signed slot for one model version.
    fn slot(&self, m: &ModelRecord) -> ModelSlot {
        ModelSlot {
            name: m.name.clone(),
            version: m.version,
            format: m.format,
            sha256: m.sha256.clone(),
            size: m.size,
            inputs: m.spec.inputs.clone(),
            outputs: m.spec.outputs.clone(),
            test_vector: m.test_vector.clone(),
            soak: None,
            upload_results: false,
            urls: self.urls(&m.sha256),
            zstd: self.compressed(&m.sha256),
            shadow: None,
            split: None,
            drift: self.drift.spec(&m.name, m.version),
        }
    }

    /// A model file a slot names besides its own version.
    fn artifact(&self, m: &ModelRecord) -> ModelArtifact {
        ModelArtifact {
            version: m.version,
            format: m.format,
            sha256: m.sha256.clone(),
            size: m.size,
            urls: self.urls(&m.sha256),
            zstd: self.compressed(&m.sha256),
        }
    }

    /// `slot` with its assignment's shadow candidate and A/B split. A
    /// setting naming the slot's own version is left out: nothing to
    /// compare or split.
    fn with_quality(&self, mut slot: ModelSlot, quality: Option<&ResolvedQuality>) -> ModelSlot {
        let Some(q) = quality else {
            return slot;
        };
        if let Some((s, record)) = q.shadow.as_ref().filter(|(s, _)| s.version != slot.version) {
            slot.shadow = Some(ShadowSpec {
                candidate: self.artifact(record),
                sample_rate: s.sample_rate,
                compare: s.compare.clone(),
                max_queue: SHADOW_QUEUE,
                cpu_budget: SHADOW_CPU_BUDGET,
            });
        }
        if let Some((s, record)) = q.split.as_ref().filter(|(s, _)| s.version != slot.version) {
            slot.split = Some(SplitSpec {
                variant: self.artifact(record),
                share: s.share,
                experiment: s.experiment.clone(),
            });
        }
        slot
    }

    /// Where devices download the artifact with this hash.
    fn urls(&self, sha256: &str) -> Vec<String> {
        vec![format!("{}/artifacts/{sha256}", self.public_url)]
    }

    /// The compressed copy of an artifact, if the store has one.
    fn compressed(&self, sha256: &str) -> Option<Compressed> {
        self.artifacts.zst_size(sha256).map(|size| Compressed {
            size,
            urls: vec![format!("{}/artifacts/{sha256}.zst", self.public_url)],
        })
    }

    /// The signed agent slot for an assigned release: every build, each
    /// downloaded like a model file.
    pub fn agent_slot(&self, agent: &AssignedAgent) -> AgentSlot {
        AgentSlot {
            version: agent.version.clone(),
            allow_downgrade: agent.allow_downgrade,
            builds: agent
                .builds
                .iter()
                .map(|b| {
                    let build = AgentBuild {
                        sha256: b.sha256.clone(),
                        size: b.size,
                        urls: self.urls(&b.sha256),
                        zstd: self.compressed(&b.sha256),
                    };
                    (b.target.clone(), build)
                })
                .collect(),
        }
    }

    /// Signs a new desired state for `device` from its assignments (models
    /// and agent release), stores it and publishes it retained. Returns the new document version, or
    /// `None` when the device has nothing assigned or is revoked.
    pub async fn publish(&self, device: &DeviceId) -> Result<Option<u64>, StoreError> {
        if self.revoked.contains(device.as_str()) {
            tracing::info!(device = %device, "revoked: no desired state published");
            return Ok(None);
        }
        // The document is signed inside a store transaction, where the
        // compressed copies' sizes are looked up without waiting.
        self.artifacts.refresh().await;
        let this = self.clone();
        let id = device.clone();
        let now = self.clock.now();
        let sign: store::SignFn = Box::new(move |content, version| {
            let slots: Vec<ModelSlot> = content
                .models
                .iter()
                .map(|m| this.with_quality(this.slot(m), content.quality.get(&m.name)))
                .collect();
            let agent = content.agent.as_ref().map(|a| this.agent_slot(a));
            let doc = DesiredState::new(id, version, now, now + this.expiry_secs, slots)
                .with_agent(agent);
            this.signer.sign(&doc).to_json()
        });
        let signed = self.store.sign_desired(device.as_str(), now, sign).await?;
        let Some((version, bytes)) = signed else {
            return Ok(None);
        };
        self.republish(device, bytes).await;
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
            if self.publish(&device).await?.is_some() {
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
    /// published again when the device next reports.
    pub async fn republish(&self, device: &DeviceId, bytes: Vec<u8>) {
        let topic = self.prefix.device(device, TopicKind::Desired).to_string();
        self.metrics.published("desired");
        if let Err(e) = self.publisher.publish_retained(topic, bytes).await {
            tracing::error!(device = %device, error = %e, "could not queue desired state; it is stored and will be re-published when the device reports");
        }
    }
}

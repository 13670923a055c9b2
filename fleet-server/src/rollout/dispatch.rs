//! The rollout driver's dispatcher: carries out what the planner
//! commanded, in rounds. Each round assigns versions (a model version or
//! an agent release) to devices in one transaction per assignment, then
//! signs and publishes each device's desired state, apart from the
//! driver's lock, so device messages keep flowing meanwhile.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use edgefleet_shared::DeviceId;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::clock::Clock;
use crate::desired::DesiredStates;
use crate::store::quality::{QualityChange, ShadowSettings};
use crate::store::{self, Store, StoreError};

/// What to point one device at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Assign {
    Model {
        model: String,
        version: u64,
    },
    Agent {
        version: String,
        allow_downgrade: bool,
    },
    /// A model's shadow candidate: its settings as JSON (kept as text so
    /// assignments order and compare), or none to stop it.
    Quality {
        model: String,
        shadow: Option<String>,
    },
}

impl Assign {
    /// What the assignment replaces on a device: one model's version
    /// (`Some(model)`), or its agent release (`None`).
    pub(super) fn slot(&self) -> Option<&str> {
        match self {
            Self::Model { model, .. } | Self::Quality { model, .. } => Some(model),
            Self::Agent { .. } => None,
        }
    }
}

/// One device and what to point it at; `again` marks a command a
/// previous driver may already have carried out (it stored the command,
/// then stopped): a device whose signed desired state already holds the
/// assignment is left alone, so no step is signed twice.
#[derive(Debug, Clone)]
pub(super) struct Dispatch {
    pub device: String,
    pub assign: Assign,
    pub again: bool,
}

/// Whether `device`'s signed desired state already points at `assign`.
async fn holds(store: &Store, device: &str, assign: &Assign) -> bool {
    let Ok(Some(bytes)) = store.desired_json(device).await else {
        return false;
    };
    let Ok(doc) = edgefleet_shared::Signed::from_json(&bytes)
        .and_then(|env| env.parse_unverified::<edgefleet_shared::DesiredState>())
    else {
        return false;
    };
    match assign {
        Assign::Model { model, version } => doc
            .models
            .iter()
            .any(|m| &m.name == model && m.version == *version),
        Assign::Agent { version, .. } => doc.agent.is_some_and(|a| &a.version == version),
        Assign::Quality { model, shadow } => {
            let wanted = shadow
                .as_deref()
                .and_then(|s| serde_json::from_str::<ShadowSettings>(s).ok())
                .map(|s| s.version);
            doc.models.iter().any(|m| {
                &m.name == model && m.shadow.as_ref().map(|s| s.candidate.version) == wanted
            })
        }
    }
}

/// Most devices assigned per round.
const DISPATCH_BATCH: usize = 4096;
/// Desired states signed and stored at once.
const SIGN_CONCURRENCY: usize = 8;

/// Carries out the planner's commands in order: per round, the versions
/// are assigned in one transaction per (model, version) or agent release,
/// then each device's desired state is signed and published. A device
/// asked twice in one round about the same model (or its agent) gets only
/// the later word.
pub(super) async fn dispatch(
    store: Store,
    desired: DesiredStates,
    clock: Arc<dyn Clock>,
    mut rx: mpsc::UnboundedReceiver<Dispatch>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut batch = Vec::with_capacity(DISPATCH_BATCH);
    while rx.recv_many(&mut batch, DISPATCH_BATCH).await > 0 {
        // The latest word per (model or agent, device): walk the round
        // backwards.
        let mut seen = HashSet::new();
        let mut order: Vec<(String, Assign)> = Vec::with_capacity(batch.len());
        for d in batch.drain(..).rev() {
            if !seen.insert((d.assign.slot().map(str::to_string), d.device.clone())) {
                continue;
            }
            if d.again && holds(&store, &d.device, &d.assign).await {
                tracing::info!(device = %d.device, assignment = ?d.assign, "already signed by the previous driver; not signed again");
                continue;
            }
            order.push((d.device, d.assign));
        }
        order.reverse();
        let mut groups: BTreeMap<Assign, Vec<String>> = BTreeMap::new();
        for (device, assign) in &order {
            groups
                .entry(assign.clone())
                .or_default()
                .push(device.clone());
        }
        let now = clock.now();
        for (assign, devices) in groups {
            let target = store::Target::Devices(devices);
            let mut failures = 0u32;
            loop {
                let assigned = match &assign {
                    Assign::Model { model, version } => {
                        store.deploy(model, *version, &target, now).await
                    }
                    Assign::Agent {
                        version,
                        allow_downgrade,
                    } => {
                        store
                            .deploy_agent(version, *allow_downgrade, &target, now)
                            .await
                    }
                    Assign::Quality { model, shadow } => {
                        let settings = shadow
                            .as_deref()
                            .and_then(|s| serde_json::from_str::<ShadowSettings>(s).ok());
                        store
                            .set_quality(model, &QualityChange::Shadow(settings), &target)
                            .await
                    }
                };
                // A device that does not run the model has nothing to
                // shadow: retrying cannot change that.
                if let (Assign::Quality { .. }, Err(StoreError::NotFound(why))) =
                    (&assign, &assigned)
                {
                    tracing::warn!(assignment = ?assign, reason = %why, "shadow not set");
                    break;
                }
                let Err(e) = assigned else { break };
                failures += 1;
                tracing::error!(assignment = ?assign, error = %e, attempt = failures, "rollout cannot assign a version; retrying");
                let wait = std::time::Duration::from_millis((100u64 << failures.min(6)).min(5_000));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        // Each device once per round (one document covers all its models,
        // even when two rollouts moved it), so documents can be signed side
        // by side (PostgreSQL commits them on several connections) without
        // two for one device racing to be the retained one.
        let mut signed = HashSet::new();
        order.retain(|(device, _)| signed.insert(device.clone()));
        futures_util::stream::iter(order)
            .for_each_concurrent(SIGN_CONCURRENCY, |(device, _)| {
                let desired = &desired;
                async move {
                    match DeviceId::new(device.clone()) {
                        Ok(id) => {
                            if let Err(e) = desired.publish(&id).await {
                                tracing::error!(device = %device, error = %e, "rollout cannot publish desired state; the device gets it when it next reports");
                            }
                        }
                        Err(e) => {
                            tracing::error!(device = %device, error = %e, "bad device id in a rollout")
                        }
                    }
                }
            })
            .await;
    }
}

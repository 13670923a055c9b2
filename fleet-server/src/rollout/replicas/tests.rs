//! Two replicas' rollouts on one real PostgreSQL database (a schema of
//! its own): one drives, the other passes operator actions and device
//! reports through the inbox; when the driver stops without a word its
//! lease runs out and the other takes over from the stored state, signing
//! no device twice for one step and skipping none.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use edgefleet_shared::{DesiredState, DeviceId, EventKind, ModelFormat, Signed, TopicPrefix};
use tokio_util::sync::CancellationToken;

use super::super::driver::{CreateRollout, Rollouts};
use super::super::planner::{Command, Phase, WaveSize};
use crate::artifacts::ArtifactStore;
use crate::clock::ManualClock;
use crate::desired::{DesiredStates, MemoryPublisher, Revoked};
use crate::keys::{init_keys, Signer};
use crate::store::{ModelRecord, Store, Target};

const MODEL: &str = "digits";
const START: u64 = 1_800_000_000;

struct Replica {
    rollouts: Rollouts,
    published: MemoryPublisher,
}

async fn replica(
    store: &Store,
    signer: &Arc<Signer>,
    dir: &std::path::Path,
    clock: &ManualClock,
    name: &str,
) -> Replica {
    let published = MemoryPublisher::default();
    let desired = DesiredStates {
        store: store.clone(),
        artifacts: ArtifactStore::open(&dir.join(name)).unwrap(),
        signer: signer.clone(),
        publisher: Arc::new(published.clone()),
        clock: Arc::new(clock.clone()),
        prefix: TopicPrefix::new("edgefleet/v1").unwrap(),
        public_url: "http://fleet.test".into(),
        expiry_secs: 3600,
        revoked: Revoked::default(),
        metrics: Default::default(),
        drift: Default::default(),
    };
    let rollouts = Rollouts::load_as(store.clone(), desired, Arc::new(clock.clone()), name)
        .await
        .unwrap();
    Replica {
        rollouts,
        published,
    }
}

fn model(version: u64) -> ModelRecord {
    ModelRecord {
        name: MODEL.into(),
        version,
        format: ModelFormat::Onnx,
        sha256: format!("{version:064x}"),
        size: 100,
        created_at: START,
        test_vector: None,
        spec: Default::default(),
        pushed_by: None,
        notes: None,
    }
}

fn confirmed(device: &str) -> edgefleet_shared::UpdateEvent {
    edgefleet_shared::UpdateEvent {
        schema: edgefleet_shared::SCHEMA_VERSION,
        device_id: DeviceId::new(device).unwrap(),
        seq: 1,
        at: START,
        kind: EventKind::Confirmed,
        desired_version: None,
        model: Some(MODEL.into()),
        model_version: Some(2),
        reason: None,
        agent_version: None,
    }
}

/// Each device's signed desired-state versions that carry `version` of
/// the model, as published by one replica.
fn signed(published: &MemoryPublisher, version: u64) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (_, payload) in published.published() {
        let doc: DesiredState = Signed::from_json(&payload)
            .unwrap()
            .parse_unverified()
            .unwrap();
        if doc
            .models
            .iter()
            .any(|m| m.name == MODEL && m.version == version)
        {
            out.entry(doc.device_id.to_string())
                .or_default()
                .push(doc.version);
        }
    }
    out
}

async fn eventually(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Fleet {
    store: Store,
    signer: Arc<Signer>,
    clock: ManualClock,
    devices: Vec<String>,
    dir: tempfile::TempDir,
}

async fn fleet() -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    init_keys(&dir.path().join("keys"), 1, 1, 365).unwrap();
    let signer = Arc::new(Signer::load(&dir.path().join("keys")).unwrap());
    let url = crate::store::tests::fresh_postgres_schema().await;
    let store = Store::open(&url).await.unwrap();
    store.add_model(&model(1)).await.unwrap();
    store.add_model(&model(2)).await.unwrap();
    let devices: Vec<String> = (0..10).map(|i| format!("dev-{i:02}")).collect();
    store
        .deploy(MODEL, 1, &Target::Devices(devices.clone()), START)
        .await
        .unwrap();
    Fleet {
        store,
        signer,
        clock: ManualClock::at(START),
        devices,
        dir,
    }
}

#[tokio::test]
async fn one_replica_drives_the_other_passes_on_and_takes_over_when_it_dies() {
    let f = fleet().await;
    let r1 = replica(&f.store, &f.signer, f.dir.path(), &f.clock, "r1").await;
    let r2 = replica(&f.store, &f.signer, f.dir.path(), &f.clock, "r2").await;
    assert!(
        r1.rollouts.role.driving(),
        "the first replica takes the lease"
    );
    assert!(!r2.rollouts.role.driving(), "one driver at a time");
    let (stop1, stop2) = (CancellationToken::new(), CancellationToken::new());
    let driver1 = tokio::spawn(r1.rollouts.clone().run(stop1.clone()));
    tokio::spawn(r2.rollouts.clone().run(stop2.clone()));

    // Created and started through the replica that does not drive.
    let request = CreateRollout {
        id: "r".into(),
        model: MODEL.into(),
        version: 2,
        waves: vec![WaveSize::Count(2), WaveSize::Percent(100.0)],
        ..Default::default()
    };
    let created = r2
        .rollouts
        .create(request.clone(), f.devices.clone())
        .await
        .unwrap();
    assert_eq!(created.plan.devices.len(), 10);
    let again = r2.rollouts.create(request, f.devices.clone()).await;
    assert!(
        matches!(again, Err(super::RolloutError::Conflict(ref m)) if m.contains("exists")),
        "{again:?}"
    );
    let started = r2.rollouts.act("r", "start").await.unwrap();
    assert!(matches!(started.plan.phase, Phase::Running { wave: 0, .. }));
    // Only the driver signs: the canary wave.
    eventually("the driver signs the first wave", 5, || {
        signed(&r1.published, 2).len() == 2
    })
    .await;
    assert!(r2.published.published().is_empty());
    // The other replica reads what the driver stored.
    let seen = r2.rollouts.record("r").await.unwrap();
    assert!(matches!(seen.plan.phase, Phase::Running { wave: 0, .. }));

    // The canaries' confirmations reach the other replica; passed on,
    // they move the driver to the next wave.
    for device in signed(&r1.published, 2).keys() {
        r2.rollouts.on_event(&confirmed(device)).await;
    }
    r2.rollouts.flush().await.unwrap();
    eventually("the driver starts the last wave", 10, || {
        signed(&r1.published, 2).len() == 10
    })
    .await;

    // The driver dies without a word: its lease runs out, the other
    // replica takes over and carries on from the stored state.
    driver1.abort();
    let _ = driver1.await;
    let took_over = std::time::Instant::now();
    eventually("the other replica takes over", 10, || {
        r2.rollouts.role.driving()
    })
    .await;
    let waited = took_over.elapsed();
    assert!(
        waited < Duration::from_secs(8),
        "took over after {waited:?}"
    );
    for device in &f.devices {
        r2.rollouts.on_event(&confirmed(device)).await;
    }
    r2.rollouts.flush().await.unwrap();
    eventually("the new driver completes the rollout", 10, || {
        futures_util::FutureExt::now_or_never(r2.rollouts.record("r"))
            .flatten()
            .is_some_and(|r| r.plan.phase == Phase::Completed)
    })
    .await;
    // Every device signed exactly once for the step, by the first driver.
    let once = signed(&r1.published, 2);
    assert_eq!(once.len(), 10);
    assert!(once.values().all(|v| v.len() == 1), "{once:?}");
    assert!(signed(&r2.published, 2).is_empty());
    stop2.cancel();
}

#[tokio::test]
async fn a_new_driver_carries_out_stored_commands_once() {
    let f = fleet().await;
    let r1 = replica(&f.store, &f.signer, f.dir.path(), &f.clock, "r1").await;
    let stop1 = CancellationToken::new();
    r1.rollouts.spawn_dispatcher(stop1.clone());
    let request = CreateRollout {
        id: "r".into(),
        model: MODEL.into(),
        version: 2,
        waves: vec![WaveSize::Count(2), WaveSize::Percent(100.0)],
        ..Default::default()
    };
    r1.rollouts
        .create(request, f.devices.clone())
        .await
        .unwrap();
    r1.rollouts.act("r", "start").await.unwrap();
    eventually("the first wave is signed", 5, || {
        signed(&r1.published, 2).len() == 2
    })
    .await;
    let canaries: Vec<String> = signed(&r1.published, 2).into_keys().collect();
    // The driver stored commands for the canaries (done) and for a third
    // device (stored, then the driver died before carrying it out).
    let third = f
        .devices
        .iter()
        .find(|d| !canaries.contains(d))
        .unwrap()
        .clone();
    let mut record = r1.rollouts.record("r").await.unwrap();
    record.pending_mut().extend(
        canaries
            .iter()
            .chain([&third])
            .map(|d| Command::Update(d.clone())),
    );
    r1.rollouts.save_for_test(&record).await.unwrap();
    stop1.cancel();
    f.store.release_lease("rollouts", "r1").await.unwrap();

    let r2 = replica(&f.store, &f.signer, f.dir.path(), &f.clock, "r2").await;
    assert!(r2.rollouts.role.driving());
    let stop2 = CancellationToken::new();
    r2.rollouts.spawn_dispatcher(stop2.clone());
    eventually("the stored command is carried out", 5, || {
        signed(&r2.published, 2).contains_key(&third)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = signed(&r2.published, 2);
    assert_eq!(
        again.keys().collect::<Vec<_>>(),
        vec![&third],
        "the canaries already held it and were not signed again"
    );
    stop2.cancel();
}

//! The driver between the planner and the fleet: a real SQLite store in a
//! temp dir, real signing keys, a [`MemoryPublisher`] for the broker and a
//! [`ManualClock`], so soak times, timeouts and backoff pass when a test
//! moves the clock, not by sleeping.

use std::sync::Arc;
use std::time::Duration;

use edgefleet_shared::{
    DesiredState, DeviceId, EventKind, ModelFormat, Signed, StatusMessage, TopicPrefix, UpdateEvent,
};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::artifacts::ArtifactStore;
use crate::clock::ManualClock;
use crate::desired::{MemoryPublisher, Revoked};
use crate::keys::{init_keys, Signer};
use crate::store::{ModelRecord, Target};

const MODEL: &str = "digits";
const START: u64 = 1_800_000_000;

struct Fixture {
    rollouts: Rollouts,
    store: Store,
    desired: DesiredStates,
    published: MemoryPublisher,
    clock: ManualClock,
    shutdown: CancellationToken,
    devices: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.shutdown.cancel();
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

/// Ten devices on version 1 of the model, version 2 pushed.
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    init_keys(&dir.path().join("keys"), 1, 1, 365).unwrap();
    let signer = Arc::new(Signer::load(&dir.path().join("keys")).unwrap());
    let store = Store::open(dir.path().join("fleet.db").to_str().unwrap())
        .await
        .unwrap();
    let clock = ManualClock::at(START);
    let published = MemoryPublisher::default();
    let desired = DesiredStates {
        store: store.clone(),
        artifacts: ArtifactStore::open(&dir.path().join("artifacts")).unwrap(),
        signer,
        publisher: Arc::new(published.clone()),
        clock: Arc::new(clock.clone()),
        prefix: TopicPrefix::new("edgefleet/v1").unwrap(),
        public_url: "http://fleet.test".into(),
        expiry_secs: 3600,
        revoked: Revoked::default(),
        metrics: Default::default(),
        drift: Default::default(),
    };
    store.add_model(&model(1)).await.unwrap();
    store.add_model(&model(2)).await.unwrap();
    let devices: Vec<String> = (0..10).map(|i| format!("dev-{i:02}")).collect();
    store
        .deploy(MODEL, 1, &Target::Devices(devices.clone()), START)
        .await
        .unwrap();
    let rollouts = Rollouts::load(store.clone(), desired.clone(), Arc::new(clock.clone()))
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    rollouts.spawn_dispatcher(shutdown.clone());
    Fixture {
        rollouts,
        store,
        desired,
        published,
        clock,
        shutdown,
        devices,
        _dir: dir,
    }
}

fn request(id: &str, waves: Vec<WaveSize>, gates: Gates) -> CreateRollout {
    CreateRollout {
        id: id.into(),
        model: MODEL.into(),
        version: 2,
        waves,
        gates: Some(gates),
        ..Default::default()
    }
}

fn event(device: &str, kind: EventKind, version: u64) -> UpdateEvent {
    UpdateEvent {
        schema: edgefleet_shared::SCHEMA_VERSION,
        device_id: DeviceId::new(device).unwrap(),
        seq: 1,
        at: START,
        kind,
        desired_version: None,
        model: Some(MODEL.into()),
        model_version: Some(version),
        reason: (kind != EventKind::Confirmed).then(|| "test vector failed".to_string()),
        agent_version: None,
    }
}

/// Waits (a few seconds at most) for the dispatcher task to have done
/// what `done` checks; panics with its last complaint when it has not.
async fn eventually<E: std::fmt::Display>(done: impl Fn() -> Result<(), E>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match done() {
            Ok(()) => return,
            Err(why) => assert!(tokio::time::Instant::now() < deadline, "{why}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Fixture {
    /// The model version in each device's latest published desired state.
    fn latest_versions(&self) -> BTreeMap<String, u64> {
        let mut latest = BTreeMap::new();
        for (topic, payload) in self.published.published() {
            let doc: DesiredState = Signed::from_json(&payload)
                .unwrap()
                .parse_unverified()
                .unwrap();
            assert_eq!(
                topic,
                format!("edgefleet/v1/devices/{}/desired", doc.device_id)
            );
            let slot = doc.models.iter().find(|m| m.name == MODEL).unwrap();
            latest.insert(doc.device_id.to_string(), slot.version);
        }
        latest
    }

    /// How many desired states were published for `device`.
    fn publishes_to(&self, device: &str) -> usize {
        let topic = format!("edgefleet/v1/devices/{device}/desired");
        self.published
            .published()
            .iter()
            .filter(|(t, _)| *t == topic)
            .count()
    }

    /// Waits (a few seconds at most) for the dispatcher to have published
    /// `version` as the latest for exactly `devices`.
    async fn expect_latest(&self, want: &[(&str, u64)]) {
        let want: BTreeMap<String, u64> = want.iter().map(|(d, v)| (d.to_string(), *v)).collect();
        eventually(|| {
            let latest = self.latest_versions();
            (latest == want)
                .then_some(())
                .ok_or_else(|| format!("published {latest:?}, expected {want:?}"))
        })
        .await;
    }

    async fn plan(&self, id: &str) -> Rollout {
        self.rollouts.record(id).await.unwrap().plan
    }

    /// The devices of rollout `id` in state `kind` (`"updating"`, ...).
    async fn in_state(&self, id: &str, kind: &str) -> Vec<String> {
        self.plan(id)
            .await
            .devices
            .iter()
            .filter(|(_, s)| serde_json::to_value(s).unwrap()["state"] == kind)
            .map(|(d, _)| d.clone())
            .collect()
    }
}

#[tokio::test]
async fn waves_advance_on_confirmations_and_the_soak_time() {
    let f = fixture().await;
    let gates = Gates {
        soak_secs: 60,
        ..Default::default()
    };
    let waves = vec![WaveSize::Count(1), WaveSize::Percent(100.0)];
    f.rollouts
        .create(request("r1", waves, gates), f.devices.clone())
        .await
        .unwrap();
    assert!(f.published.published().is_empty(), "created, not started");
    f.rollouts.act("r1", "start").await.unwrap();
    let canary = f.in_state("r1", "updating").await;
    assert_eq!(canary.len(), 1, "one canary");
    f.expect_latest(&[(&canary[0], 2)]).await;
    // Its assignment is stored: a restart would sign the same.
    let assigned = f.store.assigned_versions(MODEL, &canary).await.unwrap();
    assert_eq!(assigned[&canary[0]], Some(2));

    f.rollouts
        .on_event(&event(&canary[0], EventKind::Confirmed, 2))
        .await;
    f.rollouts.flush().await.unwrap();
    // The soak time has not passed on the rollout's clock.
    f.clock.advance(59);
    f.rollouts.tick().await;
    assert_eq!(
        f.plan("r1").await.phase,
        Phase::Running {
            wave: 0,
            wave_started: START
        }
    );
    f.clock.advance(2);
    f.rollouts.tick().await;
    assert!(matches!(
        f.plan("r1").await.phase,
        Phase::Running { wave: 1, .. }
    ));
    let all: Vec<(&str, u64)> = f.devices.iter().map(|d| (d.as_str(), 2)).collect();
    f.expect_latest(&all).await;
    // Every device reports in: once the last wave has soaked too, the
    // rollout completes.
    for d in &f.devices {
        f.rollouts
            .on_event(&event(d, EventKind::Confirmed, 2))
            .await;
    }
    f.rollouts.tick().await;
    assert!(matches!(
        f.plan("r1").await.phase,
        Phase::Running { wave: 1, .. }
    ));
    f.clock.advance(60);
    f.rollouts.tick().await;
    assert_eq!(f.plan("r1").await.phase, Phase::Completed);
    assert!(!f.rollouts.record("r1").await.unwrap().active());
}

#[tokio::test]
async fn a_failure_past_the_threshold_aborts_and_sends_moved_devices_back() {
    let f = fixture().await;
    let gates = Gates {
        failure_action: planner::FailureAction::Abort,
        failure_pct: 10.0,
        ..Default::default()
    };
    let waves = vec![WaveSize::Count(2), WaveSize::Percent(100.0)];
    f.rollouts
        .create(request("r2", waves, gates), f.devices.clone())
        .await
        .unwrap();
    f.rollouts.act("r2", "start").await.unwrap();
    let moved = f.in_state("r2", "updating").await;
    assert_eq!(moved.len(), 2);
    f.expect_latest(&[(&moved[0], 2), (&moved[1], 2)]).await;

    // A report about another version is not this rollout's.
    f.rollouts
        .on_event(&event(&moved[0], EventKind::RolledBack, 7))
        .await;
    assert!(matches!(f.plan("r2").await.phase, Phase::Running { .. }));

    f.rollouts
        .on_event(&event(&moved[0], EventKind::RolledBack, 2))
        .await;
    f.rollouts.flush().await.unwrap();
    let phase = f.plan("r2").await.phase;
    assert!(matches!(phase, Phase::Aborted { .. }), "{phase:?}");
    // Both moved devices are signed their previous version again; the
    // others were never touched.
    f.expect_latest(&[(&moved[0], 1), (&moved[1], 1)]).await;
    let assigned = f.store.assigned_versions(MODEL, &f.devices).await.unwrap();
    assert!(assigned.values().all(|v| *v == Some(1)), "{assigned:?}");
    // And an aborted rollout no longer holds its devices.
    f.rollouts
        .create(
            request("r3", vec![WaveSize::Percent(100.0)], Gates::default()),
            f.devices.clone(),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_silent_device_is_asked_again_after_its_timeout_then_failed() {
    let f = fixture().await;
    let gates = Gates {
        device_timeout_secs: 30,
        retries: 1,
        failure_pct: 100.0,
        ..Default::default()
    };
    f.rollouts
        .create(
            request("r4", vec![WaveSize::Count(1)], gates),
            f.devices.clone(),
        )
        .await
        .unwrap();
    f.rollouts.act("r4", "start").await.unwrap();
    let canary = f.in_state("r4", "updating").await.remove(0);
    f.expect_latest(&[(&canary, 2)]).await;
    assert_eq!(f.publishes_to(&canary), 1);

    // Within its timeout nothing happens.
    f.clock.advance(29);
    f.rollouts.tick().await;
    assert_eq!(f.in_state("r4", "updating").await, vec![canary.clone()]);
    // At it, the device backs off, then is asked again.
    f.clock.advance(1);
    f.rollouts.tick().await;
    assert_eq!(f.in_state("r4", "backoff").await, vec![canary.clone()]);
    for _ in 0..100 {
        f.clock.advance(10);
        f.rollouts.tick().await;
        if !f.in_state("r4", "updating").await.is_empty() {
            break;
        }
    }
    assert_eq!(f.in_state("r4", "updating").await, vec![canary.clone()]);
    eventually(|| {
        (f.publishes_to(&canary) >= 2)
            .then_some(())
            .ok_or("not asked again")
    })
    .await;
    // Out of retries: failed, with the reason.
    f.clock.advance(30);
    f.rollouts.tick().await;
    assert_eq!(f.in_state("r4", "failed").await, vec![canary.clone()]);
    let state = f.plan("r4").await.devices[&canary].clone();
    assert_eq!(
        state,
        planner::DeviceState::Failed {
            reason: "no report within 30 s, 2 attempts".into()
        }
    );
}

#[tokio::test]
async fn a_device_joining_the_selection_is_taken_in() {
    let f = fixture().await;
    let mut req = request("r5", vec![WaveSize::Percent(100.0)], Gates::default());
    req.tags = [("site".to_string(), "lab".to_string())].into();
    let lab: Vec<String> = f.devices[..3].to_vec();
    f.rollouts.create(req, lab.clone()).await.unwrap();
    f.rollouts.act("r5", "start").await.unwrap();

    let mut newcomer = crate::store::DeviceRecord::new("dev-new");
    newcomer.online = true;
    // Not selected: no tag.
    f.rollouts.on_join(&newcomer).await;
    assert!(!f.plan("r5").await.devices.contains_key("dev-new"));
    newcomer.tags.insert("site".into(), "lab".into());
    f.rollouts.on_join(&newcomer).await;
    f.rollouts.flush().await.unwrap();
    assert!(f.plan("r5").await.devices.contains_key("dev-new"));
    let mut want: Vec<(&str, u64)> = lab.iter().map(|d| (d.as_str(), 2)).collect();
    want.push(("dev-new", 2));
    f.expect_latest(&want).await;
    // Its version before the rollout is remembered (none: an abort
    // leaves it as it is).
    let record = f.rollouts.record("r5").await.unwrap();
    assert_eq!(record.previous.get("dev-new"), Some(&None));
}

#[tokio::test]
async fn a_restarted_driver_resumes_where_the_store_left_it() {
    let f = fixture().await;
    f.rollouts
        .create(
            request(
                "r6",
                vec![WaveSize::Count(1), WaveSize::Percent(100.0)],
                Gates::default(),
            ),
            f.devices.clone(),
        )
        .await
        .unwrap();
    f.rollouts.act("r6", "start").await.unwrap();
    let canary = f.in_state("r6", "updating").await.remove(0);
    f.rollouts
        .on_event(&event(&canary, EventKind::Confirmed, 2))
        .await;
    f.rollouts.flush().await.unwrap();
    let before = f.plan("r6").await;

    let again = Rollouts::load(
        f.store.clone(),
        f.desired.clone(),
        Arc::new(f.clock.clone()),
    )
    .await
    .unwrap();
    let after = again.record("r6").await.unwrap().plan;
    assert_eq!(after, before);
    assert_eq!(
        after.devices[&canary],
        planner::DeviceState::Confirmed { at: START }
    );
    // Unknown ids and actions are refused with what was wrong.
    let err = again.act("nope", "start").await.unwrap_err();
    assert!(matches!(err, RolloutError::NotFound(_)), "{err}");
    let err = again.act("r6", "launch").await.unwrap_err();
    assert!(err.to_string().contains("launch"), "{err}");
}

// ---- agent rollouts ---------------------------------------------------------

const ARM: &str = "aarch64-unknown-linux-musl";

/// The fixture with agent releases 1.0.0 and 2.0.0 pushed (one build
/// each) and every device assigned 1.0.0.
async fn agent_fixture() -> Fixture {
    let f = fixture().await;
    for (version, seed) in [("1.0.0", 0xa1u8), ("2.0.0", 0xa2)] {
        f.store
            .add_agent_build(&crate::store::AgentBuildRecord {
                version: version.into(),
                target: ARM.into(),
                sha256: format!("{seed:02x}").repeat(32),
                size: 4096,
                created_at: START,
                pushed_by: None,
                notes: None,
            })
            .await
            .unwrap();
    }
    f.store
        .deploy_agent("1.0.0", false, &Target::Devices(f.devices.clone()), START)
        .await
        .unwrap();
    f
}

fn agent_request(id: &str, waves: Vec<WaveSize>, gates: Gates) -> CreateRollout {
    CreateRollout {
        id: id.into(),
        agent: Some("2.0.0".into()),
        waves,
        gates: Some(gates),
        ..Default::default()
    }
}

/// An online status of a device running agent `release`.
fn agent_status(device: &str, seq: u64, release: Option<&str>) -> StatusMessage {
    StatusMessage {
        seq,
        online: true,
        agent_version: "test".into(),
        agent: Some(edgefleet_shared::AgentStatus {
            target: ARM.into(),
            release: release.map(str::to_string),
        }),
        ..StatusMessage::offline(DeviceId::new(device).unwrap())
    }
}

/// An event about agent release `release`.
fn agent_event(device: &str, kind: EventKind, release: &str) -> UpdateEvent {
    UpdateEvent {
        model: None,
        model_version: None,
        agent_version: Some(release.into()),
        reason: Some("crash loop".into()),
        ..event(device, kind, 0)
    }
}

impl Fixture {
    /// The agent slot (release, allow_downgrade) of each device's latest
    /// published desired state.
    fn latest_agents(&self) -> BTreeMap<String, (String, bool)> {
        let mut latest = BTreeMap::new();
        for (_, payload) in self.published.published() {
            let doc: DesiredState = Signed::from_json(&payload)
                .unwrap()
                .parse_unverified()
                .unwrap();
            let slot = doc.agent.expect("an agent slot");
            let build = &slot.builds[ARM];
            assert_eq!(
                build.urls,
                vec![format!("http://fleet.test/artifacts/{}", build.sha256)]
            );
            latest.insert(
                doc.device_id.to_string(),
                (slot.version, slot.allow_downgrade),
            );
        }
        latest
    }

    async fn expect_agents(&self, want: &[(&str, &str, bool)]) {
        let want: BTreeMap<String, (String, bool)> = want
            .iter()
            .map(|(d, v, down)| (d.to_string(), (v.to_string(), *down)))
            .collect();
        eventually(|| {
            let latest = self.latest_agents();
            (latest == want)
                .then_some(())
                .ok_or_else(|| format!("published {latest:?}, expected {want:?}"))
        })
        .await;
    }
}

#[tokio::test]
async fn agent_rollouts_confirm_on_status_pause_on_failures_and_abort_back_with_a_downgrade() {
    let f = agent_fixture().await;
    let gates = Gates {
        failure_pct: 10.0,
        ..Default::default()
    };
    let waves = vec![WaveSize::Count(3), WaveSize::Percent(100.0)];
    let created = f
        .rollouts
        .create(agent_request("a1", waves, gates), f.devices.clone())
        .await
        .unwrap();
    let agent = created.agent.clone().unwrap();
    assert_eq!(agent.version, "2.0.0");
    assert!(agent
        .previous
        .values()
        .all(|v| v.as_deref() == Some("1.0.0")));
    f.rollouts.act("a1", "start").await.unwrap();
    let moved = f.in_state("a1", "updating").await;
    assert_eq!(moved.len(), 3);
    let want: Vec<(&str, &str, bool)> =
        moved.iter().map(|d| (d.as_str(), "2.0.0", false)).collect();
    f.expect_agents(&want).await;
    // The model stays where it was.
    let models = f.latest_versions();
    assert!(models.values().all(|v| *v == 1), "{models:?}");

    // Success: the device's status says it runs the release.
    f.rollouts
        .on_status(&agent_status(&moved[0], 5, Some("1.0.0")))
        .await;
    assert_eq!(f.in_state("a1", "updating").await.len(), 3, "still 1.0.0");
    f.rollouts
        .on_status(&agent_status(&moved[0], 6, Some("2.0.0")))
        .await;
    assert_eq!(f.in_state("a1", "confirmed").await, vec![moved[0].clone()]);
    // Reports about other releases, and model confirmations, are not
    // this rollout's.
    f.rollouts
        .on_event(&agent_event(&moved[1], EventKind::RolledBack, "3.0.0"))
        .await;
    f.rollouts
        .on_event(&event(&moved[1], EventKind::Confirmed, 2))
        .await;
    assert_eq!(f.in_state("a1", "updating").await.len(), 2);
    // A failed self-test: the failure gate (10 %) pauses the rollout.
    f.rollouts
        .on_event(&agent_event(
            &moved[1],
            EventKind::ActivationFailed,
            "2.0.0",
        ))
        .await;
    f.rollouts.flush().await.unwrap();
    let phase = f.plan("a1").await.phase;
    assert!(matches!(phase, Phase::Paused { .. }), "{phase:?}");
    assert_eq!(f.in_state("a1", "failed").await, vec![moved[1].clone()]);
    // A device that went back by itself after its status counted fails too.
    f.rollouts
        .on_event(&agent_event(&moved[0], EventKind::RolledBack, "2.0.0"))
        .await;
    let mut failed = f.in_state("a1", "failed").await;
    failed.sort();
    let mut want_failed = moved[..2].to_vec();
    want_failed.sort();
    assert_eq!(failed, want_failed);

    // Abort: the moved devices get 1.0.0 back, allowed as a downgrade.
    f.rollouts.act("a1", "abort").await.unwrap();
    let want: Vec<(&str, &str, bool)> = moved.iter().map(|d| (d.as_str(), "1.0.0", true)).collect();
    f.expect_agents(&want).await;
    for d in &moved {
        let assigned = f.store.agent_for_device(d).await.unwrap().unwrap();
        assert_eq!(
            (assigned.version.as_str(), assigned.allow_downgrade),
            ("1.0.0", true)
        );
    }
    let untouched = f
        .store
        .agent_for_device(f.devices.iter().find(|d| !moved.contains(d)).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (untouched.version.as_str(), untouched.allow_downgrade),
        ("1.0.0", false)
    );

    // The stored record reads back as an agent rollout.
    let again = Rollouts::load(
        f.store.clone(),
        f.desired.clone(),
        Arc::new(f.clock.clone()),
    )
    .await
    .unwrap();
    let record = again.record("a1").await.unwrap();
    assert_eq!(record.agent, f.rollouts.record("a1").await.unwrap().agent);
    assert_eq!(record.what(), "agent 2.0.0");
}

#[tokio::test]
async fn agent_rollouts_complete_and_model_rollouts_ignore_agent_events() {
    let f = agent_fixture().await;
    f.rollouts
        .create(
            agent_request("a2", vec![WaveSize::Percent(100.0)], Gates::default()),
            f.devices[..2].to_vec(),
        )
        .await
        .unwrap();
    f.rollouts
        .create(
            request("m2", vec![WaveSize::Percent(100.0)], Gates::default()),
            f.devices[2..4].to_vec(),
        )
        .await
        .unwrap();
    f.rollouts.act("a2", "start").await.unwrap();
    f.rollouts.act("m2", "start").await.unwrap();
    for (seq, d) in f.devices[..2].iter().enumerate() {
        f.rollouts
            .on_status(&agent_status(d, seq as u64 + 1, Some("2.0.0")))
            .await;
    }
    f.rollouts.tick().await;
    assert_eq!(f.plan("a2").await.phase, Phase::Completed);
    // An agent failure on a model rollout's device is not the model's.
    f.rollouts
        .on_event(&agent_event(&f.devices[2], EventKind::RolledBack, "2.0.0"))
        .await;
    assert_eq!(f.in_state("m2", "updating").await.len(), 2);
}

#[tokio::test]
async fn agent_rollouts_need_a_pushed_release_and_one_subject() {
    let f = agent_fixture().await;
    let mut req = agent_request("a3", vec![WaveSize::Percent(100.0)], Gates::default());
    req.agent = Some("9.0.0".into());
    let err = f
        .rollouts
        .create(req.clone(), f.devices.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, RolloutError::NotFound(_)), "{err}");
    req.agent = Some("nine".into());
    let err = f
        .rollouts
        .create(req.clone(), f.devices.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RolloutError::BadRequest(m) if m.contains("semantic version")),
        "{err}"
    );
    req.agent = Some("2.0.0".into());
    req.model = MODEL.into();
    req.version = 2;
    let err = f
        .rollouts
        .create(req.clone(), f.devices.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RolloutError::BadRequest(m) if m.contains("not both")),
        "{err}"
    );
    req.agent = None;
    req.allow_downgrade = true;
    let err = f.rollouts.create(req, f.devices.clone()).await.unwrap_err();
    assert!(
        matches!(&err, RolloutError::BadRequest(m) if m.contains("allow_downgrade")),
        "{err}"
    );
}

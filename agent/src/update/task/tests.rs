//! Unit tests of the update task: its reaction to each shape of desired
//! state and to each download outcome, and the activation, soak and
//! rollback it drives. Time is a [`FakeClock`]; downloads come from a
//! [`FakeFetcher`] or, where the real retry and hash check matter, from
//! the real [`Downloader`] against a small HTTP server on a real socket.
//! The model store is real (a temporary directory) and so are the models
//! (`models/digits/` in the repository).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use edgefleet_shared::documents::TestTensor;
use edgefleet_shared::{ModelFormat, RootDocument, SecretKey, Signed, TestVector, UpdateEvent};
use futures_util::future::BoxFuture;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::*;
use crate::clock::FakeClock;
use crate::download::{DownloadError, Downloader};
use crate::engine::Runtimes;
use crate::outbox::{OutboxHandle, Sequence, Stream, StreamPolicy};
use crate::report::refusals::REFUSAL_PERIOD;

/// The same task with the real downloader over a real socket.
mod downloads;
/// Shadow candidates and A/B variants.
mod quality;

/// A fetcher that serves files from memory by URL, or fails as told. It
/// keeps the [`Fetcher`] contract: what it leaves in `dest` is exactly
/// the signed bytes.
#[derive(Debug, Clone, Default)]
struct FakeFetcher {
    state: Arc<Mutex<FakeFetcherState>>,
}

#[derive(Debug, Default)]
struct FakeFetcherState {
    files: HashMap<String, Vec<u8>>,
    /// Failures returned by the next fetches, in order, whatever the URL.
    failures: VecDeque<DownloadError>,
    /// Every fetch asked for: (model, version).
    fetched: Vec<(String, u64)>,
}

impl FakeFetcher {
    fn lock(&self) -> std::sync::MutexGuard<'_, FakeFetcherState> {
        self.state.lock().unwrap()
    }

    fn serve(&self, url: &str, bytes: Vec<u8>) {
        self.lock().files.insert(url.to_string(), bytes);
    }

    fn fail_next(&self, error: DownloadError) {
        self.lock().failures.push_back(error);
    }

    fn fetched(&self) -> Vec<(String, u64)> {
        self.lock().fetched.clone()
    }
}

impl Fetcher for FakeFetcher {
    fn fetch<'a>(
        &'a self,
        slot: &'a Artifact<'a>,
        dest: &'a Path,
    ) -> BoxFuture<'a, Result<(), DownloadError>> {
        let outcome = {
            let mut state = self.lock();
            let version = slot.version.parse().expect("the fake fetches models");
            state.fetched.push((slot.name.to_string(), version));
            match state.failures.pop_front() {
                Some(e) => Err(e),
                None => slot
                    .urls
                    .iter()
                    .find_map(|url| state.files.get(url).cloned())
                    .ok_or_else(|| DownloadError::AllUrlsFailed("HTTP 404 Not Found".into())),
            }
        };
        Box::pin(async move {
            let bytes = outcome?;
            if bytes.len() as u64 > slot.size {
                return Err(DownloadError::TooLarge {
                    declared: slot.size,
                });
            }
            let actual = sha256_hex(&bytes);
            if actual != slot.sha256 {
                return Err(DownloadError::HashMismatch {
                    expected: slot.sha256.to_string(),
                    actual,
                });
            }
            tokio::fs::write(dest, bytes)
                .await
                .map_err(|e| DownloadError::Io(e.to_string()))
        })
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A model file of the repository's `models/` folder.
fn model_bytes(relative: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models")
        .join(relative);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn fp32() -> Vec<u8> {
    model_bytes("digits/digits_fp32.onnx")
}

fn int8() -> Vec<u8> {
    model_bytes("digits/digits_int8.onnx")
}

/// A slot for `bytes` as model `name` version `version`, at `url`.
fn slot(name: &str, version: u64, bytes: &[u8], url: &str) -> ModelSlot {
    ModelSlot {
        name: name.into(),
        version,
        format: ModelFormat::Onnx,
        sha256: sha256_hex(bytes),
        size: bytes.len() as u64,
        urls: vec![url.into()],
        inputs: vec![],
        outputs: vec![],
        test_vector: None,
        soak: None,
        upload_results: false,
        zstd: None,
        shadow: None,
        split: None,
        drift: None,
    }
}

/// A soak of `secs` that rolls back above a 10 % error rate once five
/// requests have been seen.
fn soak(secs: u64) -> SoakPolicy {
    SoakPolicy {
        secs,
        min_requests: 5,
        max_error_rate: Some(0.1),
        max_error_rate_ratio: None,
        max_p95_us: None,
        max_p95_ratio: None,
    }
}

const DEVICE: &str = "pi-1";
const FP32_URL: &str = "http://artifacts.test/digits-fp32.onnx";
const INT8_URL: &str = "http://artifacts.test/digits-int8.onnx";

fn loading() -> Loading {
    Loading {
        runtimes: Runtimes::builtin(),
        pin: None,
    }
}

/// An update task over the data directory `dir` (its pinned root in
/// `root.json`), reporting to `outbox`, on `clock`.
fn task(
    dir: &Path,
    outbox: &OutboxHandle,
    clock: &FakeClock,
    registry: ModelRegistry,
    fetcher: impl Fetcher + 'static,
    startup_rollbacks: Vec<StartupRollback>,
) -> Updater {
    let device = DeviceId::new(DEVICE).unwrap();
    Updater::new(
        device.clone(),
        TrustStore::open(dir, &dir.join("root.json")).unwrap(),
        ModelStore::open(dir).unwrap(),
        registry,
        fetcher,
        Reporter::new(
            device,
            outbox.clone(),
            watch::channel(None).0,
            watch::channel(None).0,
        ),
        loading(),
        startup_rollbacks,
    )
    .with_clock(Arc::new(clock.clone()))
}

/// An update task on a fresh data directory, trusting `online` for
/// desired states, on a fake clock, with the outbox it reports to.
struct Harness {
    dir: tempfile::TempDir,
    online: SecretKey,
    clock: FakeClock,
    outbox: OutboxHandle,
    updater: Updater,
}

impl Harness {
    fn new(fetcher: impl Fetcher + 'static) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root_key = SecretKey::from_seed([1; 32]);
        let online = SecretKey::from_seed([2; 32]);
        let root = RootDocument::new(1, u64::MAX, &[root_key.public()], 1, &[online.public()]);
        std::fs::write(
            dir.path().join("root.json"),
            Signed::sign(&root, &[&root_key]).to_json(),
        )
        .unwrap();
        let outbox = OutboxHandle::open(
            &dir.path().join("outbox.db"),
            Stream::ALL.map(StreamPolicy::default_for),
            1 << 30,
            1000,
            Sequence::persistent(&dir.path().join("seq")).unwrap(),
        )
        .unwrap();
        let clock = FakeClock::at(edgefleet_shared::unix_now());
        let updater = task(
            dir.path(),
            &outbox,
            &clock,
            ModelRegistry::default(),
            fetcher,
            Vec::new(),
        );
        Self {
            dir,
            online,
            clock,
            outbox,
            updater,
        }
    }

    /// The same device after the agent restarted: a new task over the
    /// same data directory and outbox, serving what the store holds.
    async fn restart(self, fetcher: impl Fetcher + 'static) -> Self {
        let registry = ModelRegistry::default();
        let rollbacks = super::super::serve_installed(&self.updater.store, &registry, &loading())
            .await
            .unwrap();
        let updater = task(
            self.dir.path(),
            &self.outbox,
            &self.clock,
            registry,
            fetcher,
            rollbacks,
        );
        Self { updater, ..self }
    }

    /// Desired state `version` listing `models`, issued now by the fake
    /// clock, valid for an hour, signed by `key`.
    fn desired_by(&self, key: &SecretKey, version: u64, models: Vec<ModelSlot>) -> Vec<u8> {
        let now = self.clock.unix_now();
        let doc = DesiredState::new(
            DeviceId::new(DEVICE).unwrap(),
            version,
            now,
            now + 3600,
            models,
        );
        Signed::sign(&doc, &[key]).to_json()
    }

    /// Desired state `version` listing `models`, signed by the trusted key.
    fn desired(&self, version: u64, models: Vec<ModelSlot>) -> Vec<u8> {
        self.desired_by(&self.online, version, models)
    }

    /// The version of `name` served now.
    fn serving(&self, name: &str) -> Option<u64> {
        self.updater.registry.get(name).map(|m| m.version)
    }

    fn events(&self) -> Vec<UpdateEvent> {
        events(&self.outbox)
    }

    /// Every event reported so far as (kind, model version).
    fn kinds(&self) -> Vec<(EventKind, Option<u64>)> {
        self.events()
            .into_iter()
            .map(|e| (e.kind, e.model_version))
            .collect()
    }
}

fn events(outbox: &OutboxHandle) -> Vec<UpdateEvent> {
    outbox.flush().unwrap();
    outbox
        .next_batch(100_000, &HashSet::new())
        .unwrap()
        .into_iter()
        .filter(|r| r.stream == Stream::Events)
        .map(|r| serde_json::from_slice(&r.payload).unwrap())
        .collect()
}

/// Events stored since `before` was read.
fn events_after(outbox: &OutboxHandle, before: &[UpdateEvent]) -> Vec<UpdateEvent> {
    let seen: HashSet<u64> = before.iter().map(|e| e.seq).collect();
    events(outbox)
        .into_iter()
        .filter(|e| !seen.contains(&e.seq))
        .collect()
}

fn reason_of(event: &UpdateEvent) -> &str {
    event.reason.as_deref().unwrap_or("")
}

#[tokio::test]
async fn a_new_version_is_downloaded_loaded_activated_and_confirmed() {
    let fetcher = FakeFetcher::default();
    fetcher.serve(FP32_URL, fp32());
    let mut h = Harness::new(fetcher.clone());
    let doc = h.desired(1, vec![slot("digits", 1, &fp32(), FP32_URL)]);
    h.updater.handle(&doc).await;
    assert_eq!(h.serving("digits"), Some(1));
    assert_eq!(
        h.kinds(),
        vec![
            (EventKind::Accepted, None),
            (EventKind::Activated, Some(1)),
            (EventKind::Confirmed, Some(1)),
        ]
    );
    assert_eq!(fetcher.fetched(), vec![("digits".to_string(), 1)]);
    let pointer = h.updater.store.active_pointer("digits").unwrap().unwrap();
    assert_eq!((pointer.version, pointer.soaking), (1, None));
    // The real model is what serves.
    let served = h.updater.registry.get("digits").unwrap();
    assert_eq!(served.engine.outputs()[0].name, "probabilities");

    // The same document again (a retained message redelivered) does
    // nothing and reports nothing.
    h.updater.handle(&doc).await;
    assert_eq!(h.kinds().len(), 3);
    // A newer document with the same model version is accepted but
    // neither downloads nor activates anything.
    h.updater
        .handle(&h.desired(2, vec![slot("digits", 1, &fp32(), FP32_URL)]))
        .await;
    assert_eq!(h.kinds().last(), Some(&(EventKind::Accepted, None)));
    assert_eq!(h.kinds().len(), 4);
    assert_eq!(fetcher.fetched().len(), 1);
}

#[tokio::test]
async fn a_newer_version_replaces_the_served_one_and_an_older_one_is_refused() {
    let fetcher = FakeFetcher::default();
    fetcher.serve(FP32_URL, fp32());
    fetcher.serve(INT8_URL, int8());
    let mut h = Harness::new(fetcher.clone());
    h.updater
        .handle(&h.desired(1, vec![slot("digits", 1, &fp32(), FP32_URL)]))
        .await;
    h.updater
        .handle(&h.desired(2, vec![slot("digits", 2, &int8(), INT8_URL)]))
        .await;
    assert_eq!(h.serving("digits"), Some(2));
    let pointer = h.updater.store.active_pointer("digits").unwrap().unwrap();
    assert_eq!((pointer.version, pointer.previous), (2, Some(1)));

    // A newer document that takes the model back a version is refused
    // whole: nothing is fetched and version 2 keeps serving.
    let before = h.events();
    h.updater
        .handle(&h.desired(3, vec![slot("digits", 1, &fp32(), FP32_URL)]))
        .await;
    let new = events_after(&h.outbox, &before);
    assert_eq!(new.len(), 1, "{new:#?}");
    assert_eq!(new[0].kind, EventKind::Refused);
    assert_eq!(new[0].desired_version, Some(3));
    assert!(reason_of(&new[0]).contains("digits"), "{new:#?}");
    assert_eq!(h.serving("digits"), Some(2));
    assert_eq!(fetcher.fetched().len(), 2);
    assert_eq!(h.updater.trust.desired_version(), Some(2));
}

#[tokio::test]
async fn a_document_past_its_expiry_on_the_clock_is_refused() {
    let fetcher = FakeFetcher::default();
    fetcher.serve(FP32_URL, fp32());
    let mut h = Harness::new(fetcher.clone());
    let doc = h.desired(1, vec![slot("digits", 1, &fp32(), FP32_URL)]);
    // Valid for an hour from issue; an hour and a second later it is not.
    h.clock.advance(Duration::from_secs(3601));
    h.updater.handle(&doc).await;
    let events = h.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].kind, EventKind::Refused);
    assert!(reason_of(&events[0]).contains("expired"), "{events:#?}");
    assert_eq!(h.serving("digits"), None);
    assert!(fetcher.fetched().is_empty());
    assert_eq!(h.updater.trust.desired_version(), None);
}

#[tokio::test]
async fn a_model_the_desired_state_no_longer_lists_stops_serving() {
    let fetcher = FakeFetcher::default();
    fetcher.serve(FP32_URL, fp32());
    let mut h = Harness::new(fetcher);
    h.updater
        .handle(&h.desired(1, vec![slot("digits", 1, &fp32(), FP32_URL)]))
        .await;
    assert_eq!(h.serving("digits"), Some(1));
    h.updater.handle(&h.desired(2, vec![])).await;
    assert_eq!(h.serving("digits"), None);
    assert_eq!(h.updater.store.active_pointer("digits").unwrap(), None);
    assert_eq!(h.kinds().last(), Some(&(EventKind::Accepted, None)));
}

#[tokio::test]
async fn a_local_model_of_the_config_is_left_alone_by_the_desired_state() {
    let fetcher = FakeFetcher::default();
    fetcher.serve(FP32_URL, fp32());
    let mut h = Harness::new(fetcher);
    h.updater
        .handle(&h.desired(1, vec![slot("digits", 1, &fp32(), FP32_URL)]))
        .await;
    // From here on "digits" counts as one the config serves from a file.
    h.updater.local_models = vec!["digits".into()];
    h.updater.handle(&h.desired(2, vec![])).await;
    assert_eq!(h.serving("digits"), Some(1), "a local model stays");
    assert_eq!(h.kinds().last(), Some(&(EventKind::Accepted, None)));
}

#[tokio::test]
async fn a_document_signed_by_an_unknown_key_or_tampered_with_changes_nothing() {
    let fetcher = FakeFetcher::default();
    fetcher.serve(FP32_URL, fp32());
    let mut h = Harness::new(fetcher.clone());
    let stranger = SecretKey::from_seed([9; 32]);
    let forged = h.desired_by(&stranger, 1, vec![slot("digits", 1, &fp32(), FP32_URL)]);
    h.updater.handle(&forged).await;
    // Kept: a root rotated to trust this key would make it good.
    assert_eq!(h.updater.unknown_signer.as_deref(), Some(forged.as_slice()));

    let genuine = h.desired(2, vec![slot("digits", 1, &fp32(), FP32_URL)]);
    let text = String::from_utf8(genuine).unwrap();
    let tampered = text.replacen("\"version\":2", "\"version\":3", 1);
    assert_ne!(tampered, text, "the document's version is in its JSON");
    h.updater.handle(tampered.as_bytes()).await;

    let events = h.events();
    assert_eq!(
        events.iter().map(|e| e.kind).collect::<Vec<_>>(),
        vec![EventKind::Refused, EventKind::Refused],
        "{events:#?}"
    );
    assert!(fetcher.fetched().is_empty());
    assert_eq!(h.serving("digits"), None);
    assert_eq!(h.updater.trust.desired_version(), None);
}

#[tokio::test]
async fn a_failed_download_leaves_the_old_version_serving_and_is_retried_next_time() {
    let fetcher = FakeFetcher::default();
    fetcher.serve(FP32_URL, fp32());
    fetcher.serve(INT8_URL, int8());
    let mut h = Harness::new(fetcher.clone());
    h.updater
        .handle(&h.desired(1, vec![slot("digits", 1, &fp32(), FP32_URL)]))
        .await;
    fetcher.fail_next(DownloadError::AllUrlsFailed(
        "http://artifacts.test: HTTP 503".into(),
    ));
    let before = h.events();
    h.updater
        .handle(&h.desired(2, vec![slot("digits", 2, &int8(), INT8_URL)]))
        .await;
    let new = events_after(&h.outbox, &before);
    assert_eq!(
        new.iter().map(|e| e.kind).collect::<Vec<_>>(),
        vec![EventKind::Accepted, EventKind::DownloadFailed]
    );
    assert!(reason_of(&new[1]).contains("HTTP 503"), "{new:#?}");
    assert_eq!(h.serving("digits"), Some(1));
    // A download failure says nothing against the version itself.
    assert!(h.updater.store.rejected("digits").unwrap().is_empty());

    // The next desired state naming it tries again, and it goes through.
    h.updater
        .handle(&h.desired(3, vec![slot("digits", 2, &int8(), INT8_URL)]))
        .await;
    assert_eq!(h.serving("digits"), Some(2));
    assert_eq!(
        fetcher.fetched(),
        vec![
            ("digits".to_string(), 1),
            ("digits".to_string(), 2),
            ("digits".to_string(), 2)
        ]
    );
}

#[tokio::test]
async fn a_model_failing_its_test_vector_is_rejected_for_good() {
    let fetcher = FakeFetcher::default();
    fetcher.serve(FP32_URL, fp32());
    let mut h = Harness::new(fetcher.clone());
    let mut wrong = slot("digits", 1, &fp32(), FP32_URL);
    // Probabilities of 5 are impossible for a softmax.
    wrong.test_vector = Some(TestVector {
        inputs: vec![TestTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, 64],
            data: vec![0.0; 64],
        }],
        expected: vec![TestTensor {
            name: "probabilities".into(),
            datatype: "FP32".into(),
            shape: vec![1, 10],
            data: vec![5.0; 10],
        }],
        tolerance: 0.01,
    });
    h.updater.handle(&h.desired(1, vec![wrong.clone()])).await;
    let events = h.events();
    assert_eq!(
        events.iter().map(|e| e.kind).collect::<Vec<_>>(),
        vec![EventKind::Accepted, EventKind::ActivationFailed],
        "{events:#?}"
    );
    assert!(
        reason_of(&events[1]).starts_with("test vector failed"),
        "{events:#?}"
    );
    assert_eq!(h.serving("digits"), None);
    let rejected = h.updater.store.rejected("digits").unwrap();
    assert_eq!(rejected.len(), 1);
    // Named again by a newer document, it is not even downloaded.
    h.updater.handle(&h.desired(2, vec![wrong])).await;
    assert_eq!(fetcher.fetched().len(), 1);
}

#[tokio::test]
async fn a_soak_is_confirmed_once_its_period_has_passed_on_the_clock() {
    let fetcher = FakeFetcher::default();
    fetcher.serve(FP32_URL, fp32());
    let mut h = Harness::new(fetcher);
    let mut soaked = slot("digits", 1, &fp32(), FP32_URL);
    soaked.soak = Some(soak(60));
    h.updater.handle(&h.desired(1, vec![soaked])).await;
    assert_eq!(
        h.kinds(),
        vec![(EventKind::Accepted, None), (EventKind::Activated, Some(1))]
    );
    let pointer = h.updater.store.active_pointer("digits").unwrap().unwrap();
    assert_eq!(
        pointer.soaking.map(|s| s.since),
        Some(h.clock.unix_now()),
        "the soak starts at the clock's time"
    );

    h.clock.advance(Duration::from_secs(59));
    h.updater.check_soaks().await;
    assert_eq!(h.kinds().len(), 2, "not yet");
    h.clock.advance(Duration::from_secs(1));
    h.updater.check_soaks().await;
    assert_eq!(h.kinds().last(), Some(&(EventKind::Confirmed, Some(1))));
    assert!(h.updater.watches.is_empty());
    let pointer = h.updater.store.active_pointer("digits").unwrap().unwrap();
    assert_eq!(pointer.soaking, None);
}

#[tokio::test]
async fn after_a_restart_the_task_goes_on_watching_a_soaking_version() {
    let fetcher = FakeFetcher::default();
    fetcher.serve(FP32_URL, fp32());
    let mut h = Harness::new(fetcher.clone());
    let mut soaked = slot("digits", 1, &fp32(), FP32_URL);
    soaked.soak = Some(soak(60));
    h.updater.handle(&h.desired(1, vec![soaked])).await;
    h.clock.advance(Duration::from_secs(40));

    let mut h = h.restart(fetcher.clone()).await;
    assert_eq!(h.serving("digits"), Some(1));
    h.updater.resume().await;
    // The stored desired state is still served: nothing is fetched again.
    assert_eq!(fetcher.fetched().len(), 1);
    assert_eq!(h.updater.watches.len(), 1);
    // The soak counts from the activation before the restart.
    h.clock.advance(Duration::from_secs(19));
    h.updater.check_soaks().await;
    assert_eq!(h.kinds().last(), Some(&(EventKind::Activated, Some(1))));
    h.clock.advance(Duration::from_secs(1));
    h.updater.check_soaks().await;
    assert_eq!(h.kinds().last(), Some(&(EventKind::Confirmed, Some(1))));
}

#[tokio::test]
async fn rollbacks_made_at_start_are_reported_once_the_task_runs() {
    let mut h = Harness::new(FakeFetcher::default());
    h.updater.startup_rollbacks = vec![StartupRollback {
        name: "digits".into(),
        version: 2,
        reason: "the agent restarted 3 times while version 2 soaked".into(),
    }];
    h.updater.resume().await;
    let events = h.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(
        (
            events[0].kind,
            events[0].model.as_deref(),
            events[0].model_version
        ),
        (EventKind::RolledBack, Some("digits"), Some(2))
    );
    assert!(reason_of(&events[0]).contains("restarted 3 times"));
    // Reported once.
    h.updater.resume().await;
    assert_eq!(h.events().len(), 1);
}

#[tokio::test]
async fn a_soak_breach_rolls_back_to_the_previous_version() {
    let fetcher = FakeFetcher::default();
    fetcher.serve(FP32_URL, fp32());
    fetcher.serve(INT8_URL, int8());
    let mut h = Harness::new(fetcher);
    h.updater
        .handle(&h.desired(1, vec![slot("digits", 1, &fp32(), FP32_URL)]))
        .await;
    let mut soaked = slot("digits", 2, &int8(), INT8_URL);
    soaked.soak = Some(soak(600));
    h.updater.handle(&h.desired(2, vec![soaked])).await;
    assert_eq!(h.serving("digits"), Some(2));

    // Requests to version 2 fail: 6 of 8.
    let v2 = h.updater.registry.get("digits").unwrap();
    for _ in 0..6 {
        v2.stats.record_failure();
    }
    for _ in 0..2 {
        v2.stats.record_success(Duration::from_micros(100));
    }
    h.clock.advance(Duration::from_secs(10));
    let before = h.events();
    h.updater.check_soaks().await;
    let new = events_after(&h.outbox, &before);
    assert_eq!(new.len(), 1, "{new:#?}");
    assert_eq!(
        (new[0].kind, new[0].model_version),
        (EventKind::RolledBack, Some(2))
    );
    assert!(reason_of(&new[0]).contains("error rate 75.0%"), "{new:#?}");
    assert_eq!(h.serving("digits"), Some(1));
    let pointer = h.updater.store.active_pointer("digits").unwrap().unwrap();
    assert_eq!(pointer.version, 1);
    assert!(h.updater.watches.is_empty());
}

#[tokio::test]
async fn the_running_task_checks_soaks_on_the_clock_not_in_real_time() {
    let fetcher = FakeFetcher::default();
    fetcher.serve(FP32_URL, fp32());
    let h = Harness::new(fetcher);
    let mut soaked = slot("digits", 1, &fp32(), FP32_URL);
    soaked.soak = Some(soak(3600));
    let doc = h.desired(1, vec![soaked]);
    let (tx, rx) = mpsc::channel(4);
    let shutdown = CancellationToken::new();
    let Harness {
        dir: _dir,
        clock,
        outbox,
        updater,
        ..
    } = h;
    let task = tokio::spawn(updater.run(rx, shutdown.clone()));
    tx.send(FromFleet::Desired(doc)).await.unwrap();
    let wait_for = |kind: EventKind| {
        let outbox = outbox.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(30), async {
                loop {
                    if events(&outbox).iter().any(|e| e.kind == kind) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("no {kind:?} event"))
        }
    };
    wait_for(EventKind::Activated).await;
    // An hour's soak passes in a moment of real time: the task's soak
    // check sleeps on the fake clock.
    clock.advance(Duration::from_secs(3600));
    wait_for(EventKind::Confirmed).await;
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_flood_of_replayed_desired_states_makes_two_refused_events() {
    let mut h = Harness::new(FakeFetcher::default());
    h.updater.handle(&h.desired(10_001, vec![])).await;
    // A broker replays 10,000 old, genuinely signed desired states,
    // each refused as a rollback with its own version in the reason;
    // half way through the fleet publishes a real new one.
    for version in 1..=10_000 {
        h.updater.handle(&h.desired(version, vec![])).await;
        if version == 5_000 {
            h.updater.handle(&h.desired(10_002, vec![])).await;
        }
    }
    h.clock.advance(REFUSAL_PERIOD);
    h.updater.report_due_refusals(h.clock.now());
    let events = h.events();
    let accepted: Vec<Option<u64>> = events
        .iter()
        .filter(|e| e.kind == EventKind::Accepted)
        .map(|e| e.desired_version)
        .collect();
    assert_eq!(
        accepted,
        vec![Some(10_001), Some(10_002)],
        "genuine events are all there"
    );
    let refused: Vec<&UpdateEvent> = events
        .iter()
        .filter(|e| e.kind == EventKind::Refused)
        .collect();
    assert_eq!(refused.len(), 2, "{refused:#?}");
    assert_eq!(refused[0].desired_version, Some(1));
    assert!(
        reason_of(refused[0]).starts_with("desired state version 1 is not newer"),
        "{:?}",
        refused[0].reason
    );
    assert_eq!(refused[1].desired_version, Some(10_000));
    let summary = reason_of(refused[1]);
    assert!(
        summary.starts_with("desired state version 10000 is not newer"),
        "{summary}"
    );
    assert!(
        summary.ends_with("(and 9,998 more like it within 60 s)"),
        "{summary}"
    );
    // Nothing more is due: the next refusal after a quiet period is
    // reported at once.
    h.clock.advance(REFUSAL_PERIOD);
    h.updater.report_due_refusals(h.clock.now());
    assert!(events_after(&h.outbox, &events).is_empty());
}

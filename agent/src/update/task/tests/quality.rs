//! A slot's shadow candidate and A/B variant through the update task:
//! fetched and verified like a version, kept in the store's candidates,
//! loaded with the runtime selection, attached to the served model, kept
//! across unchanged desired states and restarts without a new download,
//! detached when the slot drops them, and reported when they fail while
//! the served version goes on.

use edgefleet_shared::quality::{ModelArtifact, ShadowSpec, SplitSpec};

use super::*;

const CANDIDATE_URL: &str = "http://artifacts.test/digits-candidate.onnx";
const MISSING_URL: &str = "http://artifacts.test/missing.onnx";

fn artifact(version: u64, bytes: &[u8], url: &str) -> ModelArtifact {
    ModelArtifact {
        version,
        format: ModelFormat::Onnx,
        sha256: sha256_hex(bytes),
        size: bytes.len() as u64,
        urls: vec![url.into()],
        zstd: None,
    }
}

fn shadow(candidate: ModelArtifact, sample_rate: f64) -> ShadowSpec {
    ShadowSpec {
        candidate,
        sample_rate,
        compare: Vec::new(),
        max_queue: 8,
        cpu_budget: 0.25,
    }
}

fn with_shadow(spec: Option<ShadowSpec>) -> ModelSlot {
    ModelSlot {
        shadow: spec,
        ..slot("digits", 1, &fp32(), FP32_URL)
    }
}

fn fetcher() -> FakeFetcher {
    let fetcher = FakeFetcher::default();
    fetcher.serve(FP32_URL, fp32());
    fetcher.serve(CANDIDATE_URL, int8());
    fetcher
}

fn candidate_file(h: &Harness) -> PathBuf {
    h.updater
        .store
        .candidate_path(&sha256_hex(&int8()), ModelFormat::Onnx)
}

#[tokio::test]
async fn a_shadow_candidate_is_fetched_once_attached_kept_and_detached() {
    let fetcher = fetcher();
    let mut h = Harness::new(fetcher.clone());
    let spec = shadow(artifact(2, &int8(), CANDIDATE_URL), 0.5);
    let doc = h.desired(1, vec![with_shadow(Some(spec.clone()))]);
    h.updater.handle(&doc).await;
    assert_eq!(h.serving("digits"), Some(1));
    let model = h.updater.registry.get("digits").unwrap();
    let attached = model.quality.shadow().expect("shadow attached");
    assert_eq!(attached.candidate_version(), 2);
    assert_eq!(attached.runtime(), "tract-onnx");
    assert!(candidate_file(&h).exists());
    assert_eq!(
        fetcher.fetched(),
        [("digits".to_string(), 1), ("digits".to_string(), 2)]
    );
    // The candidate is no version of the model: only 1 is active.
    let active = h.updater.store.active_models().unwrap();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].slot.version, 1);

    // An unchanged spec in a new desired state keeps what is loaded.
    let doc = h.desired(2, vec![with_shadow(Some(spec.clone()))]);
    h.updater.handle(&doc).await;
    let still = h
        .updater
        .registry
        .get("digits")
        .unwrap()
        .quality
        .shadow()
        .unwrap();
    assert!(Arc::ptr_eq(&attached, &still));
    assert_eq!(fetcher.fetched().len(), 2);

    // After a restart the kept file is loaded again, not downloaded.
    drop((attached, still, model));
    let mut h = h.restart(fetcher.clone()).await;
    h.updater.resume().await;
    let model = h.updater.registry.get("digits").unwrap();
    assert_eq!(model.quality.shadow().unwrap().candidate_version(), 2);
    assert_eq!(fetcher.fetched().len(), 2, "no download after the restart");

    // A changed spec is applied from the kept file.
    let doc = h.desired(
        3,
        vec![with_shadow(Some(shadow(spec.candidate.clone(), 1.0)))],
    );
    h.updater.handle(&doc).await;
    assert_eq!(model.quality.shadow().unwrap().spec().sample_rate, 1.0);
    assert_eq!(fetcher.fetched().len(), 2);

    // Dropped from the slot: detached, its file cleaned.
    let doc = h.desired(4, vec![with_shadow(None)]);
    h.updater.handle(&doc).await;
    assert!(model.quality.shadow().is_none());
    assert!(!candidate_file(&h).exists());
    assert_eq!(h.serving("digits"), Some(1));
    assert!(!h
        .kinds()
        .iter()
        .any(|(kind, _)| *kind == EventKind::QualityFailed));
}

#[tokio::test]
async fn a_candidate_that_fails_is_reported_and_the_served_version_is_untouched() {
    let fetcher = fetcher();
    // Bytes that are not a model, correctly signed.
    let not_a_model = b"not an onnx model".to_vec();
    fetcher.serve("http://artifacts.test/garbage.onnx", not_a_model.clone());
    let mut h = Harness::new(fetcher.clone());
    let doc = h.desired(1, vec![with_shadow(None)]);
    h.updater.handle(&doc).await;
    let model = h.updater.registry.get("digits").unwrap();

    let before = h.events();
    let missing = shadow(artifact(2, &int8(), MISSING_URL), 0.5);
    let doc = h.desired(2, vec![with_shadow(Some(missing))]);
    h.updater.handle(&doc).await;
    let garbage = artifact(3, &not_a_model, "http://artifacts.test/garbage.onnx");
    let split = ModelSlot {
        split: Some(SplitSpec {
            variant: garbage,
            share: 0.5,
            experiment: "e".into(),
        }),
        ..with_shadow(None)
    };
    let doc = h.desired(3, vec![split]);
    h.updater.handle(&doc).await;

    let failed: Vec<UpdateEvent> = events_after(&h.outbox, &before)
        .into_iter()
        .filter(|e| e.kind == EventKind::QualityFailed)
        .collect();
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert_eq!(failed[0].model_version, Some(2));
    assert!(
        reason_of(&failed[0]).contains("shadow candidate version 2"),
        "{failed:?}"
    );
    assert!(
        reason_of(&failed[0]).contains("download failed"),
        "{failed:?}"
    );
    assert_eq!(failed[1].model_version, Some(3));
    assert!(
        reason_of(&failed[1]).contains("A/B variant version 3"),
        "{failed:?}"
    );
    assert!(
        reason_of(&failed[1]).contains("does not load"),
        "{failed:?}"
    );
    // The same model serves, without a shadow or a split.
    let now = h.updater.registry.get("digits").unwrap();
    assert!(Arc::ptr_eq(&model, &now));
    assert!(now.quality.shadow().is_none() && now.quality.split().is_none());
}

#[tokio::test]
async fn an_ab_variant_is_loaded_beside_the_served_version() {
    let fetcher = fetcher();
    let mut h = Harness::new(fetcher.clone());
    let spec = SplitSpec {
        variant: artifact(2, &int8(), CANDIDATE_URL),
        share: 0.3,
        experiment: "int8".into(),
    };
    let split = |spec: &SplitSpec| ModelSlot {
        split: Some(spec.clone()),
        ..with_shadow(None)
    };
    let doc = h.desired(1, vec![split(&spec)]);
    h.updater.handle(&doc).await;
    let model = h.updater.registry.get("digits").unwrap();
    let current = model.quality.split().expect("split attached");
    assert_eq!((model.version, current.variant().version), (1, 2));
    let variant = current.variant().clone();
    // A new share keeps the loaded variant (and its counts).
    let doc = h.desired(2, vec![split(&SplitSpec { share: 0.5, ..spec })]);
    h.updater.handle(&doc).await;
    let now = model.quality.split().unwrap();
    assert_eq!(now.spec().share, 0.5);
    assert!(Arc::ptr_eq(&variant, now.variant()));
    assert_eq!(fetcher.fetched().len(), 2);
}

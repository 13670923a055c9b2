//! The store suite's tests of assignments' quality settings (shadow
//! candidates and A/B splits), on both backends like the rest.

use super::super::quality::{QualityChange, ShadowSettings, SplitSettings};
use super::*;

/// What a device's desired state is signed from, as text: each model's
/// version, shadow candidate and variant.
fn sign_quality() -> SignFn {
    Box::new(|content: &DesiredContent, _| {
        let parts: Vec<String> = content
            .models
            .iter()
            .map(|m| {
                let q = content.quality.get(&m.name);
                let shadow = q.and_then(|q| q.shadow.as_ref()).map(|(s, r)| {
                    assert_eq!(s.version, r.version);
                    format!(" shadow {} @{}", r.version, s.sample_rate)
                });
                let split = q
                    .and_then(|q| q.split.as_ref())
                    .map(|(s, r)| format!(" split {} {} {}", r.version, s.share, s.experiment));
                format!(
                    "{}@{}{}{}",
                    m.name,
                    m.version,
                    shadow.unwrap_or_default(),
                    split.unwrap_or_default()
                )
            })
            .collect();
        parts.join(",").into_bytes()
    })
}

async fn signed(s: &Store, device: &str) -> String {
    let (_, bytes) = s
        .sign_desired(device, 9, sign_quality())
        .await
        .unwrap()
        .unwrap();
    String::from_utf8(bytes).unwrap()
}

fn shadow(version: u64) -> QualityChange {
    QualityChange::Shadow(Some(ShadowSettings {
        version,
        sample_rate: 0.5,
        compare: Vec::new(),
    }))
}

fn split(version: u64) -> QualityChange {
    QualityChange::Split(Some(SplitSettings {
        version,
        share: 0.25,
        experiment: "e1".into(),
    }))
}

async fn shadow_and_split_settings_follow_assignments(f: Fixture) {
    let s = &f.store;
    for v in 1..=3 {
        s.add_model(&model("m", v)).await.unwrap();
    }
    let devices = |ids: &[&str]| Target::Devices(ids.iter().map(|d| d.to_string()).collect());
    // Nothing deployed: nothing to shadow.
    let err = s
        .set_quality("m", &shadow(2), &devices(&["a"]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not run model m"), "{err}");
    s.deploy("m", 1, &Target::All, 1).await.unwrap();
    s.deploy("m", 1, &devices(&["c"]), 1).await.unwrap();
    // A version that does not exist is refused.
    let err = s
        .set_quality("m", &shadow(7), &devices(&["a"]))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
    // Device a (on the fleet-wide assignment) gets a row of its own; b
    // is untouched.
    let changed = s
        .set_quality("m", &shadow(2), &devices(&["a"]))
        .await
        .unwrap();
    assert_eq!(changed, vec!["a".to_string()]);
    assert_eq!(signed(s, "a").await, "m@1 shadow 2 @0.5");
    assert_eq!(signed(s, "b").await, "m@1");
    // A split beside the shadow; ending the shadow keeps the split.
    s.set_quality("m", &split(3), &devices(&["a"]))
        .await
        .unwrap();
    assert_eq!(signed(s, "a").await, "m@1 shadow 2 @0.5 split 3 0.25 e1");
    s.set_quality("m", &QualityChange::Shadow(None), &devices(&["a"]))
        .await
        .unwrap();
    assert_eq!(signed(s, "a").await, "m@1 split 3 0.25 e1");
    // A candidate or variant in use cannot be deleted.
    let err = s.delete_model("m", 3).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    // Assigning a version clears the settings.
    s.deploy("m", 3, &devices(&["a"]), 2).await.unwrap();
    assert_eq!(signed(s, "a").await, "m@3");
    // The whole fleet: every assignment row of the model.
    let changed = s.set_quality("m", &split(2), &Target::All).await.unwrap();
    assert!(changed.contains(&"c".to_string()), "{changed:?}");
    assert_eq!(signed(s, "b").await, "m@1 split 2 0.25 e1");
    assert_eq!(signed(s, "c").await, "m@1 split 2 0.25 e1");
    assert_eq!(signed(s, "a").await, "m@3 split 2 0.25 e1");
    s.set_quality("m", &QualityChange::Split(None), &Target::All)
        .await
        .unwrap();
    assert_eq!(signed(s, "b").await, "m@1");
    s.delete_model("m", 2).await.unwrap();
}

suite!(shadow_and_split_settings_follow_assignments);

//! Unit tests of the signed documents: signing, verification, chains and refusals.

use super::*;
use crate::crypto::SecretKey;
use serde_json::json;

struct Fixture {
    root_key: SecretKey,
    online_key: SecretKey,
    root: RootDocument,
    device: DeviceId,
}

fn fixture() -> Fixture {
    let root_key = SecretKey::from_seed([1; 32]);
    let online_key = SecretKey::from_seed([2; 32]);
    let root = RootDocument::new(
        1,
        2_000_000_000,
        &[root_key.public()],
        1,
        &[online_key.public()],
    );
    Fixture {
        root_key,
        online_key,
        root,
        device: DeviceId::new("pi-1").unwrap(),
    }
}

fn slot() -> ModelSlot {
    ModelSlot {
        name: "digits".into(),
        version: 3,
        format: ModelFormat::Onnx,
        sha256: "ab".repeat(32),
        size: 1234,
        urls: vec!["http://server/artifacts/abab".into()],
        inputs: vec![TensorSpec {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![-1, 64],
        }],
        outputs: vec![],
        test_vector: Some(TestVector {
            inputs: vec![TestTensor {
                name: "input".into(),
                datatype: "FP32".into(),
                shape: vec![1, 2],
                data: vec![0.5, 1.0],
            }],
            expected: vec![],
            tolerance: 0.01,
        }),
        soak: None,
        upload_results: false,
        zstd: None,
        shadow: None,
        split: None,
        drift: None,
    }
}

fn desired(f: &Fixture) -> DesiredState {
    DesiredState::new(f.device.clone(), 7, 1_000, 1_000_000_000, vec![slot()])
}

const NOW: u64 = 500_000;

#[test]
fn root_document_verifies_itself_and_survives_json() {
    let f = fixture();
    let env = Signed::sign(&f.root, &[&f.root_key]);
    let parsed = Signed::from_json(&env.to_json()).unwrap();
    assert_eq!(RootDocument::verify_initial(&parsed, NOW).unwrap(), f.root);
}

#[test]
fn root_signed_by_online_key_is_refused() {
    let f = fixture();
    let env = Signed::sign(&f.root, &[&f.online_key]);
    assert!(matches!(
        RootDocument::verify_initial(&env, NOW).unwrap_err(),
        VerifyError::UnknownKey { role, .. } if role == "root"
    ));
}

#[test]
fn desired_state_round_trips_and_verifies() {
    let f = fixture();
    let doc = desired(&f);
    let env = Signed::sign(&doc, &[&f.online_key]);
    let parsed = Signed::from_json(&env.to_json()).unwrap();
    assert_eq!(
        DesiredState::verify(&parsed, &f.root, &f.device, NOW).unwrap(),
        doc
    );
}

#[test]
fn canonical_signing_input_is_stable() {
    // If this changes, every signature in the field breaks: bump the
    // schema version instead of editing the expected bytes.
    let f = fixture();
    let mut doc = desired(&f);
    doc.models[0].test_vector = None;
    let value = serde_json::to_value(&doc).unwrap();
    let bytes = crate::canonical::signing_input("desired", &value);
    let expected = concat!(
        "edgefleet/v1/desired\0",
        r#"{"device_id":"pi-1","expires":1000000000,"issued_at":1000,"models":[{"format":"onnx","#,
        r#""inputs":[{"datatype":"FP32","name":"input","shape":[-1,64]}],"name":"digits","#,
        r#""sha256":"abababababababababababababababababababababababababababababababab","size":1234,"#,
        r#""urls":["http://server/artifacts/abab"],"version":3}],"schema":1,"type":"desired","version":7}"#
    );
    assert_eq!(String::from_utf8(bytes).unwrap(), expected);
    let sig = f.online_key.sign(expected.as_bytes());
    assert_eq!(
        Signed::sign(&doc, &[&f.online_key]).signatures[0].sig,
        crate::crypto::encode_signature(&sig)
    );
}

#[test]
fn wrong_key_is_refused() {
    let f = fixture();
    let rogue = SecretKey::from_seed([66; 32]);
    let env = Signed::sign(&desired(&f), &[&rogue]);
    let err = DesiredState::verify(&env, &f.root, &f.device, NOW).unwrap_err();
    assert_eq!(
        err,
        VerifyError::UnknownKey {
            keyid: rogue.key_id().to_string(),
            role: "desired".into()
        }
    );
}

#[test]
fn root_key_cannot_sign_desired_state() {
    let f = fixture();
    let env = Signed::sign(&desired(&f), &[&f.root_key]);
    assert!(matches!(
        DesiredState::verify(&env, &f.root, &f.device, NOW).unwrap_err(),
        VerifyError::UnknownKey { .. }
    ));
}

#[test]
fn rogue_key_claiming_a_trusted_key_id_is_refused() {
    let f = fixture();
    let rogue = SecretKey::from_seed([66; 32]);
    let mut env = Signed::sign(&desired(&f), &[&rogue]);
    env.signatures[0].keyid = f.online_key.key_id().to_string();
    assert!(matches!(
        DesiredState::verify(&env, &f.root, &f.device, NOW).unwrap_err(),
        VerifyError::BadSignature { .. }
    ));
}

/// Changes one scalar somewhere inside `value`, returning false when
/// `index` is past the number of scalars.
fn flip_nth_scalar(value: &mut Value, index: &mut usize) -> bool {
    match value {
        Value::Object(map) => map.values_mut().any(|v| flip_nth_scalar(v, index)),
        Value::Array(items) => items.iter_mut().any(|v| flip_nth_scalar(v, index)),
        scalar => {
            if *index > 0 {
                *index -= 1;
                return false;
            }
            *scalar = match scalar.take() {
                Value::String(s) => {
                    let mut bytes = s.into_bytes();
                    bytes[0] ^= 0x01;
                    Value::String(String::from_utf8(bytes).unwrap())
                }
                Value::Number(n) if n.is_u64() => json!(n.as_u64().unwrap() ^ 1),
                Value::Number(n) if n.is_i64() => json!(n.as_i64().unwrap() ^ 1),
                Value::Number(n) => json!(n.as_f64().unwrap() + 0.25),
                Value::Bool(b) => json!(!b),
                Value::Null => json!(0),
                other => other,
            };
            true
        }
    }
}

#[test]
fn flipping_any_field_breaks_the_signature() {
    let f = fixture();
    let env = Signed::sign(&desired(&f), &[&f.online_key]);
    let mut checked = 0;
    for index in 0.. {
        let mut tampered = env.clone();
        let mut i = index;
        if !flip_nth_scalar(&mut tampered.signed, &mut i) {
            break;
        }
        let err = DesiredState::verify(&tampered, &f.root, &f.device, NOW).unwrap_err();
        // Changing `type` or `schema` is caught before signatures are
        // checked; everything else must fail the signature.
        assert!(
            matches!(
                err,
                VerifyError::BadSignature { .. }
                    | VerifyError::WrongType { .. }
                    | VerifyError::UnsupportedSchema { .. }
                    | VerifyError::Malformed(_)
            ),
            "field {index}: {err}"
        );
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} fields visited");
}

#[test]
fn flipping_any_signature_byte_breaks_it() {
    let f = fixture();
    let env = Signed::sign(&desired(&f), &[&f.online_key]);
    let raw = decode_signature(&env.signatures[0].sig).unwrap();
    for byte in 0..64 {
        let mut sig = raw;
        sig[byte] ^= 0x80;
        let mut tampered = env.clone();
        tampered.signatures[0].sig = encode_signature(&sig);
        assert!(
            DesiredState::verify(&tampered, &f.root, &f.device, NOW).is_err(),
            "byte {byte}"
        );
    }
}

#[test]
fn added_field_breaks_the_signature() {
    let f = fixture();
    let mut env = Signed::sign(&desired(&f), &[&f.online_key]);
    env.signed["models"][0]["urls"]
        .as_array_mut()
        .unwrap()
        .push(json!("http://evil/model"));
    assert!(matches!(
        DesiredState::verify(&env, &f.root, &f.device, NOW).unwrap_err(),
        VerifyError::BadSignature { .. }
    ));
}

#[test]
fn truncated_signature_is_refused() {
    let f = fixture();
    let mut env = Signed::sign(&desired(&f), &[&f.online_key]);
    let sig = &env.signatures[0].sig;
    env.signatures[0].sig = sig[..sig.len() - 8].to_string();
    assert!(matches!(
        DesiredState::verify(&env, &f.root, &f.device, NOW).unwrap_err(),
        VerifyError::BadSignatureEncoding { .. }
    ));
}

#[test]
fn unsigned_document_is_refused() {
    let f = fixture();
    let mut env = Signed::sign(&desired(&f), &[&f.online_key]);
    env.signatures.clear();
    assert_eq!(
        DesiredState::verify(&env, &f.root, &f.device, NOW).unwrap_err(),
        VerifyError::ThresholdNotMet {
            role: "desired".into(),
            valid: 0,
            required: 1
        }
    );
}

#[test]
fn unknown_key_id_is_refused() {
    let f = fixture();
    let mut env = Signed::sign(&desired(&f), &[&f.online_key]);
    env.signatures[0].keyid = "00".repeat(32);
    assert!(matches!(
        DesiredState::verify(&env, &f.root, &f.device, NOW).unwrap_err(),
        VerifyError::UnknownKey { .. }
    ));
    env.signatures[0].keyid = "not-a-key-id".into();
    assert!(matches!(
        DesiredState::verify(&env, &f.root, &f.device, NOW).unwrap_err(),
        VerifyError::UnknownKey { .. }
    ));
}

#[test]
fn duplicate_signatures_do_not_meet_a_threshold_of_two() {
    let mut f = fixture();
    let second = SecretKey::from_seed([3; 32]);
    f.root = RootDocument::new(
        1,
        2_000_000_000,
        &[f.root_key.public()],
        1,
        &[f.online_key.public(), second.public()],
    );
    f.root.desired.threshold = 2;
    let env = Signed::sign(&desired(&f), &[&f.online_key, &f.online_key]);
    assert_eq!(
        DesiredState::verify(&env, &f.root, &f.device, NOW).unwrap_err(),
        VerifyError::ThresholdNotMet {
            role: "desired".into(),
            valid: 1,
            required: 2
        }
    );
    let env = Signed::sign(&desired(&f), &[&f.online_key, &second]);
    assert!(DesiredState::verify(&env, &f.root, &f.device, NOW).is_ok());
}

#[test]
fn expired_wrong_device_and_wrong_type_are_refused() {
    let f = fixture();
    let env = Signed::sign(&desired(&f), &[&f.online_key]);
    assert!(matches!(
        DesiredState::verify(&env, &f.root, &f.device, 1_000_000_000).unwrap_err(),
        VerifyError::Expired { .. }
    ));
    let other = DeviceId::new("pi-2").unwrap();
    assert!(matches!(
        DesiredState::verify(&env, &f.root, &other, NOW).unwrap_err(),
        VerifyError::WrongDevice { .. }
    ));
    let root_env = Signed::sign(&f.root, &[&f.root_key]);
    assert!(matches!(
        DesiredState::verify(&root_env, &f.root, &f.device, NOW).unwrap_err(),
        VerifyError::WrongType { .. }
    ));
}

#[test]
fn rollback_and_replay_are_refused() {
    let f = fixture();
    let doc = desired(&f);
    assert!(doc.check_newer_than(None).is_ok());
    assert!(doc.check_newer_than(Some(6)).is_ok());
    assert_eq!(
        doc.check_newer_than(Some(7)).unwrap_err(),
        VerifyError::Rollback {
            trusted: 7,
            offered: 7
        }
    );
    assert!(doc.check_newer_than(Some(9)).is_err());
}

#[test]
fn invalid_slots_are_refused_even_when_signed() {
    let f = fixture();
    let mut doc = desired(&f);
    doc.models[0].sha256 = "XYZ".into();
    let env = Signed::sign(&doc, &[&f.online_key]);
    assert!(matches!(
        DesiredState::verify(&env, &f.root, &f.device, NOW).unwrap_err(),
        VerifyError::InvalidDesired(_)
    ));
    let mut doc = desired(&f);
    doc.models.push(slot());
    let env = Signed::sign(&doc, &[&f.online_key]);
    assert!(matches!(
        DesiredState::verify(&env, &f.root, &f.device, NOW).unwrap_err(),
        VerifyError::InvalidDesired(m) if m.contains("twice")
    ));
}

#[test]
fn root_rotation_needs_old_and_new_root_keys_and_the_next_version() {
    let f = fixture();
    let new_root_key = SecretKey::from_seed([11; 32]);
    let new_online = SecretKey::from_seed([12; 32]);
    let next = RootDocument::new(
        2,
        2_000_000_000,
        &[new_root_key.public()],
        1,
        &[new_online.public()],
    );
    let both = Signed::sign(&next, &[&f.root_key, &new_root_key]);
    assert_eq!(f.root.verify_successor(&both).unwrap(), next);

    let only_new = Signed::sign(&next, &[&new_root_key]);
    assert!(f.root.verify_successor(&only_new).is_err());
    let only_old = Signed::sign(&next, &[&f.root_key]);
    assert!(f.root.verify_successor(&only_old).is_err());

    let mut skipping = next.clone();
    skipping.version = 3;
    let env = Signed::sign(&skipping, &[&f.root_key, &new_root_key]);
    assert_eq!(
        f.root.verify_successor(&env).unwrap_err(),
        VerifyError::RootVersion {
            trusted: 1,
            offered: 3
        }
    );
}

/// Root `version` of the fixture's keys (a renewal: same keys), valid
/// until `expires`, signed by the root key.
fn renewed(f: &Fixture, version: u64, expires: u64) -> Signed {
    let doc = RootDocument::new(
        version,
        expires,
        &[f.root_key.public()],
        1,
        &[f.online_key.public()],
    );
    Signed::sign(&doc, &[&f.root_key])
}

#[test]
fn an_expired_root_is_refused_and_so_is_what_it_signs() {
    let f = fixture();
    let env = Signed::sign(&f.root, &[&f.root_key]);
    let expired = VerifyError::RootExpired {
        version: 1,
        expires: 2_000_000_000,
        now: 2_000_000_000,
    };
    assert_eq!(
        RootDocument::verify_initial(&env, 2_000_000_000).unwrap_err(),
        expired
    );
    assert!(RootDocument::verify_initial(&env, 1_999_999_999).is_ok());
    // Still usable as the anchor of a walk, but not to verify with.
    let pinned = RootDocument::verify_pinned(&env).unwrap();
    assert_eq!(pinned.check_unexpired(2_000_000_000), Err(expired.clone()));
    // A desired state valid in itself is refused under an expired root.
    let doc = DesiredState::new(f.device.clone(), 7, 1_000, u64::MAX, vec![slot()]);
    let signed = Signed::sign(&doc, &[&f.online_key]);
    assert!(DesiredState::verify(&signed, &pinned, &f.device, 1_999_999_999).is_ok());
    assert_eq!(
        DesiredState::verify(&signed, &pinned, &f.device, 2_000_000_000).unwrap_err(),
        expired
    );
}

#[test]
fn a_walk_steps_over_expired_roots_to_a_fresh_one() {
    let f = fixture();
    let now = 3_000_000_000;
    // Version 1 (the fixture) expired at 2e9, so did version 2; 3 is
    // fresh. Given in any order, with an old version thrown in.
    let v2 = renewed(&f, 2, 2_500_000_000);
    let v3 = renewed(&f, 3, 4_000_000_000);
    let old = Signed::sign(&f.root, &[&f.root_key]);
    let chain = vec![v3.clone(), old, v2.clone()];
    let walk = f.root.walk_chain(&chain, now);
    assert_eq!(walk.error, None);
    let versions: Vec<u64> = walk.accepted.iter().map(|(_, d)| d.version).collect();
    assert_eq!(versions, vec![2, 3]);
    assert_eq!(walk.accepted[1].0, &v3);
    // Nothing newer, and the trusted root is fresh: nothing to do.
    let fresh = &walk.accepted[1].1;
    let walk = fresh.walk_chain(&chain, now);
    assert_eq!((walk.accepted.len(), walk.error), (0, None));
}

#[test]
fn a_walk_ending_at_an_expired_root_moves_forward_and_says_so() {
    let f = fixture();
    let now = 3_000_000_000;
    let chain = vec![renewed(&f, 2, 2_500_000_000)];
    let walk = f.root.walk_chain(&chain, now);
    // Version 2 is validly signed: trusted (never go back), yet stale.
    assert_eq!(walk.accepted.len(), 1);
    assert_eq!(
        walk.error,
        Some(VerifyError::RootExpired {
            version: 2,
            expires: 2_500_000_000,
            now
        })
    );
    // No newer root at all, and the trusted one expired: reported too.
    let walk = f.root.walk_chain(&[], now);
    assert!(walk.accepted.is_empty());
    assert!(matches!(
        walk.error,
        Some(VerifyError::RootExpired { version: 1, .. })
    ));
    // A broken link stops the walk after what came before it.
    let rogue = SecretKey::from_seed([66; 32]);
    let forged = Signed::sign(
        &RootDocument::new(3, 4_000_000_000, &[rogue.public()], 1, &[rogue.public()]),
        &[&rogue],
    );
    let chain = vec![renewed(&f, 2, 2_500_000_000), forged];
    let walk = f.root.walk_chain(&chain, now);
    assert_eq!(walk.accepted.len(), 1);
    assert!(matches!(walk.error, Some(VerifyError::UnknownKey { .. })));
}

/// Floats whose shortest decimal form serde_json parses one ULP off
/// unless its `float_roundtrip` feature is on (found by printing and
/// parsing random f64 values with serde_json 1.0.154: about one in
/// eight of them comes back different without the feature; none with
/// it).
const FLOATS_SERDE_JSON_GETS_WRONG_BY_DEFAULT: [f64; 12] = [
    0.9856906946328695,
    -114.51378781506311,
    0.21291890726713458,
    14.169897424337579,
    102.70060649649079,
    -53.559940781497204,
    0.9720916325967499,
    0.47079800016492035,
    0.37449851059431805,
    1.5633501113983639,
    -127.13945378799981,
    116.07947448955409,
];

#[test]
fn floats_in_a_signed_document_survive_json_bit_exact() {
    // Each one parses back bit-exact (without the feature, each of
    // these comes back one ULP off and the signature below fails).
    for x in FLOATS_SERDE_JSON_GETS_WRONG_BY_DEFAULT {
        let text = serde_json::to_string(&x).unwrap();
        let back: f64 = serde_json::from_str(&text).unwrap();
        assert_eq!(back.to_bits(), x.to_bits(), "{text} parsed as {back:?}");
    }
    let f = fixture();
    let mut doc = desired(&f);
    let floats = FLOATS_SERDE_JSON_GETS_WRONG_BY_DEFAULT.to_vec();
    let tv = doc.models[0].test_vector.as_mut().unwrap();
    tv.inputs[0].shape = vec![1, floats.len() as u64];
    tv.inputs[0].data = floats.clone();
    tv.expected = vec![TestTensor {
        name: "output".into(),
        datatype: "FP64".into(),
        shape: vec![floats.len() as u64],
        data: floats.iter().rev().copied().collect(),
    }];
    tv.tolerance = 0.30000000000000004;
    doc.models[0].soak = Some(SoakPolicy {
        secs: 600,
        min_requests: 20,
        max_error_rate: Some(0.21291890726713458),
        max_error_rate_ratio: Some(1.5633501113983639),
        max_p95_us: None,
        max_p95_ratio: Some(0.9720916325967499),
    });
    let env = Signed::sign(&doc, &[&f.online_key]);
    let parsed = Signed::from_json(&env.to_json()).unwrap();
    assert_eq!(
        DesiredState::verify(&parsed, &f.root, &f.device, NOW).unwrap(),
        doc
    );
}

#[test]
fn root_validation_catches_inconsistent_documents() {
    let f = fixture();
    let mut bad = f.root.clone();
    bad.root.threshold = 2;
    assert!(matches!(
        bad.validate().unwrap_err(),
        VerifyError::InvalidRoot(_)
    ));
    let mut bad = f.root.clone();
    bad.desired.keyids.push("ff".repeat(32).parse().unwrap());
    assert!(matches!(
        bad.validate().unwrap_err(),
        VerifyError::InvalidRoot(_)
    ));
    let mut bad = f.root.clone();
    let (id, _) = bad
        .keys
        .iter()
        .next()
        .map(|(k, v)| (k.clone(), *v))
        .unwrap();
    bad.keys.insert(id, SecretKey::from_seed([99; 32]).public());
    assert!(matches!(
        bad.validate().unwrap_err(),
        VerifyError::InvalidRoot(_)
    ));
}

//! One store test suite, run against both backends: SQLite (a fresh file
//! per test) and PostgreSQL (a fresh schema per test on the database named
//! by `EDGEFLEET_TEST_POSTGRES_URL`; `.ci/run` and `./scripts/test` set
//! `postgres://postgres@127.0.0.1:5432/test`, where this machine kind runs
//! PostgreSQL; elsewhere point it at any database the user may create
//! schemas in). The PostgreSQL tests fail, saying so, when it is
//! unreachable.

use edgefleet_shared::{
    DeviceId, EventKind, InferenceResult, ModelFormat, StatusMessage, TelemetryMessage,
    UpdateEvent, SCHEMA_VERSION,
};

use super::*;

/// A store and what keeps it alive (the SQLite file's directory).
struct Fixture {
    store: Store,
    _dir: Option<tempfile::TempDir>,
}

async fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    Fixture {
        store: Store::open(path.to_str().unwrap()).await.unwrap(),
        _dir: Some(dir),
    }
}

pub(crate) fn postgres_url() -> String {
    std::env::var("EDGEFLEET_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A URL whose connections use a new, empty schema.
pub(crate) async fn fresh_postgres_schema() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let url = postgres_url();
    let schema = format!(
        "edgefleet_test_{}_{}_{}",
        std::process::id(),
        edgefleet_shared::unix_now(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!("no PostgreSQL at {url} ({e}): start one or set EDGEFLEET_TEST_POSTGRES_URL")
        });
    tokio::spawn(conn);
    // Schemas of earlier runs (an hour old or more) go.
    let cutoff = edgefleet_shared::unix_now().saturating_sub(3600);
    for row in client
        .query(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'edgefleet_test_%'",
            &[],
        )
        .await
        .unwrap()
    {
        let name: String = row.get(0);
        let created = name.split('_').nth(3).and_then(|t| t.parse::<u64>().ok());
        if created.is_some_and(|t| t < cutoff) {
            let _ = client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                .await;
        }
    }
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}

async fn postgres() -> Fixture {
    let url = fresh_postgres_schema().await;
    Fixture {
        store: Store::open(&url).await.unwrap(),
        _dir: None,
    }
}

fn model(name: &str, version: u64) -> ModelRecord {
    ModelRecord {
        test_vector: None,
        spec: Default::default(),
        name: name.into(),
        version,
        format: ModelFormat::Onnx,
        sha256: format!("{version:064x}"),
        size: 10,
        created_at: 1,
        pushed_by: Some("ci".into()),
        notes: (version == 1).then(|| "first cut".into()),
    }
}

fn status(id: &str, seq: u64, online: bool) -> StatusMessage {
    StatusMessage {
        session: None,
        schema: SCHEMA_VERSION,
        device_id: DeviceId::new(id).unwrap(),
        seq,
        online,
        at: 0,
        agent_version: "1".into(),
        desired_version: Some(seq),
        models: vec![],
        agent: None,
    }
}

fn telemetry(device: &str, seq: u64) -> Streamed {
    Streamed::Telemetry(TelemetryMessage {
        schema: SCHEMA_VERSION,
        device_id: DeviceId::new(device).unwrap(),
        seq,
        at: 1000 + seq,
        interval_secs: 60.0,
        health: Default::default(),
        models: vec![],
        outbox: Default::default(),
        link: Default::default(),
    })
}

fn result(device: &str, seq: u64, model: &str) -> Streamed {
    Streamed::Result(InferenceResult {
        schema: SCHEMA_VERSION,
        device_id: DeviceId::new(device).unwrap(),
        seq,
        at: 0,
        model: model.into(),
        model_version: 1,
        runtime: "tract-onnx".into(),
        request_id: Some(format!("r{seq}")),
        latency_us: 5,
        outputs: serde_json::json!([]),
    })
}

fn names(models: &[ModelRecord]) -> Vec<(String, u64)> {
    models.iter().map(|m| (m.name.clone(), m.version)).collect()
}

/// A signer that writes the models, agent release and version it was
/// given.
fn sign_listing() -> SignFn {
    Box::new(|content, version| {
        let listed: Vec<String> = content
            .models
            .iter()
            .map(|m| format!("{}@{}", m.name, m.version))
            .collect();
        let agent = content.agent.as_ref().map(|a| {
            let targets: Vec<&str> = a.builds.iter().map(|b| b.target.as_str()).collect();
            let downgrade = if a.allow_downgrade { "+downgrade" } else { "" };
            format!(";agent {}{downgrade} [{}]", a.version, targets.join(","))
        });
        format!(
            "v{version}:{}{}",
            listed.join(","),
            agent.unwrap_or_default()
        )
        .into_bytes()
    })
}

async fn status_is_applied_in_sequence_order_and_will_marks_offline(f: Fixture) {
    let s = &f.store;
    let first = s.record_status(&status("a", 5, true), 100).await.unwrap();
    assert!(first.is_new);
    assert_eq!(first.desired, Some((0, None)));
    assert!(
        !s.record_status(&status("a", 3, true), 101)
            .await
            .unwrap()
            .is_new
    );
    let dev = s.get_device("a").await.unwrap().unwrap();
    assert_eq!(
        dev.reported_desired_version,
        Some(5),
        "stale status ignored"
    );
    assert!(dev.online);
    let will = s.record_status(&status("a", 0, false), 102).await.unwrap();
    assert_eq!(will.desired, None);
    assert!(!s.get_device("a").await.unwrap().unwrap().online);
    s.record_status(&status("a", 6, true), 103).await.unwrap();
    let dev = s.get_device("a").await.unwrap().unwrap();
    assert!(dev.online);
    assert_eq!(dev.last_seen, 103);
    assert_eq!(dev.first_seen, 100);
}

async fn device_assignments_override_fleet_wide_ones(f: Fixture) {
    let s = &f.store;
    for (n, v) in [("digits", 1), ("digits", 2), ("kws", 1)] {
        s.add_model(&model(n, v)).await.unwrap();
    }
    s.record_status(&status("pi-1", 1, true), 1).await.unwrap();
    let all = s.deploy("digits", 1, &Target::All, 2).await.unwrap();
    assert_eq!(all, vec!["pi-1".to_string()]);
    s.deploy("kws", 1, &Target::All, 2).await.unwrap();
    let pi2 = s
        .deploy("digits", 2, &Target::Devices(vec!["pi-2".into()]), 3)
        .await
        .unwrap();
    assert_eq!(pi2, vec!["pi-2".to_string()]);
    assert!(
        s.get_device("pi-2").await.unwrap().is_some(),
        "created by deploy"
    );
    let (_, a) = s
        .sign_desired("pi-1", 4, sign_listing())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a, b"v1:digits@1,kws@1");
    let (_, b) = s
        .sign_desired("pi-2", 4, sign_listing())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b, b"v1:digits@2,kws@1");
    assert!(matches!(
        s.deploy("digits", 9, &Target::All, 5).await,
        Err(StoreError::NotFound(_))
    ));
    let listed = names(&s.list_models().await.unwrap());
    assert_eq!(
        listed,
        vec![
            ("digits".into(), 1),
            ("digits".into(), 2),
            ("kws".into(), 1)
        ]
    );
}

async fn model_versions_are_immutable(f: Fixture) {
    let s = &f.store;
    s.add_model(&model("m", 1)).await.unwrap();
    assert_eq!(s.add_model(&model("m", 1)).await.unwrap(), model("m", 1));
    let mut other = model("m", 1);
    other.sha256 = "ff".repeat(32);
    let err = s.add_model(&other).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    assert!(err.to_string().contains("push a new version"), "{err}");
    assert_eq!(s.get_model("m", 1).await.unwrap(), Some(model("m", 1)));
    assert_eq!(s.get_model("m", 2).await.unwrap(), None);
}

async fn attachments_only_before_deployment(f: Fixture) {
    let s = &f.store;
    s.add_model(&model("m", 1)).await.unwrap();
    let spec = ModelSpec {
        inputs: vec![edgefleet_shared::TensorSpec {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![-1, 64],
        }],
        outputs: vec![],
    };
    let tv = edgefleet_shared::TestVector {
        inputs: vec![],
        expected: vec![],
        tolerance: 0.5,
    };
    let r = s
        .attach("m", 1, Attachment::Spec(spec.clone()))
        .await
        .unwrap();
    assert_eq!(r.spec, spec);
    let r = s
        .attach("m", 1, Attachment::TestVector(tv.clone()))
        .await
        .unwrap();
    assert_eq!((r.spec, r.test_vector), (spec.clone(), Some(tv.clone())));
    assert!(matches!(
        s.attach("m", 2, Attachment::Spec(spec.clone())).await,
        Err(StoreError::NotFound(_))
    ));
    s.deploy("m", 1, &Target::Devices(vec!["d".into()]), 1)
        .await
        .unwrap();
    let err = s
        .attach("m", 1, Attachment::TestVector(tv))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains("already deployed")),
        "{err}"
    );
}

async fn desired_versions_increase_per_device(f: Fixture) {
    let s = &f.store;
    assert_eq!(s.sign_desired("a", 1, sign_listing()).await.unwrap(), None);
    s.add_model(&model("m", 1)).await.unwrap();
    s.deploy("m", 1, &Target::Devices(vec!["a".into(), "b".into()]), 1)
        .await
        .unwrap();
    let (v1, _) = s
        .sign_desired("a", 2, sign_listing())
        .await
        .unwrap()
        .unwrap();
    let (v2, bytes) = s
        .sign_desired("a", 3, sign_listing())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((v1, v2), (1, 2));
    assert_eq!(bytes, b"v2:m@1");
    assert_eq!(s.desired_json("a").await.unwrap(), Some(bytes.clone()));
    assert_eq!(s.desired_json("b").await.unwrap(), None);
    assert_eq!(
        s.all_desired().await.unwrap(),
        vec![("a".to_string(), bytes)]
    );
    let seen = s.record_status(&status("a", 1, true), 4).await.unwrap();
    assert_eq!(seen.desired.map(|(v, _)| v), Some(2));
    assert_eq!(s.get_device("a").await.unwrap().unwrap().desired_version, 2);
}

async fn events_are_stored_once(f: Fixture) {
    let s = &f.store;
    let e = UpdateEvent {
        schema: SCHEMA_VERSION,
        device_id: DeviceId::new("a").unwrap(),
        seq: 9,
        at: 1,
        kind: EventKind::Refused,
        desired_version: Some(1),
        model: None,
        model_version: None,
        reason: Some("bad signature".into()),
        agent_version: None,
    };
    assert!(s.record_event(&e).await.unwrap());
    assert!(!s.record_event(&e).await.unwrap());
    let later = UpdateEvent { seq: 10, ..e };
    assert!(s.record_event(&later).await.unwrap());
    let stored = s.events_for_device("a", 10).await.unwrap();
    assert_eq!(
        stored.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![10, 9],
        "newest first"
    );
    assert_eq!(stored[0].kind, "refused");
    assert_eq!(stored[0].reason.as_deref(), Some("bad signature"));
    assert_eq!(s.events_for_device("a", 1).await.unwrap().len(), 1);
    assert!(s.get_device("a").await.unwrap().is_some());
}

async fn streamed_records_are_stored_once_in_sequence_order_and_pruned(f: Fixture) {
    let s = &f.store;
    // Out of order and with a redelivered copy.
    let batch = [
        telemetry("a", 3),
        telemetry("a", 1),
        result("a", 2, "m"),
        telemetry("a", 3),
        result("a", 4, "other"),
        telemetry("b", 1),
    ];
    assert_eq!(s.record_streamed(&batch, 100).await.unwrap(), 5);
    assert_eq!(s.record_streamed(&batch, 101).await.unwrap(), 0);
    let page = Page {
        after_seq: None,
        limit: 10,
    };
    let t = s.telemetry_for_device("a", &page).await.unwrap().unwrap();
    let seqs: Vec<u64> = t.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 3]);
    assert_eq!(t[0]["received_at"], 100);
    let after = Page {
        after_seq: Some(1),
        limit: 10,
    };
    assert_eq!(
        s.telemetry_for_device("a", &after)
            .await
            .unwrap()
            .unwrap()
            .len(),
        1
    );
    // The newest samples, oldest first, bounded by count and device time.
    let seqs = |v: Vec<serde_json::Value>| -> Vec<u64> {
        v.iter().map(|v| v["seq"].as_u64().unwrap()).collect()
    };
    assert_eq!(seqs(s.recent_telemetry("a", 0, 10).await.unwrap()), [1, 3]);
    assert_eq!(seqs(s.recent_telemetry("a", 0, 1).await.unwrap()), [3]);
    assert_eq!(seqs(s.recent_telemetry("a", 1002, 10).await.unwrap()), [3]);
    assert!(s
        .recent_telemetry("nobody", 0, 10)
        .await
        .unwrap()
        .is_empty());
    let r = s
        .results_for_device("a", Some("m"), &page)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["request_id"], "r2");
    assert_eq!(
        s.results_for_device("a", None, &page)
            .await
            .unwrap()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(s.telemetry_for_device("nobody", &page).await.unwrap(), None);
    // The device row exists for a device only seen in telemetry.
    assert_eq!(s.get_device("b").await.unwrap().unwrap().last_seen, 101);
    s.record_streamed(&[telemetry("a", 9)], 500).await.unwrap();
    assert_eq!(s.prune_streamed(200).await.unwrap(), 5);
    assert_eq!(
        s.telemetry_for_device("a", &page)
            .await
            .unwrap()
            .unwrap()
            .len(),
        1
    );
}

async fn tokens_and_the_audit_log_round_trip(f: Fixture) {
    use crate::auth::{generate, Scope};
    let s = &f.store;
    assert!(s.list_tokens().await.unwrap().is_empty());
    let a = generate("ci", Scope::Write, 10);
    let b = generate("dash", Scope::Read, 11);
    s.create_token(&a.record, &a.hash).await.unwrap();
    s.create_token(&b.record, &b.hash).await.unwrap();
    let (found, hash) = s.token_for_auth(&a.record.id).await.unwrap().unwrap();
    assert_eq!((found, hash), (a.record.clone(), a.hash.clone()));
    assert_eq!(s.token_for_auth("0000000000000000").await.unwrap(), None);
    assert_eq!(
        s.list_tokens().await.unwrap(),
        vec![a.record.clone(), b.record.clone()]
    );
    let revoked = s.revoke_token(&b.record.id, 20).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at, Some(20));
    // Revoking again keeps the first time.
    let again = s.revoke_token(&b.record.id, 30).await.unwrap().unwrap();
    assert_eq!(again.revoked_at, Some(20));
    assert_eq!(s.revoke_token("nope", 30).await.unwrap(), None);

    let entry = |action: &str, detail: Option<serde_json::Value>| AuditEntry {
        at: 40,
        token_id: Some(a.record.id.clone()),
        actor: "ci".into(),
        action: action.into(),
        target: "digits@1".into(),
        detail,
    };
    s.record_audit(&entry("model.push", None)).await.unwrap();
    s.record_audit(&entry("deploy", Some(serde_json::json!({"all": true}))))
        .await
        .unwrap();
    let log = s.list_audit(0, 10).await.unwrap();
    assert_eq!(log.len(), 2);
    assert!(log[0].id < log[1].id);
    assert_eq!(log[0].entry, entry("model.push", None));
    assert_eq!(log[1].entry.detail, Some(serde_json::json!({"all": true})));
    let rest = s.list_audit(log[0].id, 10).await.unwrap();
    assert_eq!(rest, vec![log[1].clone()]);
    assert_eq!(s.list_audit(0, 1).await.unwrap().len(), 1);
}

async fn enrollment_filters_paging_and_revocation(f: Fixture) {
    let s = &f.store;
    let enroll = |id: &str, hw: &str, tags: &[(&str, &str)]| Enrollment {
        id: id.into(),
        hardware: hw.into(),
        tags: tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        credential: format!("hash-of-{id}"),
        public_key: None,
    };
    let a = s
        .enroll_device(
            &enroll("a", "rpi4", &[("site", "berlin"), ("room.name", "lab")]),
            10,
        )
        .await
        .unwrap();
    assert_eq!(a.hardware.as_deref(), Some("rpi4"));
    assert_eq!(a.enrolled_at, Some(10));
    assert_eq!(a.tags["room.name"], "lab");
    s.enroll_device(&enroll("b", "jetson", &[("site", "berlin")]), 11)
        .await
        .unwrap();
    s.enroll_device(&enroll("c", "rpi4", &[("site", "paris")]), 12)
        .await
        .unwrap();
    s.record_status(&status("a", 1, true), 13).await.unwrap();
    s.record_status(&status("seen-only", 1, true), 13)
        .await
        .unwrap();
    let find = |tags: &[(&str, &str)],
                hardware: Option<&str>,
                online: Option<bool>,
                after: Option<&str>,
                limit: u32| DeviceFilter {
        tags: tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        hardware: hardware.map(str::to_string),
        online,
        after: after.map(str::to_string),
        limit,
    };
    let ids = |devices: Vec<DeviceRecord>| devices.into_iter().map(|d| d.id).collect::<Vec<_>>();
    let all = s
        .find_devices(&find(&[], None, None, None, 100))
        .await
        .unwrap();
    assert_eq!(ids(all.clone()), vec!["a", "b", "c", "seen-only"]);
    assert!(all[3].tags.is_empty() && all[3].hardware.is_none());
    let q = |f| async move { ids(s.find_devices(&f).await.unwrap()) };
    assert_eq!(
        q(find(&[("site", "berlin")], None, None, None, 100)).await,
        vec!["a", "b"]
    );
    assert_eq!(
        q(find(&[("site", "berlin")], Some("rpi4"), None, None, 100)).await,
        vec!["a"]
    );
    assert_eq!(
        q(find(&[("room.name", "lab")], None, None, None, 100)).await,
        vec!["a"]
    );
    assert_eq!(
        q(find(
            &[("site", "berlin"), ("room.name", "lab")],
            None,
            None,
            None,
            100
        ))
        .await,
        vec!["a"]
    );
    assert!(q(find(&[("site", "rome")], None, None, None, 100))
        .await
        .is_empty());
    assert_eq!(
        q(find(&[], None, Some(true), None, 100)).await,
        vec!["a", "seen-only"]
    );
    assert_eq!(
        q(find(&[], None, Some(false), None, 100)).await,
        vec!["b", "c"]
    );
    assert_eq!(q(find(&[], None, None, Some("a"), 2)).await, vec!["b", "c"]);

    assert_eq!(
        s.device_credential("a").await.unwrap().as_deref(),
        Some("hash-of-a")
    );
    assert_eq!(s.device_credential("seen-only").await.unwrap(), None);
    let revoked = s.revoke_device("a", 20).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at, Some(20));
    assert_eq!(s.device_credential("a").await.unwrap(), None, "revoked");
    assert_eq!(
        s.revoke_device("nobody", 20).await.unwrap().map(|d| d.id),
        None
    );
    let again = s
        .enroll_device(&enroll("a", "rpi5", &[]), 30)
        .await
        .unwrap();
    assert_eq!(
        (again.revoked_at, again.hardware.as_deref()),
        (None, Some("rpi5"))
    );
    assert_eq!(
        s.device_credential("a").await.unwrap().as_deref(),
        Some("hash-of-a")
    );
}

async fn tags_edits_and_model_deletion(f: Fixture) {
    let s = &f.store;
    s.record_status(&status("a", 1, true), 1).await.unwrap();
    let tags: std::collections::BTreeMap<String, String> =
        [("site".to_string(), "rome".to_string())].into();
    let d = s.set_tags("a", &tags).await.unwrap().unwrap();
    assert_eq!(d.tags, tags);
    assert_eq!(
        s.set_tags("nobody", &tags).await.unwrap().map(|d| d.id),
        None
    );

    s.add_model(&model("m", 1)).await.unwrap();
    s.add_model(&model("m", 2)).await.unwrap();
    let mut same_file = model("n", 1);
    same_file.sha256 = model("m", 2).sha256;
    s.add_model(&same_file).await.unwrap();
    s.deploy("m", 1, &Target::Devices(vec!["a".into()]), 2)
        .await
        .unwrap();
    let err = s.delete_model("m", 1).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    let (gone, still_used) = s.delete_model("m", 2).await.unwrap();
    assert_eq!(
        (gone.version, still_used),
        (2, true),
        "n@1 has the same file"
    );
    let (_, still_used) = s.delete_model("n", 1).await.unwrap();
    assert!(!still_used);
    assert!(matches!(
        s.delete_model("m", 2).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        names(&s.list_models().await.unwrap()),
        vec![("m".into(), 1)]
    );
}

async fn rollouts_and_assigned_versions_round_trip(f: Fixture) {
    let s = &f.store;
    s.save_rollout("r1", true, "{\"a\":1}").await.unwrap();
    s.save_rollout("r2", true, "{}").await.unwrap();
    s.save_rollout("r1", false, "{\"a\":2}").await.unwrap();
    assert_eq!(
        s.list_rollouts().await.unwrap(),
        vec![
            ("r1".to_string(), false, "{\"a\":2}".to_string()),
            ("r2".to_string(), true, "{}".to_string())
        ]
    );
    s.add_model(&model("m", 1)).await.unwrap();
    s.add_model(&model("m", 2)).await.unwrap();
    s.deploy("m", 1, &Target::All, 1).await.unwrap();
    s.deploy("m", 2, &Target::Devices(vec!["b".into()]), 1)
        .await
        .unwrap();
    let versions = s
        .assigned_versions("m", &["a".into(), "b".into()])
        .await
        .unwrap();
    assert_eq!(versions["a"], Some(1));
    assert_eq!(versions["b"], Some(2));
    let none = s.assigned_versions("other", &["a".into()]).await.unwrap();
    assert_eq!(none["a"], None);
}

async fn device_keys_are_set_once_by_devices_and_replaced_by_operators(f: Fixture) {
    let s = &f.store;
    let (k1, k2) = ("11".repeat(32), "22".repeat(32));
    // Only for a device the store has.
    let none = s
        .set_device_key("new", &k1, KeyWrite::FirstOnly)
        .await
        .unwrap();
    assert_eq!(none, None);
    s.record_status(&status("new", 1, true), 1).await.unwrap();
    // First use on an open fleet.
    let set = s
        .set_device_key("new", &k1, KeyWrite::FirstOnly)
        .await
        .unwrap();
    assert_eq!(set.as_deref(), Some(k1.as_str()));
    assert_eq!(
        s.get_device("new").await.unwrap().unwrap().public_key,
        Some(k1.clone())
    );
    // A device cannot replace its key.
    let kept = s
        .set_device_key("new", &k2, KeyWrite::FirstOnly)
        .await
        .unwrap();
    assert_eq!(kept.as_deref(), Some(k1.as_str()));
    // An operator can, but only for a device that exists.
    let replaced = s
        .set_device_key("new", &k2, KeyWrite::Operator)
        .await
        .unwrap();
    assert_eq!(replaced.as_deref(), Some(k2.as_str()));
    assert_eq!(
        s.set_device_key("nobody", &k2, KeyWrite::Operator)
            .await
            .unwrap(),
        None
    );
    // Enrolling again is a rotation: the old key goes, or the new one is given.
    let enroll = |key: Option<String>| Enrollment {
        id: "new".into(),
        hardware: "rpi4".into(),
        tags: Default::default(),
        credential: "hash".into(),
        public_key: key,
    };
    let d = s.enroll_device(&enroll(None), 8).await.unwrap();
    assert_eq!(d.public_key, None);
    let d = s.enroll_device(&enroll(Some(k1.clone())), 9).await.unwrap();
    assert_eq!(d.public_key, Some(k1));
}

/// Runs each test function against both backends.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::sqlite().await).await
            })*
        }
        mod on_postgres {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::postgres().await).await
            })*
        }
    };
}

suite!(
    status_is_applied_in_sequence_order_and_will_marks_offline,
    device_assignments_override_fleet_wide_ones,
    model_versions_are_immutable,
    attachments_only_before_deployment,
    desired_versions_increase_per_device,
    events_are_stored_once,
    streamed_records_are_stored_once_in_sequence_order_and_pruned,
    tokens_and_the_audit_log_round_trip,
    enrollment_filters_paging_and_revocation,
    tags_edits_and_model_deletion,
    rollouts_and_assigned_versions_round_trip,
    device_keys_are_set_once_by_devices_and_replaced_by_operators,
);

// More of the suite, one file per part: agent releases; shadow and A/B
// settings; drift references; what replicas share (sessions, arrivals).
mod agents;
mod quality;
mod references;
mod sessions;

#[tokio::test]
async fn sqlite_reopening_does_not_rerun_migrations() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let path = path.to_str().unwrap();
    let s = Store::open(path).await.unwrap();
    s.add_model(&model("m", 1)).await.unwrap();
    drop(s);
    let s = Store::open(path).await.unwrap();
    assert_eq!(s.list_models().await.unwrap().len(), 1);
}

#[tokio::test]
async fn postgres_servers_starting_together_migrate_once() {
    let url = fresh_postgres_schema().await;
    let opened = futures_util::future::join_all((0..4).map(|_| Store::open(&url))).await;
    for s in &opened {
        assert!(s.is_ok(), "{:?}", s.as_ref().err());
    }
    opened[0]
        .as_ref()
        .unwrap()
        .add_model(&model("m", 1))
        .await
        .unwrap();
    let again = Store::open(&url).await.unwrap();
    assert_eq!(again.list_models().await.unwrap().len(), 1);
}

#[tokio::test]
async fn postgres_unreachable_is_a_clear_start_up_error() {
    // Port 9 (discard) has no PostgreSQL; the password stays out of it.
    let err = Store::open("postgres://fleet:secret@127.0.0.1:9/fleet")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot open database postgres://fleet@127.0.0.1:9/fleet"),
        "{err}"
    );
    assert!(!err.contains("secret"), "{err}");
}
